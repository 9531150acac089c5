// The whole generation, prompt to pixels, through the runtime against a Python pipeline made of the
// reference implementations (test/fidelity/pipeline, written by test/fidelity/make_pipeline.py): the micro
// checkpoint in the released layout is imported with the API (float32), loaded on CPU, and each recorded
// prompt / seed is generated with the recorded settings; the image must be the reference's to within 2/255.
// The reference: transformers' Qwen2.5-VL, the official BLIP3-o DiT sampler (diffusers 0.32.2), diffusers'
// UNet / Euler / VAE, in float32, with the runtime's noise convention (see test/fidelity/README.md).
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import t from 'tap';
import { importCheckpoint, loadModel } from '../ts/index';
import { pythonSkip } from './fixtures/broken-bundle';
import { fidelity } from './fixtures/fidelity';
import { ensureCompiled, root, skipWithoutRuntime } from './fixtures/runtime';

const dir = path.join(root, 'test', 'fidelity', 'pipeline');
const MAX_PIXEL_DIFF = 2;

interface Case { index: number; prompt: string; seed: number; ids: number[] }
interface Expected {
  cases: Case[];
  negative: { seed: number; steps: number; guidance: number; ids: number[] };
  settings: { runtime_options: { steps: number; cfg: number; decoderSteps: number; decoderCfg: number } };
  checkpoint: { image: { height: number; width: number } };
}

/** One tensor of a .safetensors file: its dtype, shape and bytes (the format: an 8-byte little-endian header
 * length, a JSON header of dtype / shape / data_offsets per tensor, then the raw data). */
function readTensor(file: string, name: string): { dtype: string; shape: number[]; data: Buffer } {
  const buf = readFileSync(file);
  const headerLength = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLength).toString('utf8')) as
    Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  const entry = header[name];
  if (!entry) throw new Error(`${file} has no tensor ${name}`);
  const [start, end] = entry.data_offsets;
  return { dtype: entry.dtype, shape: entry.shape, data: buf.subarray(8 + headerLength + start, 8 + headerLength + end) };
}

const skip = skipWithoutRuntime || pythonSkip();

t.test('prompt to image through the runtime equals the reference pipeline within 2/255', { skip }, async (t) => {
  ensureCompiled();
  const expected = JSON.parse(readFileSync(path.join(dir, 'expected.json'), 'utf8')) as Expected;
  const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-pipeline-'));
  t.teardown(() => rmSync(scratch, { recursive: true, force: true }));

  const bundle = path.join(scratch, 'bundle');
  await importCheckpoint(path.join(dir, 'checkpoint'), { out: bundle, dtype: 'float32' });
  const model = await loadModel(bundle, { device: 'cpu', dtype: 'float32' });
  t.teardown(() => model.dispose());

  // the negative condition is made at load with the manifest's defaults: the reference's must be the same
  const { sampler, image } = model.manifest;
  t.equal(sampler.negativeSeed, expected.negative.seed, 'negative seed');
  t.equal(sampler.dit.steps, expected.negative.steps, 'negative features: DiT steps');
  t.equal(sampler.dit.cfg, expected.negative.guidance, 'negative features: DiT guidance');
  t.same([image.height, image.width], [expected.checkpoint.image.height, expected.checkpoint.image.width]);

  const { steps, cfg, decoderSteps, decoderCfg } = expected.settings.runtime_options;
  for (const c of expected.cases) {
    const result = await model.generate(c.prompt, { seed: c.seed, steps, cfg, decoderSteps, decoderCfg, format: 'png' });
    const { data, info } = await sharp(result.image).removeAlpha().raw().toBuffer({ resolveWithObject: true });
    const want = readTensor(path.join(dir, 'expected.safetensors'), `image.${c.index}`);
    t.equal(want.dtype, 'U8');
    t.same([info.height, info.width, info.channels], want.shape, `${c.prompt}: image shape`);
    let max = 0;
    let differing = 0;
    for (let i = 0; i < want.data.length; i++) {
      const d = Math.abs(data[i] - want.data[i]);
      if (d > max) max = d;
      if (d > 0) differing++;
    }
    t.comment(`"${c.prompt}" seed ${c.seed}: max |pixel difference| ${max}/255, ${differing} of ${want.data.length} values differ`);
    fidelity(t, `whole pipeline "${c.prompt}" seed ${c.seed} (${steps} DiT + ${decoderSteps} decoder steps) vs the reference pipeline, max pixel difference /255`,
      max, MAX_PIXEL_DIFF);
  }
});
