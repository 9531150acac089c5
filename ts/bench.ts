// The benchmark behind `blip3o bench`: cold load, per-stage and per-step times, the runtime's own
// overhead, end-to-end latency against the Python reference (bench/reference.py, same bundle, token
// ids, seeds and settings, runs alternating), batch and request-queue throughput, understanding
// prefill/decode speed and peak memory. It measures; bench-report.ts formats and writes.

import { fork } from 'node:child_process';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import sharp from 'sharp';
import type { ColdLoad } from './bench-load';
import { PythonReference, type ReferenceTimings } from './bench-reference';
import { machineInfo, type MachineInfo } from './bench-report';
import { InvalidArgumentError } from './errors';
import { bundledModelDir, loadModel, packageVersion, runtimeInfo, type Blip3oModel, type DescribeDetails, type GenerateResult } from './model';
import type { DeviceRequest, DtypeRequest } from './native';
import { validateGenerateOptions, validateLoadOptions } from './options';
import { PromptTokenizer } from './tokenizer';

export interface BenchOptions {
  /** Bundle directory (default: the bundled model). */
  model?: string;
  device?: DeviceRequest;
  dtype?: DtypeRequest;
  /** CPU threads of both sides; 0 (default) = each side's default (the runtime's, torch's). */
  threads?: number;
  /** The runtime's CUDA graphs (loadModel's cudaGraphs; default true). */
  cudaGraphs?: boolean;
  /** Measured end-to-end runs per side (default 10; 2 with quick). */
  runs?: number;
  /** DiT / decoder steps (default: the bundle's). */
  steps?: number;
  decoderSteps?: number;
  /** Run the Python reference (default true). */
  python?: boolean;
  /** Measure batch and request-queue throughput (default true; at real size they take minutes). */
  throughput?: boolean;
  /** Few runs and tokens, one repetition: for tests. */
  quick?: boolean;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
}

/** A native time, the Python reference's, and native / Python (below 1: the runtime is faster). */
export interface Comparison {
  nativeMs: number | null;
  pythonMs: number | null;
  ratio: number | null;
}

export type Stage = 'condition' | 'dit' | 'decoder' | 'vae';

export interface BenchReport {
  version: 1;
  date: string;
  machine: MachineInfo;
  runtime: { blip3o: string; libtorch: string; torch: string | null; cudaBuilt: boolean };
  settings: {
    model: string;
    bundle: string;
    device: string;
    dtype: string;
    threads: { native: number; python: number | null };
    runs: number;
    warmupRuns: number;
    steps: number;
    cfg: number;
    /** The bundle's DiT sampler eta (0: deterministic Euler). */
    eta: number;
    decoderSteps: number;
    decoderCfg: number;
    quick: boolean;
    python: boolean;
    throughput: boolean;
    prompt: string;
    seed: number;
  };
  /**
   * In fresh processes: loadModel (native, after the addon and libtorch loaded: addonMs) and the
   * reference's torch.jit.load + negative features (after `import torch`); coldProcessMs: from the
   * native process start to the loaded model.
   */
  load: { coldMs: number; addonMs: number; coldProcessMs: number; pythonMs: number | null };
  /** Median wall time of each stage. */
  stages: Record<Stage, Comparison>;
  /** Median wall time of one step of each loop. */
  steps: { dit: Comparison; decoder: Comparison };
  /** Median time per step spent outside the TorchScript calls (loop time minus call time). */
  overheadPerStepMs: { dit: Comparison; decoder: Comparison };
  /** (loop time - time inside calls) / loop time over the DiT and decoder loops of the native runs. */
  overheadFraction: number;
  pythonOverheadFraction: number | null;
  /** Medians to raw pixels (native: generate() minus image encoding); p50/p90 of generate() with PNG. */
  endToEnd: Comparison & { p50Ms: number; p90Ms: number; pythonP50Ms: number | null; pythonP90Ms: number | null };
  /** Largest |native - Python| over every pixel channel of every measured seed (0..255). */
  maxPixelDiff: number | null;
  images: { native: { width: number; height: number }; python: { width: number; height: number } | null };
  /** Empty, and queue null, when throughput was not measured. */
  throughput: { batch: number; ms: number; imagesPerSec: number }[];
  /** rounds: the throughput and queue times are medians of this many rounds; speedup is the median of
   * the queue rounds' own ratios (roundSpeedups), each round timing both orders alternately. */
  queue: { requests: number; rounds: number; concurrentMs: number; sequentialMs: number; speedup: number; roundSpeedups: number[]; identical: boolean } | null;
  understanding: { promptTokens: number; generatedTokens: number; prefillMs: number; decodeMs: number; decodeTokensPerSec: number };
  memory: { peakRssMb: number; pythonPeakRssMb: number | null; peakCudaMb: number | null; pythonPeakCudaMb: number | null };
}

