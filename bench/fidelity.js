#!/usr/bin/env node
// npm run fidelity: the fidelity checks against implementations nobody here wrote (transformers'
// Qwen2.5-VL, the official BLIP3-o DiT, diffusers' UNet, VAE and schedulers, and the whole generation
// through the runtime against a pipeline of those), collected from the tests that make them into
// bench/results/fidelity/latest.json: { "checks": [{ "name", "value", "limit", "pass" }] }. Exits 1 when
// a check fails or a test does not run.
'use strict';
const { spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const out = path.join(root, 'bench', 'results', 'fidelity');
const record = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'blip3o-fidelity-')), 'checks.jsonl');
const env = { ...process.env, BLIP3O_FIDELITY_OUT: record };
const python = ['test/python/test_fidelity_backbone.py', 'test/python/test_fidelity_dit.py', 'test/python/test_fidelity_decoder.py'];
const tap = ['test/schedulers-fidelity.test.ts', 'test/fidelity-pipeline.test.ts'].filter((f) => fs.existsSync(path.join(root, f)));
const runs = [
  ['bash', ['models/run-python.sh', '-m', 'pytest', '-q', ...python]],
  [path.join(root, 'node_modules', '.bin', 'tap'), tap],
];
let failed = false;
for (const [command, args] of runs) {
  const r = spawnSync(command, args, { cwd: root, env, stdio: 'inherit' });
  if (r.status !== 0) {
    failed = true;
    console.error(`fidelity: ${path.basename(command)} ${args.slice(-1)[0]}: exit ${r.status}`);
  }
}
const checks = fs.existsSync(record)
  ? fs.readFileSync(record, 'utf8').split('\n').filter(Boolean).map((line) => JSON.parse(line))
  : [];
fs.rmSync(path.dirname(record), { recursive: true, force: true });
fs.mkdirSync(out, { recursive: true });
const report = { date: new Date().toISOString(), checks };
fs.writeFileSync(path.join(out, 'latest.json'), `${JSON.stringify(report, null, 2)}\n`);
const bad = checks.filter((c) => !c.pass);
for (const c of checks) console.log(`${c.pass ? 'pass' : 'FAIL'}  ${c.value.toPrecision(3).padStart(9)} <= ${String(c.limit).padEnd(7)} ${c.name}`);
console.log(`fidelity: ${checks.length - bad.length} of ${checks.length} checks pass; wrote ${path.relative(root, path.join(out, 'latest.json'))}`);
if (checks.length === 0) console.error('fidelity: no checks were recorded');
process.exit(failed || bad.length > 0 || checks.length === 0 ? 1 : 0);
