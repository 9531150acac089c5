// The sigma schedules (ts/schedules.ts) against diffusers' own outputs: test/fidelity/fixtures/schedulers
// (FlowMatchEulerDiscreteScheduler as BLIP3-o's DiT sampler drives it, EulerDiscreteScheduler with the
// Emu2-Gen / SDXL decoder config; torch float32 values, read from the .safetensors by hand).
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import t, { type Test } from 'tap';
import { eulerDiscreteSchedule, flowMatchSigmas, type EulerDiscreteConfig } from '../ts/schedules';
import { fidelity } from './fixtures/fidelity';

const dir = join(__dirname, 'fidelity', 'fixtures');
const meta = JSON.parse(readFileSync(join(dir, 'schedulers.json'), 'utf8'));

/** A .safetensors file's tensors (F32 and I64 only), flattened. */
function readSafetensors(path: string): Map<string, number[]> {
  const buf = readFileSync(path);
  const headerLength = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLength).toString('utf8'));
  const base = 8 + headerLength;
  const out = new Map<string, number[]>();
  for (const [name, entry] of Object.entries<{ dtype: string; data_offsets: [number, number] }>(header)) {
    if (name === '__metadata__') continue;
    const [start, end] = entry.data_offsets;
    const values: number[] = [];
    if (entry.dtype === 'F32') for (let i = base + start; i < base + end; i += 4) values.push(buf.readFloatLE(i));
    else if (entry.dtype === 'I64') for (let i = base + start; i < base + end; i += 8) values.push(Number(buf.readBigInt64LE(i)));
    else throw new Error(`${name}: unexpected dtype ${entry.dtype}`);
    out.set(name, values);
  }
  return out;
}

const fx = readSafetensors(join(dir, 'schedulers.safetensors'));
function get(name: string): number[] {
  const v = fx.get(name);
  if (!v) throw new Error(`schedulers.safetensors has no ${name}`);
  return v;
}

const f32 = Math.fround;
const bits = new Int32Array(1);
const asFloat = new Float32Array(bits.buffer);
/** Distance in float32 units in the last place (both values must be float32 values). */
function ulps(a: number, b: number): number {
  const key = (x: number): number => {
    asFloat[0] = x;
    return bits[0] < 0 ? -2147483648 - bits[0] : bits[0];
  };
  return Math.abs(key(a) - key(b));
}

interface Worst { ulps: number; relative: number; at: number }
function worst(actual: number[], expected: number[]): Worst {
  const w: Worst = { ulps: 0, relative: 0, at: -1 };
  for (let i = 0; i < expected.length; i++) {
    const u = ulps(actual[i], expected[i]);
    const r = Math.abs(actual[i] - expected[i]) / Math.max(Math.abs(expected[i]), 1e-30);
    if (u > w.ulps) Object.assign(w, { ulps: u, at: i });
    w.relative = Math.max(w.relative, r);
  }
  return w;
}

/** Float32 values equal to within `maxUlps` (0: the same bytes). */
function sameFloat32(t: Test, actual: number[], expected: number[], maxUlps: number, what: string): Worst {
  t.equal(actual.length, expected.length, `${what}: length`);
  t.ok(actual.every((v) => f32(v) === v), `${what}: float32 values`);
  const w = worst(actual, expected);
  t.ok(w.ulps <= maxUlps, `${what}: worst ${w.ulps} ulp (relative ${w.relative.toExponential(2)}) at ${w.at}, <= ${maxUlps} ulp`);
  return w;
}

// The decoder's scheduler config (the Emu2-Gen / BLIP3-o diffusion-decoder one) in the manifest's form.
const euler = meta.config.euler_sdxl;
const sdxl: EulerDiscreteConfig = {
  numTrainTimesteps: euler.num_train_timesteps,
  betaStart: euler.beta_start,
  betaEnd: euler.beta_end,
  betaSchedule: euler.beta_schedule,
  timestepSpacing: euler.timestep_spacing,
  stepsOffset: euler.steps_offset,
};

t.test('flowMatchSigmas gives diffusers FlowMatchEulerDiscreteScheduler(sigmas=linspace(1, 1/n, n)) byte for byte', async (t) => {
  for (const [name, steps] of [['flow30', 30], ['flow4', 4], ['flow30_shift3', 30]] as const) {
    const shift = meta.cases[name].config.shift;
    t.equal(meta.cases[name].call, `set_timesteps(${steps}, sigmas=np.linspace(1.0, 1/${steps}, ${steps}))`);
    const s = flowMatchSigmas(steps, { shift, numTrainTimesteps: meta.cases[name].config.num_train_timesteps });
    sameFloat32(t, s.sigmas, get(`out.${name}.sigmas`), 0, `${name} sigmas`);
    sameFloat32(t, s.timesteps, get(`out.${name}.timesteps`), 0, `${name} timesteps`);
    fidelity(t, `DiT schedule (${steps} steps, shift ${shift}) vs diffusers' FlowMatchEulerDiscreteScheduler, sigmas and timesteps, worst ulp`,
      Math.max(worst(s.sigmas, get(`out.${name}.sigmas`)).ulps, worst(s.timesteps, get(`out.${name}.timesteps`)).ulps), 0);
  }
});

