// Bad input over the public API and the CLI: every case is answered by a typed error that names the
// problem, the process stays alive, and the model still produces the same image afterwards. Fixed
// cases first, then generated ones (fast-check, fixed seeds, few runs: the file stays fast).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import fc from 'fast-check';
import sharp from 'sharp';
import t, { type Test } from 'tap';
import { Blip3oError, BundleError, DeviceError, InvalidArgumentError, loadModel, runtimeInfo, type Blip3oModel } from '../ts/index';
import { root, skipWithoutRuntime, squarePng } from './fixtures/runtime';

/** Steps of every generation whose steps are not under test. */
const quick = { steps: 1, decoderSteps: 1 } as const;
const baselinePrompt = 'a large red circle at the center on a white background';
const baselineOptions = { seed: 1234, ...quick };
/** fast-check settings: a fixed seed, few runs. */
const fcRuns = (numRuns: number, seed = 42): fc.Parameters<unknown> => ({ seed, numRuns, endOnFailure: true });

/** The error `promise` rejects with (or a failure if it resolves). */
async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => new Error('resolved where a rejection was expected'),
    (err: unknown) => err,
  );
}

/** Whether `promise` resolved, and its value or error. */
async function outcome<T>(promise: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; err: unknown }> {
  return promise.then(
    (value) => ({ ok: true as const, value }),
    (err: unknown) => ({ ok: false as const, err }),
  );
}

/** A rejection with an InvalidArgumentError whose one-line message matches `message`. */
async function rejectsInvalid(t: Test, promise: Promise<unknown>, message: RegExp, label: string): Promise<void> {
  const err = await rejection(promise);
  t.ok(err instanceof InvalidArgumentError, `${label}: an InvalidArgumentError (got ${String(err)})`);
  t.equal((err as Blip3oError).code, 'BLIP3O_INVALID_ARGUMENT', `${label}: code`);
  t.match((err as Error).message, message, `${label}: the message names the problem`);
}

// ---------------------------------------------------------------------------------------------
// Images: valid ones in many layouts, and ways to break them.

async function validImages(): Promise<Record<string, Buffer>> {
  const rgb = await squarePng(48, 40);
  const raw = (channels: 1 | 2 | 3 | 4): sharp.Sharp =>
    sharp(Buffer.alloc(24 * 20 * channels, 0).map((_, i) => (i * 37) % 251), { raw: { width: 24, height: 20, channels } });
  return {
    'png rgb': rgb,
    'png grey': await raw(1).png().toBuffer(),
    'png grey+alpha': await raw(2).png().toBuffer(),
    'png rgba': await raw(4).png().toBuffer(),
    'png 16-bit': await sharp(rgb).toColourspace('rgb16').png().toBuffer(),
    'png palette': await sharp(rgb).png({ palette: true, colours: 8 }).toBuffer(),
    'jpeg rgb': await sharp(rgb).jpeg({ quality: 80 }).toBuffer(),
    'jpeg grey': await raw(1).jpeg().toBuffer(),
    'jpeg cmyk': await sharp(rgb).toColourspace('cmyk').jpeg().toBuffer(),
    'webp rgb': await sharp(rgb).webp({ quality: 80 }).toBuffer(),
    'webp rgba': await raw(4).webp({ lossless: true }).toBuffer(),
  };
}

function pngChunk(type: string, data: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(Buffer.concat([head.subarray(4), data])) >>> 0, 0);
  return Buffer.concat([head, data, crc]);
}

/** A PNG whose (valid, CRC-correct) header claims width x height, with a few bytes of pixel data. */
function pngClaiming(width: number, height: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.writeUInt8(8, 8); // bit depth
  ihdr.writeUInt8(2, 9); // RGB
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk('IHDR', ihdr),
    pngChunk('IDAT', Buffer.from([0x78, 0x9c, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01])),
    pngChunk('IEND', Buffer.alloc(0)),
  ]);
}

// ---------------------------------------------------------------------------------------------
// Option rules, written independently of ts/options.ts: what a valid value is.

