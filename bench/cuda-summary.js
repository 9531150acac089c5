#!/usr/bin/env node
// Merges one bench/cuda.sh run (its $OUT: env.json, cuda-check.json, speed-4b.json, speed-8b.json,
// floors.json) into the CUDA results: <date>_cuda_<card>.json and the same as a Markdown table. The
// four headline quantities (ditLoopMs, decoderStepMs, imageMs, decodeTokensPerSec) each for the graph
// path, the eager path, the Python reference and the hardware floor, beside the targets.
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

// Issue 5's targets at the 4B dimensions (decode at the 7B backbone's), bfloat16, on an H100.
const targets = { ditLoopMs: 40, decoderStepMs: 50, imageMs: 1500, decodeTokensPerSec: 150 };
const higherIsBetter = new Set(['decodeTokensPerSec']);

function side(speed4b, speed8b, name) {
  const g = speed4b?.generation?.sides[name];
  const d = speed8b?.decode?.sides[name];
  return { ditLoopMs: g?.ditLoopMs ?? null, decoderStepMs: g?.decoderStepMs ?? null, imageMs: g?.imageMs ?? null,
           decodeTokensPerSec: d?.decodeTokensPerSec ?? null };
}

function summarize(env, check, speed4b, speed8b, floors) {
  const graph = side(speed4b, speed8b, 'graph');
  return {
    date: new Date().toISOString(),
    device: env?.gpu ?? null,
    gpuMemoryGiB: env?.gpuMemoryGiB ?? null,
    torch: env?.torch ?? null,
    cuda: env?.cuda ?? null,
    libtorch: check?.runtime?.libtorch ?? speed4b?.runtime?.libtorch ?? null,
    targets,
    graph,
    eager: side(speed4b, speed8b, 'eager'),
    python: side(speed4b, speed8b, 'python'),
    floor: floors && { ditLoopMs: floors.ditLoopMs, decoderStepMs: floors.decoderStepMs, imageMs: floors.imageMs,
                       decodeTokensPerSec: floors.decodeTokensPerSec },
    graphMeetsTarget: Object.fromEntries(Object.entries(targets).map(([k, t]) =>
      [k, graph[k] === null ? null : higherIsBetter.has(k) ? graph[k] >= t : graph[k] <= t])),
    cudaGraphs: { realSize4b: speed4b?.cudaGraphs ?? null, realSize8b: speed8b?.cudaGraphs ?? null, tiny: check?.cudaGraphs ?? null },
    correctness: {
      tiny: check ? { bundle: 'models/tiny', prompts: check.prompts.length, ...check.correctness } : null,
      realSizeGraphVsEagerMaxPixelDiff: speed4b?.generation?.graphVsEagerMaxPixelDiff ?? null,
      realSizeGraphVsPythonMaxPixelDiff: speed4b?.generation?.graphVsPythonMaxPixelDiff ?? null,
      decodeSameAnswerGraphVsEager: { '4b': speed4b?.decode?.sameAnswer ?? null, '8b': speed8b?.decode?.sameAnswer ?? null },
    },
    bundles: { image: speed4b?.bundle ?? null, decode: speed8b?.bundle ?? null },
    generation: speed4b?.generation ?? null,
    decode: { '4b': speed4b?.decode ?? null, '8b': speed8b?.decode ?? null },
    floors,
    pythonPeakCudaMb: { '4b': speed4b?.pythonPeakCudaMb ?? null, '8b': speed8b?.pythonPeakCudaMb ?? null },
  };
}

function fmt(v, key) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '–';
  if (key === 'decodeTokensPerSec') return `${v.toFixed(0)} tokens/s`;
  return v >= 1000 ? `${(v / 1000).toFixed(2)} s` : v >= 10 ? `${v.toFixed(0)} ms` : `${v.toFixed(2)} ms`;
}

