// The sigma schedules against diffusers' formulas, written out here independently in float64, and
// against values diffusers itself prints (torch float32), to float32 precision.
import t, { type Test } from 'tap';
import { eulerDiscreteSchedule, flowMatchSigmas, type EulerDiscreteConfig } from '../ts/schedules';
import { InvalidArgumentError } from '../ts/errors';

const sdxl: EulerDiscreteConfig = {
  numTrainTimesteps: 1000,
  betaStart: 0.00085,
  betaEnd: 0.012,
  betaSchedule: 'scaled_linear',
  timestepSpacing: 'leading',
  stepsOffset: 1,
};

/** Relative closeness at float32 precision (diffusers computes in float32). */
function close(t: Test, actual: number[], expected: number[], rel: number, what: string): void {
  t.equal(actual.length, expected.length, `${what}: length`);
  let worst = 0;
  let at = -1;
  for (let i = 0; i < expected.length; i++) {
    const err = Math.abs(actual[i] - expected[i]) / Math.max(Math.abs(expected[i]), 1e-30);
    if (expected[i] === 0 ? actual[i] !== 0 : err > worst) {
      worst = expected[i] === 0 ? Infinity : err;
      at = i;
    }
  }
  t.ok(worst <= rel, `${what}: worst relative error ${worst} at ${at} <= ${rel}`);
}

// --- reference formulas (float64), straight from the diffusers sources ---

function refTrainSigmas(c: EulerDiscreteConfig): number[] {
  const n = c.numTrainTimesteps;
  const sigmas: number[] = [];
  let cumprod = 1;
  for (let i = 0; i < n; i++) {
    let beta: number;
    if (c.betaSchedule === 'linear') beta = c.betaStart + ((c.betaEnd - c.betaStart) * i) / (n - 1);
    else {
      const root = Math.sqrt(c.betaStart) + ((Math.sqrt(c.betaEnd) - Math.sqrt(c.betaStart)) * i) / (n - 1);
      beta = root * root;
    }
    cumprod *= 1 - beta;
    sigmas.push(Math.sqrt((1 - cumprod) / cumprod));
  }
  return sigmas;
}

function refEuler(steps: number, c: EulerDiscreteConfig): { sigmas: number[]; timesteps: number[]; init: number } {
  const n = c.numTrainTimesteps;
  let timesteps: number[];
  if (c.timestepSpacing === 'leading') {
    const ratio = Math.floor(n / steps);
    timesteps = Array.from({ length: steps }, (_, i) => (steps - 1 - i) * ratio + c.stepsOffset);
  } else if (c.timestepSpacing === 'trailing') {
    const ratio = n / steps;
    timesteps = Array.from({ length: steps }, (_, i) => {
      const v = n - i * ratio;
      const r = Math.round(v);
      return (Math.abs(v - Math.trunc(v)) === 0.5 && r % 2 !== 0 ? r - 1 : r) - 1; // numpy rounds half to even
    });
  } else {
    // np.linspace(0, n - 1, steps, dtype=np.float32): float32 timesteps.
    timesteps = Array.from({ length: steps }, (_, i) => Math.fround(steps === 1 ? 0 : ((n - 1) * (steps - 1 - i)) / (steps - 1)));
  }
  const train = refTrainSigmas(c);
  const sigmas = timesteps.map((ts) => {
    if (ts >= n - 1) return train[n - 1]; // np.interp clamps (leading with steps = n gives t = n)
    const lo = Math.floor(ts);
    const hi = Math.min(lo + 1, n - 1);
    return train[lo] + (train[hi] - train[lo]) * (ts - lo);
  });
  const max = Math.max(...sigmas);
  const init = c.timestepSpacing === 'leading' ? Math.sqrt(max * max + 1) : max;
  return { sigmas: [...sigmas, 0], timesteps, init };
}

function refFlowMatch(steps: number, shift: number): { sigmas: number[]; timesteps: number[] } {
  const base = Array.from({ length: steps }, (_, i) => (steps === 1 ? 1 : 1 + ((1 / steps - 1) * i) / (steps - 1)));
  const shifted = base.map((s) => (shift * s) / (1 + (shift - 1) * s));
  return { sigmas: [...shifted, 0], timesteps: shifted.map((s) => s * 1000) };
}

// --- tests ---

t.test('integerTimesteps truncates the timesteps as the official BLIP3-o sampler does, sigmas unchanged', async (t) => {
  for (const steps of [1, 4, 30, 50]) {
    const float = flowMatchSigmas(steps);
    const int = flowMatchSigmas(steps, { integerTimesteps: true });
    t.same(int.sigmas, float.sigmas);
    t.same(int.timesteps, float.timesteps.map(Math.trunc));
  }
  // 30 steps: sigma 2/3 at step 10 is 666.6667 in float32, given as 666 (rounding would give 667)
  t.equal(flowMatchSigmas(30, { integerTimesteps: true }).timesteps[10], 666);
  t.same(flowMatchSigmas(30, { integerTimesteps: true }).timesteps.slice(0, 3), [1000, 966, 933]);
});

