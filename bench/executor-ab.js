#!/usr/bin/env node
// TorchScript's profiling executor off (the default) against on (BLIP3O_JIT_OPTIMIZE=1), each in a fresh
// process on one bundle: load time, per-step and per-stage medians of `runs` generations after two
// warm-ups, describe prefill and decode speed, and whether a seed's first image equals the same seed's
// image after the warm-ups (the stability the default keeps). Prints one JSON object.
//   node bench/executor-ab.js BUNDLE [--device cuda] [--dtype bfloat16] [--runs 3]
'use strict';
const { spawnSync } = require('node:child_process');
const crypto = require('node:crypto');
const path = require('node:path');
const { parseArgs } = require('node:util');

const { median } = require(path.join(__dirname, '..', 'dist', 'bench.js'));
const prompt = 'a large red circle at the center on a white background';

async function child(dir, device, dtype, runs) {
  const { loadModel } = require(path.join(__dirname, '..', 'dist', 'index.js'));
  const started = performance.now();
  const model = await loadModel(dir, { device, dtype });
  const loadMs = performance.now() - started;
  try {
    const hash = (r) => crypto.createHash('sha256').update(r.image).digest('hex');
    const first = hash(await model.generate(prompt, { seed: 1 }));
    await model.generate(prompt, { seed: 2 });
    const t = [];
    for (let i = 0; i < runs; i++) t.push((await model.generate(prompt, { seed: 10 + i })).timings);
    const again = hash(await model.generate(prompt, { seed: 1 }));
    const image = (await model.generate(prompt, { seed: 3 })).image;
    const d = [];
    for (let i = 0; i < 3; i++) d.push(await model.describeDetailed(image, 'what is in the image?', { maxTokens: 32, temperature: 0 }));
    const m = (key) => median(t.map((x) => x[key]));
    return {
      loadMs,
      conditionMs: m('conditionMs'), ditMs: m('ditMs'), decoderMs: m('decoderMs'), vaeMs: m('vaeMs'),
      ditStepMs: median(t.flatMap((x) => x.ditStepMs)), decoderStepMs: median(t.flatMap((x) => x.decoderStepMs)),
      firstImageSameAsLater: first === again,
      promptTokens: d[0].promptTokens, prefillMs: median(d.map((x) => x.prefillMs)),
      decodeTokensPerSec: median(d.map((x) => (x.generatedTokens * 1000) / x.decodeMs)),
    };
  } finally {
    await model.dispose();
  }
}

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { child: { type: 'boolean' }, device: { type: 'string', default: 'cuda' }, dtype: { type: 'string', default: 'bfloat16' }, runs: { type: 'string', default: '3' } },
});
const dir = path.resolve(positionals[0] ?? path.join(__dirname, '..', 'models', 'tiny'));
if (values.child) {
  child(dir, values.device, values.dtype, Number(values.runs)).then(
    (r) => process.stdout.write(JSON.stringify(r)),
    (err) => { console.error(err.stack || String(err)); process.exit(1); },
  );
} else {
  const out = { bundle: dir, device: values.device, dtype: values.dtype, runs: Number(values.runs) };
  for (const [name, flag] of [['optimizeOff', '0'], ['optimizeOn', '1']]) {
    const args = [__filename, dir, '--child', '--device', values.device, '--dtype', values.dtype, '--runs', values.runs];
    const r = spawnSync(process.execPath, args, { env: { ...process.env, BLIP3O_JIT_OPTIMIZE: flag }, encoding: 'utf8', stdio: ['ignore', 'pipe', 'inherit'] });
    out[name] = r.status === 0 ? JSON.parse(r.stdout) : { error: `exit ${r.status}` };
    console.error(`${name}: ${JSON.stringify(out[name])}`); // kept if a later run is cut short
  }
  console.log(JSON.stringify(out, null, 2));
}