const isInt = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v);
const isFinite = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v);
const rules = {
  generate: {
    seed: (v: unknown) => isInt(v) && v >= 0 && v <= Number.MAX_SAFE_INTEGER,
    steps: (v: unknown) => isInt(v) && v >= 1 && v <= 1000,
    cfg: (v: unknown) => isFinite(v) && v >= 0,
    decoderSteps: (v: unknown) => isInt(v) && v >= 1 && v <= 1000,
    decoderCfg: (v: unknown) => isFinite(v) && v >= 0,
    format: (v: unknown) => v === 'png' || v === 'jpeg' || v === 'webp',
    signal: (v: unknown) => v instanceof AbortSignal,
    onProgress: (v: unknown) => typeof v === 'function',
  },
  describe: {
    maxTokens: (v: unknown) => isInt(v) && v >= 1,
    temperature: (v: unknown) => isFinite(v) && v >= 0,
    topK: (v: unknown) => isInt(v) && v >= 0 && v <= Number.MAX_SAFE_INTEGER,
    topP: (v: unknown) => isFinite(v) && v > 0 && v <= 1,
    seed: (v: unknown) => isInt(v) && v >= 0 && v <= Number.MAX_SAFE_INTEGER,
    limitInputPixels: (v: unknown) => isInt(v) && v >= 1 && v <= Number.MAX_SAFE_INTEGER,
    signal: (v: unknown) => v instanceof AbortSignal,
  },
  loadModel: {
    device: (v: unknown) => v === 'auto' || v === 'cpu' || v === 'cuda',
    dtype: (v: unknown) => v === 'auto' || v === 'float32' || v === 'bfloat16' || v === 'float16',
    threads: (v: unknown) => isInt(v) && v >= 0 && v <= 4096,
    maxBatch: (v: unknown) => isInt(v) && v >= 1,
    maxQueue: (v: unknown) => isInt(v) && v >= 1,
    cudaGraphs: (v: unknown) => typeof v === 'boolean',
  },
} as const;

/** Any value, including the awkward ones (null prototypes, sparse arrays, -0, NaN, huge strings). */
const anyValue = fc.oneof(
  fc.anything({ withNullPrototype: true, withBoxedValues: true, withSparseArray: true, withTypedArray: true, withMap: true, withSet: true, withDate: true }),
  fc.constantFrom(NaN, Infinity, -Infinity, -0, 0, 1, -1, 0.5, 2 ** 53, 2 ** 53 - 1, 1e308, '', ' ', '1', 'png', 'cpu', null, true, [], {}),
  fc.integer({ min: -5, max: 2000 }),
  fc.double(),
);