t.test('flowMatchSigmas equals diffusers FlowMatchEulerDiscreteScheduler(sigmas=linspace(1, 1/n, n))', async (t) => {
  for (const steps of [1, 2, 3, 7, 30, 50, 1000]) {
    for (const shift of [1, 3, 0.5]) {
      const s = flowMatchSigmas(steps, { shift });
      const ref = refFlowMatch(steps, shift);
      close(t, s.sigmas, ref.sigmas, 2e-7, `steps ${steps} shift ${shift} sigmas`);
      close(t, s.timesteps, ref.timesteps, 2e-7, `steps ${steps} shift ${shift} timesteps`);
      t.equal(s.sigmas[s.sigmas.length - 1], 0, 'ends with 0');
      t.equal(s.sigmas.length, steps + 1);
      t.equal(s.timesteps.length, steps);
    }
  }
});

t.test('flowMatchSigmas known values (diffusers, float32)', async (t) => {
  const s = flowMatchSigmas(30);
  t.equal(s.sigmas[0], 1);
  t.equal(s.timesteps[0], 1000);
  t.equal(s.sigmas[1], Math.fround(0.9666666388511658));
  t.equal(s.timesteps[1], Math.fround(966.6666259765625));
  t.equal(s.sigmas[29], Math.fround(0.03333333507180214));
  t.equal(s.timesteps[29], Math.fround(33.333335876464844));
  const shifted = flowMatchSigmas(30, { shift: 3 });
  t.equal(shifted.sigmas[1], Math.fround(0.988636314868927));
  t.equal(shifted.sigmas[29], 0.09375);
  t.equal(shifted.timesteps[29], 93.75);
  t.same(flowMatchSigmas(1), { sigmas: [1, 0], timesteps: [1000] });
});

t.test('eulerDiscreteSchedule equals diffusers EulerDiscreteScheduler', async (t) => {
  for (const spacing of ['leading', 'trailing', 'linspace'] as const) {
    for (const schedule of ['scaled_linear', 'linear'] as const) {
      for (const steps of [1, 2, 3, 7, 16, 30, 50, 999, 1000]) {
        const config = { ...sdxl, timestepSpacing: spacing, betaSchedule: schedule };
        const s = eulerDiscreteSchedule(steps, config);
        const ref = refEuler(steps, config);
        const what = `${spacing} ${schedule} ${steps}`;
        // Timesteps are integers (leading, trailing) or float32 values (linspace). The sigmas follow
        // diffusers' float32 arithmetic (schedulers-fidelity.test.ts: within one ulp of its values), which
        // drifts from this float64 model by up to 1.5e-5 (linear betas) at the smallest sigmas.
        close(t, s.timesteps, ref.timesteps, 1e-7, `${what} timesteps`);
        close(t, s.sigmas, ref.sigmas, 2e-5, `${what} sigmas`);
        t.ok(Math.abs(s.initNoiseSigma - ref.init) / ref.init < 2e-5, `${what} init sigma ${s.initNoiseSigma} vs ${ref.init}`);
      }
    }
  }
});

t.test('eulerDiscreteSchedule known values (diffusers, SDXL config, float32)', async (t) => {
  const s = eulerDiscreteSchedule(50, sdxl);
  t.same(s.timesteps.slice(0, 3), [981, 961, 941]);
  t.same(s.timesteps.slice(-2), [21, 1]);
  // diffusers' float32 arithmetic drifts from the exact values by up to ~1e-5 at the smallest sigmas.
  close(t, s.sigmas.slice(0, 3), [13.120414733886719, 11.676050186157227, 10.425044059753418], 1e-5, 'first sigmas');
  close(t, s.sigmas.slice(-3), [0.14146366715431213, 0.04131447896361351, 0], 3e-5, 'last sigmas');
  t.ok(Math.abs(s.initNoiseSigma - 13.158468246459961) < 1e-4, `init noise sigma ${s.initNoiseSigma}`);

  const trailing = eulerDiscreteSchedule(30, { ...sdxl, timestepSpacing: 'trailing' });
  t.same(trailing.timesteps.slice(0, 3), [999, 966, 932]);
  t.same(trailing.timesteps.slice(-2), [66, 32]);
  t.ok(Math.abs(trailing.initNoiseSigma - 14.614645004272461) < 1e-4, 'trailing init = max sigma');

  const linspace = eulerDiscreteSchedule(7, { ...sdxl, timestepSpacing: 'linspace', betaSchedule: 'linear' });
  t.same(linspace.timesteps, [999, 832.5, 666, 499.5, 333, 166.5, 0]);
  close(t, linspace.sigmas, [25.146116256713867, 9.906187057495117, 4.495611190795898, 2.2803473472595215, 1.2142558097839355, 0.5895482897758484, 0.029167532920837402, 0], 3e-5, 'linspace sigmas');
});

t.test('trailing keeps exactly `steps` timesteps where numpy.arange would add one', async (t) => {
  for (const steps of [61, 103, 121]) {
    const s = eulerDiscreteSchedule(steps, { ...sdxl, timestepSpacing: 'trailing' });
    t.equal(s.timesteps.length, steps);
    t.ok(s.timesteps.every((ts) => ts >= 0), 'no negative timestep');
  }
});

t.test('schedules reject bad step counts', async (t) => {
  t.throws(() => flowMatchSigmas(0), new InvalidArgumentError('Expected positive integer for steps but received 0 of type number'));
  t.throws(() => eulerDiscreteSchedule(1.5, sdxl), InvalidArgumentError);
  t.throws(() => flowMatchSigmas(10, { shift: -1 }), InvalidArgumentError);
});