t.test("integerTimesteps gives the official DiT sampler's integer timesteps", async (t) => {
  // BLIP3-o's sampler gives the DiT timesteps.to(torch.long): sigma * 1000 truncated (966.67 -> 966)
  for (const [name, steps, shift] of [['flow30', 30, 1], ['flow4', 4, 1], ['flow30_shift3', 30, 3]] as const) {
    const s = flowMatchSigmas(steps, { shift, integerTimesteps: true });
    t.same(s.timesteps, get(`out.${name}.timesteps_int64`), `${name}: timesteps`);
    const want = get(`out.${name}.timesteps_int64`);
    fidelity(t, `DiT integer timesteps (${steps} steps, shift ${shift}) vs the official sampler's, timesteps differing`,
      s.timesteps.filter((v, i) => v !== want[i]).length, 0);
    sameFloat32(t, s.sigmas, get(`out.${name}.sigmas`), 0, `${name}: sigmas unchanged`);
  }
  t.not(flowMatchSigmas(30).timesteps[1], get('out.flow30.timesteps_int64')[1], 'without it the timesteps are the float ones');
});

t.test("a flow-match Euler step from the schedule's sigmas is diffusers' step", async (t) => {
  const s = flowMatchSigmas(30);
  const i = meta.cases.flow_step.step_index;
  t.equal(s.timesteps[i], get('in.flow_step.timestep')[0], 'the step timestep');
  const x = get('in.flow_step.sample'), v = get('in.flow_step.model_output'), want = get('out.flow_step.prev_sample');
  const dt = f32(s.sigmas[i + 1] - s.sigmas[i]);
  const got = x.map((xi, k) => f32(xi + f32(dt * v[k])));  // float32: x + (sigma_next - sigma) v
  sameFloat32(t, got, want, 0, 'prev_sample');
});

t.test('eulerDiscreteSchedule timesteps and init_noise_sigma equal diffusers EulerDiscreteScheduler (leading, offset 1)', async (t) => {
  for (const [name, steps] of [['euler50', 50], ['euler7', 7]] as const) {
    t.equal(meta.cases[name].call, `EulerDiscreteScheduler.from_config(cfg).set_timesteps(${steps})`);
    const s = eulerDiscreteSchedule(steps, sdxl);
    t.same(s.timesteps, get(`out.${name}.timesteps`), `${name} timesteps`);
    const want = get(`out.${name}.timesteps`);
    fidelity(t, `decoder schedule (${steps} steps) vs diffusers' EulerDiscreteScheduler (SDXL config), timesteps differing`,
      s.timesteps.filter((v, i) => v !== want[i]).length, 0);
    t.equal(s.timesteps[0], steps === 50 ? 981 : 853, `${name}: leading spacing with steps_offset 1`);
    // init_noise_sigma = sqrt(max^2 + 1) for leading spacing, in float32: the schedule's formula on diffusers'
    // largest sigma gives diffusers' value exactly; the schedule's own value inherits its sigma_max's
    // difference (see the sigmas test below)
    const init = get(`out.${name}.init_noise_sigma`)[0];
    t.equal(f32(meta.cases[name].init_noise_sigma), init);
    const max = Math.max(...get(`out.${name}.sigmas`));
    sameFloat32(t, [f32(Math.sqrt(f32(f32(max * max) + 1)))], [init], 0, `${name} init_noise_sigma from diffusers' sigma_max`);
    const w = worst([s.initNoiseSigma], [init]);
    t.ok(w.relative <= 1e-6, `${name} init_noise_sigma: ${s.initNoiseSigma} vs ${init}, relative ${w.relative.toExponential(2)} <= 1e-6`);
    t.comment(`${name} init_noise_sigma: schedule vs diffusers ${w.ulps} ulp (relative ${w.relative.toExponential(2)})`);
  }
});

t.test('eulerDiscreteSchedule sigmas are diffusers\' (float32 training sigmas, as diffusers builds them)', async (t) => {
  for (const [name, steps] of [['euler50', 50], ['euler7', 7]] as const) {
    const s = eulerDiscreteSchedule(steps, sdxl);
    const want = get(`out.${name}.sigmas`);
    t.equal(s.sigmas[steps], 0, 'final sigma 0');
    // one ulp: torch.linspace's values come out of a fused multiply-add, rounded once
    const w = worst(s.sigmas, want);
    fidelity(t, `decoder schedule (${steps} steps) vs diffusers' EulerDiscreteScheduler (SDXL config), sigmas, worst ulp`, w.ulps, 1);
    t.comment(`${name}: schedule vs diffusers sigmas: worst ${w.ulps} ulp, relative ${w.relative.toExponential(2)} at index ${w.at}`);
  }
});

t.test("an Euler step from the fixture's sigmas is the k-diffusion update the runtime makes", async (t) => {
  // diffusers' EulerDiscreteScheduler.step (epsilon, s_churn 0) in float32: x0 = x - sigma eps,
  // d = (x - x0) / sigma, x' = x + d (sigma_next - sigma); native/core/model.cpp runDecoder does the same.
  const sigmas = get('out.euler50.sigmas');
  const i = meta.cases.euler_step.step_index;
  t.equal(get('in.euler_step.timestep')[0], get('out.euler50.timesteps')[i]);
  const x = get('in.euler_step.sample'), eps = get('in.euler_step.model_output');
  const s = sigmas[i], dt = f32(sigmas[i + 1] - s);
  const got = x.map((xi, k) => {
    const x0 = f32(xi - f32(s * eps[k]));
    return f32(xi + f32(f32(f32(xi - x0) / s) * dt));
  });
  sameFloat32(t, got, get('out.euler_step.prev_sample'), 0, 'prev_sample');
  // scale_model_input: x / sqrt(sigma^2 + 1), float32
  const scales = get('out.euler50.scale_factors');
  sameFloat32(t, sigmas.slice(0, 50).map((sg) => f32(1 / f32(Math.sqrt(f32(f32(sg * sg) + 1))))), scales, 0, 'scale_model_input factors');
});