/** What both sides time: per stage (wall and inside the TorchScript calls), per step, in total. */
type Timings = ReferenceTimings;

const prompt = 'a large red circle at the center on a white background';
const prompts = [
  prompt,
  'a small blue square at the top left on a black background',
  'two green triangles on a gray background',
  'a yellow square above a blue circle on a black background',
  'a small purple circle at the bottom right on a white background',
  'three red squares on a gray background',
  'a large orange triangle at the top on a black background',
  'a green circle to the left of a red square on a white background',
];
const baseSeed = 1000;
const batchSizes = [1, 2, 4, 8];
const queueRequests = 8;

export function median(values: number[]): number {
  return percentile(values, 50);
}

/** Linear interpolation between closest ranks (numpy's default). */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = (p / 100) * (sorted.length - 1);
  const low = Math.floor(rank);
  return sorted[low] + (sorted[Math.min(low + 1, sorted.length - 1)] - sorted[low]) * (rank - low);
}

function compare(nativeMs: number | null, pythonMs: number | null): Comparison {
  const ratio = nativeMs === null || pythonMs === null || pythonMs === 0 ? null : nativeMs / pythonMs;
  return { nativeMs, pythonMs, ratio };
}

/** Time outside the calls over loop time, over both loops of every sample. */
function overheadFraction(samples: Timings[]): number {
  let loop = 0;
  let calls = 0;
  for (const t of samples) {
    loop += t.ditMs + t.decoderMs;
    calls += t.ditCallMs + t.decoderCallMs;
  }
  return (loop - calls) / loop;
}

async function rawPixels(png: Buffer): Promise<{ data: Buffer; width: number; height: number }> {
  const { data, info } = await sharp(png).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  return { data, width: info.width, height: info.height };
}

function maxAbsDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return 255;
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

/** Loads the model in a fresh Node process (this module's sibling bench-load, same loader flags). */
function coldLoad(dir: string, options: object): Promise<ColdLoad> {
  const script = path.join(__dirname, `bench-load${path.extname(__filename)}`);
  return new Promise((resolve, reject) => {
    const child = fork(script, [JSON.stringify({ dir, options })], { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] });
    let answer: (ColdLoad & { error?: string }) | undefined;
    child.on('message', (message) => (answer = message as ColdLoad));
    child.on('error', reject);
    child.on('exit', (code) => {
      if (answer?.error !== undefined) reject(new Error(`cold load failed: ${answer.error}`));
      else if (answer === undefined) reject(new Error(`the cold-load process exited with code ${code} and no result`));
      else resolve(answer);
    });
  });
}

async function timed<T>(run: () => Promise<T>): Promise<{ ms: number; value: T }> {
  const started = performance.now();
  const value = await run();
  return { ms: performance.now() - started, value };
}

function checkRuns(runs: unknown): number {
  if (typeof runs !== 'number' || !Number.isInteger(runs) || runs < 1 || runs > 10_000) {
    throw new InvalidArgumentError(`Expected integer between 1 and 10000 for runs but received ${String(runs)} of type ${typeof runs}`);
  }
  return runs;
}

