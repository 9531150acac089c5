// The benchmark in --quick mode on the bundled tiny model with the Python reference: the structure of
// its report and files (never its timings or ratios, which depend on the machine).
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { median, percentile, runBench, type BenchReport } from '../ts/bench';
import { markdown, writeReport } from '../ts/bench-report';
import { InvalidArgumentError } from '../ts/index';
import { root, skipWithoutRuntime } from './fixtures/runtime';

const hasPython = spawnSync('bash', [path.join(root, 'models', 'run-python.sh'), '-c', 'import torch'], { stdio: 'ignore' }).status === 0;
const skip = skipWithoutRuntime || (hasPython ? false : 'no Python with torch (apt-get install python3-torch)');

t.test('percentiles interpolate like numpy', async (t) => {
  t.equal(median([3, 1, 2]), 2);
  t.equal(median([4, 1, 2, 3]), 2.5);
  t.equal(percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90), 9.1);
});

t.test('bad options fail before anything loads', async (t) => {
  await t.rejects(runBench({ runs: 0 }), InvalidArgumentError);
  await t.rejects(runBench({ steps: -1 }), InvalidArgumentError);
});

t.test('bench --quick with the Python reference', { skip }, async (t) => {
  const out = mkdtempSync(path.join(os.tmpdir(), 'blip3o-bench-'));
  t.teardown(() => rmSync(out, { recursive: true, force: true }));
  const report = await runBench({ device: 'cpu', quick: true, runs: 2, steps: 2, decoderSteps: 2 });
  const files = await writeReport(report, out);

  const latest = JSON.parse(readFileSync(files.latest, 'utf8')) as BenchReport;
  t.same(latest, JSON.parse(readFileSync(files.json, 'utf8')), 'latest.json is the dated report');
  t.same(readdirSync(out).sort(), [path.basename(files.json), path.basename(files.markdown), 'latest.json'].sort());
  t.match(path.basename(files.json), /^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_[a-z0-9-]+-\d+c-cpu\.json$/, 'named by date and machine');

  const finite = (value: unknown, name: string): void => {
    t.ok(typeof value === 'number' && Number.isFinite(value), `${name} is a finite number`);
  };
  for (const key of ['nativeMs', 'pythonMs', 'ratio', 'p50Ms', 'p90Ms', 'pythonP50Ms', 'pythonP90Ms'] as const) {
    finite(latest.endToEnd[key], `endToEnd.${key}`);
  }
  for (const key of ['concurrentMs', 'sequentialMs', 'speedup'] as const) finite(latest.queue?.[key], `queue.${key}`);
  t.equal(latest.queue?.requests, 8);
  t.equal(latest.queue?.roundSpeedups.length, latest.queue?.rounds, 'one ratio per queue round');
  t.equal(latest.queue?.speedup, median(latest.queue?.roundSpeedups ?? []), "the speedup is the median of the rounds' ratios");
  t.equal(latest.queue?.identical, true, 'the queue gives the images of sequential requests');
  for (const stage of ['condition', 'dit', 'decoder', 'vae'] as const) {
    finite(latest.stages[stage].nativeMs, `stages.${stage}.nativeMs`);
    finite(latest.stages[stage].pythonMs, `stages.${stage}.pythonMs`);
  }
  finite(latest.load.coldMs, 'load.coldMs');
  finite(latest.load.pythonMs, 'load.pythonMs');
  finite(latest.memory.peakRssMb, 'memory.peakRssMb');
  finite(latest.memory.pythonPeakRssMb, 'memory.pythonPeakRssMb');
  t.same(latest.throughput.map((row) => row.batch), [1, 2, 4, 8]);
  latest.throughput.forEach((row) => finite(row.imagesPerSec, `throughput at batch ${row.batch}`));

  finite(latest.overheadFraction, 'overheadFraction');
  for (const loop of ['dit', 'decoder'] as const) {
    for (const side of ['nativeMs', 'pythonMs'] as const) {
      finite(latest.steps[loop][side], `steps.${loop}.${side}`);
      finite(latest.overheadPerStepMs[loop][side], `overheadPerStepMs.${loop}.${side}`);
    }
  }
  for (const key of ['promptTokens', 'generatedTokens', 'prefillMs', 'decodeMs', 'decodeTokensPerSec'] as const) {
    finite(latest.understanding[key], `understanding.${key}`);
  }
  finite(latest.pythonOverheadFraction, 'pythonOverheadFraction');

  finite(latest.maxPixelDiff, 'maxPixelDiff');
  t.ok((latest.maxPixelDiff ?? 255) >= 0 && (latest.maxPixelDiff ?? 255) <= 1, `native and Python pixels agree (max diff ${latest.maxPixelDiff})`);
  t.same(latest.images.python, latest.images.native, 'both images have the same size');
  t.same(latest.images.native, { width: 64, height: 64 });

  t.equal(latest.settings.steps, 2);
  t.equal(latest.settings.decoderSteps, 2);
  t.equal(latest.settings.runs, 2);
  t.ok(latest.settings.threads.native >= 1 && (latest.settings.threads.python ?? 0) >= 1, 'thread counts of both sides');
  t.type(latest.machine.cpu, 'string');
  t.type(latest.runtime.libtorch, 'string');
  t.equal(readFileSync(files.markdown, 'utf8'), markdown(report), 'the Markdown report');
  t.match(markdown(report), /\| end to end, to pixels \(median\) \|/);
});

t.test('bench --no-throughput leaves out batch and queue runs', { skip: skipWithoutRuntime }, async (t) => {
  const report = await runBench({ device: 'cpu', quick: true, runs: 1, steps: 1, decoderSteps: 1, python: false, throughput: false });
  t.same(report.throughput, []);
  t.equal(report.queue, null);
  t.equal(report.settings.throughput, false);
  t.ok(Number.isFinite(report.endToEnd.nativeMs), 'the end-to-end runs still happen');
  t.match(markdown(report), /No throughput runs/);
  t.notMatch(markdown(report), /requests at once/);
});
