// The benchmark's client of the Python reference (bench/reference.py --serve): one long-lived Python
// process, one JSON request per line on its stdin, one JSON answer per line on its stdout.

import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { packageRoot, type NativeGenerateTimings } from './native';

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
  private readonly lines: AsyncIterator<string>;
  private stderr = '';

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    // A process that died shows as the end of its stdout; request() reports its stderr then.
    child.on('error', (err) => (this.stderr += `\n${err.message}`));
    child.stdin.on('error', () => undefined);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-4000);
    });
    this.lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }

  /** Starts `bash models/run-python.sh -m bench.reference --serve` (a Python with torch). */
  static start(): PythonReference {
    const script = path.join(packageRoot, 'models', 'run-python.sh');
    const child = spawn('bash', [script, '-m', 'bench.reference', '--serve'], { cwd: packageRoot, stdio: 'pipe' });
    return new PythonReference(child);
  }

  /** Loads the bundle and computes the negative features: { loadMs, threads, torch }. */
  load(req: ReferenceLoad): Promise<{ loadMs: number; threads: number; torch: string }> {
    return this.request({ op: 'load', ...req });
  }

  async generate(req: ReferenceSettings): Promise<ReferenceImage> {
    const res = await this.request<Omit<ReferenceImage, 'pixels'> & { pixels: string }>({ op: 'generate', ...req });
    return { ...res, pixels: Buffer.from(res.pixels, 'base64') };
  }

  stats(): Promise<{ peakRssMb: number; peakCudaMb: number | null }> {
    return this.request({ op: 'stats' });
  }

  /** Ends the process (closing stdin ends its loop). */
  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.stdin.end();
    await exited;
  }

  private async request<T>(req: object): Promise<T> {
    this.child.stdin.write(`${JSON.stringify(req)}\n`);
    const next = await this.lines.next();
    if (next.done === true) {
      await new Promise((resolve) => (this.child.exitCode === null ? this.child.once('exit', resolve) : resolve(null)));
      throw new Error(`the Python reference exited (${this.child.exitCode}): ${this.stderr.trim().split('\n').pop() ?? ''}`);
    }
    const res = JSON.parse(next.value) as T & { error?: string };
    if (res.error !== undefined) throw new Error(`the Python reference failed: ${res.error}`);
    return res;
  }
}
