// Typed errors of the public API. Every error the runtime raises is a Blip3oError with a stable
// `code` (the native addon's codes, plus BLIP3O_ADDON for a missing or unloadable addon), except
// aborts: those reject with the AbortSignal's reason, or with an AbortError (name 'AbortError',
// like fetch and the other AbortSignal-aware Node APIs) when there is no reason to hand back.

export type Blip3oErrorCode =
  | 'BLIP3O_ADDON'
  | 'BLIP3O_BUNDLE'
  | 'BLIP3O_INVALID_ARGUMENT'
  | 'BLIP3O_ABORTED'
  | 'BLIP3O_DISPOSED'
  | 'BLIP3O_DEVICE'
  | 'BLIP3O_RUNTIME'
  | 'BLIP3O_BUSY'
  | 'BLIP3O_CHECKPOINT';

export class Blip3oError extends Error {
  readonly code: Blip3oErrorCode;

  constructor(code: Blip3oErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** The native addon (build/Release/blip3o.node) is missing or could not be loaded. */
export class AddonLoadError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_ADDON', message, options);
  }
}

/** The bundle directory, its manifest or one of its files is missing or invalid. */
export class BundleError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_BUNDLE', message, options);
  }
}

/** An option or input of a call is invalid (also: a prompt that does not fit the context). */
export class InvalidArgumentError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_INVALID_ARGUMENT', message, options);
  }
}

/** The requested device is not available (e.g. `device: 'cuda'` without a CUDA build or GPU). */
export class DeviceError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_DEVICE', message, options);
  }
}

/** The model was disposed before or while the call ran. */
export class DisposedError extends Blip3oError {
  constructor(message = 'the model has been disposed', options?: { cause?: unknown }) {
    super('BLIP3O_DISPOSED', message, options);
  }
}

/** libtorch raised an exception while running a model (named so as not to shadow any global). */
export class Blip3oRuntimeError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_RUNTIME', message, options);
  }
}

/** The model's request queue is full (load option maxQueue): retry later, or raise the limit. */
export class BusyError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_BUSY', message, options);
  }
}

/** A checkpoint directory cannot be imported (importCheckpoint): not a BLIP3-o checkpoint, a missing or
 * truncated file, a tensor of the wrong shape or dtype, an index naming files outside the directory. */
export class CheckpointError extends Blip3oError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('BLIP3O_CHECKPOINT', message, options);
  }
}

/** A job was aborted and no AbortSignal reason is available; `name` is 'AbortError'. */
export class AbortError extends Blip3oError {
  constructor(message = 'the operation was aborted', options?: { cause?: unknown }) {
    super('BLIP3O_ABORTED', message, options);
    this.name = 'AbortError';
  }
}

/** What a call rejects with when it is aborted through `signal`. */
export function abortReason(signal: AbortSignal | undefined): unknown {
  if (signal !== undefined && signal.aborted && signal.reason !== undefined) return signal.reason;
  return new AbortError();
}

function nativeCode(err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const code = (err as { code?: unknown }).code;
  return typeof code === 'string' ? code : undefined;
}

function messageOf(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * Maps an error thrown or rejected by the native addon to the typed error of its code. Errors that
 * are already typed (or come from user callbacks) pass through unchanged.
 */
export function fromNativeError(err: unknown, signal?: AbortSignal): unknown {
  if (err instanceof Blip3oError) return err;
  const code = nativeCode(err);
  const message = messageOf(err);
  switch (code) {
    case 'BLIP3O_BUNDLE':
      return new BundleError(message, { cause: err });
    case 'BLIP3O_INVALID_ARGUMENT':
      return new InvalidArgumentError(message, { cause: err });
    case 'BLIP3O_ABORTED':
      return abortReason(signal);
    case 'BLIP3O_DISPOSED':
      return new DisposedError(message, { cause: err });
    case 'BLIP3O_DEVICE':
      return new DeviceError(message, { cause: err });
    case 'BLIP3O_RUNTIME':
      return new Blip3oRuntimeError(message, { cause: err });
    default:
      return err;
  }
}

/** True for the errors an abort produces (an AbortError, or a signal's reason). */
export function isAbortError(err: unknown, signal?: AbortSignal): boolean {
  if (signal !== undefined && signal.aborted && err === signal.reason) return true;
  return err instanceof Error && err.name === 'AbortError';
}