type Settings = { steps: number; cfg: number; decoderSteps: number; decoderCfg: number };
type Log = (line: string) => void;
type NativeRun = { wallMs: number; pixelsMs: number; timings: Timings };

/** Runs the whole benchmark; the model and the Python process are closed afterwards. */
export async function runBench(options: BenchOptions = {}): Promise<BenchReport> {
  const log = options.log ?? (() => undefined);
  const quick = options.quick === true;
  const runs = checkRuns(options.runs ?? (quick ? 2 : 10));
  const warmupRuns = quick ? 1 : 2;
  const reps = quick ? 1 : 5;
  const withPython = options.python !== false;
  const withThroughput = options.throughput !== false;
  const loadOptions = validateLoadOptions({ device: options.device, dtype: options.dtype, threads: options.threads ?? 0, cudaGraphs: options.cudaGraphs });
  validateGenerateOptions({ steps: options.steps, decoderSteps: options.decoderSteps });
  const dir = path.resolve(options.model ?? bundledModelDir);

  log('cold load in a fresh process');
  const cold = await coldLoad(dir, loadOptions);
  const model = await loadModel(dir, loadOptions);
  let python: PythonReference | undefined;
  try {
    const info = model.info();
    const { manifest } = model;
    const settings: Settings = {
      steps: options.steps ?? info.defaults.steps,
      cfg: info.defaults.cfg,
      decoderSteps: options.decoderSteps ?? info.defaults.decoderSteps,
      decoderCfg: info.defaults.decoderCfg,
    };
    const tokenizer = await PromptTokenizer.load(
      info.dir,
      { tokenizer: manifest.files.tokenizer.path, tokenizerConfig: manifest.files.tokenizerConfig.path },
      manifest.templates,
    );
    let pythonLoad: { loadMs: number; threads: number; torch: string } | undefined;
    if (withPython) {
      log('starting the Python reference');
      python = PythonReference.start();
      const negativeIds = tokenizer.negativeIds();
      // torch's default thread count unless --threads sets both sides (more threads can be slower: measured).
      pythonLoad = await python.load({ bundle: info.dir, device: info.device, dtype: info.dtype, threads: loadOptions.threads, negativeIds });
    }

    const e2e = await endToEnd(model, python, tokenizer.generationIds(prompt), settings, runs, warmupRuns, log);
    const pythonStats = await python?.stats();
    await python?.close();
    python = undefined;
    const throughput = withThroughput ? await batchThroughput(model, settings, reps, log) : [];
    const queue = withThroughput ? await queueThroughput(model, settings, reps, log) : null;
    const understanding = await measureUnderstanding(model, e2e.lastImage, quick ? 4 : 32, reps);

    const nt = e2e.native.map((run) => run.timings);
    const ref = withPython ? e2e.reference : undefined;
    const both = (f: (samples: Timings[]) => number): Comparison => compare(f(nt), ref === undefined ? null : f(ref));
    const stage = (name: Stage): Comparison => both((s) => median(s.map((t) => t[`${name}Ms`])));
    const step = (key: 'ditStepMs' | 'decoderStepMs'): Comparison => both((s) => median(s.flatMap((t) => t[key])));
    const overheadPerStep = (loop: 'dit' | 'decoder', steps: number): Comparison =>
      both((s) => median(s.map((t) => (t[`${loop}Ms`] - t[`${loop}CallMs`]) / steps)));
    const walls = e2e.native.map((run) => run.wallMs);
    const pythonTotals = ref?.map((t) => t.totalMs);
    return {
      version: 1,
      date: new Date().toISOString(),
      machine: machineInfo(),
      runtime: { blip3o: packageVersion(), libtorch: info.libtorch, torch: pythonLoad?.torch ?? null, cudaBuilt: runtimeInfo().cudaBuilt },
      settings: {
        model: info.dir,
        bundle: info.name,
        device: info.device,
        dtype: info.dtype,
        threads: { native: info.threads, python: pythonLoad?.threads ?? null },
        runs,
        warmupRuns,
        ...settings,
        eta: info.defaults.eta,
        quick,
        python: withPython,
        throughput: withThroughput,
        prompt,
        seed: baseSeed,
      },
      load: { coldMs: cold.loadMs, addonMs: cold.addonMs, coldProcessMs: cold.processMs, pythonMs: pythonLoad?.loadMs ?? null },
      stages: { condition: stage('condition'), dit: stage('dit'), decoder: stage('decoder'), vae: stage('vae') },
      steps: { dit: step('ditStepMs'), decoder: step('decoderStepMs') },
      overheadPerStepMs: { dit: overheadPerStep('dit', settings.steps), decoder: overheadPerStep('decoder', settings.decoderSteps) },
      overheadFraction: overheadFraction(nt),
      pythonOverheadFraction: ref === undefined ? null : overheadFraction(ref),
      endToEnd: {
        ...compare(median(e2e.native.map((run) => run.pixelsMs)), pythonTotals === undefined ? null : median(pythonTotals)),
        p50Ms: percentile(walls, 50),
        p90Ms: percentile(walls, 90),
        pythonP50Ms: pythonTotals === undefined ? null : percentile(pythonTotals, 50),
        pythonP90Ms: pythonTotals === undefined ? null : percentile(pythonTotals, 90),
      },
      maxPixelDiff: e2e.maxPixelDiff,
      images: e2e.images,
      throughput,
      queue,
      understanding,
      memory: {
        peakRssMb: process.resourceUsage().maxRSS / 1024,
        pythonPeakRssMb: pythonStats?.peakRssMb ?? null,
        peakCudaMb: null,
        pythonPeakCudaMb: pythonStats?.peakCudaMb ?? null,
      },
    };
  } finally {
    await python?.close();
    await model.dispose();
  }
}

