// The loaded model: text-to-image generation and image understanding over one native model.
// TypeScript owns prompts, templates, schedules, option checks and image I/O; every denoising and
// decoding loop runs natively as one job on the model's own executor thread.

import { stat } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Blip3oRuntimeError, BundleError, DisposedError, InvalidArgumentError, abortReason, fromNativeError } from './errors';
import { encodeImage, loadVisionPixels, type ImageInput } from './image';
import { parseManifest, type BundleManifest, type BundleSource } from './manifest';
import {
  getBinding,
  packageRoot,
  type CudaGraphStatus,
  type Device,
  type Dtype,
  type NativeDescribeResult,
  type NativeGenerateTimings,
  type NativeJob,
  type NativeModel,
  type NativeRuntimeInfo,
} from './native';
import {
  defaultMaxBatch,
  defaultMaxQueue,
  invalidOption,
  maxSeed,
  randomSeed,
  validateDescribeOptions,
  validateGenerateOptions,
  validateLoadOptions,
  validatePrompts,
  validateQuestion,
  type DescribeOptions,
  type GenerateOptions,
  type ImageFormat,
  type LoadOptions,
} from './options';
import { GenerateQueue, type QueueLimits } from './queue';
import { eulerDiscreteSchedule, flowMatchSigmas } from './schedules';
import { PromptTokenizer } from './tokenizer';

/** The bundle shipped with the package: the tiny model trained on the shapes world. */
export const bundledModelDir = path.join(packageRoot, 'models', 'tiny');

/**
 * The native stage timings (conditionMs .. vaeMs, the *CallMs spent inside the TorchScript modules with
 * the concurrent calls of a batch counted once, ditStepMs and decoderStepMs), plus the image encoding;
 * totalMs is the whole call, from validation to encoded images.
 */
export interface GenerateTimings extends NativeGenerateTimings {
  /** PNG/JPEG/WebP encoding. */
  encodeMs: number;
}

export interface GenerateResult {
  /** The encoded image (PNG by default). */
  image: Buffer;
  format: ImageFormat;
  width: number;
  height: number;
  /** The seed of this sample: generating its prompt alone with this seed gives the same bytes (on CUDA,
   * where a batch is one call, the same image within float rounding). */
  seed: number;
  /** Timings of the call that produced the sample (shared by the samples of a batch). */
  timings: GenerateTimings;
}

/** describeDetailed's answer: the text and what it took. */
export interface DescribeDetails {
  text: string;
  /** Prompt tokens (template, question and image tokens). */
  promptTokens: number;
  /** Tokens of the answer (a stop token not counted). */
  generatedTokens: number;
  /** 'stop': the model ended the answer; 'length': maxTokens (or the context) ended it. */
  stopReason: 'stop' | 'length';
  /** Embedding, image encoding and prefill of the prompt. */
  prefillMs: number;
  /** The token-by-token loop. */
  decodeMs: number;
}

export interface ModelInfo {
  name: string;
  dir: string;
  preset: string;
  formatVersion: number;
  device: Device;
  dtype: Dtype;
  threads: number;
  /** Whether the DiT and text decode loops replay CUDA graphs, and why not when they do not. */
  cudaGraphs: CudaGraphStatus;
  image: { width: number; height: number };
  context: number;
  libtorch: string;
  defaults: { steps: number; cfg: number; decoderSteps: number; decoderCfg: number; shift: number; eta: number };
  /** Where an imported bundle's weights came from (blip3o import); absent for exported ones. */
  source?: BundleSource;
}

export interface RuntimeInfo extends NativeRuntimeInfo {
  /** This package's version. */
  version: string;
}

/** libtorch version, CUDA support and default threads of the native runtime. */
export function runtimeInfo(): RuntimeInfo {
  const info = getBinding().runtimeInfo();
  return { ...info, version: packageVersion() };
}

let cachedVersion: string | undefined;

/** The version in the package's package.json. */
export function packageVersion(): string {
  if (cachedVersion === undefined) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    cachedVersion = (require(path.join(packageRoot, 'package.json')) as { version: string }).version;
  }
  return cachedVersion;
}

/**
 * Loads a bundle directory (default: the bundled tiny model), validates it, and prepares the
 * negative condition of the decoder's guidance once.
 */
