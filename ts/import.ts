// importCheckpoint: a released BLIP3-o checkpoint directory (BLIP3o/BLIP3o-Model-4B or -8B, as
// downloaded) into a bundle, by the importer in models/importer (Python: safetensors and torch do the
// reading and the TorchScript export). It streams its progress as JSON lines; a checkpoint that cannot be
// imported rejects with a CheckpointError and leaves nothing behind.

import { spawn } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { CheckpointError, InvalidArgumentError, abortReason } from './errors';
import { packageRoot } from './native';

export const importDtypes = ['bfloat16', 'float16', 'float32'] as const;
export type ImportDtype = (typeof importDtypes)[number];

/** Progress of an import: `check` (configs and every file's header), then per component (backbone, dit,
 * decoder, vae) its tensors read so far, and `written` once its TorchScript file is. */
export interface ImportProgress {
  stage: 'check' | 'backbone' | 'dit' | 'decoder' | 'vae';
  tensors?: number;
  total?: number;
  written?: boolean;
}

export interface ImportOptions {
  /** The bundle directory to write; it must not exist. */
  out: string;
  /** The bundle's dtype (default bfloat16, as the checkpoints are stored). */
  dtype?: ImportDtype;
  /** The bundle's name (default blip3o-<checkpoint directory name>). */
  name?: string;
  onProgress?: (event: ImportProgress) => void;
  /** Stops the import; the partial bundle is removed. */
  signal?: AbortSignal;
}

export interface ImportResult {
  bundle: string;
  name: string;
  seconds: number;
  /** The importing process's peak resident memory (the checkpoint's memory-mapped pages included), its
   * peak anonymous memory (its own: what the import needs beside the page cache; null without /proc),
   * and the sizes read and written. */
  peakRssBytes: number;
  peakAnonymousBytes: number | null;
  checkpointBytes: number;
  bundleBytes: number;
}

function validate(checkpoint: unknown, options: ImportOptions): void {
  if (typeof checkpoint !== 'string' || checkpoint.length === 0) {
    throw new InvalidArgumentError(`Expected a checkpoint directory but received ${JSON.stringify(checkpoint)}`);
  }
  if (typeof options !== 'object' || options === null || typeof options.out !== 'string' || options.out.length === 0) {
    throw new InvalidArgumentError('importCheckpoint needs options.out, the bundle directory to write');
  }
  if (options.dtype !== undefined && !importDtypes.includes(options.dtype)) {
    throw new InvalidArgumentError(`Expected one of ${importDtypes.join(', ')} for dtype but received ${JSON.stringify(options.dtype)}`);
  }
  if (options.name !== undefined && (typeof options.name !== 'string' || options.name.length === 0)) {
    throw new InvalidArgumentError(`Expected a non-empty string for name but received ${JSON.stringify(options.name)}`);
  }
}

/** Imports `checkpoint` into a new bundle at `options.out`; loadModel(options.out) then runs it. */
export async function importCheckpoint(checkpoint: string, options: ImportOptions): Promise<ImportResult> {
  validate(checkpoint, options);
  const { signal } = options;
  if (signal?.aborted) throw abortReason(signal);
  const args = [path.join(packageRoot, 'models', 'run-python.sh'), '-m', 'models.importer', path.resolve(checkpoint),
    '--out', path.resolve(options.out), '--dtype', options.dtype ?? 'bfloat16', '--json'];
  if (options.name !== undefined) args.push('--name', options.name);
  const child = spawn('bash', args, { cwd: packageRoot, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => (stderr = (stderr + chunk).slice(-4000)));
  // SIGTERM: the importer removes its temporary directory on the way out
  const onAbort = () => child.kill('SIGTERM');
  signal?.addEventListener('abort', onAbort, { once: true });
  const exited = new Promise<number | null>((resolve) => child.once('close', (code) => resolve(code)));
  let result: ImportResult | undefined;
  let failure: string | undefined;
  try {
    for await (const line of createInterface({ input: child.stdout })) {
      let event: { event?: string; message?: string } & Record<string, unknown>;
      try {
        event = JSON.parse(line) as typeof event;
      } catch {
        continue;  // (not one of the importer's lines)
      }
      if (event.event === 'progress') {
        const { event: _, ...progress } = event;
        options.onProgress?.(progress as unknown as ImportProgress);
      } else if (event.event === 'done') {
        const { event: _, ...done } = event;
        result = done as unknown as ImportResult;
      } else if (event.event === 'error') {
        failure = String(event.message);
      }
    }
    const code = await exited;
    if (signal?.aborted) throw abortReason(signal);
    if (failure !== undefined) throw new CheckpointError(failure);
    if (code !== 0 || result === undefined) {
      const last = stderr.trim().split('\n').pop() ?? '';
      throw new CheckpointError(`the importer failed (exit ${code}): ${last}`);
    }
    return result;
  } finally {
    signal?.removeEventListener('abort', onAbort);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  }
}
