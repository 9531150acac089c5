// Every public option rejects bad values with a precise, sharp-style message.
import t, { type Test } from 'tap';
import { InvalidArgumentError } from '../ts/errors';
import {
  maxSeed,
  randomSeed,
  validateDescribeOptions,
  validateGenerateOptions,
  validateLoadOptions,
  validatePrompts,
  validateQuestion,
} from '../ts/options';

function rejects(t: Test, fn: () => unknown, message: string): void {
  t.throws(fn, new InvalidArgumentError(message), message);
  try {
    fn();
  } catch (err) {
    t.ok(err instanceof InvalidArgumentError, 'an InvalidArgumentError');
    t.equal((err as InvalidArgumentError).code, 'BLIP3O_INVALID_ARGUMENT');
  }
}

t.test('prompt', async (t) => {
  rejects(t, () => validatePrompts(''), 'Expected non-empty string for prompt but received "" of type string');
  rejects(t, () => validatePrompts(42), 'Expected non-empty string or non-empty array of strings for prompt but received 42 of type number');
  rejects(t, () => validatePrompts(undefined), 'Expected non-empty string or non-empty array of strings for prompt but received undefined of type undefined');
  rejects(t, () => validatePrompts([]), 'Expected non-empty string or non-empty array of strings for prompt but received an array of type object');
  rejects(t, () => validatePrompts(['a', '']), 'Expected non-empty string for prompt[1] but received "" of type string');
  rejects(t, () => validatePrompts(['a', null]), 'Expected non-empty string for prompt[1] but received null of type null');
  t.same(validatePrompts('a red circle'), { prompts: ['a red circle'], batch: false });
  t.same(validatePrompts(['a', 'b']), { prompts: ['a', 'b'], batch: true });
});

t.test('generate options', async (t) => {
  const g = (options: unknown) => () => validateGenerateOptions(options);
  rejects(t, g({ seed: -1 }), `Expected integer between 0 and ${maxSeed} for seed but received -1 of type number`);
  rejects(t, g({ seed: 1.5 }), `Expected integer between 0 and ${maxSeed} for seed but received 1.5 of type number`);
  rejects(t, g({ seed: 2 ** 53 }), `Expected integer between 0 and ${maxSeed} for seed but received 9007199254740992 of type number`);
  rejects(t, g({ seed: '7' }), `Expected integer between 0 and ${maxSeed} for seed but received "7" of type string`);
  rejects(t, g({ steps: -1 }), 'Expected integer between 1 and 1000 for steps but received -1 of type number');
  rejects(t, g({ steps: 0 }), 'Expected integer between 1 and 1000 for steps but received 0 of type number');
  rejects(t, g({ steps: 1001 }), 'Expected integer between 1 and 1000 for steps but received 1001 of type number');
  rejects(t, g({ steps: 2.5 }), 'Expected integer between 1 and 1000 for steps but received 2.5 of type number');
  rejects(t, g({ decoderSteps: NaN }), 'Expected integer between 1 and 1000 for decoderSteps but received NaN of type number');
  rejects(t, g({ cfg: -0.5 }), 'Expected finite number >= 0 for cfg but received -0.5 of type number');
  rejects(t, g({ cfg: Infinity }), 'Expected finite number >= 0 for cfg but received Infinity of type number');
  rejects(t, g({ decoderCfg: '3' }), 'Expected finite number >= 0 for decoderCfg but received "3" of type string');
  rejects(t, g({ format: 'gif' }), "Expected one of 'png', 'jpeg', 'webp' for format but received \"gif\" of type string");
  rejects(t, g({ signal: {} }), 'Expected AbortSignal for signal but received an object of type object');
  rejects(t, g({ onProgress: true }), 'Expected function for onProgress but received true of type boolean');
  rejects(t, g({ stepz: 3 }), 'Unknown option "stepz" for generate; expected one of seed, steps, cfg, decoderSteps, decoderCfg, format, signal, onProgress');
  rejects(t, g('fast'), 'Expected object for generate options but received "fast" of type string');
  rejects(t, g(null), 'Expected object for generate options but received null of type null');
  rejects(
    t,
    () => validateGenerateOptions({ seed: maxSeed - 1 }, 3),
    `Expected seed + 2 (one seed per prompt) to be at most ${maxSeed} but received seed ${maxSeed - 1}`,
  );

  const controller = new AbortController();
  const onProgress = (): void => undefined;
  t.same(validateGenerateOptions({ seed: maxSeed, steps: 1000, cfg: 0, decoderSteps: 1, decoderCfg: 7.5, format: 'webp', signal: controller.signal, onProgress }), {
    seed: maxSeed,
    steps: 1000,
    cfg: 0,
    decoderSteps: 1,
    decoderCfg: 7.5,
    format: 'webp',
    signal: controller.signal,
    onProgress,
  });
  t.same(validateGenerateOptions(undefined), {
    seed: undefined,
    steps: undefined,
    cfg: undefined,
    decoderSteps: undefined,
    decoderCfg: undefined,
    format: 'png',
    signal: undefined,
    onProgress: undefined,
  });
  t.same(validateGenerateOptions({ seed: undefined }).seed, undefined, 'undefined means the default');
});

