#!/usr/bin/env node
// The CUDA graphs against the runtime without them and the Python reference (bench/reference.py), on
// one bundle in one process: the same prompt, token ids, seeds and settings on the three sides, runs
// alternating (graph, eager, Python) after warm-up ones, medians reported. Then greedy text decoding
// on each side at the same prompt length and token count. Prints one JSON object.
//   node bench/cuda-speed.js BUNDLE [--runs N] [--warmup N] [--tokens N] [--decode-only] [--device cpu]
// --decode-only skips the image timings (one short generation still makes the image to describe);
// --device cpu (float32) is a dry run of the script on a machine without CUDA.
'use strict';
const path = require('node:path');
const fs = require('node:fs');
const { performance } = require('node:perf_hooks');
const sharp = require('sharp');

const dist = path.join(__dirname, '..', 'dist');
const { loadModel, runtimeInfo } = require(path.join(dist, 'index.js'));
const { PythonReference } = require(path.join(dist, 'bench-reference.js'));
const { PromptTokenizer } = require(path.join(dist, 'tokenizer.js'));
const { median } = require(path.join(dist, 'bench.js'));

const prompt = 'a large red circle at the center on a white background';
const question = 'what is in the image?';
const baseSeed = 1000;

function parseArgs(argv) {
  const out = { bundle: undefined, runs: 3, warmup: 2, tokens: 64, decodeOnly: false, device: 'cuda' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--decode-only') out.decodeOnly = true;
    else if (['--runs', '--warmup', '--tokens'].includes(a)) out[a.slice(2)] = Number(argv[++i]);
    else if (a === '--device') out.device = argv[++i];
    else if (!a.startsWith('--') && out.bundle === undefined) out.bundle = a;
    else throw new Error(`unknown argument ${a}`);
  }
  if (!out.bundle) throw new Error('usage: node bench/cuda-speed.js BUNDLE [--runs N] [--warmup N] [--tokens N] [--decode-only]');
  return out;
}

async function timed(run) {
  const t0 = performance.now();
  const value = await run();
  return { ms: performance.now() - t0, value };
}

const raw = async (png) => sharp(png).removeAlpha().raw().toBuffer();

