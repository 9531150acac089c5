#!/usr/bin/env node
// Soak: N generations on one loaded model, sampling the process RSS every `every` generations after a
// warm-up, to show that memory does not grow with the number of calls.
//
//   node bench/soak.js [--n 1000] [--steps N] [--decoder-steps N] [--warmup 50] [--every 50] [--model DIR] [--threads N]
//
// Prints one line per sample and, at the end, the RSS growth after the warm-up (MB) and one JSON line.
// Default settings are the bundle's (30 DiT steps, 50 decoder steps for the tiny model). `soak()` is
// also used by test/soak.test.ts with the package's API passed in.
'use strict';

const MB = 1024 * 1024;

/**
 * Runs `n` generations (seeds 0, 1, 2, ... cycling over a few prompts) on `model`; returns the RSS
 * samples and the growth after the warm-up. `log` receives a line per sample.
 */
async function soak(model, { n = 1000, steps, decoderSteps, warmup = 50, every = 50, log = () => undefined } = {}) {
  if (!(Number.isInteger(n) && n > warmup)) throw new Error(`--n must be an integer > --warmup (${warmup})`);
  const prompts = [
    'a red circle at the center on a white background',
    'two green triangles on a gray background',
    'a blue square at the top left on a black background',
  ];
  const options = {};
  if (steps !== undefined) options.steps = steps;
  if (decoderSteps !== undefined) options.decoderSteps = decoderSteps;
  const samples = [];
  let baseline = 0;
  const started = Date.now();
  for (let i = 1; i <= n; i++) {
    const result = await model.generate(prompts[i % prompts.length], { ...options, seed: i });
    if (!Buffer.isBuffer(result.image) || result.image.length === 0) throw new Error(`generation ${i} returned no image`);
    if (i === warmup) {
      baseline = process.memoryUsage().rss;
      samples.push({ generation: i, rssMb: baseline / MB });
      log(`warm-up done after ${i} generations: rss ${(baseline / MB).toFixed(1)} MB`);
    } else if (i > warmup && (i - warmup) % every === 0) {
      const rss = process.memoryUsage().rss;
      samples.push({ generation: i, rssMb: rss / MB });
      log(`${i} generations: rss ${(rss / MB).toFixed(1)} MB (${((rss - baseline) / MB).toFixed(1)} MB since warm-up)`);
    }
  }
  const last = samples[samples.length - 1].rssMb;
  const first = samples[0].rssMb;
  const peak = Math.max(...samples.map((s) => s.rssMb));
  return {
    generations: n,
    steps: steps ?? null,
    decoderSteps: decoderSteps ?? null,
    warmup,
    every,
    rssAfterWarmupMb: round(first),
    rssFinalMb: round(last),
    rssPeakMb: round(peak),
    growthMb: round(last - first),
    peakGrowthMb: round(peak - first),
    seconds: round((Date.now() - started) / 1000),
    samples: samples.map((s) => ({ generation: s.generation, rssMb: round(s.rssMb) })),
  };
}

function round(x) {
  return Math.round(x * 10) / 10;
}

function parseArgs(argv) {
  const out = {};
  const names = { '--n': 'n', '--steps': 'steps', '--decoder-steps': 'decoderSteps', '--warmup': 'warmup', '--every': 'every', '--threads': 'threads', '--model': 'model' };
  for (let i = 0; i < argv.length; i++) {
    const key = names[argv[i]];
    if (key === undefined || i + 1 >= argv.length) throw new Error(`unknown or incomplete argument: ${argv[i]}\nusage: node bench/soak.js [--n N] [--steps N] [--decoder-steps N] [--warmup N] [--every N] [--threads N] [--model DIR]`);
    const value = argv[++i];
    if (key === 'model') out.model = value;
    else {
      const v = Number(value);
      if (!Number.isInteger(v) || v < 1) throw new Error(`${argv[i - 1]} must be a positive integer`);
      out[key] = v;
    }
  }
  return out;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { loadModel } = require('../dist/index.js');
  const model = await loadModel(args.model, { device: 'cpu', ...(args.threads ? { threads: args.threads } : {}) });
  try {
    const info = model.info();
    const n = args.n ?? 1000;
    console.log(`soak: ${n} generations on ${info.name} (${info.device}, ${info.threads} threads), DiT ${args.steps ?? info.defaults.steps} steps, decoder ${args.decoderSteps ?? info.defaults.decoderSteps} steps`);
    const result = await soak(model, { ...args, n, log: (line) => console.log(line) });
    console.log(`RSS growth after warm-up: ${result.growthMb.toFixed(1)} MB (peak ${result.peakGrowthMb.toFixed(1)} MB) over ${n - result.warmup} generations, ${result.seconds} s`);
    console.log(JSON.stringify({ model: info.name, device: info.device, threads: info.threads, ...result }));
  } finally {
    await model.dispose();
  }
}

module.exports = { soak };

if (require.main === module) {
  main().catch((err) => {
    console.error(`soak: ${err instanceof Error ? err.message : String(err)}`);
    process.exitCode = 1;
  });
}
