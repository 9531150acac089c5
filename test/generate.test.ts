// Text-to-image generation with the bundled tiny model: determinism, batching, progress, aborts.
import sharp from 'sharp';
import t from 'tap';
import { InvalidArgumentError, loadModel, type Blip3oModel, type ProgressEvent } from '../ts/index';
import { fast, skipWithoutRuntime } from './fixtures/runtime';

const prompt = 'a large red circle at the center on a white background';

t.test('generate', { skip: skipWithoutRuntime }, async (t) => {
  const model: Blip3oModel = await loadModel({ device: 'cpu' });
  t.teardown(() => model.dispose());
  const { width, height } = model.info().image;

  t.test('a PNG of the bundle image size', async (t) => {
    const result = await model.generate(prompt, { seed: 7, ...fast });
    const meta = await sharp(result.image).metadata();
    t.equal(meta.format, 'png');
    t.equal(meta.width, width);
    t.equal(meta.height, height);
    t.equal(meta.channels, 3);
    t.equal(result.format, 'png');
    t.equal(result.width, width);
    t.equal(result.height, height);
    t.equal(result.seed, 7);
    for (const key of ['conditionMs', 'ditMs', 'decoderMs', 'vaeMs', 'encodeMs', 'totalMs'] as const) {
      t.type(result.timings[key], 'number', `timings.${key}`);
    }
  });

  t.test('the same seed gives the same bytes, another seed other bytes', async (t) => {
    const a = await model.generate(prompt, { seed: 42, ...fast });
    const b = await model.generate(prompt, { seed: 42, ...fast });
    const c = await model.generate(prompt, { seed: 43, ...fast });
    t.ok(a.image.equals(b.image), 'seed 42 twice');
    t.notOk(a.image.equals(c.image), 'seed 43 differs');
    const other = await model.generate('a small blue square at the top left on a black background', { seed: 42, ...fast });
    t.notOk(a.image.equals(other.image), 'another prompt differs');
  });

  t.test('without a seed, a random one is reported and reproduces the image', async (t) => {
    const a = await model.generate(prompt, fast);
    t.ok(Number.isInteger(a.seed) && a.seed >= 0 && a.seed <= Number.MAX_SAFE_INTEGER);
    const b = await model.generate(prompt, { ...fast, seed: a.seed });
    t.ok(a.image.equals(b.image));
  });

  t.test('a batch equals each sample generated alone', async (t) => {
    const prompts = [prompt, 'two green triangles on a gray background', 'a yellow square above a blue circle on a black background'];
    const batch = await model.generate(prompts, { seed: 100, ...fast });
    t.equal(batch.length, 3);
    t.same(batch.map((r) => r.seed), [100, 101, 102]);
    for (let i = 0; i < prompts.length; i++) {
      const alone = await model.generate(prompts[i], { seed: 100 + i, ...fast });
      t.ok(batch[i].image.equals(alone.image), `sample ${i} is byte-identical`);
    }
    const single = await model.generate([prompt], { seed: 5, ...fast });
    t.ok(Array.isArray(single) && single.length === 1, 'an array of one for an array of one');
  });

  t.test('progress reports every step of every stage, in order', async (t) => {
    const events: ProgressEvent[] = [];
    await model.generate(['a', 'b'], { seed: 1, steps: 3, decoderSteps: 4, onProgress: (e) => events.push({ ...e }) });
    const expected: ProgressEvent[] = [
      { stage: 'condition', step: 1, steps: 2 },
      { stage: 'condition', step: 2, steps: 2 },
      ...[1, 2, 3].map((step) => ({ stage: 'dit' as const, step, steps: 3 })),
      ...[1, 2, 3, 4].map((step) => ({ stage: 'decoder' as const, step, steps: 4 })),
      { stage: 'vae', step: 1, steps: 1 },
    ];
    t.same(events, expected);
  });

  t.test('JPEG and WebP', async (t) => {
    for (const format of ['jpeg', 'webp'] as const) {
      const result = await model.generate(prompt, { seed: 3, ...fast, format });
      const meta = await sharp(result.image).metadata();
      t.equal(meta.format, format);
      t.equal(meta.width, width);
      t.equal(meta.height, height);
      t.equal(result.format, format);
    }
  });

  t.test('abort mid-generation rejects with AbortError within one step; the model keeps working', async (t) => {
    const reference = await model.generate(prompt, { seed: 9, ...fast });
    const controller = new AbortController();
    let afterAbort = 0;
    const seen: ProgressEvent[] = [];
    const run = model.generate(prompt, {
      seed: 9,
      steps: 30,
      decoderSteps: 200,
      signal: controller.signal,
      onProgress: (e) => {
        if (controller.signal.aborted) afterAbort++;
        seen.push(e);
        if (e.stage === 'decoder' && e.step === 3) controller.abort();
      },
    });
    await t.rejects(run, { name: 'AbortError' });
    t.ok(afterAbort <= 1, `${afterAbort} progress event(s) after the abort`);
    t.notOk(seen.some((e) => e.stage === 'vae'), 'never reached the VAE');
    const again = await model.generate(prompt, { seed: 9, ...fast });
    t.ok(again.image.equals(reference.image), 'the next generation is unaffected');
  });

  t.test('an abort reason is what the call rejects with', async (t) => {
    const controller = new AbortController();
    const reason = new Error('user cancelled');
    const run = model.generate(prompt, {
      seed: 1,
      steps: 50,
      signal: controller.signal,
      onProgress: (e) => {
        if (e.stage === 'dit' && e.step === 2) controller.abort(reason);
      },
    });
    await t.rejects(run, reason);
  });

  t.test('an already-aborted signal rejects before any work', async (t) => {
    let events = 0;
    const run = model.generate(prompt, { signal: AbortSignal.abort(), onProgress: () => events++ });
    await t.rejects(run, { name: 'AbortError' });
    t.equal(events, 0);
  });

  t.test('a throwing onProgress ends the job with its error', async (t) => {
    const boom = new Error('progress failed');
    await t.rejects(
      model.generate(prompt, {
        seed: 1,
        ...fast,
        onProgress: (e) => {
          if (e.stage === 'dit') throw boom;
        },
      }),
      boom,
    );
    const ok = await model.generate(prompt, { seed: 1, ...fast });
    t.ok(ok.image.length > 0, 'the model keeps working');
  });

  t.test('bad prompts and options are rejected before running', async (t) => {
    await t.rejects(model.generate(''), new InvalidArgumentError('Expected non-empty string for prompt but received "" of type string'));
    await t.rejects(model.generate([]), InvalidArgumentError);
    await t.rejects(model.generate(prompt, { steps: -1 }), new InvalidArgumentError('Expected integer between 1 and 1000 for steps but received -1 of type number'));
    await t.rejects(model.generate(prompt, { format: 'gif' as 'png' }), InvalidArgumentError);
    const context = model.info().context;
    await t.rejects(model.generate('word '.repeat(context)), { name: 'InvalidArgumentError', message: /too long: \d+ tokens.*context of \d+ tokens/ });
  });

  t.test('concurrent calls queue and each completes', async (t) => {
    const [a, b] = await Promise.all([
      model.generate(prompt, { seed: 11, ...fast }),
      model.generate(prompt, { seed: 12, ...fast }),
    ]);
    const a2 = await model.generate(prompt, { seed: 11, ...fast });
    t.ok(a.image.equals(a2.image));
    t.notOk(a.image.equals(b.image));
  });
});
