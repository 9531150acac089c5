// `blip3o import` and importCheckpoint on a synthetic checkpoint in the released layout (models/importer/
// synthetic.py: the mini preset, random weights), then the imported bundle through the runtime as a
// user runs it: info shows its source, generate draws an image, describe answers.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, unlinkSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { CheckpointError, importCheckpoint, InvalidArgumentError, loadModel } from '../ts/index';
import { pythonSkip } from './fixtures/broken-bundle';
import { cli, ensureCompiled, root } from './fixtures/runtime';

ensureCompiled();
const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-import-'));
t.teardown(() => rmSync(scratch, { recursive: true, force: true }));

function run(args: string[]) {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 300_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function synthetic(dir: string): void {
  const r = spawnSync('bash', [path.join(root, 'models', 'run-python.sh'), '-m', 'models.importer.synthetic', '--preset', 'mini',
    '--out', dir, '--seed', '5'], { encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0) throw new Error(`synthetic checkpoint: ${r.stderr}`);
}

t.test('import, then info, generate and describe through the runtime', { skip: pythonSkip() }, async (t) => {
  const checkpoint = path.join(scratch, 'BLIP3o-Model-mini');
  synthetic(checkpoint);
  const bundle = path.join(scratch, 'bundle');
  const imported = run(['import', checkpoint, '--out', bundle, '--dtype', 'float32', '--json']);
  t.equal(imported.code, 0, imported.stderr);
  const result = JSON.parse(imported.stdout) as { bundle: string; peakRssBytes: number; peakAnonymousBytes: number; bundleBytes: number };
  t.equal(result.bundle, bundle);
  t.ok(result.peakRssBytes > 0 && result.bundleBytes > 0);
  t.ok(result.peakAnonymousBytes > 0 && result.peakAnonymousBytes <= result.peakRssBytes, 'its own memory, part of the resident');

  const info = run(['info', '--model', bundle]);
  t.equal(info.code, 0, info.stderr);
  t.match(info.stdout, /source +BLIP3o-Model-mini \(blip3o_qwen_inference, [\d.]+ GB\), imported .* as float32/);

  const model = await loadModel(bundle);
  t.teardown(() => model.dispose());
  t.same(model.info().source?.checkpoint, 'BLIP3o-Model-mini');
  const image = await model.generate('a red circle', { seed: 1, steps: 3, decoderSteps: 3 });
  t.same([image.width, image.height], [64, 64]);
  const again = await model.generate('a red circle', { seed: 1, steps: 3, decoderSteps: 3 });
  t.ok(image.image.equals(again.image), 'the same seed gives the same image');
  const text = await model.describeDetailed(image.image, 'what is this?', { maxTokens: 4 });
  t.equal(text.generatedTokens, 4, 'random weights: describe runs to maxTokens');
});

t.test('the API: progress, typed errors, and an abort that leaves nothing', { skip: pythonSkip() }, async (t) => {
  const checkpoint = path.join(scratch, 'ckpt-api');
  synthetic(checkpoint);
  const stages: string[] = [];
  const out = path.join(scratch, 'api-bundle');
  await importCheckpoint(checkpoint, { out, dtype: 'bfloat16', onProgress: (e) => e.written && stages.push(e.stage) });
  t.same(stages, ['backbone', 'dit', 'decoder', 'vae']);

  await t.rejects(importCheckpoint(checkpoint, { out: path.join(scratch, 'x'), dtype: 'int8' as never }), InvalidArgumentError);
  await t.rejects(importCheckpoint(checkpoint, { out: '' }), InvalidArgumentError);
  await t.rejects(importCheckpoint(checkpoint, { out }), { name: 'CheckpointError', message: /already exists/ });

  const aborted = path.join(scratch, 'aborted', 'bundle');
  await t.rejects(importCheckpoint(checkpoint, { out: aborted, signal: AbortSignal.timeout(1500) }));
  t.same(existsSync(path.dirname(aborted)) ? readdirSync(path.dirname(aborted)) : [], [], 'nothing left behind');

  unlinkSync(path.join(checkpoint, 'diffusion-decoder', 'vae', 'config.json'));
  const err = await importCheckpoint(checkpoint, { out: path.join(scratch, 'never') }).catch((e: unknown) => e);
  t.ok(err instanceof CheckpointError);
  t.match((err as Error).message, /vae: no config\.json \(the diffusion decoder's VAE\)/);
  t.notOk(existsSync(path.join(scratch, 'never')));

  const cliFailure = run(['import', checkpoint, '--out', path.join(scratch, 'never')]);
  t.equal(cliFailure.code, 1);
  t.match(cliFailure.stderr, /^blip3o: .*vae: no config\.json \(the diffusion decoder's VAE\)\n$/);
});