/**
 * `runs` generations of the same prompt per side, alternating (native, Python, native, ...) after
 * `warmupRuns` unmeasured ones; run i uses seed baseSeed + i on both sides, and their pixels are compared.
 */
async function endToEnd(model: Blip3oModel, python: PythonReference | undefined, ids: number[], settings: Settings, runs: number, warmupRuns: number, log: Log) {
  const native: NativeRun[] = [];
  const reference: ReferenceTimings[] = [];
  let maxPixelDiff: number | null = python === undefined ? null : 0;
  const images: BenchReport['images'] = { native: { width: 0, height: 0 }, python: null };
  let lastImage: Buffer = Buffer.alloc(0);
  for (let i = -warmupRuns; i < runs; i++) {
    const seed = baseSeed + Math.max(i, 0);
    const run = await timed(() => model.generate(prompt, { seed, ...settings }));
    const timings = run.value.timings;
    const image = await rawPixels((lastImage = run.value.image));
    images.native = { width: image.width, height: image.height };
    let line = `run ${i < 0 ? 'warm-up' : `${i + 1}/${runs}`}: native ${run.ms.toFixed(0)} ms`;
    if (i >= 0) native.push({ wallMs: run.ms, pixelsMs: run.ms - timings.encodeMs, timings });
    if (python !== undefined) {
      const ref = await python.generate({ ids, seed, ...settings });
      images.python = { width: ref.width, height: ref.height };
      line += `, Python ${ref.timings.totalMs.toFixed(0)} ms`;
      if (i >= 0) {
        reference.push(ref.timings);
        const sameSize = ref.width === image.width && ref.height === image.height;
        maxPixelDiff = Math.max(maxPixelDiff ?? 0, sameSize ? maxAbsDiff(image.data, ref.pixels) : 255);
      }
    }
    log(line);
  }
  return { native, reference, maxPixelDiff, images, lastImage };
}

