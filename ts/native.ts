// Finds and loads the native addon (build/Release/blip3o.node) and types what it exposes
// (contract section 4). Loading is lazy, so that the pure parts of the package (schedules, option
// validation, the tokenizer) work without a built addon.

import { existsSync } from 'node:fs';
import path from 'node:path';
import { AddonLoadError } from './errors';

export type DeviceRequest = 'auto' | 'cpu' | 'cuda';
export type Device = 'cpu' | 'cuda';
export type DtypeRequest = 'auto' | 'float32' | 'bfloat16' | 'float16';
export type Dtype = 'float32' | 'bfloat16' | 'float16';
export type GenerationStage = 'condition' | 'dit' | 'decoder' | 'vae';

export interface NativeRuntimeInfo {
  libtorch: string;
  cudaBuilt: boolean;
  cudaDevices: number;
  defaultThreads: number;
}

export interface NativeJob<T> {
  id: number;
  promise: Promise<T>;
}

export interface NativeNegativeRequest {
  ids: number[];
  seed: number;
  ditSigmas: number[];
  ditTimesteps: number[];
  ditCfg: number;
  /** Share of fresh noise in each DiT step, 0 to 1 (0: the deterministic Euler step). */
  ditEta: number;
}

export interface NativeGenerateRequest {
  prompts: number[][];
  seeds: number[];
  ditSigmas: number[];
  ditTimesteps: number[];
  ditCfg: number;
  /** Share of fresh noise in each DiT step, 0 to 1 (0: the deterministic Euler step). */
  ditEta: number;
  decoderSigmas: number[];
  decoderTimesteps: number[];
  decoderInitSigma: number;
  decoderCfg: number;
}

export interface NativeGenerateTimings {
  conditionMs: number;
  ditMs: number;
  decoderMs: number;
  vaeMs: number;
  totalMs: number;
  /** Wall time inside TorchScript calls, per stage (concurrent calls of a batch counted once). */
  conditionCallMs: number;
  ditCallMs: number;
  decoderCallMs: number;
  vaeCallMs: number;
  /** Wall time of every DiT / decoder step. */
  ditStepMs: number[];
  decoderStepMs: number[];
}

export interface NativeGenerateResult {
  /** count * height * width * 3 bytes, uint8 HWC per sample, samples back to back. */
  pixels: Buffer;
  count: number;
  width: number;
  height: number;
  timings: NativeGenerateTimings;
}

export interface NativeDescribeRequest {
  ids: number[];
  pixels: Float32Array;
  height: number;
  width: number;
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  seed: number;
  stopIds: number[];
}

export interface NativeDescribeResult {
  tokens: number[];
  stopReason: 'stop' | 'length';
  promptTokens: number;
  prefillMs: number;
  decodeMs: number;
}

export interface NativeModel {
  readonly manifest: string;
  readonly bundleDir: string;
  readonly device: Device;
  readonly dtype: Dtype;
  readonly threads: number;
  /** Whether the DiT and decode loops replay CUDA graphs, in words (changes as shapes are captured). */
  readonly cudaGraphs: CudaGraphStatus;
  prepareNegative(req: NativeNegativeRequest): NativeJob<void>;
  generate(
    req: NativeGenerateRequest,
    onProgress?: (stage: GenerationStage, step: number, total: number) => void,
  ): NativeJob<NativeGenerateResult>;
  describe(req: NativeDescribeRequest, onToken?: (id: number) => void): NativeJob<NativeDescribeResult>;
  cancel(jobId: number): void;
  dispose(): Promise<void>;
}

export interface NativeLoadOptions {
  device: DeviceRequest;
  dtype: DtypeRequest;
  /** 0 = the runtime's default. */
  threads: number;
  cudaGraphs: boolean;
}

/**
 * Per loop: 'off (cpu)', 'off (cudaGraphs: false)', 'graph (captured at first use)', 'graph (captured
 * for 2 rows)' (DiT) / 'graph (captured for 2048 cache positions)' (decode), or 'eager (<why capture
 * failed>)'.
 */
export interface CudaGraphStatus {
  dit: string;
  decode: string;
}

export interface NativeBinding {
  runtimeInfo(): NativeRuntimeInfo;
  load(bundleDir: string, opts: NativeLoadOptions): Promise<NativeModel>;
}

/** The package root: one level above this file, both for ts/native.ts and dist/native.js. */
export const packageRoot = path.resolve(__dirname, '..');

const addonCandidates = [
  path.join(packageRoot, 'build', 'Release', 'blip3o.node'),
  path.join(packageRoot, 'build', 'Debug', 'blip3o.node'),
];

let binding: NativeBinding | undefined;

/** Loads the addon once; throws AddonLoadError when it is not built or cannot be loaded. */
export function getBinding(): NativeBinding {
  if (binding !== undefined) return binding;
  const addonPath = addonCandidates.find((candidate) => existsSync(candidate));
  if (addonPath === undefined) {
    throw new AddonLoadError(
      `blip3o: native addon not built; run npm run build (looked for ${addonCandidates[0]})`,
    );
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    binding = require(addonPath) as NativeBinding;
  } catch (err) {
    // Typically libtorch (or a library it needs) is missing from the loader path.
    const reason = err instanceof Error ? err.message.split('\n')[0] : String(err);
    throw new AddonLoadError(`blip3o: could not load the native addon ${addonPath}: ${reason}`, {
      cause: err,
    });
  }
  return binding;
}