t.test('describe options', async (t) => {
  const d = (options: unknown) => () => validateDescribeOptions(options);
  rejects(t, d({ maxTokens: 0 }), 'Expected positive integer for maxTokens but received 0 of type number');
  rejects(t, d({ maxTokens: 1.5 }), 'Expected positive integer for maxTokens but received 1.5 of type number');
  rejects(t, d({ temperature: -1 }), 'Expected finite number >= 0 for temperature but received -1 of type number');
  rejects(t, d({ temperature: NaN }), 'Expected finite number >= 0 for temperature but received NaN of type number');
  rejects(t, d({ topK: -1 }), 'Expected non-negative integer for topK but received -1 of type number');
  rejects(t, d({ topK: 2.5 }), 'Expected non-negative integer for topK but received 2.5 of type number');
  rejects(t, d({ topP: 0 }), 'Expected number greater than 0 and at most 1 for topP but received 0 of type number');
  rejects(t, d({ topP: 1.01 }), 'Expected number greater than 0 and at most 1 for topP but received 1.01 of type number');
  rejects(t, d({ seed: -3 }), `Expected integer between 0 and ${maxSeed} for seed but received -3 of type number`);
  rejects(t, d({ limitInputPixels: 0 }), 'Expected positive integer for limitInputPixels but received 0 of type number');
  rejects(t, d({ signal: 'stop' }), 'Expected AbortSignal for signal but received "stop" of type string');
  rejects(t, d({ steps: 3 }), 'Unknown option "steps" for describe; expected one of maxTokens, temperature, topK, topP, seed, limitInputPixels, signal');
  t.throws(() => validateDescribeOptions({ max_tokens: 3 }, 'describeStream'), { message: /^Unknown option "max_tokens" for describeStream/ });
  t.same(validateDescribeOptions({}), {
    maxTokens: 128,
    temperature: 0,
    topK: 0,
    topP: 1,
    seed: undefined,
    limitInputPixels: 4096 * 4096,
    signal: undefined,
  });
  t.equal(validateDescribeOptions({ topP: 1, topK: 0, temperature: 0.7 }).temperature, 0.7);
});

t.test('question', async (t) => {
  rejects(t, () => validateQuestion(''), 'Expected non-empty string for question but received "" of type string');
  rejects(t, () => validateQuestion(5), 'Expected non-empty string for question but received 5 of type number');
  t.equal(validateQuestion(undefined), undefined);
  t.equal(validateQuestion('what shape is it?'), 'what shape is it?');
});

t.test('load options', async (t) => {
  const l = (options: unknown) => () => validateLoadOptions(options);
  rejects(t, l({ device: 'gpu' }), "Expected one of 'auto', 'cpu', 'cuda' for device but received \"gpu\" of type string");
  rejects(t, l({ dtype: 'fp16' }), "Expected one of 'auto', 'float32', 'bfloat16', 'float16' for dtype but received \"fp16\" of type string");
  rejects(t, l({ threads: -1 }), 'Expected non-negative integer for threads but received -1 of type number');
  rejects(t, l({ threads: 1.5 }), 'Expected non-negative integer for threads but received 1.5 of type number');
  rejects(t, l({ gpu: true }), 'Unknown option "gpu" for loadModel; expected one of device, dtype, threads, maxBatch, maxQueue, cudaGraphs');
  rejects(t, l({ cudaGraphs: 'no' }), 'Expected boolean for cudaGraphs but received "no" of type string');
  rejects(t, l({ cudaGraphs: 0 }), 'Expected boolean for cudaGraphs but received 0 of type number');
  rejects(t, l({ maxBatch: 0 }), 'Expected positive integer for maxBatch but received 0 of type number');
  rejects(t, l({ maxQueue: 1.5 }), 'Expected positive integer for maxQueue but received 1.5 of type number');
  t.same(validateLoadOptions(undefined), { device: 'auto', dtype: 'auto', threads: 0, maxBatch: 8, maxQueue: 64, cudaGraphs: true });
  t.same(validateLoadOptions({ device: 'cpu', dtype: 'float32', threads: 2, maxBatch: 4, maxQueue: 2, cudaGraphs: false }), {
    device: 'cpu',
    dtype: 'float32',
    threads: 2,
    maxBatch: 4,
    maxQueue: 2,
    cudaGraphs: false,
  });
});

t.test('random seeds are integers in range', async (t) => {
  for (let i = 0; i < 200; i++) {
    const seed = randomSeed();
    t.ok(Number.isInteger(seed) && seed >= 0 && seed <= maxSeed);
  }
  for (let i = 0; i < 50; i++) t.ok(randomSeed(3) <= 3);
});
