// Validation of every public option, before anything reaches the native side. Messages follow
// sharp's form: "Expected positive integer for steps but received -1 of type number".

import { randomBytes } from 'node:crypto';
import { InvalidArgumentError } from './errors';
import type { DeviceRequest, DtypeRequest, GenerationStage } from './native';

export type ImageFormat = 'png' | 'jpeg' | 'webp';
export const imageFormats: readonly ImageFormat[] = ['png', 'jpeg', 'webp'];
export const deviceRequests: readonly DeviceRequest[] = ['auto', 'cpu', 'cuda'];
export const dtypeRequests: readonly DtypeRequest[] = ['auto', 'float32', 'bfloat16', 'float16'];

/** The largest seed: seeds are integers in [0, 2^53 - 1]. */
export const maxSeed = Number.MAX_SAFE_INTEGER;
/** Upper bound for steps and decoderSteps. */
export const maxSteps = 1000;
/** Default maxBatch: samples of concurrent generate calls merged into one native batch. */
export const defaultMaxBatch = 8;
/** Default maxQueue: generate calls waiting to run. */
export const defaultMaxQueue = 64;
/** Most CPU threads a model may ask for (the native executor's limit). */
export const maxThreads = 4096;
/** Default input pixel limit for images given to describe (width * height). */
export const defaultLimitInputPixels = 4096 * 4096;

export interface LoadOptions {
  /** 'auto' (CUDA when available, else CPU), 'cpu' or 'cuda'. Default 'auto'. */
  device?: DeviceRequest;
  /** Compute dtype; 'auto' = the bundle's dtype on CUDA, float32 on CPU. Default 'auto'. */
  dtype?: DtypeRequest;
  /**
   * CPU threads of the model; 0 = the runtime's default (the machine's cores, at most 8). A lone
   * image's CFG pairs (DiT, guided decoder) run as two one-row calls on two of them, an unguided
   * decoder's one call on all while that measures faster than on one; a batch spreads its calls over
   * them (one per sample for a bundle without `batchInvariant`). Default 0.
   */
  threads?: number;
  /** Most samples that concurrent generate calls with the same settings merge into one batch. Default 8. */
  maxBatch?: number;
  /** Most generate calls waiting to run; past it generate rejects with a BusyError. Default 64. */
  maxQueue?: number;
  /**
   * CUDA: replay the DiT step and the text decode step as CUDA graphs (captured at the first use of
   * each shape); false runs every step eagerly. No effect on CPU. Default true.
   */
  cudaGraphs?: boolean;
}

export interface ProgressEvent {
  stage: GenerationStage;
  /** 1-based step within the stage. */
  step: number;
  /** Steps of the stage. */
  steps: number;
}

export interface GenerateOptions {
  /** Seed of the first sample (the next samples of a batch use seed + 1, ...). Default: random. */
  seed?: number;
  /** DiT steps. Default: the bundle's sampler.dit.steps. */
  steps?: number;
  /** DiT classifier-free guidance scale. Default: the bundle's sampler.dit.cfg. */
  cfg?: number;
  /** Decoder steps. Default: the bundle's sampler.decoder.steps. */
  decoderSteps?: number;
  /** Decoder guidance scale. Default: the bundle's sampler.decoder.cfg. */
  decoderCfg?: number;
  /** Output encoding. Default 'png'. */
  format?: ImageFormat;
  signal?: AbortSignal;
  onProgress?: (event: ProgressEvent) => void;
}

export interface DescribeOptions {
  /** Most new tokens (clamped to what the context leaves). Default 128. */
  maxTokens?: number;
  /** 0 = greedy. Default 0. */
  temperature?: number;
  /** Sample among the k most likely tokens; 0 = off. Default 0. */
  topK?: number;
  /** Nucleus sampling mass, 0 < p <= 1. Default 1. */
  topP?: number;
  /** Seed of the sampler (unused when greedy). Default: random. */
  seed?: number;
  /** Largest input image (width * height) accepted. Default 4096 * 4096. */
  limitInputPixels?: number;
  signal?: AbortSignal;
}

export interface ValidatedLoadOptions {
  device: DeviceRequest;
  dtype: DtypeRequest;
  threads: number;
  maxBatch: number;
  maxQueue: number;
  cudaGraphs: boolean;
}