function markdown(s) {
  const card = s.device ?? 'unknown GPU';
  const lines = [`### CUDA graphs: ${card}, torch ${s.torch} (CUDA ${s.cuda}), ${s.date.slice(0, 10)}`, ''];
  const labels = {
    ditLoopMs: 'DiT loop, 30 steps, CFG (4B dims)',
    decoderStepMs: 'decoder step, CFG, 1024 x 1024 (4B dims)',
    imageMs: 'one 1024 x 1024 image, end to end (4B dims)',
    decodeTokensPerSec: 'text decode, batch 1 (7B backbone dims)',
  };
  lines.push('| quantity | target | graph | eager | Python reference | floor |', '|---|---:|---:|---:|---:|---:|');
  for (const [key, label] of Object.entries(labels)) {
    const met = s.graphMeetsTarget[key] === null ? '' : s.graphMeetsTarget[key] ? ' (met)' : ' (missed)';
    lines.push(`| ${label} | ${higherIsBetter.has(key) ? '≥' : '≤'} ${fmt(targets[key], key)} | ${fmt(s.graph[key], key)}${met} | ` +
      `${fmt(s.eager[key], key)} | ${fmt(s.python[key], key)} | ${fmt(s.floor?.[key], key)} |`);
  }
  lines.push('');
  const g = s.generation;
  if (g) {
    const st = g.settings;
    lines.push(`Per stage (${s.bundles.image}, bfloat16; DiT ${st.steps} steps CFG ${st.cfg}, decoder ${st.decoderSteps} steps CFG ${st.decoderCfg}; ` +
      `medians of ${st.runs} runs per side after ${st.warmupRuns} warm-up, alternating, same token ids and seeds):`, '',
    '| stage | graph | eager | Python reference |', '|---|---:|---:|---:|');
    for (const [key, label] of [['conditionMs', 'backbone conditioning'], ['ditStepMs', 'DiT step'], ['ditLoopMs', 'DiT loop'],
      ['decoderStepMs', 'decoder step'], ['decoderLoopMs', 'decoder loop'], ['vaeMs', 'VAE decode'], ['imageMs', 'end to end, to pixels']]) {
      lines.push(`| ${label} | ${fmt(g.sides.graph[key])} | ${fmt(g.sides.eager[key])} | ${fmt(g.sides.python[key])} |`);
    }
    lines.push('');
  }
  const c = s.correctness;
  lines.push('Correctness:', '',
    `- graph vs eager, same seeds, 4B dims: largest pixel difference ${c.realSizeGraphVsEagerMaxPixelDiff ?? '–'}/255; ` +
      `graph vs Python reference ${c.realSizeGraphVsPythonMaxPixelDiff ?? '–'}/255.`,
    `- greedy answers, graph vs eager: 4B ${c.decodeSameAnswerGraphVsEager['4b'] ?? '–'}, 8B ${c.decodeSameAnswerGraphVsEager['8b'] ?? '–'}.`);
  if (c.tiny) {
    lines.push(`- bundled tiny model: bfloat16 graph vs eager ${c.tiny.bf16GraphVsEagerMaxPixelDiff}/255 (answers same: ${c.tiny.describeSameGraphVsEager}); ` +
      `CUDA float32 vs CPU ${c.tiny.fp32MaxPixelDiff}/255; describe same as CPU ${c.tiny.describeSame} / ${c.tiny.describeSameBf16} (float32 / bfloat16).`);
  }
  lines.push(`- CUDA graph status after the runs: ${JSON.stringify(s.cudaGraphs.realSize4b)} (4B), ${JSON.stringify(s.cudaGraphs.realSize8b)} (8B).`, '');
  if (s.floors) {
    const f = s.floors;
    lines.push(`Floors: ${f.card} at ${f.bandwidthTBs} TB/s and ${f.bf16Tflops} dense bfloat16 TFLOP/s (datasheet); a step's floor is the larger of ` +
      `weight bytes / bandwidth and FLOPs / peak. DiT step ${(f.ditStep.weightBytes / 1e9).toFixed(2)} GB, ${(f.ditStep.flops / 1e12).toFixed(2)} TFLOP; ` +
      `decoder step ${(f.decoderStep.flops / 1e12).toFixed(1)} TFLOP; VAE ${(f.vae.flops / 1e12).toFixed(1)} TFLOP; ` +
      `decode ${(f.decodeToken.weightBytes / 1e9).toFixed(2)} GB per token (${f.decodeToken.preset}).`, '');
  }
  return `${lines.join('\n')}\n`;
}

const [outDir, resultsDir] = process.argv.slice(2);
if (!outDir || !resultsDir) {
  console.error('usage: node bench/cuda-summary.js OUT_DIR RESULTS_DIR');
  process.exit(2);
}
const read = (name) => readJson(path.join(outDir, name));
const s = summarize(read('env.json'), read('cuda-check.json'), read('speed-4b.json'), read('speed-8b.json'), read('floors.json'));
const card = (s.device ?? 'gpu').toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
const base = path.join(resultsDir, `${s.date.slice(0, 19).replace(/:/g, '-')}_cuda-graphs_${card}`);
fs.mkdirSync(resultsDir, { recursive: true });
fs.writeFileSync(`${base}.json`, `${JSON.stringify(s, null, 2)}\n`);
fs.writeFileSync(`${base}.md`, markdown(s));
process.stdout.write(markdown(s));
console.error(`wrote ${base}.json and ${base}.md`);
