// The model's generate queue. Concurrent generate calls with the same sampler settings that arrive
// in the same tick, or while a batch runs, are merged into one native batch of at most maxBatch
// samples: on CPU the batch's samples run side by side on the model's threads, and every sample
// keeps the bytes it has alone (its own seed, its own calls). Each caller gets its own result,
// progress, abort and error; past maxQueue waiting calls, submit rejects with a BusyError.

import { BusyError, Blip3oRuntimeError, DisposedError, abortReason, fromNativeError } from './errors';
import type {
  GenerationStage,
  NativeGenerateRequest,
  NativeGenerateResult,
  NativeGenerateTimings,
  NativeJob,
  NativeModel,
} from './native';

/** The sampler part of a native request: equal settings give an equal key, and may share a batch. */
export type SamplerSettings = Omit<NativeGenerateRequest, 'prompts' | 'seeds'>;

export interface QueuedRequest {
  prompts: number[][];
  seeds: number[];
  settings: SamplerSettings;
  signal?: AbortSignal;
  onProgress?: (stage: GenerationStage, step: number, steps: number) => void;
}

export interface QueuedResult {
  /** This caller's samples only: count * height * width * 3 bytes. */
  pixels: Buffer;
  count: number;
  width: number;
  height: number;
  /** Of the native batch that ran this caller's samples (shared with the others merged into it). */
  timings: NativeGenerateTimings;
}

interface Entry {
  req: QueuedRequest;
  key: string;
  resolve: (result: QueuedResult) => void;
  reject: (err: unknown) => void;
  settled: boolean;
  batch?: Batch;
  detach: () => void;
}

interface Batch {
  job: NativeJob<NativeGenerateResult> | undefined;
  live: number;  // callers still waiting for the result
}

export interface QueueLimits {
  maxBatch: number;
  maxQueue: number;
}

export class GenerateQueue {
  private readonly pending: Entry[] = [];
  private running = false;
  private scheduled = false;
  private closed = false;

  constructor(
    private readonly native: NativeModel,
    private readonly limits: QueueLimits,
  ) {}

  /** Queues a request; it settles exactly once. */
  submit(req: QueuedRequest): Promise<QueuedResult> {
    if (this.closed) return Promise.reject(new DisposedError());
    if (this.pending.length >= this.limits.maxQueue) {
      return Promise.reject(
        new BusyError(`the model is busy: ${this.pending.length} generate calls are already waiting (maxQueue ${this.limits.maxQueue})`),
      );
    }
    return new Promise<QueuedResult>((resolve, reject) => {
      const entry: Entry = { req, key: settingsKey(req.settings), resolve, reject, settled: false, detach: () => undefined };
      const signal = req.signal;
      if (signal !== undefined) {
        const onAbort = (): void => this.drop(entry, abortReason(signal));
        signal.addEventListener('abort', onAbort, { once: true });
        entry.detach = () => signal.removeEventListener('abort', onAbort);
      }
      this.pending.push(entry);
      this.schedule();
    });
  }

  /** Rejects the waiting calls (the native dispose rejects the running batch). */
  close(): void {
    this.closed = true;
    for (const entry of this.pending.splice(0)) this.settle(entry, () => entry.reject(new DisposedError()));
  }

