#!/usr/bin/env node
// Load test of `blip3o serve` on loopback: N mixed requests at a fixed concurrency, some of them
// abandoned by their client at a random moment, against a server in its own process. Checks that
// every request is answered (2xx, or 429 when the queue is full) or cancelled, none lost; that the
// server is healthy afterwards (ready, no job left in flight, a request still answered); and that
// its RSS after the run is within --rss-limit MB of its RSS after the warm-up.
//
//   npm run bench:serve -- [--n 200] [--concurrency 16] [--aborts 0.25] [--max-queue 8] [--seed 1]
//                          [--warmup 20] [--rss-limit 50] [--model DIR] [--threads N]
//
// The share --aborts of the requests (default 0.25) goes through plain fetch calls aborted after a
// random 0-400 ms; the rest goes through autocannon. Mix: images n=1 (30%), images n=2 (15%),
// chat (30%), streamed chat (15%), GET /v1/models (10%). Prints a summary and one JSON line; exits 1
// when a check fails. Needs `npm run build` first.
'use strict';

const { spawn, execFileSync } = require('node:child_process');
const path = require('node:path');
const { parseArgs } = require('node:util');
const autocannon = require('autocannon');
const sharp = require('sharp');

const root = path.resolve(__dirname, '..');
const cli = path.join(root, 'dist', 'cli.js');
const MB = 1024 * 1024;
const key = 'serve-load-key';
const caption = 'a large red circle at the center on a white background';

const { values } = parseArgs({
  options: {
    n: { type: 'string', default: '200' },
    concurrency: { type: 'string', default: '16' },
    aborts: { type: 'string', default: '0.25' },
    'max-queue': { type: 'string', default: '8' },
    seed: { type: 'string', default: '1' },
    warmup: { type: 'string', default: '20' },
    'rss-limit': { type: 'string', default: '50' },
    model: { type: 'string' },
    threads: { type: 'string' },
  },
});
const n = Number(values.n);
const concurrency = Number(values.concurrency);
const abortShare = Number(values.aborts);
const rssLimitMb = Number(values['rss-limit']);