export interface ValidatedGenerateOptions {
  seed: number | undefined;
  steps: number | undefined;
  cfg: number | undefined;
  decoderSteps: number | undefined;
  decoderCfg: number | undefined;
  format: ImageFormat;
  signal: AbortSignal | undefined;
  onProgress: ((event: ProgressEvent) => void) | undefined;
}

export interface ValidatedDescribeOptions {
  maxTokens: number;
  temperature: number;
  topK: number;
  topP: number;
  seed: number | undefined;
  limitInputPixels: number;
  signal: AbortSignal | undefined;
}

function describeValue(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value);
  if (typeof value === 'function') return 'a function';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object' && value !== null) return 'an object';
  return String(value);
}

/** The error for an option of the wrong type or range, in sharp's wording. */
export function invalidOption(name: string, expected: string, value: unknown): InvalidArgumentError {
  const type = value === null ? 'null' : typeof value;
  return new InvalidArgumentError(`Expected ${expected} for ${name} but received ${describeValue(value)} of type ${type}`);
}

function isInteger(value: unknown): value is number {
  return typeof value === 'number' && Number.isInteger(value);
}

function isFiniteNumber(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

function checkOptionsObject(options: unknown, call: string, known: readonly string[]): Record<string, unknown> {
  if (options === undefined) return {};
  if (typeof options !== 'object' || options === null || Array.isArray(options)) {
    throw invalidOption(`${call} options`, 'object', options);
  }
  const record = options as Record<string, unknown>;
  for (const name of Object.keys(record)) {
    if (!known.includes(name)) {
      throw new InvalidArgumentError(`Unknown option ${JSON.stringify(name)} for ${call}; expected one of ${known.join(', ')}`);
    }
  }
  return record;
}

function optional<T>(record: Record<string, unknown>, name: string, check: (value: unknown) => value is T, expected: string): T | undefined {
  const value = record[name];
  if (value === undefined) return undefined;
  if (!check(value)) throw invalidOption(name, expected, value);
  return value;
}

/** An integer option past its upper bound (the native side would refuse it with an internal name). */
function atMost(name: string, value: number | undefined, max: number, min = 0): number | undefined {
  if (value !== undefined && value > max) throw invalidOption(name, `integer between ${min} and ${max}`, value);
  return value;
}

function oneOf<T extends string>(values: readonly T[]): (value: unknown) => value is T {
  return (value: unknown): value is T => typeof value === 'string' && (values as readonly string[]).includes(value);
}

function choiceText(values: readonly string[]): string {
  return `one of ${values.map((v) => `'${v}'`).join(', ')}`;
}

const isSeed = (value: unknown): value is number => isInteger(value) && value >= 0 && value <= maxSeed;
const isSteps = (value: unknown): value is number => isInteger(value) && value >= 1 && value <= maxSteps;
const isScale = (value: unknown): value is number => isFiniteNumber(value) && value >= 0;
const isPositiveInteger = (value: unknown): value is number => isInteger(value) && value >= 1;
const isNonNegativeInteger = (value: unknown): value is number => isInteger(value) && value >= 0;
const isProbability = (value: unknown): value is number => isFiniteNumber(value) && value > 0 && value <= 1;
const isBoolean = (value: unknown): value is boolean => typeof value === 'boolean';
const isSignal = (value: unknown): value is AbortSignal => value instanceof AbortSignal;
const isFunction = (value: unknown): value is (event: ProgressEvent) => void => typeof value === 'function';

const seedText = `integer between 0 and ${maxSeed}`;
const stepsText = `integer between 1 and ${maxSteps}`;

const loadOptionNames = ['device', 'dtype', 'threads', 'maxBatch', 'maxQueue', 'cudaGraphs'] as const;
const generateOptionNames = ['seed', 'steps', 'cfg', 'decoderSteps', 'decoderCfg', 'format', 'signal', 'onProgress'] as const;
const describeOptionNames = ['maxTokens', 'temperature', 'topK', 'topP', 'seed', 'limitInputPixels', 'signal'] as const;

export function validateLoadOptions(options: unknown): ValidatedLoadOptions {
  const record = checkOptionsObject(options, 'loadModel', loadOptionNames);
  return {
    device: optional(record, 'device', oneOf(deviceRequests), choiceText(deviceRequests)) ?? 'auto',
    dtype: optional(record, 'dtype', oneOf(dtypeRequests), choiceText(dtypeRequests)) ?? 'auto',
    threads: atMost('threads', optional(record, 'threads', isNonNegativeInteger, 'non-negative integer'), maxThreads) ?? 0,
    maxBatch: optional(record, 'maxBatch', isPositiveInteger, 'positive integer') ?? defaultMaxBatch,
    maxQueue: optional(record, 'maxQueue', isPositiveInteger, 'positive integer') ?? defaultMaxQueue,
    cudaGraphs: optional(record, 'cudaGraphs', isBoolean, 'boolean') ?? true,
  };
}

/** A prompt is a non-empty string; a batch is a non-empty array of them. */
export function validatePrompts(prompt: unknown): { prompts: string[]; batch: boolean } {
  if (typeof prompt === 'string') {
    if (prompt.length === 0) throw invalidOption('prompt', 'non-empty string', prompt);
    return { prompts: [prompt], batch: false };
  }
  if (Array.isArray(prompt)) {
    if (prompt.length === 0) throw invalidOption('prompt', 'non-empty string or non-empty array of strings', prompt);
    prompt.forEach((item: unknown, index) => {
      if (typeof item !== 'string' || item.length === 0) throw invalidOption(`prompt[${index}]`, 'non-empty string', item);
    });
    return { prompts: prompt as string[], batch: true };
  }
  throw invalidOption('prompt', 'non-empty string or non-empty array of strings', prompt);
}

export function validateGenerateOptions(options: unknown, batchSize = 1): ValidatedGenerateOptions {
  const record = checkOptionsObject(options, 'generate', generateOptionNames);
  const seed = optional(record, 'seed', isSeed, seedText);
  if (seed !== undefined && seed > maxSeed - (batchSize - 1)) {
    throw new InvalidArgumentError(
      `Expected seed + ${batchSize - 1} (one seed per prompt) to be at most ${maxSeed} but received seed ${seed}`,
    );
  }
  return {
    seed,
    steps: optional(record, 'steps', isSteps, stepsText),
    cfg: optional(record, 'cfg', isScale, 'finite number >= 0'),
    decoderSteps: optional(record, 'decoderSteps', isSteps, stepsText),
    decoderCfg: optional(record, 'decoderCfg', isScale, 'finite number >= 0'),
    format: optional(record, 'format', oneOf(imageFormats), choiceText(imageFormats)) ?? 'png',
    signal: optional(record, 'signal', isSignal, 'AbortSignal'),
    onProgress: optional(record, 'onProgress', isFunction, 'function'),
  };
}

export function validateDescribeOptions(options: unknown, call = 'describe'): ValidatedDescribeOptions {
  const record = checkOptionsObject(options, call, describeOptionNames);
  return {
    maxTokens: optional(record, 'maxTokens', isPositiveInteger, 'positive integer') ?? 128,
    temperature: optional(record, 'temperature', isScale, 'finite number >= 0') ?? 0,
    topK: atMost('topK', optional(record, 'topK', isNonNegativeInteger, 'non-negative integer'), maxSeed) ?? 0,
    topP: optional(record, 'topP', isProbability, 'number greater than 0 and at most 1') ?? 1,
    seed: optional(record, 'seed', isSeed, seedText),
    limitInputPixels:
      atMost('limitInputPixels', optional(record, 'limitInputPixels', isPositiveInteger, 'positive integer'), maxSeed, 1) ??
      defaultLimitInputPixels,
    signal: optional(record, 'signal', isSignal, 'AbortSignal'),
  };
}

/** A question is a non-empty string (undefined = the bundle's default question). */
export function validateQuestion(question: unknown): string | undefined {
  if (question === undefined) return undefined;
  if (typeof question !== 'string' || question.length === 0) throw invalidOption('question', 'non-empty string', question);
  return question;
}

/** A random seed in [0, limit] (53 bits of crypto randomness, reduced to the range). */
export function randomSeed(limit = maxSeed): number {
  const bytes = randomBytes(7);
  const value = (bytes.readUIntBE(0, 3) & 0x1fffff) * 0x100000000 + bytes.readUInt32BE(3);
  return value % (limit + 1);
}
