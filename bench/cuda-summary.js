#!/usr/bin/env node
// Merges one bench/cuda.sh run (its $OUT: env.json, cuda-check.json, bench.json) into the CUDA results:
// <date>_cuda_<card>.json (device, torch and CUDA versions, settings, correctness, stage timings in ms
// with the runtime and the Python reference side by side) and the same as a Markdown table.
//   node bench/cuda-summary.js OUT_DIR RESULTS_DIR
'use strict';
const fs = require('node:fs');
const path = require('node:path');

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch {
    return null; // that step failed or did not run: the rest is still reported
  }
}

const side = (c) => (c ? { runtimeMs: c.nativeMs, referenceMs: c.pythonMs, ratio: c.ratio } : null);

function summarize(env, check, bench) {
  const b = bench;
  return {
    date: (b?.date ?? new Date().toISOString()),
    device: env?.gpu ?? null,
    gpuMemoryGiB: env?.gpuMemoryGiB ?? null,
    torch: env?.torch ?? null,
    cuda: env?.cuda ?? null,
    libtorch: check?.runtime?.libtorch ?? b?.runtime.libtorch ?? null,
    correctness: check ? { bundle: 'models/tiny', prompts: check.prompts.length, ...check.correctness } : null,
    realSize: b && {
      bundle: b.settings.bundle,
      settings: {
        device: b.settings.device, dtype: b.settings.dtype, image: b.images.native,
        steps: b.settings.steps, cfg: b.settings.cfg, decoderSteps: b.settings.decoderSteps, decoderCfg: b.settings.decoderCfg,
        runs: b.settings.runs, warmupRuns: b.settings.warmupRuns, prompt: b.settings.prompt,
      },
      stagesMs: {
        load: side({ nativeMs: b.load.coldMs, pythonMs: b.load.pythonMs, ratio: b.load.pythonMs ? b.load.coldMs / b.load.pythonMs : null }),
        condition: side(b.stages.condition),
        ditLoop: side(b.stages.dit),
        ditStep: side(b.steps.dit),
        decoderLoop: side(b.stages.decoder),
        decoderStep: side(b.steps.decoder),
        vae: side(b.stages.vae),
        endToEnd: side(b.endToEnd),
      },
      runtimeVsReferenceMaxPixelDiff: b.maxPixelDiff,
      understanding: b.understanding,
      peakCudaMb: { runtime: b.memory.peakCudaMb, reference: b.memory.pythonPeakCudaMb },
    },
  };
}

function ms(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  return v >= 1000 ? `${(v / 1000).toFixed(2)} s` : v >= 10 ? `${v.toFixed(0)} ms` : `${v.toFixed(2)} ms`;
}

function markdown(s) {
  const lines = [`### CUDA: ${s.device ?? 'unknown GPU'}, torch ${s.torch} (CUDA ${s.cuda}), ${s.date.slice(0, 10)}`, ''];
  const c = s.correctness;
  if (c) {
    lines.push(
      `Correctness on the bundled tiny model (${c.prompts} prompts and seeds; CPU float32 is the reference):`, '',
      '| check | result |', '|---|---|',
      `| CUDA float32 vs CPU, largest pixel difference | ${c.fp32MaxPixelDiff}/255 (required ≤ 2) |`,
      `| CUDA bfloat16 vs CPU, largest / mean pixel difference | ${c.bf16MaxPixelDiff}/255 / ${c.bf16MeanPixelDiff?.toFixed(3)} (information: bfloat16 is judged by content, see bench/cuda-check.js) |`,
      `| CUDA float32, batch of 4 vs each alone | ${c.fp32BatchVsAloneMaxPixelDiff}/255 |`,
      `| describe, same answers as CPU (float32 / bfloat16 images) | ${c.describeSame ? 'yes' : 'NO'} / ${c.describeSameBf16 ? 'yes' : 'NO'} |`, '');
  } else {
    lines.push('Correctness check: did not run (see log.txt).', '');
  }
  const r = s.realSize;
  if (r) {
    const st = r.settings;
    const row = (label, v) => `| ${label} | ${ms(v?.runtimeMs)} | ${ms(v?.referenceMs)} | ${v?.ratio == null ? '–' : v.ratio.toFixed(2)} |`;
    const u = r.understanding;
    lines.push(
      `Real size: ${r.bundle}, ${st.dtype}, ${st.image.width} x ${st.image.height}; DiT ${st.steps} steps (CFG ${st.cfg}), ` +
        `decoder ${st.decoderSteps} steps (CFG ${st.decoderCfg}); medians of ${st.runs} runs per side after ${st.warmupRuns} warm-up, alternating, same token ids and seeds.`, '',
      '| stage | runtime | Python reference | runtime / reference |', '|---|---:|---:|---:|',
      row('model load (fresh process)', r.stagesMs.load),
      row('backbone conditioning', r.stagesMs.condition),
      row(`DiT loop (${st.steps} steps, CFG ${st.cfg})`, r.stagesMs.ditLoop),
      row('DiT step', r.stagesMs.ditStep),
      row(`decoder loop (${st.decoderSteps} steps, CFG ${st.decoderCfg})`, r.stagesMs.decoderLoop),
      row('decoder step', r.stagesMs.decoderStep),
      row('VAE decode', r.stagesMs.vae),
      row('end to end, to pixels', r.stagesMs.endToEnd),
      '',
      `Runtime and reference images of the same seed: largest pixel difference ${r.runtimeVsReferenceMaxPixelDiff ?? '–'}/255. ` +
        `Describe (runtime, greedy): ${u.promptTokens} prompt tokens prefilled in ${ms(u.prefillMs)} ` +
        `(${(u.promptTokens / (u.prefillMs / 1000)).toFixed(0)} tokens/s), ${u.generatedTokens} tokens decoded at ${u.decodeTokensPerSec.toFixed(1)} tokens/s. ` +
        `Peak CUDA memory of the reference: ${r.peakCudaMb.reference == null ? '–' : `${(r.peakCudaMb.reference / 1024).toFixed(1)} GiB`}.`, '');
  } else {
    lines.push('Real-size run: did not complete (see log.txt).', '');
  }
  return `${lines.join('\n')}\n`;
}

const [outDir, resultsDir] = process.argv.slice(2);
if (!outDir || !resultsDir) {
  console.error('usage: node bench/cuda-summary.js OUT_DIR RESULTS_DIR');
  process.exit(2);
}
const s = summarize(readJson(path.join(outDir, 'env.json')), readJson(path.join(outDir, 'cuda-check.json')), readJson(path.join(outDir, 'bench.json')));
const card = (s.device ?? 'gpu').toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
const base = path.join(resultsDir, `${s.date.slice(0, 19).replace(/:/g, '-')}_cuda_${card}`);
fs.mkdirSync(resultsDir, { recursive: true });
fs.writeFileSync(`${base}.json`, `${JSON.stringify(s, null, 2)}\n`);
fs.writeFileSync(`${base}.md`, markdown(s));
process.stdout.write(markdown(s));
console.error(`wrote ${base}.json and ${base}.md`);
