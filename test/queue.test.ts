// The generate queue: concurrent calls with the same settings merge into one native batch, each
// caller keeping the bytes it gets alone, its own progress, abort and error; a full queue rejects
// with BusyError; every call settles exactly once. No timing asserts: a shared batch shows in the
// timings, which a merged call shares with its batch (the same per-step wall times).
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { BusyError, DisposedError, loadModel, type GenerateResult, type ProgressEvent } from '../ts/index';
import { fast, skipWithoutRuntime, tinyDir } from './fixtures/runtime';

const prompts = [
  'a large red circle at the center on a white background',
  'two green triangles on a gray background',
  'a small blue square at the top left on a black background',
  'a yellow star at the bottom right on a white background',
];
const sameBatch = (a: GenerateResult, b: GenerateResult): boolean =>
  JSON.stringify(a.timings.ditStepMs) === JSON.stringify(b.timings.ditStepMs);

t.test('queue', { skip: skipWithoutRuntime }, async (t) => {
  const model = await loadModel({ device: 'cpu', threads: 2, maxBatch: 4, maxQueue: 6 });
  t.teardown(() => model.dispose());
  const alone: GenerateResult[] = [];
  for (let i = 0; i < prompts.length; i++) alone.push(await model.generate(prompts[i], { seed: 20 + i, ...fast }));

  t.test('calls made together merge into one batch, each with its own bytes', async (t) => {
    const merged = await Promise.all(prompts.map((p, i) => model.generate(p, { seed: 20 + i, ...fast })));
    merged.forEach((r, i) => {
      t.ok(r.image.equals(alone[i].image), `sample ${i} equals it alone`);
      t.equal(r.seed, 20 + i);
    });
    t.ok(merged.every((r) => sameBatch(r, merged[0])), 'one native batch ran them');
  });

  t.test('a caller batch merges with single calls; other settings run in their own batch', async (t) => {
    const [pair, single, other] = await Promise.all([
      model.generate(prompts.slice(0, 2), { seed: 20, ...fast }),
      model.generate(prompts[2], { seed: 22, ...fast }),
      model.generate(prompts[3], { seed: 23, steps: 2, decoderSteps: 2 }),
    ]);
    t.ok(pair[0].image.equals(alone[0].image) && pair[1].image.equals(alone[1].image), 'the caller batch');
    t.ok(single.image.equals(alone[2].image), 'the single call');
    t.ok(sameBatch(pair[0], single), 'merged');
    t.notOk(sameBatch(single, other), 'other settings are not merged');
    t.equal(other.timings.ditStepMs.length, 2);
  });

  t.test('more samples than maxBatch run in several batches, unchanged', async (t) => {
    const many = await Promise.all([...prompts, ...prompts.slice(0, 2)].map((p, i) => model.generate(p, { seed: 20 + (i % 4), ...fast })));
    many.forEach((r, i) => t.ok(r.image.equals(alone[i % 4].image), `call ${i}`));
    t.ok(sameBatch(many[4], many[5]), 'the rest share the next batch');
    t.notOk(sameBatch(many[0], many[4]), 'maxBatch 4: the fifth call runs in the next batch');
  });

  t.test('each caller gets its own progress', async (t) => {
    const events: ProgressEvent[][] = [[], []];
    await Promise.all([
      model.generate(prompts.slice(0, 2), { seed: 1, steps: 2, decoderSteps: 2, onProgress: (e) => events[0].push({ ...e }) }),
      model.generate(prompts[2], { seed: 3, steps: 2, decoderSteps: 2, onProgress: (e) => events[1].push({ ...e }) }),
    ]);
    const loops = [
      ...[1, 2].map((step) => ({ stage: 'dit' as const, step, steps: 2 })),
      ...[1, 2].map((step) => ({ stage: 'decoder' as const, step, steps: 2 })),
      { stage: 'vae' as const, step: 1, steps: 1 },
    ];
    t.same(events[0], [{ stage: 'condition', step: 1, steps: 2 }, { stage: 'condition', step: 2, steps: 2 }, ...loops]);
    t.same(events[1], [{ stage: 'condition', step: 1, steps: 1 }, ...loops]);
  });

  t.test('aborting one batched caller rejects it alone; the others finish unchanged', async (t) => {
    const controller = new AbortController();
    let afterAbort = 0;
    const calls = prompts.map((p, i) =>
      model.generate(p, {
        seed: 20 + i,
        ...fast,
        signal: i === 1 ? controller.signal : undefined,
        onProgress:
          i === 1
            ? (e) => {
                if (controller.signal.aborted) afterAbort++;
                if (e.stage === 'dit' && e.step === 1) controller.abort();
              }
            : undefined,
      }),
    );
    const settled = await Promise.allSettled(calls);
    t.equal(settled[1].status, 'rejected');
    t.equal((settled[1] as PromiseRejectedResult).reason.name, 'AbortError');
    t.equal(afterAbort, 0, 'no progress after the abort');
    for (const i of [0, 2, 3]) {
      t.equal(settled[i].status, 'fulfilled', `call ${i}`);
      t.ok((settled[i] as PromiseFulfilledResult<GenerateResult>).value.image.equals(alone[i].image), `call ${i} bytes`);
    }
  });

  t.test('a throwing onProgress fails its caller only', async (t) => {
    const boom = new Error('progress failed');
    const [bad, good] = await Promise.allSettled([
      model.generate(prompts[0], { seed: 20, ...fast, onProgress: () => { throw boom; } }),
      model.generate(prompts[1], { seed: 21, ...fast }),
    ]);
    t.same(bad, { status: 'rejected', reason: boom });
    t.ok(good.status === 'fulfilled' && good.value.image.equals(alone[1].image));
  });

  t.test('when every caller of a batch aborts, the batch stops and the model keeps working', async (t) => {
    const controllers = [new AbortController(), new AbortController()];
    let steps = 0;
    const calls = controllers.map((c, i) =>
      model.generate(prompts[i], {
        seed: 20 + i,
        steps: 30,
        decoderSteps: 500,
        signal: c.signal,
        onProgress: (e) => {
          if (e.stage === 'decoder') steps = Math.max(steps, e.step);
          if (e.stage === 'decoder' && e.step === 2) c.abort();
        },
      }),
    );
    for (const call of calls) await t.rejects(call, { name: 'AbortError' });
    const next = await model.generate(prompts[0], { seed: 20, ...fast });
    t.ok(next.image.equals(alone[0].image), 'the next call runs, unchanged');
    t.ok(steps < 500, 'the cancelled batch never ran to its end');
  });

  t.test('past maxQueue waiting calls, generate rejects with BusyError at once', async (t) => {
    const calls = Array.from({ length: 8 }, (_, i) => model.generate(prompts[i % 4], { seed: 20 + (i % 4), ...fast }));
    const settled = await Promise.allSettled(calls);
    settled.slice(0, 6).forEach((s, i) => t.ok(s.status === 'fulfilled' && s.value.image.equals(alone[i % 4].image), `call ${i}`));
    for (const s of settled.slice(6)) {
      t.equal(s.status, 'rejected');
      const reason = (s as PromiseRejectedResult).reason;
      t.ok(reason instanceof BusyError);
      t.equal(reason.code, 'BLIP3O_BUSY');
      t.match(reason.message, /maxQueue 6/);
    }
  });

  t.test('a sample has the same bytes for any thread count and batch', async (t) => {
    // also with a guided decoder: its CFG pairs are split into calls like the DiT's
    const guided = { ...fast, decoderCfg: 2 };
    const guidedAlone: GenerateResult[] = [];
    for (let i = 0; i < 3; i++) guidedAlone.push(await model.generate(prompts[i], { ...guided, seed: 20 + i }));
    // six samples: 12 DiT rows, more than one call of at most 4 rows per thread
    const six = [...prompts, ...prompts.slice(0, 2)];
    const sixAlone = [...alone];
    for (let i = 4; i < 6; i++) sixAlone.push(await model.generate(six[i], { seed: 20 + i, ...fast }));
    for (const threads of [1, 2, 3]) {
      const other = await loadModel({ device: 'cpu', threads });
      const batch = await other.generate(six, { seed: 20, ...fast });
      batch.forEach((r, i) => t.ok(r.image.equals(sixAlone[i].image), `threads ${threads}, sample ${i}`));
      const guidedBatch = await other.generate(prompts.slice(0, 3), { ...guided, seed: 20 });
      guidedBatch.forEach((r, i) => t.ok(r.image.equals(guidedAlone[i].image), `guided decoder, threads ${threads}, sample ${i}`));
      await other.dispose();
    }
  });

  t.test('a lone image keeps its bytes whether its decoder runs on every thread or on one', async (t) => {
    // The model tries both to learn which is faster (WidenChoice): alone[0] was its first image, whose
    // decoder steps ran widened; by now it runs the faster mode and the other now and then.
    const first = alone[0];
    for (let i = 0; i < 14; i++) {
      const again = await model.generate(prompts[0], { seed: 20, ...fast });
      t.ok(again.image.equals(first.image), `image ${i}`);
    }
  });

  t.test('a bundle that does not say batchInvariant runs one call per sample, with the same bytes', async (t) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'blip3o-queue-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    cpSync(tinyDir, dir, { recursive: true });
    const manifestPath = path.join(dir, 'manifest.json');
    const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as { batchInvariant?: boolean };
    delete manifest.batchInvariant;
    writeFileSync(manifestPath, JSON.stringify(manifest));
    const other = await loadModel(dir, { device: 'cpu', threads: 2 });
    t.equal(other.manifest.batchInvariant, false);
    const batch = await other.generate(prompts.slice(0, 3), { seed: 20, ...fast });
    batch.forEach((r, i) => t.ok(r.image.equals(alone[i].image), `sample ${i}`));
    t.ok((await other.generate(prompts[0], { seed: 20, ...fast })).image.equals(alone[0].image), 'alone');
    await other.dispose();
  });

  t.test('every call settles exactly once, dispose included', async (t) => {
    const other = await loadModel({ device: 'cpu', threads: 1, maxBatch: 2 });
    let settlements = 0;
    const count = (p: Promise<unknown>): Promise<unknown> =>
      p.then(
        (v) => (settlements++, v),
        (e: unknown) => {
          settlements++;
          throw e;
        },
      );
    let started!: () => void;
    const running = new Promise<void>((resolve) => (started = resolve));
    const calls = [
      count(other.generate(prompts[0], { seed: 1, steps: 30, decoderSteps: 500, onProgress: () => started() })),
      ...[1, 2, 3].map((i) => count(other.generate(prompts[i], { seed: 1, ...fast }))),
    ];
    const settled = Promise.allSettled(calls);
    await running;  // the first batch (maxBatch 2: calls 0 and 1) runs; calls 2 and 3 wait
    await other.dispose();
    for (const s of await settled) t.ok(s.status === 'rejected' && s.reason instanceof DisposedError);
    await new Promise((resolve) => setImmediate(resolve));
    t.equal(settlements, 4);
  });
});
