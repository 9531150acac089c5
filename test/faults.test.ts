// Faults: an abort at every stage of generation and understanding rejects with AbortError and leaves the
// model working with the same bytes; dispose while a job runs rejects it and frees the model; an
// exception inside a TorchScript call (or a wrongly shaped module output) becomes a rejected promise
// with a Blip3oRuntimeError, not a crash; the process exits cleanly with work pending. The abort points
// are reached through progress and token events (the job is still in its loop when the abort lands,
// since the loops are long), so the tests hold however the machine schedules them; no timing asserts.
import { spawn } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync, mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { Blip3oRuntimeError, DisposedError, loadModel, type Blip3oModel, type GenerationStage } from '../ts/index';
import { makeBrokenBundle, pythonSkip } from './fixtures/broken-bundle';
import { fast, root, skipWithoutRuntime, squarePng } from './fixtures/runtime';

const prompt = 'a large red circle at the center on a white background';
const isAbort = { name: 'AbortError' };

t.test('faults', { skip: skipWithoutRuntime }, async (t) => {
  const model: Blip3oModel = await loadModel({ device: 'cpu', threads: 2 });
  t.teardown(() => model.dispose());
  const image = await squarePng();
  const reference = (await model.generate(prompt, { seed: 5, ...fast })).image;
  const referenceBatch = (await model.generate([prompt, prompt], { seed: 5, ...fast })).map((r) => r.image);
  const referenceText = await model.describe(image, { maxTokens: 12 });

  // The model still gives the same bytes (generation, a batch, understanding) as before the fault.
  const unchanged = async (t: Test, what: string): Promise<void> => {
    t.ok((await model.generate(prompt, { seed: 5, ...fast })).image.equals(reference), `${what}: same image after`);
    const batch = await model.generate([prompt, prompt], { seed: 5, ...fast });
    t.ok(batch.every((r, i) => r.image.equals(referenceBatch[i])), `${what}: same batch after`);
    t.equal(await model.describe(image, { maxTokens: 12 }), referenceText, `${what}: same answer after`);
  };

  t.test('abort at every generation stage rejects with AbortError; the model keeps its bytes', async (t) => {
    // stage: where the abort is sent (on that stage's first progress event); the long loop after it
    // is where it lands.
    const cases: Array<{ stage: GenerationStage | 'queued' | 'before'; steps: number; decoderSteps: number }> = [
      { stage: 'before', steps: 3, decoderSteps: 3 },   // aborted before the call
      { stage: 'queued', steps: 3, decoderSteps: 3 },   // aborted in the same tick, still in the queue
      { stage: 'condition', steps: 400, decoderSteps: 3 },
      { stage: 'dit', steps: 400, decoderSteps: 3 },
      { stage: 'decoder', steps: 3, decoderSteps: 400 },
      { stage: 'vae', steps: 3, decoderSteps: 3 },      // after the last stage: the result is dropped
    ];
    for (const { stage, steps, decoderSteps } of cases) {
      for (const batch of [false, true]) {
        const controller = new AbortController();
        if (stage === 'before') controller.abort();
        const seen: string[] = [];
        const call = model.generate((batch ? [prompt, prompt] : prompt) as string, {
          seed: 5,
          steps,
          decoderSteps,
          signal: controller.signal,
          onProgress: (e) => {
            seen.push(e.stage);
            if (e.stage === stage) controller.abort();
          },
        });
        if (stage === 'queued') controller.abort();
        await t.rejects(call, isAbort, `${stage}${batch ? ' (batch)' : ''}`);
        if (stage !== 'before' && stage !== 'queued') t.ok(seen.includes(stage), `${stage}: reached`);
      }
    }
    await unchanged(t, 'generation aborts');
  });

  t.test('abort while queued behind another job, and mid-batch for one caller', async (t) => {
    const blocker = new AbortController();
    const first = model.generate(prompt, { seed: 1, steps: 400, decoderSteps: 3, signal: blocker.signal });
    const waiting = new AbortController();
    const second = model.generate(prompt, { seed: 2, steps: 2, decoderSteps: 2, signal: waiting.signal });
    const describeWaiting = new AbortController();
    const third = model.describe(image, { maxTokens: 12, signal: describeWaiting.signal });
    setImmediate(() => {
      waiting.abort();
      describeWaiting.abort();
    });
    const running = t.rejects(first, isAbort, 'the running one');
    await Promise.all([
      t.rejects(second, isAbort, 'a generate waiting in the queue'),
      t.rejects(third, isAbort, 'a describe waiting for the executor'),
    ]);
    blocker.abort();
    await running;
    await unchanged(t, 'queued aborts');
  });

  t.test('abort at every describe stage rejects with AbortError; the model keeps its answer', async (t) => {
    // Before the call; while the image is read (before the native job); at the first token (decode).
    const before = new AbortController();
    before.abort();
    await t.rejects(model.describe(image, { signal: before.signal }), isAbort, 'before');
    const reading = new AbortController();
    const whileReading = model.describe(image, { maxTokens: 12, signal: reading.signal });
    reading.abort();
    await t.rejects(whileReading, isAbort, 'while the image is read');
    const decoding = new AbortController();
    let pieces = 0;
    await t.rejects(async () => {
      for await (const piece of model.describeStream(image, { maxTokens: 10000, signal: decoding.signal })) {
        t.type(piece, 'string');
        pieces++;
        decoding.abort();
      }
    }, isAbort, 'decode (stream)');
    t.ok(pieces >= 1);
    // Prefill: the job is cancelled while the executor still runs the generation before it, so it
    // stops at its first check (before the prefill).
    const blocker = new AbortController();
    const running = model.generate(prompt, { seed: 1, steps: 400, decoderSteps: 3, signal: blocker.signal });
    const prefill = new AbortController();
    const call = model.describe(image, { maxTokens: 12, signal: prefill.signal });
    setTimeout(() => {
      prefill.abort();
      blocker.abort();
    }, 20);
    await Promise.all([t.rejects(call, isAbort, 'before the prefill'), t.rejects(running, isAbort)]);
    await unchanged(t, 'describe aborts');
  });

  t.test('dispose while a job runs (every stage) rejects it and frees the model', async (t) => {
    for (const stage of ['dit', 'decoder'] as const) {
      const other = await loadModel({ device: 'cpu', threads: 2 });
      let disposing: Promise<void> | undefined;
      const running = other.generate([prompt, prompt], {
        seed: 1,
        steps: stage === 'dit' ? 400 : 3,
        decoderSteps: stage === 'decoder' ? 400 : 3,
        onProgress: (e) => {
          if (e.stage === stage) disposing ??= other.dispose();
        },
      });
      const queued = other.describe(image, { maxTokens: 4 });
      await Promise.all([
        t.rejects(running, DisposedError, `${stage}: the running job`),
        t.rejects(queued, DisposedError, `${stage}: the queued describe`),
      ]);
      await t.resolves(disposing!, `${stage}: dispose resolves (the executor thread joined)`);
      await t.rejects(other.generate(prompt, fast), DisposedError);
    }
    const other = await loadModel({ device: 'cpu' });
    const disposing = other.dispose();
    await t.rejects(other.describe(image), DisposedError, 'describe after dispose started');
    await disposing;
    await unchanged(t, 'other models disposed');
  });

  t.test('an exception inside TorchScript rejects with Blip3oRuntimeError', { skip: pythonSkip() }, async (t) => {
    const dirs: string[] = [];
    t.teardown(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

    const raising = makeBrokenBundle('decoder-raises');
    dirs.push(raising);
    const broken = await loadModel(raising, { device: 'cpu', threads: 2 });
    for (let round = 0; round < 2; round++) {
      await t.rejects(broken.generate(prompt, { seed: 1, steps: 2, decoderSteps: 2 }), {
        name: 'Blip3oRuntimeError',
        code: 'BLIP3O_RUNTIME',
        message: /boom: decoder\.pt fails on purpose/,
      });
      t.notMatch(String(((await broken.generate(prompt, fast).catch((e: unknown) => e)) as Error).message), /\n/, 'one line');
    }
    // Merged callers each get the error; the model keeps serving what does not touch the decoder.
    const merged = await Promise.allSettled([broken.generate(prompt, { seed: 1, ...fast }), broken.generate([prompt, prompt], { seed: 2, ...fast })]);
    for (const s of merged) t.ok(s.status === 'rejected' && s.reason instanceof Blip3oRuntimeError, 'a merged caller');
    t.equal(await broken.describe(image, { maxTokens: 12 }), referenceText, 'describe on the same model still works');
    await broken.dispose();

    const flat = makeBrokenBundle('vae-bad-shape');
    dirs.push(flat);
    const badVae = await loadModel(flat, { device: 'cpu' });
    const { latent } = JSON.parse(readFileSync(path.join(flat, 'manifest.json'), 'utf8')) as { latent: Record<string, number> };
    await t.rejects(badVae.generate([prompt, prompt], { seed: 1, ...fast }), {
      name: 'Blip3oRuntimeError',
      // the broken VAE flattens one sample's latents: channels x height x width values
      message: `vae.pt returned a tensor of shape [${latent.channels * latent.height * latent.width}], expected [1, 3, 64, 64]`,
    });
    await badVae.dispose();

    // A DiT output that would broadcast: loadModel (which runs the DiT for the negative condition) fails.
    // On two threads the CFG pair's halves are two one-row calls.
    const short = makeBrokenBundle('dit-bad-shape');
    dirs.push(short);
    await t.rejects(loadModel(short, { device: 'cpu', threads: 2 }), {
      name: 'Blip3oRuntimeError',
      message: /dit\.pt returned a tensor of shape \[1, 1, 32\], expected \[1, 64, 32\]/,
    });
    await unchanged(t, 'broken bundles');
  });

  t.test('the process exits cleanly with work pending', async (t) => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'blip3o-exit-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const index = JSON.stringify(path.join(root, 'ts', 'index'));
    const scripts: Record<string, { code: string; status: number }> = {
      // main returns without awaiting: the pending jobs finish, then the process ends.
      'returns from main': {
        status: 0,
        code: `const { loadModel } = require(${index});
          (async () => {
            const model = await loadModel({ device: 'cpu' });
            for (let i = 0; i < 4; i++) void model.generate('a red circle', { seed: i, steps: 3, decoderSteps: 3 });
            void model.generate(['a', 'b'], { seed: 9, steps: 3, decoderSteps: 3 });
            void model.describe(require('node:fs').readFileSync(process.argv[2]), { maxTokens: 8 });
          })();`,
      },
      // process.exit while a long job runs and more wait.
      'process.exit mid-job': {
        status: 0,
        code: `const { loadModel } = require(${index});
          (async () => {
            const model = await loadModel({ device: 'cpu' });
            void model.generate('a red circle', { seed: 1, steps: 100000, decoderSteps: 3,
              onProgress: (e) => { if (e.stage === 'dit' && e.step === 3) process.exit(0); } }).catch(() => {});
            for (let i = 0; i < 4; i++) void model.generate('a', { seed: i, steps: 3, decoderSteps: 3 }).catch(() => {});
            void model.describe(require('node:fs').readFileSync(process.argv[2]), { maxTokens: 8 }).catch(() => {});
          })();`,
      },
      // An uncaught exception while jobs run: Node's usual exit code 1, no signal.
      'uncaught exception mid-job': {
        status: 1,
        code: `const { loadModel } = require(${index});
          (async () => {
            const model = await loadModel({ device: 'cpu' });
            void model.generate('a red circle', { seed: 1, steps: 100000, decoderSteps: 3 }).catch(() => {});
            void model.generate('a', { seed: 2, steps: 3, decoderSteps: 3 }).catch(() => {});
            setTimeout(() => { throw new Error('uncaught on purpose'); }, 50);
          })();`,
      },
    };
    const imageFile = path.join(dir, 'square.png');
    writeFileSync(imageFile, image);
    for (const [name, { code, status }] of Object.entries(scripts)) {
      const file = path.join(dir, `${name.replace(/\W+/g, '-')}.ts`);
      writeFileSync(file, code);
      const result = await new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve) => {
        // The same TypeScript loader as this test, so the child runs the sources under test.
        const child = spawn(process.execPath, [...process.execArgv, file, imageFile], { stdio: ['ignore', 'ignore', 'pipe'] });
        let stderr = '';
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        // A guard against a hung child (a failure, not a timing assert).
        const guard = setTimeout(() => child.kill('SIGKILL'), 60_000);
        child.on('close', (code, signal) => {
          clearTimeout(guard);
          resolve({ code, signal, stderr });
        });
      });
      t.equal(result.signal, null, `${name}: no signal (no crash, not hung)`);
      t.equal(result.code, status, `${name}: exit code ${status}`);
      t.notMatch(result.stderr, /Segmentation fault|core dumped|terminate called|FATAL ERROR|Assertion/, `${name}: nothing on stderr from a crash`);
    }
  });
});