t.test('bad input', { skip: skipWithoutRuntime }, async (t) => {
  const model: Blip3oModel = await loadModel({ device: 'cpu' });
  t.teardown(() => model.dispose());
  const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-badinput-'));
  t.teardown(() => rmSync(scratch, { recursive: true, force: true }));
  const baseline = (await model.generate(baselinePrompt, baselineOptions)).image;
  const image = await squarePng();
  const counts: Record<string, number> = {};
  const count = (key: string): void => {
    counts[key] = (counts[key] ?? 0) + 1;
  };

  t.test('prompts', async (t) => {
    for (const prompt of ['', 42, null, undefined, {}, [], [''], ['a', 3], ['a', ''], Symbol('p')]) {
      await rejectsInvalid(t, model.generate(prompt as never, quick), /prompt/, `prompt ${String(prompt)}`);
    }
    const long = 'red circle '.repeat(200);
    await rejectsInvalid(t, model.generate(long, quick), /^prompt is too long: \d+ tokens .* context of 256 tokens/, 'too long');
    await rejectsInvalid(t, model.generate(['ok', long], quick), /^prompt\[1\] is too long/, 'too long in a batch');
  });

  t.test('generate options', async (t) => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ steps: 0 }, /for steps but received 0/],
      [{ steps: -3 }, /for steps but received -3/],
      [{ steps: 1.5 }, /integer between 1 and 1000 for steps but received 1.5/],
      [{ steps: 1001 }, /for steps but received 1001/],
      [{ steps: 1e12 }, /for steps/],
      [{ steps: Infinity }, /for steps but received Infinity/],
      [{ steps: '3' }, /for steps but received "3" of type string/],
      [{ decoderSteps: 0 }, /for decoderSteps/],
      [{ decoderSteps: 2.5 }, /for decoderSteps/],
      [{ cfg: NaN }, /finite number >= 0 for cfg but received NaN/],
      [{ cfg: -1 }, /for cfg but received -1/],
      [{ cfg: Infinity }, /for cfg/],
      [{ decoderCfg: NaN }, /for decoderCfg/],
      [{ decoderCfg: -0.01 }, /for decoderCfg/],
      [{ seed: -1 }, /integer between 0 and 9007199254740991 for seed but received -1/],
      [{ seed: 0.5 }, /for seed but received 0.5/],
      [{ seed: 2 ** 53 }, /for seed but received 9007199254740992/],
      [{ seed: Number.MAX_VALUE }, /for seed/],
      [{ seed: '1' }, /for seed but received "1" of type string/],
      [{ format: 'gif' }, /'png', 'jpeg', 'webp' for format but received "gif"/],
      [{ signal: {} }, /AbortSignal for signal/],
      [{ onProgress: 'x' }, /function for onProgress/],
      [{ stepz: 3 }, /Unknown option "stepz" for generate/],
    ];
    for (const [options, message] of cases) {
      await rejectsInvalid(t, model.generate('a circle', { ...quick, ...options }), message, JSON.stringify(options) ?? String(options));
    }
    await rejectsInvalid(t, model.generate(['a', 'b'], { ...quick, seed: Number.MAX_SAFE_INTEGER }), /seed \+ 1 \(one seed per prompt\)/, 'batch seed overflow');
    for (const options of [null, 3, 'fast', [], () => 1]) {
      await rejectsInvalid(t, model.generate('a circle', options as never), /generate options/, `options ${String(options)}`);
    }
  });

  t.test('load options', async (t) => {
    const missing = path.join(scratch, 'no-bundle');
    await rejectsInvalid(t, loadModel({ device: 'tpu' as never }), /'auto', 'cpu', 'cuda' for device but received "tpu"/, 'device');
    await rejectsInvalid(t, loadModel(missing, { device: 'gpu' as never }), /for device/, 'device (checked before the directory)');
    await rejectsInvalid(t, loadModel({ dtype: 'int8' as never }), /for dtype but received "int8"/, 'dtype');
    await rejectsInvalid(t, loadModel({ threads: -1 }), /non-negative integer for threads/, 'threads');
    await rejectsInvalid(t, loadModel({ threads: 5000 }), /integer between 0 and 4096 for threads but received 5000/, 'threads too many');
    await rejectsInvalid(t, loadModel({ maxBatch: 0 }), /positive integer for maxBatch/, 'maxBatch');
    await rejectsInvalid(t, loadModel({ maxQueue: 1.5 }), /positive integer for maxQueue/, 'maxQueue');
    await rejectsInvalid(t, loadModel({ cudaGraphs: 'yes' as never }), /boolean for cudaGraphs/, 'cudaGraphs');
    await rejectsInvalid(t, loadModel({ devise: 'cpu' } as never), /Unknown option "devise" for loadModel/, 'unknown option');
    await rejectsInvalid(t, loadModel(''), /non-empty string for dir/, 'empty dir');
    await rejectsInvalid(t, loadModel(3 as never), /loadModel options/, 'a number');
    await rejectsInvalid(t, loadModel({} as never, {}), /for dir/, 'an object then options');
    const err = await rejection(loadModel(missing));
    t.ok(err instanceof BundleError, 'a missing bundle: BundleError');
    if (!runtimeInfo().cudaBuilt || runtimeInfo().cudaDevices === 0) {
      const cuda = await rejection(loadModel({ device: 'cuda' }));
      t.ok(cuda instanceof DeviceError, `cuda without CUDA: DeviceError (got ${String(cuda)})`);
      t.match((cuda as Error).message, /cuda|CUDA/);
    }
  });

  t.test('describe: images and questions', async (t) => {
    const valid = await validImages();
    const png = valid['png rgb'];
    await rejectsInvalid(t, model.describe(Buffer.from('not an image at all'), { maxTokens: 1 }), /could not read the image/, 'text bytes');
    await rejectsInvalid(t, model.describe(png.subarray(0, png.length / 2), { maxTokens: 1 }), /could not read the image/, 'truncated png');
    await rejectsInvalid(t, model.describe(png.subarray(0, 20), { maxTokens: 1 }), /could not read the image/, 'png header only');
    await rejectsInvalid(t, model.describe(Buffer.alloc(0), { maxTokens: 1 }), /empty Buffer/, 'empty buffer');
    await rejectsInvalid(t, model.describe('', { maxTokens: 1 }), /image file path or Buffer for image/, 'empty path');
    await rejectsInvalid(t, model.describe(path.join(scratch, 'missing.png'), { maxTokens: 1 }), /could not read .*missing\.png/, 'missing file');
    await rejectsInvalid(t, model.describe(scratch, { maxTokens: 1 }), /could not read .*blip3o-badinput/, 'a directory');
    for (const bad of [null, undefined, 42, {}, [], Object.create(null), new Float32Array(4), Symbol('img')]) {
      await rejectsInvalid(t, model.describe(bad as never, { maxTokens: 1 }), /image file path or Buffer for image but received/, `image ${typeof bad}`);
    }
    await rejectsInvalid(t, model.describe(image, { maxTokens: 1, limitInputPixels: 64 * 64 - 1 }), /64x64 = 4096 pixels, over the limit of 4095/, 'over a set limit');
    const started = Date.now();
    await rejectsInvalid(t, model.describe(pngClaiming(100000, 100000), { maxTokens: 1 }), /100000x100000 = 10000000000 pixels, over the limit of 16777216/, 'huge declared size');
    await rejectsInvalid(t, model.describe(pngClaiming(1, 100000), { maxTokens: 1 }), /aspect ratio/, 'extreme aspect ratio');
    t.ok(Date.now() - started < 5000, 'refused from the header, without decoding');
    await rejectsInvalid(t, model.describe(image, '', { maxTokens: 1 }), /non-empty string for question/, 'empty question');
    await rejectsInvalid(t, model.describe(image, 42 as never, { maxTokens: 1 }), /for question but received 42/, 'number question');
    await rejectsInvalid(t, model.describe(image, 'what? '.repeat(200), { maxTokens: 1 }), /question does not fit the model's context/, 'question too long');
    for (const [name, bytes] of Object.entries(valid)) {
      const text = await model.describe(bytes, 'what is it?', { maxTokens: 2 });
      t.type(text, 'string', `${name} is read`);
    }
  });

  t.test('describe options', async (t) => {
    const cases: [Record<string, unknown>, RegExp][] = [
      [{ maxTokens: 0 }, /positive integer for maxTokens but received 0/],
      [{ maxTokens: 1.5 }, /for maxTokens/],
      [{ temperature: NaN }, /for temperature but received NaN/],
      [{ temperature: -1 }, /for temperature/],
      [{ topK: -1 }, /for topK/],
      [{ topP: 0 }, /for topP but received 0/],
      [{ topP: 1.01 }, /for topP/],
      [{ seed: -1 }, /for seed/],
      [{ limitInputPixels: 0 }, /for limitInputPixels/],
      [{ limitInputPixels: Infinity }, /for limitInputPixels/],
      [{ limitInputPixels: 2 ** 53 }, /integer between 1 and 9007199254740991 for limitInputPixels but received 9007199254740992/],
      [{ topK: 1e300 }, /integer between 0 and 9007199254740991 for topK but received 1e\+300/],
      [{ maxtokens: 2 }, /Unknown option "maxtokens" for describe/],
    ];
    for (const [options, message] of cases) {
      await rejectsInvalid(t, model.describe(image, 'what?', options), message, JSON.stringify(options) ?? String(options));
    }
    await rejectsInvalid(t, model.describeDetailed(image, { topK: -2 }), /for topK/, 'describeDetailed');
    const stream = async (): Promise<void> => {
      for await (const piece of model.describeStream(image, { topP: 2 })) void piece;
    };
    await rejectsInvalid(t, stream(), /Unknown option|for topP/, 'describeStream');
  });

  t.test('generated: random bytes as images', async (t) => {
    await fc.assert(
      fc.asyncProperty(fc.uint8Array({ minLength: 1, maxLength: 4096 }), async (bytes) => {
        count('random bytes');
        const err = await rejection(model.describe(Buffer.from(bytes), { maxTokens: 1 }));
        return err instanceof InvalidArgumentError && /could not read the image/.test(err.message);
      }),
      fcRuns(40),
    );
    t.pass(`${counts['random bytes']} random byte strings refused`);
  });

  t.test('generated: truncated and bit-flipped PNG, JPEG and WebP files', async (t) => {
    const valid = await validImages();
    const names = Object.keys(valid);
    const outcomes: Record<string, number> = { read: 0, refused: 0 };
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...names),
        fc.constantFrom('truncate', 'flip', 'both'),
        fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
        fc.array(fc.tuple(fc.double({ min: 0, max: 1, noNaN: true }), fc.integer({ min: 0, max: 7 })), { minLength: 1, maxLength: 4 }),
        async (name, mode, keep, flips) => {
          count('mutated images');
          const source = valid[name];
          const length = mode === 'flip' ? source.length : Math.max(1, Math.floor(source.length * keep));
          const bytes = Buffer.from(source.subarray(0, length));
          if (mode !== 'truncate') for (const [where, bit] of flips) bytes[Math.floor(where * (bytes.length - 1))] ^= 1 << bit;
          try {
            const text = await model.describe(bytes, { maxTokens: 1 });
            outcomes.read++;
            return typeof text === 'string';
          } catch (err) {
            outcomes.refused++;
            if (!(err instanceof InvalidArgumentError)) throw err;
            return /could not read the image|over the limit|aspect ratio/.test(err.message);
          }
        },
      ),
      fcRuns(80),
    );
    t.pass(`${counts['mutated images']} mutated images: ${outcomes.read} still readable, ${outcomes.refused} refused with a clear error`);
  });

  t.test('generated: declared sizes are checked before decoding', async (t) => {
    const limit = 4096 * 4096;
    const side = fc.oneof(fc.integer({ min: 1, max: 5000 }), fc.integer({ min: 4096, max: 200_000 }), fc.integer({ min: 1, max: 2 ** 31 - 1 }));
    const started = Date.now();
    await fc.assert(
      fc.asyncProperty(side, side, async (width, height) => {
        count('declared sizes');
        const err = await rejection(model.describe(pngClaiming(width, height), { maxTokens: 1 }));
        if (!(err instanceof InvalidArgumentError)) throw err;
        // Past the limit: refused by it, or (sizes near 2^31) by the decoder's header check already.
        if (width * height > limit) {
          if (/over the limit of 16777216 \(limitInputPixels\)/.test(err.message)) count('refused by the pixel limit');
          return /over the limit of 16777216 \(limitInputPixels\)|could not read the image: .*header/.test(err.message);
        }
        return /could not read the image|aspect ratio/.test(err.message);
      }),
      fcRuns(40),
    );
    t.ok(Date.now() - started < 20_000, 'no declared size was decoded');
    t.pass(`${counts['declared sizes']} declared sizes, ${counts['refused by the pixel limit'] ?? 0} of them by the pixel limit`);
  });

  t.test('generated: prompts of 0 to 100,000 characters of any Unicode', async (t) => {
    const outcomes = { generated: 0, tooLong: 0, empty: 0 };
    const unit = fc.oneof(
      fc.constant('binary' as const),
      fc.constant('grapheme' as const),
      fc.constant(fc.integer({ min: 0xd800, max: 0xdfff }).map((c) => String.fromCharCode(c))), // lone surrogates
      fc.constant(fc.constantFrom('{prompt}', '{image}', '<|im_end|>', '[IMG]', '<|vision_start|>', '\u0000', '\n')),
    );
    const prompt = fc.oneof(
      { weight: 3, arbitrary: unit.chain((u) => fc.string({ unit: u, maxLength: 40 })) },
      { weight: 1, arbitrary: unit.chain((u) => fc.string({ unit: u, minLength: 1000, maxLength: 100_000 })) },
    );
    await fc.assert(
      fc.asyncProperty(prompt, async (text) => {
        count('prompts');
        try {
          const result = await model.generate(text, { seed: 5, ...quick });
          outcomes.generated++;
          return result.image.length > 0 && result.width === 64;
        } catch (err) {
          if (!(err instanceof InvalidArgumentError)) throw err;
          if (text.length === 0) {
            outcomes.empty++;
            return /non-empty string for prompt/.test(err.message);
          }
          outcomes.tooLong++;
          return /^prompt is too long/.test(err.message);
        }
      }),
      fcRuns(30),
    );
    t.pass(`${counts.prompts} prompts: ${outcomes.generated} generated, ${outcomes.tooLong} too long, ${outcomes.empty} empty`);
  });

  t.test('generated: options of every type', async (t) => {
    let accepted = 0;
    let refused = 0;
    // generate
    for (const name of Object.keys(rules.generate) as (keyof typeof rules.generate)[]) {
      await fc.assert(
        fc.asyncProperty(anyValue, async (value) => {
          count('generate options');
          const options = { ...quick, seed: 3, [name]: value };
          const valid = value === undefined || rules.generate[name](value);
          try {
            const result = await model.generate('a blue square', options as never);
            accepted++;
            return valid && result.image.length > 0;
          } catch (err) {
            refused++;
            return !valid && err instanceof InvalidArgumentError && err.message.includes(` for ${name} but received `);
          }
        }),
        fcRuns(25),
      );
    }
    // describe
    for (const name of Object.keys(rules.describe) as (keyof typeof rules.describe)[]) {
      await fc.assert(
        fc.asyncProperty(anyValue, async (value) => {
          count('describe options');
          const options = { maxTokens: 1, [name]: value };
          const valid = value === undefined || rules.describe[name](value);
          try {
            const text = await model.describe(image, 'what?', options as never);
            accepted++;
            return valid && typeof text === 'string';
          } catch (err) {
            refused++;
            if (!(err instanceof InvalidArgumentError)) return false;
            // A valid but small pixel limit refuses the 64x64 image by name.
            if (valid) return name === 'limitInputPixels' && /over the limit of \d+ \(limitInputPixels\)/.test(err.message);
            return err.message.includes(` for ${name} but received `);
          }
        }),
        fcRuns(25),
      );
    }
    // loadModel: against a missing directory, so that valid options end in the BundleError of the directory.
    const missing = path.join(scratch, 'no-bundle');
    for (const name of Object.keys(rules.loadModel) as (keyof typeof rules.loadModel)[]) {
      await fc.assert(
        fc.asyncProperty(anyValue, async (value) => {
          count('load options');
          const valid = value === undefined || rules.loadModel[name](value);
          const err = await rejection(loadModel(missing, { [name]: value } as never));
          if (valid) return err instanceof BundleError && /bundle directory not found/.test(err.message);
          return err instanceof InvalidArgumentError && err.message.includes(` for ${name} but received `);
        }),
        fcRuns(25),
      );
    }
    // the positional arguments: prompt and question
    await fc.assert(
      fc.asyncProperty(anyValue, anyValue, async (prompt, question) => {
        count('positional arguments');
        const promptValid =
          (typeof prompt === 'string' && prompt.length > 0) ||
          (Array.isArray(prompt) && prompt.length > 0 && prompt.every((p) => typeof p === 'string' && p.length > 0));
        const generated = await outcome(model.generate(prompt as never, quick));
        if (promptValid) {
          if (!generated.ok && !(generated.err instanceof InvalidArgumentError && /too long/.test(generated.err.message))) return false;
        } else if (generated.ok || !(generated.err instanceof InvalidArgumentError && /for prompt(\[\d+\])? but received/.test(generated.err.message))) {
          return false;
        }
        const questionValid = question === undefined || (typeof question === 'string' && question.length > 0);
        const answered = await outcome(model.describe(image, question as never, { maxTokens: 1 }));
        if (questionValid) return answered.ok || (answered.err instanceof InvalidArgumentError && /does not fit/.test(answered.err.message));
        return !answered.ok && answered.err instanceof InvalidArgumentError && / for question but received /.test(answered.err.message);
      }),
      fcRuns(30),
    );
    t.pass(`${counts['generate options']} generate, ${counts['describe options']} describe, ${counts['load options']} loadModel option values and ${counts['positional arguments']} positional pairs: ${accepted} accepted, ${refused} refused`);
  });

  t.test('the model still works: the same image as at the start', async (t) => {
    const after = (await model.generate(baselinePrompt, baselineOptions)).image;
    t.ok(after.equals(baseline), 'byte-equal to the image made before the bad input');
    t.comment(`cases: ${JSON.stringify(counts)}`);
  });
});