/** mulberry32: a seeded PRNG, so that a run's mix and abort times can be repeated. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const random = prng(Number(values.seed));

function rssMb(pid) {
  return Number(execFileSync('ps', ['-o', 'rss=', '-p', String(pid)], { encoding: 'utf8' }).trim()) / 1024;
}

async function metrics(url) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const series = {};
  for (const line of text.split('\n')) {
    if (line.startsWith('#') || line.length === 0) continue;
    const at = line.lastIndexOf(' ');
    series[line.slice(0, at)] = Number(line.slice(at + 1));
  }
  return series;
}

function sum(series, prefix, filter = () => true) {
  return Object.entries(series)
    .filter(([name]) => name.startsWith(prefix) && filter(name))
    .reduce((total, [, value]) => total + value, 0);
}

function requestMix(png) {
  const image = `data:image/png;base64,${png.toString('base64')}`;
  const chat = (stream) => ({
    method: 'POST',
    path: '/v1/chat/completions',
    body: JSON.stringify({
      model: 'blip3o-tiny-shapes',
      stream,
      messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: image } }, { type: 'text', text: 'what color is the square?' }] }],
    }),
  });
  const images = (count) => ({ method: 'POST', path: '/v1/images/generations', body: JSON.stringify({ prompt: caption, n: count }) });
  const kinds = [
    [0.3, 'images n=1', () => images(1)],
    [0.15, 'images n=2', () => images(2)],
    [0.3, 'chat', () => chat(false)],
    [0.15, 'chat stream', () => chat(true)],
    [0.1, 'models', () => ({ method: 'GET', path: '/v1/models' })],
  ];
  return () => {
    let r = random();
    for (const [share, name, make] of kinds) {
      if (r < share) return { name, ...make() };
      r -= share;
    }
    return { name: 'models', method: 'GET', path: '/v1/models' };
  };
}

let child;

async function main() {
  const args = [cli, 'serve', '--port', '0', '--max-queue', values['max-queue']];
  if (values.model !== undefined) args.push('--model', values.model);
  if (values.threads !== undefined) args.push('--threads', values.threads);
  child = spawn(process.execPath, args, { env: { ...process.env, BLIP3O_API_KEY: key }, stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const url = await new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (\S+)\n/.exec(out);
      if (m) resolve(m[1]);
    });
    child.on('exit', () => reject(new Error('the server exited before listening')));
  });
  const headers = Object.freeze({ 'content-type': 'application/json', authorization: `Bearer ${key}` });
  const png = await sharp({ create: { width: 64, height: 64, channels: 3, background: { r: 255, g: 255, b: 255 } } })
    .composite([{ input: await sharp({ create: { width: 26, height: 26, channels: 3, background: { r: 220, g: 40, b: 40 } } }).png().toBuffer(), left: 19, top: 19 }])
    .png()
    .toBuffer();
  const next = requestMix(png);

  // Warm-up, one request at a time.
  for (let i = 0; i < Number(values.warmup); i++) {
    const r = next();
    const res = await fetch(`${url}${r.path}`, { method: r.method, headers, body: r.body });
    await res.arrayBuffer();
    if (!res.ok) throw new Error(`warm-up ${r.name}: HTTP ${res.status}`);
  }
  await new Promise((r) => setTimeout(r, 500));
  const rssBefore = rssMb(child.pid);
  const before = await metrics(url);

  const abortCount = Math.round(n * abortShare);
  const cannonCount = n - abortCount;
  const abortConcurrency = Math.max(1, Math.round(concurrency * abortShare));
  const cannonConnections = concurrency - abortConcurrency;

  // The aborting clients: plain fetch calls, each abandoned after a random delay.
  const aborting = { answered: 0, aborted: 0, failed: 0, statuses: {} };
  const abortPlans = Array.from({ length: abortCount }, () => ({ request: next(), after: Math.floor(random() * 400) }));
  async function abortWorker() {
    for (let plan = abortPlans.shift(); plan !== undefined; plan = abortPlans.shift()) {
      const controller = new AbortController();
      const timer = setTimeout(() => controller.abort(), plan.after);
      try {
        const res = await fetch(`${url}${plan.request.path}`, { method: plan.request.method, headers, body: plan.request.body, signal: controller.signal });
        await res.arrayBuffer();
        aborting.answered++;
        aborting.statuses[res.status] = (aborting.statuses[res.status] ?? 0) + 1;
      } catch (err) {
        if (controller.signal.aborted) aborting.aborted++;
        else {
          aborting.failed++;
          process.stderr.write(`serve-load: ${plan.request.name}: ${err.message} (${err.cause?.message ?? err.cause ?? ''})\n`);
        }
      } finally {
        clearTimeout(timer);
      }
    }
  }

  const started = Date.now();
  const cannonMix = Array.from({ length: cannonCount + cannonConnections }, () => next());
  const cannon = autocannon({
    url,
    connections: cannonConnections,
    amount: cannonCount,
    timeout: 120,
    // Copies: autocannon writes content-length into the headers it is given.
    headers: { ...headers },
    requests: [
      {
        setupRequest: (req) => {
          const r = cannonMix.shift() ?? { method: 'GET', path: '/v1/models' };
          return { ...req, method: r.method, path: r.path, body: r.body, headers: { ...headers } };
        },
      },
    ],
  });
  const [result] = await Promise.all([cannon, ...Array.from({ length: abortConcurrency }, abortWorker)]);
  const wallS = (Date.now() - started) / 1000;

  // Afterwards: no job in flight, ready, still answering.
  await new Promise((r) => setTimeout(r, 1000));
  const after = await metrics(url);
  const ready = (await fetch(`${url}/ready`)).status;
  const probe = await fetch(`${url}/v1/images/generations`, { method: 'POST', headers, body: JSON.stringify({ prompt: caption, seed: 1 }) });
  await probe.arrayBuffer();
  const rssAfter = rssMb(child.pid);

  const statuses = Object.fromEntries(Object.entries(result.statusCodeStats).map(([code, s]) => [code, s.count]));
  const cannonAnswered = Object.values(statuses).reduce((a, b) => a + b, 0);
  const v1 = (name) => name.includes('route="/v1/');
  const serverSeen = sum(after, 'blip3o_http_requests_total', v1) - sum(before, 'blip3o_http_requests_total', v1);
  const server499 = sum(after, 'blip3o_http_requests_total', (s) => v1(s) && s.includes('status="499"')) - sum(before, 'blip3o_http_requests_total', (s) => v1(s) && s.includes('status="499"'));
  const inFlight = sum(after, 'blip3o_queue_depth');
  const okStatus = (code) => code === '200' || code === '429';

  const checks = {
    'every autocannon request answered (200 or 429)': cannonAnswered === cannonCount && Object.keys(statuses).every(okStatus) && result.errors === 0 && result.timeouts === 0,
    'every aborting request answered or aborted': aborting.answered + aborting.aborted === abortCount && aborting.failed === 0 && Object.keys(aborting.statuses).every(okStatus),
    'the server saw at most n requests, at least the answered ones': serverSeen <= n && serverSeen >= cannonAnswered + aborting.answered,
    'no job left in flight': inFlight === 0,
    'ready and answering after the run': ready === 200 && probe.status === 200,
    [`RSS within ${rssLimitMb} MB of its value before`]: Math.abs(rssAfter - rssBefore) <= rssLimitMb,
  };

  const report = {
    n,
    concurrency,
    maxQueue: Number(values['max-queue']),
    seed: Number(values.seed),
    wallS,
    throughputRps: n / wallS,
    answeredRps: (cannonAnswered + aborting.answered) / wallS,
    autocannon: {
      requests: cannonCount,
      connections: cannonConnections,
      statuses,
      latencyMs: { p50: result.latency.p50, p90: result.latency.p90, p99: result.latency.p99, max: result.latency.max },
      errors: result.errors,
      timeouts: result.timeouts,
    },
    aborting: { requests: abortCount, concurrency: abortConcurrency, ...aborting },
    server: {
      requestsSeen: serverSeen,
      cancelled499: server499,
      images: after.blip3o_images_generated_total - before.blip3o_images_generated_total,
      completionTokens: after['blip3o_tokens_total{type="completion"}'] - before['blip3o_tokens_total{type="completion"}'],
    },
    rssMb: { before: rssBefore, after: rssAfter, growth: rssAfter - rssBefore },
    checks,
  };

  child.kill('SIGTERM');
  const exit = await exited;
  checks['SIGTERM exits 0'] = exit.code === 0;

  const lines = [
    `serve-load: ${n} requests at concurrency ${concurrency} (${abortCount} with random aborts), max-queue ${report.maxQueue}, ${wallS.toFixed(1)} s`,
    `  throughput ${report.throughputRps.toFixed(1)} requests/s (${report.answeredRps.toFixed(1)} answered/s)`,
    `  autocannon: ${JSON.stringify(statuses)}, latency p50 ${result.latency.p50} ms, p99 ${result.latency.p99} ms, errors ${result.errors}, timeouts ${result.timeouts}`,
    `  aborting clients: ${aborting.answered} answered ${JSON.stringify(aborting.statuses)}, ${aborting.aborted} aborted; server counted ${server499} cancelled (499)`,
    `  server: ${report.server.images} images, ${report.server.completionTokens} completion tokens; RSS ${rssBefore.toFixed(1)} -> ${rssAfter.toFixed(1)} MB (${(rssAfter - rssBefore).toFixed(1)} MB)`,
    ...Object.entries(checks).map(([name, ok]) => `  ${ok ? 'ok' : 'FAILED'}: ${name}`),
  ];
  process.stderr.write(`${lines.join('\n')}\n`);
  process.stdout.write(`${JSON.stringify(report)}\n`);
  process.exitCode = Object.values(checks).every(Boolean) ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`serve-load: ${err.stack ?? err} (${err.cause?.message ?? ''})\n`);
  child?.kill('SIGKILL');
  process.exit(1);
});