export async function loadModel(dir?: string, options?: LoadOptions): Promise<Blip3oModel>;
export async function loadModel(options?: LoadOptions): Promise<Blip3oModel>;
export async function loadModel(dirOrOptions?: string | LoadOptions, maybeOptions?: LoadOptions): Promise<Blip3oModel> {
  let dir: string | undefined;
  let options: unknown = maybeOptions;
  if (typeof dirOrOptions === 'string') {
    if (dirOrOptions.length === 0) throw invalidOption('dir', 'non-empty string', dirOrOptions);
    dir = dirOrOptions;
  } else if (dirOrOptions !== undefined) {
    if (maybeOptions !== undefined) throw invalidOption('dir', 'string', dirOrOptions);
    options = dirOrOptions;
  }
  const loadOptions = validateLoadOptions(options);
  const bundleDir = path.resolve(dir ?? bundledModelDir);

  let isDirectory: boolean;
  try {
    isDirectory = (await stat(bundleDir)).isDirectory();
  } catch {
    throw new BundleError(`bundle directory not found: ${bundleDir}`);
  }
  if (!isDirectory) throw new BundleError(`not a bundle directory: ${bundleDir}`);

  const binding = getBinding();
  let native: NativeModel;
  try {
    const { device, dtype, threads, cudaGraphs } = loadOptions;
    native = await binding.load(bundleDir, { device, dtype, threads, cudaGraphs });
  } catch (err) {
    throw fromNativeError(err);
  }
  try {
    const manifest = parseManifest(native.manifest, native.bundleDir);
    const tokenizer = await PromptTokenizer.load(
      native.bundleDir,
      { tokenizer: manifest.files.tokenizer.path, tokenizerConfig: manifest.files.tokenizerConfig.path },
      manifest.templates,
    );
    const dit = manifest.sampler.dit;
    const schedule = flowMatchSigmas(dit.steps, { shift: dit.shift, integerTimesteps: dit.integerTimesteps });
    await native.prepareNegative({
      ids: tokenizer.negativeIds(),
      seed: manifest.sampler.negativeSeed,
      ditSigmas: schedule.sigmas,
      ditTimesteps: schedule.timesteps,
      ditCfg: dit.cfg,
      ditEta: dit.eta,
    }).promise;
    return new Blip3oModel(native, manifest, tokenizer, binding.runtimeInfo().libtorch, {
      maxBatch: loadOptions.maxBatch,
      maxQueue: loadOptions.maxQueue,
    });
  } catch (err) {
    await native.dispose().catch(() => undefined);
    throw fromNativeError(err);
  }
}

/** Starts a native job unless `signal` has aborted already; errors come back typed. */
function startJob<T>(start: () => NativeJob<T>, signal: AbortSignal | undefined): NativeJob<T> {
  if (signal?.aborted) throw abortReason(signal);
  try {
    return start();
  } catch (err) {
    throw fromNativeError(err, signal);
  }
}

/** Cancels a job; a model disposed meanwhile has cancelled it already. */
function cancelQuietly(model: NativeModel, jobId: number): void {
  try {
    model.cancel(jobId);
  } catch {
    // Disposed: every job was rejected by dispose itself.
  }
}

export class Blip3oModel {
  private disposed = false;
  private disposing: Promise<void> | undefined;
  private readonly queue: GenerateQueue;

  /** Use loadModel(). */
  constructor(
    private readonly native: NativeModel,
    /** The bundle's validated manifest. */
    readonly manifest: BundleManifest,
    private readonly tokenizer: PromptTokenizer,
    private readonly libtorch: string,
    limits: QueueLimits = { maxBatch: defaultMaxBatch, maxQueue: defaultMaxQueue },
  ) {
    this.queue = new GenerateQueue(native, limits);
  }

