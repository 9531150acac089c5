// Broken copies of the bundled model: every one fails to load with a BundleError that says what is
// wrong, before anything runs.
import { createHash } from 'node:crypto';
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t, { type Test } from 'tap';
import { BundleError, DeviceError, InvalidArgumentError, loadModel, runtimeInfo } from '../ts/index';
import { skipWithoutRuntime, tinyDir } from './fixtures/runtime';

type Manifest = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

t.test('bundle validation', { skip: skipWithoutRuntime }, async (t) => {
  const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-bundle-'));
  t.teardown(() => rmSync(scratch, { recursive: true, force: true }));
  let copies = 0;

  /** A copy of models/tiny, with `edit` applied to its manifest and files. */
  function brokenCopy(edit: (dir: string, manifest: Manifest) => void): string {
    const dir = path.join(scratch, `copy-${++copies}`);
    cpSync(tinyDir, dir, { recursive: true });
    const manifestPath = path.join(dir, 'manifest.json');
    const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as Manifest;
    edit(dir, manifest);
    writeFileSync(manifestPath, JSON.stringify(manifest, null, 2));
    return dir;
  }

  async function rejectsWith(t: Test, dir: string, message: RegExp): Promise<void> {
    const err = await loadModel(dir, { device: 'cpu' }).then(
      async (model) => {
        await model.dispose();
        return undefined;
      },
      (e: unknown) => e,
    );
    t.ok(err instanceof BundleError, `a BundleError (got ${String(err)})`);
    t.equal((err as BundleError).code, 'BLIP3O_BUNDLE');
    t.match((err as Error).message, message);
    t.notMatch((err as Error).message, /\n/, 'one line');
  }

  t.test('an intact copy loads', async (t) => {
    const model = await loadModel(brokenCopy(() => undefined), { device: 'cpu' });
    t.equal(model.info().name, 'blip3o-tiny-shapes');
    t.same(model.info().cudaGraphs, { dit: 'off (cpu)', decode: 'off (cpu)' }, 'no CUDA graphs on CPU, and info says why');
    await model.dispose();
  });

  t.test('a missing directory is named', async (t) => {
    const missing = path.join(scratch, 'no-such-bundle');
    await rejectsWith(t, missing, /bundle directory not found: .*no-such-bundle/);
  });

  t.test('a file instead of a directory', async (t) => {
    const file = path.join(scratch, 'a-file');
    writeFileSync(file, 'x');
    await rejectsWith(t, file, /not a bundle directory|not a directory/);
  });

  t.test('a directory without manifest.json', async (t) => {
    const dir = brokenCopy(() => undefined);
    rmSync(path.join(dir, 'manifest.json'));
    await rejectsWith(t, dir, /manifest\.json not found/);
  });

  t.test('a manifest missing a field names its path', async (t) => {
    await rejectsWith(t, brokenCopy((_, m) => delete m.sampler.dit.steps), /manifest\.json: sampler\.dit\.steps/);
    await rejectsWith(t, brokenCopy((_, m) => delete m.templates), /manifest\.json: templates/);
    await rejectsWith(t, brokenCopy((_, m) => delete m.files.vae), /manifest\.json: files\.vae/);
  });

  t.test('a field of the wrong type or range', async (t) => {
    await rejectsWith(t, brokenCopy((_, m) => (m.sampler.dit.steps = -3)), /sampler\.dit\.steps must be a positive integer/);
    await rejectsWith(t, brokenCopy((_, m) => (m.image.width = '64')), /image\.width/);
    await rejectsWith(t, brokenCopy((_, m) => (m.sampler.decoder.betaSchedule = 'cosine')), /sampler\.decoder\.betaSchedule/);
    await rejectsWith(t, brokenCopy((_, m) => (m.sampler.dit.eta = 1.5)), /sampler\.dit\.eta must be a number in \[0, 1\]/);
    await rejectsWith(t, brokenCopy((_, m) => (m.sampler.dit.eta = 'some')), /sampler\.dit\.eta must be a finite number/);
    await rejectsWith(t, brokenCopy((_, m) => (m.batchInvariant = 'yes')), /batchInvariant must be true or false/);
    await rejectsWith(t, brokenCopy((_, m) => (m.sampler.dit.integerTimesteps = 1)), /sampler\.dit\.integerTimesteps must be true or false/);
    await rejectsWith(t, brokenCopy((_, m) => (m.vae.forceUpcast = 'yes')), /vae\.forceUpcast must be true or false/);
  });

  t.test('another format or formatVersion', async (t) => {
    await rejectsWith(t, brokenCopy((_, m) => (m.formatVersion = 2)), /unsupported bundle format version 2 \(this runtime reads 1\)/);
    await rejectsWith(t, brokenCopy((_, m) => (m.format = 'something-else')), /format/);
  });

  t.test('a manifest that is not JSON', async (t) => {
    const dir = brokenCopy(() => undefined);
    writeFileSync(path.join(dir, 'manifest.json'), '{"format": "blip3o-bundle",');
    await rejectsWith(t, dir, /manifest\.json: invalid JSON/);
  });

  t.test('a truncated TorchScript file (with a matching sha256)', async (t) => {
    const dir = brokenCopy((dir, m) => {
      const file = path.join(dir, 'dit.pt');
      const bytes = readFileSync(file);
      const truncated = bytes.subarray(0, Math.floor(bytes.length / 2));
      writeFileSync(file, truncated);
      m.files.dit.sha256 = createHash('sha256').update(truncated).digest('hex');
    });
    await rejectsWith(t, dir, /could not load dit\.pt: /);
  });

  t.test('a sha256 mismatch', async (t) => {
    const dir = brokenCopy((dir) => {
      const file = path.join(dir, 'vae.pt');
      const bytes = readFileSync(file);
      bytes[bytes.length - 100] ^= 0xff;
      writeFileSync(file, bytes);
    });
    await rejectsWith(t, dir, /sha256 mismatch for vae\.pt/);
  });

  t.test('a missing component file', async (t) => {
    await rejectsWith(t, brokenCopy((dir) => rmSync(path.join(dir, 'decoder.pt'))), /decoder\.pt/);
  });

  t.test('load options are checked before loading', async (t) => {
    await t.rejects(loadModel(tinyDir, { device: 'gpu' as 'cuda' }), InvalidArgumentError);
    await t.rejects(loadModel(''), InvalidArgumentError);
  });

  t.test("device 'cuda' without CUDA is a DeviceError", { skip: runtimeInfo().cudaDevices > 0 && 'CUDA is available here' }, async (t) => {
    await t.rejects(loadModel(tinyDir, { device: 'cuda' }), { name: 'DeviceError', code: 'BLIP3O_DEVICE' });
    await t.rejects(loadModel(tinyDir, { device: 'cuda' }), DeviceError);
  });

  t.test('paths outside the bundle directory', async (t) => {
    await rejectsWith(t, brokenCopy((_, m) => (m.files.dit.path = '../copy-1/dit.pt')), /files\.dit\.path/);
    await rejectsWith(t, brokenCopy((dir, m) => (m.files.dit.path = path.join(dir, 'dit.pt'))), /files\.dit\.path/);
    const outside = path.join(scratch, 'outside.pt');
    cpSync(path.join(tinyDir, 'dit.pt'), outside);
    await rejectsWith(
      t,
      brokenCopy((dir, m) => {
        symlinkSync(outside, path.join(dir, 'linked.pt'));
        m.files.dit.path = 'linked.pt';
      }),
      /files\.dit\.path/,
    );
  });
});