/** Images per second of one generate() call per batch size (median of `reps`, after a warm-up call). */
async function batchThroughput(model: Blip3oModel, settings: Settings, reps: number, log: Log): Promise<BenchReport['throughput']> {
  const throughput: BenchReport['throughput'] = [];
  for (const batch of batchSizes) {
    const ms: number[] = [];
    for (let rep = -1; rep < reps; rep++) {
      const run = await timed(() => model.generate(prompts.slice(0, batch), { seed: baseSeed, ...settings }));
      if (rep >= 0) ms.push(run.ms);
    }
    throughput.push({ batch, ms: median(ms), imagesPerSec: (batch * 1000) / median(ms) });
    log(`batch ${batch}: ${((batch * 1000) / median(ms)).toFixed(2)} images/s`);
  }
  return throughput;
}

/**
 * The request queue: the same 8 single-prompt requests at once (merged into batches) and one after another.
 * Each round times both, in alternating order, and the speedup is the median of the rounds' own ratios:
 * the host's speed drifts over seconds, and a ratio within one round compares like with like.
 */
async function queueThroughput(model: Blip3oModel, settings: Settings, reps: number, log: Log): Promise<BenchReport['queue']> {
  const request = (index: number): Promise<GenerateResult> => model.generate(prompts[index], { seed: baseSeed + index, ...settings });
  const indices = [...Array(queueRequests).keys()];
  const concurrentMs: number[] = [];
  const sequentialMs: number[] = [];
  const ratios: number[] = [];
  let identical = true;
  const atOnce = () => timed(() => Promise.all(indices.map(request)));
  const oneByOne = () =>
    timed(async () => {
      const out: GenerateResult[] = [];
      for (const index of indices) out.push(await request(index));
      return out;
    });
  await atOnce(); // warm-up
  for (let rep = 0; rep < reps; rep++) {
    const concurrentFirst = rep % 2 === 0;
    const first = concurrentFirst ? await atOnce() : await oneByOne();
    const second = concurrentFirst ? await oneByOne() : await atOnce();
    const [concurrent, sequential] = concurrentFirst ? [first, second] : [second, first];
    concurrentMs.push(concurrent.ms);
    sequentialMs.push(sequential.ms);
    ratios.push(sequential.ms / concurrent.ms);
    identical &&= concurrent.value.every((r, index) => r.image.equals(sequential.value[index].image));
  }
  const queue = {
    requests: queueRequests,
    rounds: reps,
    concurrentMs: median(concurrentMs),
    sequentialMs: median(sequentialMs),
    speedup: median(ratios),
    roundSpeedups: ratios,
    identical,
  };
  log(`queue: ${queueRequests} requests concurrent ${queue.concurrentMs.toFixed(0)} ms, sequential ${queue.sequentialMs.toFixed(0)} ms, speedup ${queue.speedup.toFixed(2)}x`);
  return queue;
}

/** Prefill time and decode speed of describe on `image` with the bundle's default question, which asks for
 * a whole description (median of `reps`, after a warm-up). */
async function measureUnderstanding(model: Blip3oModel, image: Buffer, maxTokens: number, reps: number): Promise<BenchReport['understanding']> {
  const answers: DescribeDetails[] = [];
  for (let rep = -1; rep < reps; rep++) {
    const answer = await model.describeDetailed(image, { maxTokens, temperature: 0 });
    if (rep >= 0) answers.push(answer);
  }
  const decodeMs = median(answers.map((a) => a.decodeMs));
  const generatedTokens = median(answers.map((a) => a.generatedTokens));
  return {
    promptTokens: answers[0].promptTokens,
    generatedTokens,
    prefillMs: median(answers.map((a) => a.prefillMs)),
    decodeMs,
    decodeTokensPerSec: decodeMs > 0 ? (generatedTokens * 1000) / decodeMs : 0,
  };
}
