// The benchmark's client of the Python reference (bench/reference.py --serve): one long-lived Python
// process, one JSON request per line on its stdin, one JSON answer per line on its stdout.

import type { NativeGenerateTimings } from './native';
import { PythonServer } from './python-server';

/** Per-stage wall ms, ms inside the TorchScript calls, and per-step wall ms, named as the runtime's. */
export type ReferenceTimings = NativeGenerateTimings;

export interface ReferenceImage {
  width: number;
  height: number;
  /** HWC uint8. */
  pixels: Buffer;
  timings: ReferenceTimings;
}

export interface ReferenceLoad {
  bundle: string;
  device: string;
  dtype: string;
  /** 0 = torch's default. */
  threads: number;
  negativeIds: number[];
}

export interface ReferenceSettings {
  ids: number[];
  seed: number;
  steps: number;
  cfg: number;
  decoderSteps: number;
  decoderCfg: number;
}

export class PythonReference {
  private constructor(private readonly server: PythonServer) {}

  /** Starts `bash models/run-python.sh -m bench.reference --serve` (a Python with torch). */
  static start(): PythonReference {
    return new PythonReference(PythonServer.start('bench.reference', 'the Python reference'));
  }

  /** Loads the bundle and computes the negative features: { loadMs, threads, torch }. */
  load(req: ReferenceLoad): Promise<{ loadMs: number; threads: number; torch: string }> {
    return this.server.request({ op: 'load', ...req });
  }

  async generate(req: ReferenceSettings): Promise<ReferenceImage> {
    const res = await this.server.request<Omit<ReferenceImage, 'pixels'> & { pixels: string }>({ op: 'generate', ...req });
    return { ...res, pixels: Buffer.from(res.pixels, 'base64') };
  }

  /** Greedy decoding of `tokens` tokens after a `promptTokens` prompt, in a cache of `cacheLength`. */
  decode(req: { promptTokens: number; tokens: number; cacheLength: number }): Promise<{ decodeMs: number; tokens: number }> {
    return this.server.request({ op: 'decode', ...req });
  }

  stats(): Promise<{ peakRssMb: number; peakCudaMb: number | null }> {
    return this.server.request({ op: 'stats' });
  }

  /** Ends the process (closing stdin ends its loop). */
  close(): Promise<void> {
    return this.server.close();
  }
}
