// The benchmark's report: the machine it ran on, the Markdown tables, and the files under
// bench/results/ (<date>_<machine>.json and .md, and latest.json for other tools).

import { mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { BenchReport, Comparison } from './bench';

export interface MachineInfo {
  cpu: string;
  /** Logical CPUs. */
  cores: number;
  memoryGiB: number;
  os: string;
  node: string;
}

export function machineInfo(): MachineInfo {
  const cpus = os.cpus();
  return {
    cpu: cpus[0]?.model.trim() ?? 'unknown CPU',
    cores: cpus.length,
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    os: `${os.type()} ${os.release()} ${os.arch()}`,
    node: process.version,
  };
}

function ms(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  if (value >= 10_000) return `${(value / 1000).toFixed(1)} s`;
  return `${value >= 100 ? value.toFixed(0) : value >= 1 ? value.toFixed(1) : value.toFixed(3)} ms`;
}

function num(value: number | null | undefined, digits = 2, suffix = ''): string {
  return value === null || value === undefined || !Number.isFinite(value) ? '–' : `${value.toFixed(digits)}${suffix}`;
}

function percent(value: number | null): string {
  return value === null ? '–' : `${(value * 100).toFixed(1)}%`;
}

function row(label: string, c: Comparison): string {
  return `| ${label} | ${ms(c.nativeMs)} | ${ms(c.pythonMs)} | ${num(c.ratio)} |`;
}

/** The report as Markdown: the settings, the native vs Python table, throughput and understanding. */
export function markdown(r: BenchReport): string {
  const s = r.settings;
  const m = r.machine;
  const e = r.endToEnd;
  const python = s.python ? `, Python reference on torch ${r.runtime.torch}` : ', no Python reference';
  const lines = [
    `### ${s.bundle} on ${s.device} (${s.dtype}), ${r.date.slice(0, 10)}`,
    '',
    `${m.cpu}, ${m.cores} cores, ${m.memoryGiB} GiB; ${m.os}; Node ${m.node}; libtorch ${r.runtime.libtorch}${python}.`,
    `Threads: native ${s.threads.native}, Python ${s.threads.python ?? '–'}. DiT ${s.steps} steps (CFG ${s.cfg}, eta ${s.eta}), decoder ${s.decoderSteps} steps (CFG ${s.decoderCfg}); ` +
      `${s.runs} runs per side after ${s.warmupRuns} warm-up run${s.warmupRuns === 1 ? "" : "s"}, alternating native and Python, same token ids and seeds.`,
    '',
    '| | native | Python | native / Python |',
    '|---|---:|---:|---:|',
    row('model load (fresh process)', { nativeMs: r.load.coldMs, pythonMs: r.load.pythonMs, ratio: r.load.pythonMs ? r.load.coldMs / r.load.pythonMs : null }),
    `| process start to loaded model | ${ms(r.load.coldProcessMs)} (addon + libtorch ${ms(r.load.addonMs)}) | | |`,
    row('backbone conditioning', r.stages.condition),
    row(`DiT loop (${s.steps} steps)`, r.stages.dit),
    row('DiT step (median)', r.steps.dit),
    row(`decoder loop (${s.decoderSteps} steps)`, r.stages.decoder),
    row('decoder step (median)', r.steps.decoder),
    row('VAE decode', r.stages.vae),
    row('loop overhead per DiT step', r.overheadPerStepMs.dit),
    row('loop overhead per decoder step', r.overheadPerStepMs.decoder),
    `| loop overhead, share of the loops | ${percent(r.overheadFraction)} | ${percent(r.pythonOverheadFraction)} | |`,
    row('end to end, to pixels (median)', { nativeMs: e.nativeMs, pythonMs: e.pythonMs, ratio: e.ratio }),
    `| end to end p50 / p90 | ${ms(e.p50Ms)} / ${ms(e.p90Ms)} | ${ms(e.pythonP50Ms)} / ${ms(e.pythonP90Ms)} | |`,
    `| peak RSS | ${num(r.memory.peakRssMb, 0, ' MB')} | ${num(r.memory.pythonPeakRssMb, 0, ' MB')} | |`,
    '',
    r.maxPixelDiff === null
      ? 'No pixel comparison (no Python reference).'
      : `Largest pixel difference between the native and the Python image of the same seed: ${r.maxPixelDiff} of 255 (${s.runs} seeds).`,
    '',
    ...throughputLines(r),
    `Understanding (describe, greedy): ${r.understanding.promptTokens} prompt tokens prefilled in ${ms(r.understanding.prefillMs)}; ` +
      `${r.understanding.generatedTokens} tokens decoded at ${num(r.understanding.decodeTokensPerSec, 1)} tokens/s.`,
    '',
    'Model load: loadModel() after the addon loaded, against torch.jit.load of the four files plus the negative features after `import torch`. ' +
      'End to end "to pixels": generate() minus PNG encoding, against the reference from token ids to uint8 pixels; p50 / p90: generate() with PNG. ' +
      'Loop overhead: loop time minus the time inside the TorchScript calls. Ratios below 1: the runtime is faster.',
  ];
  return `${lines.join('\n')}\n`;
}

function throughputLines(r: BenchReport): string[] {
  const q = r.queue;
  if (q === null) return ['No throughput runs (--no-throughput).', ''];
  return [
    '| throughput | time | images/s |',
    '|---|---:|---:|',
    ...r.throughput.map((t) => `| batch ${t.batch} (one call) | ${ms(t.ms)} | ${num(t.imagesPerSec)} |`),
    `| ${q.requests} requests at once (request queue) | ${ms(q.concurrentMs)} | ${num((q.requests * 1000) / q.concurrentMs)} |`,
    `| ${q.requests} requests one after another | ${ms(q.sequentialMs)} | ${num((q.requests * 1000) / q.sequentialMs)} |`,
    '',
    `Request queue speedup: ${num(q.speedup)}x (same images as sequential: ${q.identical ? 'yes' : 'NO'}), the median of ${q.rounds} rounds' ratios (${q.roundSpeedups.map((x) => num(x)).join(', ')}); a round runs the ${q.requests} requests at once and one after another, in alternating order. Times are medians of ${q.rounds} rounds.`,
    '',
  ];
}

/** <date>_<machine>: 2025-11-26T06-41-03_amd-epyc-2c-cpu. */
export function reportName(r: BenchReport): string {
  const date = r.date.slice(0, 19).replace(/:/g, '-');
  const cpu = r.machine.cpu.toLowerCase().replace(/\(r\)|\(tm\)|cpu|processor|@.*$/g, ' ').replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');
  return `${date}_${cpu}-${r.machine.cores}c-${r.settings.device}`;
}

/** Writes <name>.json, <name>.md and latest.json under `dir`; returns their paths. */
export async function writeReport(r: BenchReport, dir: string): Promise<{ json: string; markdown: string; latest: string }> {
  await mkdir(dir, { recursive: true });
  const base = path.join(dir, reportName(r));
  const text = `${JSON.stringify(r, null, 2)}\n`;
  const files = { json: `${base}.json`, markdown: `${base}.md`, latest: path.join(dir, 'latest.json') };
  await writeFile(files.json, text);
  await writeFile(files.markdown, markdown(r));
  await writeFile(files.latest, text);
  return files;
}