function maxAbsDiff(a, b) {
  if (a.length !== b.length) return 255;
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

// The runtime's KV-cache length on CUDA for `needed` positions (Model::Impl::cacheLength): the Python
// side decodes in a cache of the same length, so both attend over the same number of positions.
function cacheLength(needed, context, device) {
  if (device !== 'cuda') return needed;
  let length = 256;
  while (length < needed) length *= 2;
  return Math.max(needed, Math.min(length, context));
}

/** Per side: the stage medians of `samples` ({ imageMs, timings }). */
function stageMedians(samples) {
  const m = (f) => median(samples.map(f));
  return {
    imageMs: m((s) => s.imageMs),
    conditionMs: m((s) => s.timings.conditionMs),
    ditLoopMs: m((s) => s.timings.ditMs),
    ditStepMs: median(samples.flatMap((s) => s.timings.ditStepMs)),
    decoderLoopMs: m((s) => s.timings.decoderMs),
    decoderStepMs: median(samples.flatMap((s) => s.timings.decoderStepMs)),
    vaeMs: m((s) => s.timings.vaeMs),
  };
}

async function images(sides, python, ids, settings, args, log) {
  const samples = { graph: [], eager: [], python: [] };
  let graphVsEager = 0;
  let graphVsPython = 0;
  let last;
  for (let i = -args.warmup; i < args.runs; i++) {
    const seed = baseSeed + Math.max(i, 0);
    const out = {};
    for (const [name, model] of Object.entries(sides)) {
      const run = await timed(() => model.generate(prompt, { seed, ...settings }));
      out[name] = { imageMs: run.ms - run.value.timings.encodeMs, timings: run.value.timings, pixels: await raw(run.value.image) };
      last = run.value.image;
    }
    const ref = await python.generate({ ids, seed, ...settings });
    out.python = { imageMs: ref.timings.totalMs, timings: ref.timings, pixels: ref.pixels };
    log(`run ${i < 0 ? 'warm-up' : i + 1}: graph ${out.graph.imageMs.toFixed(0)} ms, eager ${out.eager.imageMs.toFixed(0)} ms, Python ${out.python.imageMs.toFixed(0)} ms`);
    if (i < 0) continue;
    for (const name of Object.keys(samples)) samples[name].push(out[name]);
    graphVsEager = Math.max(graphVsEager, maxAbsDiff(out.graph.pixels, out.eager.pixels));
    graphVsPython = Math.max(graphVsPython, maxAbsDiff(out.graph.pixels, out.python.pixels));
  }
  const result = {};
  for (const [name, s] of Object.entries(samples)) result[name] = stageMedians(s);
  return { sides: result, graphVsEagerMaxPixelDiff: graphVsEager, graphVsPythonMaxPixelDiff: graphVsPython, lastImage: last };
}

async function decoding(sides, python, image, context, device, tokens, log) {
  const result = {};
  const answers = {};
  let shape;
  for (const [name, model] of Object.entries(sides)) {
    const runs = [];
    for (let rep = -1; rep < 3; rep++) {
      const d = await model.describeDetailed(image, question, { maxTokens: tokens, temperature: 0 });
      if (rep >= 0) runs.push(d);
    }
    const decodeMs = median(runs.map((d) => d.decodeMs));
    const generated = runs[0].generatedTokens;
    shape ??= { promptTokens: runs[0].promptTokens, tokens: generated };
    answers[name] = runs[0].text;
    result[name] = { promptTokens: runs[0].promptTokens, tokens: generated, prefillMs: median(runs.map((d) => d.prefillMs)), decodeMs,
                     decodeTokensPerSec: (generated * 1000) / decodeMs };
  }
  const req = { ...shape, cacheLength: cacheLength(shape.promptTokens + tokens, context, device) };
  const runs = [];
  for (let rep = -1; rep < 3; rep++) {
    const d = await python.decode(req);
    if (rep >= 0) runs.push(d.decodeMs);
  }
  result.python = { ...shape, cacheLength: req.cacheLength, decodeMs: median(runs), decodeTokensPerSec: (shape.tokens * 1000) / median(runs) };
  log(`decode: graph ${result.graph.decodeTokensPerSec.toFixed(1)}, eager ${result.eager.decodeTokensPerSec.toFixed(1)}, Python ${result.python.decodeTokensPerSec.toFixed(1)} tokens/s`);
  return { sides: result, sameAnswer: answers.graph === answers.eager };
}

(async () => {
  const args = parseArgs(process.argv.slice(2));
  const log = (line) => process.stderr.write(`cuda-speed: ${line}\n`);
  const dir = path.resolve(args.bundle);
  const manifest = JSON.parse(fs.readFileSync(path.join(dir, 'manifest.json'), 'utf8'));
  const tokenizer = await PromptTokenizer.load(dir, { tokenizer: manifest.files.tokenizer.path, tokenizerConfig: manifest.files.tokenizerConfig.path },
    manifest.templates);
  const options = { device: args.device, dtype: args.device === 'cuda' ? 'bfloat16' : 'float32' };
  log('loading the bundle three times: graph, eager, Python');
  const python = PythonReference.start();
  try {
    const [graph, eager, pythonLoad] = await Promise.all([
      loadModel(dir, options),
      loadModel(dir, { ...options, cudaGraphs: false }),
      python.load({ bundle: dir, ...options, threads: 0, negativeIds: tokenizer.negativeIds() }),
    ]);
    const sides = { graph, eager };
    try {
      const d = graph.info().defaults;
      const settings = { steps: d.steps, cfg: d.cfg, decoderSteps: d.decoderSteps, decoderCfg: d.decoderCfg };
      const ids = tokenizer.generationIds(prompt);
      let image;
      let generation = null;
      if (args.decodeOnly) {
        image = (await graph.generate(prompt, { seed: baseSeed, steps: 2, decoderSteps: 2 })).image;
      } else {
        const { lastImage, ...rest } = await images(sides, python, ids, settings, args, log);
        image = lastImage;
        generation = { settings: { ...settings, prompt, runs: args.runs, warmupRuns: args.warmup }, ...rest };
      }
      const decode = await decoding(sides, python, image, graph.info().context, args.device, args.tokens, log);
      const stats = await python.stats();
      console.log(JSON.stringify({
        bundle: manifest.name,
        preset: manifest.preset,
        dtype: options.dtype,
        runtime: runtimeInfo(),
        torch: pythonLoad.torch,
        cudaGraphs: graph.info().cudaGraphs,
        eagerCudaGraphs: eager.info().cudaGraphs,
        generation,
        decode,
        pythonPeakCudaMb: stats.peakCudaMb,
      }, null, 2));
    } finally {
      await Promise.all([graph.dispose(), eager.dispose()]);
    }
  } finally {
    await python.close();
  }
})().catch((err) => {
  console.error(`cuda-speed: ${err.stack || err}`);
  process.exit(1);
});