  /** Generates one image for a prompt. */
  generate(prompt: string, options?: GenerateOptions): Promise<GenerateResult>;
  /** Generates one image per prompt, with seeds seed, seed + 1, ...; each sample equals generating it alone
   * (on CPU byte for byte; on CUDA within float rounding). */
  generate(prompts: string[], options?: GenerateOptions): Promise<GenerateResult[]>;
  async generate(prompt: string | string[], options?: GenerateOptions): Promise<GenerateResult | GenerateResult[]> {
    const started = performance.now();
    this.ensureOpen();
    const { prompts, batch } = validatePrompts(prompt);
    const opts = validateGenerateOptions(options, prompts.length);
    if (opts.signal?.aborted) throw abortReason(opts.signal);

    const { backbone, sampler, image } = this.manifest;
    const ids = prompts.map((text, index) => {
      const tokens = this.tokenizer.generationIds(text);
      if (tokens.length + backbone.queryTokens > backbone.context) {
        const which = batch ? `prompt[${index}]` : 'prompt';
        throw new InvalidArgumentError(
          `${which} is too long: ${tokens.length} tokens with the template, plus ${backbone.queryTokens} query tokens, exceed the model's context of ${backbone.context} tokens`,
        );
      }
      return tokens;
    });
    const firstSeed = opts.seed ?? randomSeed(maxSeed - (prompts.length - 1));
    const seeds = prompts.map((_, index) => firstSeed + index);
    const dit = flowMatchSigmas(opts.steps ?? sampler.dit.steps, { shift: sampler.dit.shift, integerTimesteps: sampler.dit.integerTimesteps });
    const decoder = eulerDiscreteSchedule(opts.decoderSteps ?? sampler.decoder.steps, sampler.decoder);

    const onProgress = opts.onProgress;
    // Through the queue: calls made together (or while a batch runs) with these settings share a batch.
    const result = await this.queue.submit({
      prompts: ids,
      seeds,
      settings: {
        ditSigmas: dit.sigmas,
        ditTimesteps: dit.timesteps,
        ditCfg: opts.cfg ?? sampler.dit.cfg,
        ditEta: sampler.dit.eta,
        decoderSigmas: decoder.sigmas,
        decoderTimesteps: decoder.timesteps,
        decoderInitSigma: decoder.initNoiseSigma,
        decoderCfg: opts.decoderCfg ?? sampler.decoder.cfg,
      },
      signal: opts.signal,
      onProgress: onProgress && ((stage, step, steps) => onProgress({ stage, step, steps })),
    });

    const { width, height, count } = result;
    if (count !== prompts.length || width !== image.width || height !== image.height) {
      throw new Blip3oRuntimeError(
        `the native pipeline returned ${count} images of ${width}x${height}, expected ${prompts.length} of ${image.width}x${image.height}`,
      );
    }
    const encodeStarted = performance.now();
    const sampleBytes = width * height * 3;
    const images = await Promise.all(
      seeds.map((_, index) =>
        encodeImage(result.pixels.subarray(index * sampleBytes, (index + 1) * sampleBytes), width, height, opts.format),
      ),
    );
    const finished = performance.now();
    const timings: GenerateTimings = {
      ...result.timings,
      encodeMs: finished - encodeStarted,
      totalMs: finished - started,
    };
    const samples = images.map((bytes, index) => ({
      image: bytes,
      format: opts.format,
      width,
      height,
      seed: seeds[index],
      timings: { ...timings, ditStepMs: [...timings.ditStepMs], decoderStepMs: [...timings.decoderStepMs] },
    }));
    return batch ? samples : samples[0];
  }

  /** Answers a question about an image (default: the bundle's default question, "Describe this image."). */
  describe(image: ImageInput, question?: string, options?: DescribeOptions): Promise<string>;
  describe(image: ImageInput, options?: DescribeOptions): Promise<string>;
  async describe(image: ImageInput, question?: string | DescribeOptions, options?: DescribeOptions): Promise<string> {
    let text = '';
    for await (const piece of this.streamAnswer(image, question, options, 'describe')) text += piece;
    return text;
  }

  /** Like describe, with the token counts and the time of the prompt's prefill and of the decode loop. */
  describeDetailed(image: ImageInput, question?: string, options?: DescribeOptions): Promise<DescribeDetails>;
  describeDetailed(image: ImageInput, options?: DescribeOptions): Promise<DescribeDetails>;
  async describeDetailed(image: ImageInput, question?: string | DescribeOptions, options?: DescribeOptions): Promise<DescribeDetails> {
    let details: DescribeDetails | undefined;
    for await (const _ of this.detailedStream(image, question, options, 'describeDetailed', (d) => (details = d)));
    return details!;
  }

  /**
   * Like describe, as text pieces while they are generated (each piece is complete UTF-8; the
   * pieces joined equal describe's text). Leaving the loop early cancels the native job.
   */
  describeStream(image: ImageInput, question?: string, options?: DescribeOptions): AsyncIterable<string>;
  describeStream(image: ImageInput, options?: DescribeOptions): AsyncIterable<string>;
  describeStream(image: ImageInput, question?: string | DescribeOptions, options?: DescribeOptions): AsyncIterable<string> {
    return this.streamAnswer(image, question, options, 'describeStream');
  }

  /**
   * Like describeStream; when the answer is complete, before the iteration ends, `onDetails` gets
   * what describeDetailed resolves to (token counts, stop reason, times). Used by the HTTP server.
   */
  async *describeStreamDetailed(
    image: ImageInput,
    question: string | undefined,
    options: DescribeOptions | undefined,
    onDetails: (details: DescribeDetails) => void,
  ): AsyncGenerator<string, void, undefined> {
    yield* this.detailedStream(image, question, options, 'describeStreamDetailed', onDetails);
  }

  private async *detailedStream(
    image: ImageInput,
    question: string | DescribeOptions | undefined,
    options: DescribeOptions | undefined,
    method: string,
    onDetails: (details: DescribeDetails) => void,
  ): AsyncGenerator<string, void, undefined> {
    let text = '';
    let stats: NativeDescribeResult | undefined;
    for await (const piece of this.streamAnswer(image, question, options, method, (r) => (stats = r))) {
      text += piece;
      yield piece;
    }
    const r = stats!;
    onDetails({
      text,
      promptTokens: r.promptTokens,
      generatedTokens: r.tokens.length,
      stopReason: r.stopReason,
      prefillMs: r.prefillMs,
      decodeMs: r.decodeMs,
    });
  }

