// What the benchmark reads: generate's per-stage call times and per-step wall times, and
// describeDetailed's token counts and prefill/decode times.
import t from 'tap';
import { loadModel } from '../ts/index';
import { skipWithoutRuntime, squarePng } from './fixtures/runtime';

t.test('timings', { skip: skipWithoutRuntime }, async (t) => {
  const model = await loadModel({ device: 'cpu' });
  t.teardown(() => model.dispose());

  t.test('generate: time inside the modules per stage, wall time per step', async (t) => {
    const { timings } = await model.generate('a red circle', { seed: 1, steps: 3, decoderSteps: 4 });
    t.equal(timings.ditStepMs.length, 3);
    t.equal(timings.decoderStepMs.length, 4);
    const sum = (a: number[]): number => a.reduce((x, y) => x + y, 0);
    for (const [stage, steps] of [['dit', timings.ditStepMs], ['decoder', timings.decoderStepMs]] as const) {
      const call = timings[`${stage}CallMs`];
      t.ok(steps.every((ms) => ms > 0), `${stage} steps`);
      t.ok(call > 0 && call <= sum(steps), `${stage}: calls within the steps`);
      t.ok(sum(steps) <= timings[`${stage}Ms`], `${stage}: steps within the stage`);
    }
    t.ok(timings.conditionCallMs > 0 && timings.conditionCallMs <= timings.conditionMs);
    t.ok(timings.vaeCallMs > 0 && timings.vaeCallMs <= timings.vaeMs);
  });

  t.test('describeDetailed: the answer and its stats', async (t) => {
    const image = await squarePng();
    const details = await model.describeDetailed(image, 'what is it?', { maxTokens: 5 });
    const text = await model.describe(image, 'what is it?', { maxTokens: 5 });
    t.equal(details.text, text);
    t.ok(details.promptTokens > 0);
    t.ok(details.generatedTokens >= 0 && details.generatedTokens <= 5);
    t.ok(details.stopReason === 'stop' || details.stopReason === 'length');
    if (details.stopReason === 'length') t.equal(details.generatedTokens, 5);
    t.ok(details.prefillMs > 0 && details.decodeMs >= 0);
  });
});