  // Dispatch after the current tick, so that calls made together merge.
  private schedule(): void {
    if (this.scheduled || this.running || this.closed || this.pending.length === 0) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.dispatch();
    });
  }

  // The oldest call, and after it the waiting calls with its settings that still fit maxBatch.
  private dispatch(): void {
    if (this.running || this.closed) return;
    const head = this.pending.shift();
    if (head === undefined) return;
    const entries = [head];
    let samples = head.req.prompts.length;
    for (let i = 0; i < this.pending.length && samples < this.limits.maxBatch; ) {
      const next = this.pending[i];
      if (next.key === head.key && samples + next.req.prompts.length <= this.limits.maxBatch) {
        entries.push(next);
        samples += next.req.prompts.length;
        this.pending.splice(i, 1);
      } else {
        i++;
      }
    }
    this.run(entries);
  }

  private run(entries: Entry[]): void {
    const batch: Batch = { job: undefined, live: entries.length };
    // The caller of every sample, and the sample's index within its caller's prompts.
    const owners: Array<{ entry: Entry; index: number }> = [];
    for (const entry of entries) {
      entry.batch = batch;
      entry.req.prompts.forEach((_, index) => owners.push({ entry, index }));
    }
    const progress = entries.some((e) => e.req.onProgress !== undefined)
      ? (stage: GenerationStage, step: number, steps: number): void => {
          if (stage === 'condition') {
            // One condition event per prompt: it belongs to that prompt's caller.
            const owner = owners[step - 1];
            if (owner !== undefined) this.progress(owner.entry, stage, owner.index + 1, owner.entry.req.prompts.length);
          } else {
            for (const entry of entries) this.progress(entry, stage, step, steps);
          }
        }
      : undefined;
    let job: NativeJob<NativeGenerateResult>;
    try {
      job = this.native.generate(
        {
          ...entries[0].req.settings,
          prompts: entries.flatMap((e) => e.req.prompts),
          seeds: entries.flatMap((e) => e.req.seeds),
        },
        progress,
      );
    } catch (err) {
      for (const entry of entries) this.settle(entry, () => entry.reject(fromNativeError(err, entry.req.signal)));
      this.schedule();
      return;
    }
    batch.job = job;
    this.running = true;
    job.promise.then(
      (result) => {
        const { count, width, height, timings } = result;
        const sampleBytes = width * height * 3;
        if (count !== owners.length || result.pixels.length !== count * sampleBytes) {
          const error = new Blip3oRuntimeError(`the native pipeline returned ${count} images for ${owners.length} prompts`);
          for (const entry of entries) this.settle(entry, () => entry.reject(error));
          return;
        }
        let first = 0;
        for (const entry of entries) {
          const n = entry.req.prompts.length;
          const pixels = result.pixels.subarray(first * sampleBytes, (first + n) * sampleBytes);
          first += n;
          this.settle(entry, () => entry.resolve({ pixels, count: n, width, height, timings }));
        }
      },
      (err: unknown) => {
        for (const entry of entries) this.settle(entry, () => entry.reject(fromNativeError(err, entry.req.signal)));
      },
    ).finally(() => {
      this.running = false;
      this.schedule();
    });
  }

  // A user progress callback that throws ends that caller's request with its error.
  private progress(entry: Entry, stage: GenerationStage, step: number, steps: number): void {
    if (entry.settled || entry.req.onProgress === undefined) return;
    try {
      entry.req.onProgress(stage, step, steps);
    } catch (err) {
      this.drop(entry, err);
    }
  }

  // Ends one caller's request now with `reason`. A waiting call leaves the queue; a running one
  // leaves its batch, which is cancelled only once no caller is left in it.
  private drop(entry: Entry, reason: unknown): void {
    if (entry.settled) return;
    const waiting = this.pending.indexOf(entry);
    if (waiting >= 0) this.pending.splice(waiting, 1);
    this.settle(entry, () => entry.reject(reason));
    const batch = entry.batch;
    if (batch !== undefined && --batch.live === 0) this.cancel(batch);
  }

  private cancel(batch: Batch): void {
    if (batch.job === undefined) return;
    try {
      this.native.cancel(batch.job.id);
    } catch {
      // Disposed: dispose rejected the job already.
    }
  }

  private settle(entry: Entry, finish: () => void): void {
    if (entry.settled) return;
    entry.settled = true;
    entry.detach();
    finish();
  }
}

function settingsKey(s: SamplerSettings): string {
  return JSON.stringify([s.ditSigmas, s.ditTimesteps, s.ditCfg, s.ditEta, s.decoderSigmas, s.decoderTimesteps, s.decoderInitSigma, s.decoderCfg]);
}