const cli = path.join(root, 'dist', 'cli.js');
const cliSkip = skipWithoutRuntime || (!existsSync(cli) && 'dist/cli.js is not built (npx tsc -p tsconfig.json)');

t.test('bad CLI invocations: exit 1, one line, no stack, no file', { skip: cliSkip }, async (t) => {
  const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-badcli-'));
  t.teardown(() => rmSync(scratch, { recursive: true, force: true }));
  const out = path.join(scratch, 'out.png');
  const notImage = path.join(scratch, 'not-an-image.png');
  writeFileSync(notImage, 'hello');
  const valid = path.join(scratch, 'valid.png');
  writeFileSync(valid, await squarePng());
  const huge = path.join(scratch, 'huge.png');
  writeFileSync(huge, pngClaiming(100000, 100000));
  const cases: [string[], RegExp][] = [
    [['generate', '', '-o', out, '--steps', '1', '--decoder-steps', '1'], /non-empty string for PROMPT/],
    [['generate', 'a circle', '-o', out, '--steps', '1.5'], /for --steps but received 1.5/],
    [['generate', 'a circle', '-o', out, '--steps', '1e9'], /for --steps/],
    [['generate', 'a circle', '-o', out, '--cfg', 'NaN'], /Expected a number for --cfg but received "NaN"/],
    [['generate', 'a circle', '-o', out, '--seed', '-1'], /for --seed but received -1/],
    [['generate', 'a circle', '-o', out, '--seed', '9007199254740993'], /for --seed/],
    [['generate', 'a circle', '-o', out, '--device', 'tpu'], /--device must be one of/],
    [['generate', 'red circle '.repeat(200), '-o', out, '--steps', '1', '--decoder-steps', '1', '--device', 'cpu'], /PROMPT is too long|prompt is too long/],
    [['describe', notImage, '--max-tokens', '1', '--device', 'cpu'], /could not read .*not-an-image\.png/],
    [['describe', huge, '--max-tokens', '1', '--device', 'cpu'], /over the limit/],
    [['describe', valid, '--question', 'why? '.repeat(200), '--device', 'cpu'], /question does not fit the model's context/],
    [['describe', valid, '--question', '', '--device', 'cpu'], /--question must not be empty/],
    [['describe', valid, '--max-tokens', '0'], /for --max-tokens but received 0/],
    [['describe', notImage, '--top-p', '0'], /for --top-p but received 0/],
  ];
  for (const [args, message] of cases) {
    const result = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 60_000 });
    const label = args.map((a) => (a.length > 30 ? `${a.slice(0, 30)}...` : a)).join(' ');
    t.equal(result.status, 1, `${label}: exit 1`);
    const lines = result.stderr.split('\n').filter((line) => line.length > 0);
    t.equal(lines.length, 1, `${label}: one stderr line (${JSON.stringify(result.stderr.slice(0, 300))})`);
    t.match(lines[0] ?? '', /^blip3o: /, `${label}: starts with blip3o:`);
    t.match(lines[0] ?? '', message, `${label}: names the problem`);
    t.notMatch(result.stderr, /\bat .*\.js:\d+|\n\s+at /, `${label}: no stack trace`);
    t.equal(result.stdout, '', `${label}: nothing on stdout`);
    t.same(readdirSync(scratch).sort(), ['huge.png', 'not-an-image.png', 'valid.png'], `${label}: no output file`);
  }
});
