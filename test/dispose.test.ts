// dispose(): frees the native model now, rejects running, queued and later calls with
// DisposedError, is idempotent, and `await using` calls it.
import t from 'tap';
import { DisposedError, loadModel } from '../ts/index';
import { fast, skipWithoutRuntime, squarePng } from './fixtures/runtime';

const prompt = 'a small green square at the top right on a black background';

t.test('dispose', { skip: skipWithoutRuntime }, async (t) => {
  const image = await squarePng();

  t.test('later calls reject with DisposedError; dispose is idempotent', async (t) => {
    const model = await loadModel({ device: 'cpu' });
    await model.generate(prompt, { seed: 1, ...fast });
    t.equal(model.isDisposed, false);
    await model.dispose();
    t.equal(model.isDisposed, true);
    await t.resolves(model.dispose(), 'a second dispose resolves');
    await t.rejects(model.generate(prompt, fast), DisposedError);
    await t.rejects(model.generate(prompt, fast), { code: 'BLIP3O_DISPOSED', name: 'DisposedError' });
    await t.rejects(model.describe(image), DisposedError);
    await t.rejects(async () => {
      for await (const piece of model.describeStream(image)) t.fail(`unexpected ${piece}`);
    }, DisposedError);
    t.throws(() => model.info(), DisposedError);
  });

  t.test('dispose while a job runs rejects it, and the queued ones', async (t) => {
    const model = await loadModel({ device: 'cpu' });
    let disposing: Promise<void> | undefined;
    const running = model.generate(prompt, {
      seed: 1,
      steps: 200,
      onProgress: (e) => {
        if (e.stage === 'dit' && e.step === 2) disposing ??= model.dispose();
      },
    });
    const queued = model.generate(prompt, { seed: 2, ...fast });
    const queuedDescribe = model.describe(image);
    await Promise.all([
      t.rejects(running, DisposedError, 'the running job'),
      t.rejects(queued, DisposedError, 'a queued generate'),
      t.rejects(queuedDescribe, DisposedError, 'a queued describe'),
    ]);
    await disposing;
  });

  t.test('dispose during a describe stream ends the stream with DisposedError', async (t) => {
    const model = await loadModel({ device: 'cpu' });
    await t.rejects(async () => {
      for await (const piece of model.describeStream(image, { maxTokens: 10000 })) {
        t.type(piece, 'string');
        void model.dispose();
      }
    }, DisposedError);
    await model.dispose();
  });

  t.test('await using disposes at the end of the scope', async (t) => {
    let escaped: Awaited<ReturnType<typeof loadModel>> | undefined;
    {
      await using model = await loadModel({ device: 'cpu' });
      escaped = model;
      t.equal(model.isDisposed, false);
    }
    t.equal(escaped.isDisposed, true);
    await t.rejects(escaped.generate(prompt, fast), DisposedError);
  });
});