  private async *streamAnswer(
    image: ImageInput,
    questionOrOptions: string | DescribeOptions | undefined,
    maybeOptions: DescribeOptions | undefined,
    call: string,
    onResult?: (result: NativeDescribeResult) => void,
  ): AsyncGenerator<string, void, undefined> {
    this.ensureOpen();
    let question: unknown = questionOrOptions;
    let options: unknown = maybeOptions;
    if (typeof questionOrOptions === 'object' && questionOrOptions !== null && maybeOptions === undefined) {
      question = undefined;
      options = questionOrOptions;
    }
    const text = validateQuestion(question) ?? this.manifest.templates.defaultQuestion;
    const opts = validateDescribeOptions(options, call);
    if (opts.signal?.aborted) throw abortReason(opts.signal);

    const { backbone, tokens: specialTokens } = this.manifest;
    const vision = await loadVisionPixels(image, this.manifest.vision, { limitInputPixels: opts.limitInputPixels });
    const ids = this.tokenizer.understandingIds(text, vision.tokens, specialTokens.imagePad);
    if (ids.length + 1 > backbone.context) {
      throw new InvalidArgumentError(
        `the question does not fit the model's context: the prompt is ${ids.length} tokens (${vision.tokens} of them for the image) and the context is ${backbone.context} tokens, with none left for the answer`,
      );
    }
    this.ensureOpen();

    const decoder = this.tokenizer.streamDecoder();
    const received: number[] = [];
    let consumed = 0;
    let settled = false;
    let wake: (() => void) | undefined;
    const signal = opts.signal;
    const job = startJob(
      () =>
        this.native.describe(
          {
            ids,
            pixels: vision.pixels,
            height: vision.height,
            width: vision.width,
            maxTokens: Math.min(opts.maxTokens, backbone.context - ids.length),
            temperature: opts.temperature,
            topK: opts.topK,
            topP: opts.topP,
            seed: opts.seed ?? randomSeed(),
            stopIds: specialTokens.stop,
          },
          (id) => {
            if (settled) return;
            received.push(id);
            wake?.();
          },
        ),
      signal,
    );
    let failure: unknown;
    const done = job.promise.then(
      (result) => {
        // The result's token list is authoritative: token callbacks still in flight are dropped.
        settled = true;
        onResult?.(result);
        received.splice(0, received.length, ...result.tokens);
        wake?.();
      },
      (err: unknown) => {
        settled = true;
        failure = err;
        wake?.();
      },
    );
    const onAbort = (): void => cancelQuietly(this.native, job.id);
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (;;) {
        while (consumed < received.length) {
          const piece = decoder.push(received[consumed++]);
          if (piece.length > 0) yield piece;
        }
        if (settled) break;
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = undefined;
      }
      if (failure !== undefined) throw fromNativeError(failure, signal);
      const rest = decoder.flush();
      if (rest.length > 0) yield rest;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (!settled) {
        // The consumer left the loop early (or threw): stop the job and wait for it to end.
        cancelQuietly(this.native, job.id);
        await done;
      }
    }
  }

  /** Bundle, device and runtime facts of this model. */
  info(): ModelInfo {
    this.ensureOpen();
    const { manifest, native } = this;
    return {
      name: manifest.name,
      dir: native.bundleDir,
      preset: manifest.preset,
      formatVersion: manifest.formatVersion,
      device: native.device,
      dtype: native.dtype,
      threads: native.threads,
      cudaGraphs: native.cudaGraphs,
      image: { width: manifest.image.width, height: manifest.image.height },
      context: manifest.backbone.context,
      libtorch: this.libtorch,
      defaults: {
        steps: manifest.sampler.dit.steps,
        cfg: manifest.sampler.dit.cfg,
        decoderSteps: manifest.sampler.decoder.steps,
        decoderCfg: manifest.sampler.decoder.cfg,
        shift: manifest.sampler.dit.shift,
        eta: manifest.sampler.dit.eta,
      },
      ...(manifest.source === undefined ? {} : { source: manifest.source }),
    };
  }

  /** True once dispose() was called. */
  get isDisposed(): boolean {
    return this.disposed;
  }

  /**
   * Frees the native model now (not at garbage collection). Running and queued jobs reject with
   * DisposedError; later calls too. Idempotent.
   */
  dispose(): Promise<void> {
    this.disposed = true;
    this.queue.close();
    this.disposing ??= this.native.dispose().catch((err: unknown) => {
      throw fromNativeError(err);
    });
    return this.disposing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.dispose();
  }

  private ensureOpen(): void {
    if (this.disposed) throw new DisposedError();
  }
}
