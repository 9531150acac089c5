// Image understanding with the bundled tiny model: text, streaming, context limits, bad images.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import t from 'tap';
import { InvalidArgumentError, loadModel, type Blip3oModel } from '../ts/index';
import { skipWithoutRuntime, squarePng } from './fixtures/runtime';

t.test('describe', { skip: skipWithoutRuntime }, async (t) => {
  const model: Blip3oModel = await loadModel({ device: 'cpu' });
  t.teardown(() => model.dispose());
  const image = await squarePng();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'blip3o-describe-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));

  t.test('returns a string, deterministic when greedy', async (t) => {
    const text = await model.describe(image, 'what color is the square?', { maxTokens: 12 });
    t.type(text, 'string');
    t.equal(await model.describe(image, 'what color is the square?', { maxTokens: 12 }), text);
    t.type(await model.describe(image), 'string', 'the default question');
    t.type(await model.describe(image, { maxTokens: 4 }), 'string', 'options without a question');
  });

  t.test('a file path works like its bytes', async (t) => {
    const file = path.join(dir, 'square.png');
    writeFileSync(file, image);
    t.equal(await model.describe(file, { maxTokens: 8 }), await model.describe(image, { maxTokens: 8 }));
  });

  t.test('stream pieces join to the same text', async (t) => {
    for (const options of [{ maxTokens: 16 }, { maxTokens: 16, temperature: 1, topK: 50, topP: 0.9, seed: 3 }]) {
      const text = await model.describe(image, 'what shape is it?', options);
      const pieces: string[] = [];
      for await (const piece of model.describeStream(image, 'what shape is it?', options)) {
        t.type(piece, 'string');
        t.ok(piece.length > 0, 'no empty pieces');
        pieces.push(piece);
      }
      t.equal(pieces.join(''), text);
    }
  });

  t.test('sampling with a seed is reproducible', async (t) => {
    const options = { maxTokens: 16, temperature: 1.5, seed: 12 };
    t.equal(await model.describe(image, options), await model.describe(image, options));
  });

  t.test('leaving the stream early cancels the job; the model keeps working', async (t) => {
    const full = await model.describe(image, { maxTokens: 32 });
    let pieces = 0;
    for await (const piece of model.describeStream(image, { maxTokens: 10000 })) {
      t.type(piece, 'string');
      if (++pieces === 1) break;
    }
    t.equal(pieces, 1);
    t.equal(await model.describe(image, { maxTokens: 32 }), full);
  });

  t.test('maxTokens beyond the context is clamped', async (t) => {
    t.type(await model.describe(image, { maxTokens: 1_000_000 }), 'string');
  });

  t.test('a question longer than the context is rejected', async (t) => {
    const context = model.info().context;
    await t.rejects(model.describe(image, 'is it red? '.repeat(context)), {
      name: 'InvalidArgumentError',
      message: /does not fit the model's context: the prompt is \d+ tokens .* the context is \d+ tokens/,
    });
    const stream = model.describeStream(image, 'is it red? '.repeat(context));
    await t.rejects(async () => {
      for await (const piece of stream) t.fail(`unexpected piece ${piece}`);
    }, InvalidArgumentError);
  });

  t.test('abort', async (t) => {
    await t.rejects(model.describe(image, { signal: AbortSignal.abort() }), { name: 'AbortError' });
    const controller = new AbortController();
    const run = (async () => {
      let text = '';
      for await (const piece of model.describeStream(image, { maxTokens: 10000, signal: controller.signal })) {
        text += piece;
        controller.abort();
      }
      return text;
    })();
    await t.rejects(run, { name: 'AbortError' });
    t.type(await model.describe(image, { maxTokens: 4 }), 'string', 'still works');
  });

  t.test('bad images are rejected with a clear error', async (t) => {
    await t.rejects(model.describe(Buffer.from('this is not an image')), {
      name: 'InvalidArgumentError',
      message: /^could not read the image: .*unsupported image format/,
    });
    const truncated = image.subarray(0, Math.floor(image.length * 0.6));
    await t.rejects(model.describe(truncated), { name: 'InvalidArgumentError', message: /^could not read the image/ });
    const missing = path.join(dir, 'missing.png');
    await t.rejects(model.describe(missing), { name: 'InvalidArgumentError', message: /missing\.png/ });
    await t.rejects(model.describe(image, { limitInputPixels: 64 * 64 - 1 }), {
      name: 'InvalidArgumentError',
      message: 'the image is 64x64 = 4096 pixels, over the limit of 4095 (limitInputPixels)',
    });
    await t.rejects(model.describe(42 as unknown as Buffer), InvalidArgumentError);
    await t.rejects(model.describe(Buffer.alloc(0)), InvalidArgumentError);
  });

  t.test('any size, alpha, grey, palette, 16-bit and JPEG inputs are accepted', async (t) => {
    const inputs: Record<string, Buffer> = {
      wide: await squarePng(300, 40),
      tiny: await squarePng(5, 5),
      large: await squarePng(1000, 700),
      rgba: await sharp(image).ensureAlpha(0.5).png().toBuffer(),
      grey: await sharp(image).greyscale().png().toBuffer(),
      palette: await sharp(image).png({ palette: true }).toBuffer(),
      rgb16: await sharp(image).toColourspace('rgb16').png().toBuffer(),
      jpeg: await sharp(image).jpeg().toBuffer(),
    };
    for (const [name, input] of Object.entries(inputs)) {
      t.type(await model.describe(input, { maxTokens: 4 }), 'string', name);
    }
    await t.rejects(model.describe(await squarePng(1000, 4)), { name: 'InvalidArgumentError', message: /aspect ratio/ });
  });
});
