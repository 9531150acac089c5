// Load: 200 concurrent requests of mixed kinds (generate single and batches, describe, describeStream)
// with seeded random aborts and a small maxQueue. Every request settles exactly once, the only
// rejections are AbortError and BusyError, every result has the bytes of the same call made alone, and
// the model works unchanged afterwards. Then a short soak (bench/soak.js's loop): RSS growth after a
// warm-up stays under 50 MB. Outcomes depend on scheduling; the assertions do not. No timing asserts.
import t from 'tap';
import { BusyError, loadModel, type Blip3oModel } from '../ts/index';
import { skipWithoutRuntime, squarePng } from './fixtures/runtime';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const { soak } = require('../bench/soak.js') as {
  soak: (model: Blip3oModel, options: { n: number; steps: number; decoderSteps: number; warmup: number; every: number }) => Promise<{ growthMb: number; peakGrowthMb: number; samples: unknown[] }>;
};

const prompts = ['a large red circle at the center on a white background', 'two green triangles on a gray background'];
const settings = { steps: 1, decoderSteps: 1 } as const;

// mulberry32: a small seeded PRNG, so the mix and the aborts are the same on every run.
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), 1 | a);
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x;
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

type Kind = 'generate' | 'batch' | 'describe' | 'stream';
type AbortWhen = 'none' | 'sync' | 'immediate' | 'timer' | 'event';

t.test('load', { skip: skipWithoutRuntime }, async (t) => {
  const model = await loadModel({ device: 'cpu', threads: 2, maxBatch: 4, maxQueue: 16 });
  t.teardown(() => model.dispose());
  const image = await squarePng();

  // What each call gives alone: images by prompt and seed, the greedy answer by maxTokens.
  const images = new Map<string, Buffer>();
  const imageAlone = async (prompt: string, seed: number): Promise<Buffer> => {
    const key = `${prompt}|${seed}`;
    if (!images.has(key)) images.set(key, (await model.generate(prompt, { seed, ...settings })).image);
    return images.get(key)!;
  };
  const answers = new Map<number, string>();
  for (const maxTokens of [2, 4]) answers.set(maxTokens, await model.describe(image, { maxTokens }));

  t.test('200 concurrent mixed requests with random aborts settle exactly once', async (t) => {
    const random = prng(6);
    const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)];
    const total = 200;
    const settlements = new Array<number>(total).fill(0);
    const outcomes: Array<{ kind: Kind; status: 'fulfilled' | 'AbortError' | 'BusyError' | 'other'; reason?: unknown }> = [];
    const checks: Array<() => Promise<void>> = [];

    const start = (i: number): Promise<void> => {
      const kind = pick<Kind>(['generate', 'generate', 'batch', 'describe', 'stream']);
      const when = random() < 0.35 ? pick<AbortWhen>(['sync', 'immediate', 'timer', 'event']) : 'none';
      const delay = Math.floor(random() * 40);
      const seed = 1 + Math.floor(random() * 3);
      const prompt = pick(prompts);
      const maxTokens = pick([2, 4]);
      const controller = new AbortController();
      const signal = when === 'none' ? undefined : controller.signal;
      const onEvent = when === 'event' ? () => controller.abort() : undefined;

      let call: Promise<unknown>;
      if (kind === 'generate' || kind === 'batch') {
        const input = kind === 'batch' ? [prompt, pick(prompts)] : prompt;
        call = model.generate(input as string, { seed, ...settings, signal, onProgress: onEvent }).then((r: unknown) => {
          const samples = (Array.isArray(r) ? r : [r]) as Array<{ image: Buffer; seed: number }>;
          const texts = Array.isArray(input) ? input : [input];
          checks.push(async () => {
            for (let k = 0; k < samples.length; k++) {
              t.equal(samples[k].seed, seed + k);
              t.ok(samples[k].image.equals(await imageAlone(texts[k], seed + k)), `request ${i} (${kind}) sample ${k}: the bytes it has alone`);
            }
          });
        });
      } else if (kind === 'describe') {
        call = model.describe(image, { maxTokens, signal }).then((text) => {
          checks.push(async () => void t.equal(text, answers.get(maxTokens), `request ${i} (describe): the answer it has alone`));
        });
        if (when === 'event') setImmediate(() => controller.abort());
      } else {
        call = (async () => {
          let text = '';
          for await (const piece of model.describeStream(image, { maxTokens, signal })) {
            text += piece;
            onEvent?.();
          }
          checks.push(async () => void t.equal(text, answers.get(maxTokens), `request ${i} (stream): the answer it has alone`));
        })();
      }
      if (when === 'sync') controller.abort();
      else if (when === 'immediate') setImmediate(() => controller.abort());
      else if (when === 'timer') setTimeout(() => controller.abort(), delay);

      return call.then(
        () => {
          settlements[i]++;
          outcomes[i] = { kind, status: 'fulfilled' };
        },
        (err: unknown) => {
          settlements[i]++;
          const name = err instanceof BusyError ? 'BusyError' : (err as Error)?.name === 'AbortError' ? 'AbortError' : 'other';
          outcomes[i] = { kind, status: name, reason: err };
        },
      );
    };

    // Half in one tick (past maxQueue: BusyError), the rest arriving over the next few tens of ms.
    const calls: Promise<void>[] = [];
    for (let i = 0; i < total / 2; i++) calls.push(start(i));
    for (let i = total / 2; i < total; i++) {
      const at = Math.floor(random() * 60);
      calls.push(new Promise<void>((resolve) => setTimeout(resolve, at)).then(() => start(i)));
    }
    await Promise.all(calls);
    await new Promise((resolve) => setTimeout(resolve, 50));  // late double settlements would show here

    t.same(settlements, new Array<number>(total).fill(1), 'every request settled exactly once');
    const others = outcomes.filter((o) => o.status === 'other');
    t.same(others.map((o) => String(o.reason)), [], 'no rejection but AbortError and BusyError');
    const count = (status: string, kind?: Kind): number => outcomes.filter((o) => o.status === status && (kind === undefined || o.kind === kind)).length;
    t.ok(count('BusyError') > 0, 'some generate calls found the queue full');
    t.ok(count('BusyError', 'describe') + count('BusyError', 'stream') === 0, 'describe is not queue-limited');
    t.ok(count('AbortError') > 0, 'some requests were aborted');
    t.ok(count('fulfilled', 'generate') + count('fulfilled', 'batch') > 0 && count('fulfilled', 'describe') + count('fulfilled', 'stream') > 0, 'both kinds completed');
    t.comment(`200 requests: ${count('fulfilled')} fulfilled, ${count('AbortError')} aborted, ${count('BusyError')} busy`);
    for (const check of checks) await check();

    // The model still works, unchanged.
    t.ok((await model.generate(prompts[0], { seed: 1, ...settings })).image.equals(await imageAlone(prompts[0], 1)), 'generate afterwards');
    t.equal(await model.describe(image, { maxTokens: 4 }), answers.get(4), 'describe afterwards');
  });

  t.test('soak: RSS growth after a warm-up stays under 50 MB', async (t) => {
    const result = await soak(model, { n: 150, steps: 1, decoderSteps: 1, warmup: 50, every: 25 });
    t.comment(`150 generations (1 + 1 steps): RSS growth after 50 warm-up generations ${result.growthMb} MB (peak ${result.peakGrowthMb} MB)`);
    t.ok(result.growthMb < 50, `growth ${result.growthMb} MB < 50 MB`);
    t.ok(result.peakGrowthMb < 50, `peak growth ${result.peakGrowthMb} MB < 50 MB`);
    t.equal(result.samples.length, 5);
  });
});
