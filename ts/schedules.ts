// Sigma schedules of the two samplers, as pure functions (the loops that use them run natively).
// They reproduce diffusers' schedulers as BLIP3-o drives them:
// - the DiT: FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/steps, steps)),
// - the decoder: EulerDiscreteScheduler.set_timesteps(steps) (linear interpolation, final sigma 0).
// diffusers returns float32 tensors, so the outputs here are float32 values too (Math.fround).

import { InvalidArgumentError } from './errors';
import { roundHalfEven } from './numeric';

export interface FlowMatchSchedule {
  /** steps + 1 sigmas, from 1 down, ending with 0. */
  sigmas: number[];
  /** steps model timesteps, sigma * numTrainTimesteps. */
  timesteps: number[];
}

export interface FlowMatchOptions {
  /** The scheduler's static shift: sigma' = shift * s / (1 + (shift - 1) * s). Default 1. */
  shift?: number;
  /** Timestep scale (diffusers' num_train_timesteps). Default 1000. */
  numTrainTimesteps?: number;
  /** Timesteps truncated to integers, as the official BLIP3-o sampler passes them (`.to(torch.long)`). */
  integerTimesteps?: boolean;
}

export type BetaSchedule = 'linear' | 'scaled_linear';
export type TimestepSpacing = 'leading' | 'trailing' | 'linspace';

export interface EulerDiscreteConfig {
  numTrainTimesteps: number;
  betaStart: number;
  betaEnd: number;
  betaSchedule: BetaSchedule;
  timestepSpacing: TimestepSpacing;
  stepsOffset: number;
}

export interface EulerDiscreteSchedule {
  /** steps + 1 sigmas, decreasing, ending with 0. */
  sigmas: number[];
  /** steps model timesteps, decreasing. */
  timesteps: number[];
  /** The scale of the initial noise: sqrt(max^2 + 1) for 'leading', max for 'linspace'/'trailing'. */
  initNoiseSigma: number;
}

const f32 = Math.fround;

function checkSteps(steps: unknown): asserts steps is number {
  if (typeof steps !== 'number' || !Number.isInteger(steps) || steps < 1) {
    throw new InvalidArgumentError(
      `Expected positive integer for steps but received ${String(steps)} of type ${typeof steps}`,
    );
  }
}

/** numpy.linspace(start, stop, num) (endpoint included), value for value. */
export function linspace(start: number, stop: number, num: number): number[] {
  const out: number[] = [];
  if (num <= 0) return out;
  const div = num - 1;
  const step = div > 0 ? (stop - start) / div : 0;
  for (let i = 0; i < num; i++) out.push(i * step + start);
  if (num > 1) out[num - 1] = stop;
  return out;
}


/** numpy.interp(x, [0, 1, ..., fp.length - 1], fp) for x inside the range. */
function interpAtIndex(x: number, fp: readonly number[]): number {
  const last = fp.length - 1;
  if (x <= 0) return fp[0];
  if (x >= last) return fp[last];
  const j = Math.floor(x);
  const slope = fp[j + 1] - fp[j];
  return slope * (x - j) + fp[j];
}

/**
 * The DiT schedule: sigmas = linspace(1, 1/steps, steps), shifted, timesteps = sigma * 1000, and a
 * final 0. The arithmetic after linspace is float32, as in diffusers.
 */
export function flowMatchSigmas(steps: number, options: FlowMatchOptions = {}): FlowMatchSchedule {
  checkSteps(steps);
  const shift = options.shift ?? 1;
  const numTrain = options.numTrainTimesteps ?? 1000;
  if (typeof shift !== 'number' || !Number.isFinite(shift) || shift <= 0) {
    throw new InvalidArgumentError(
      `Expected positive number for shift but received ${String(shift)} of type ${typeof shift}`,
    );
  }
  const shift32 = f32(shift);
  const shiftMinusOne32 = f32(shift - 1);
  const sigmas = linspace(1, 1 / steps, steps).map((value) => {
    const s = f32(value);
    return f32(f32(shift32 * s) / f32(1 + f32(shiftMinusOne32 * s)));
  });
  const timesteps = sigmas.map((sigma) => f32(sigma * numTrain)).map((t) => (options.integerTimesteps ? Math.trunc(t) : t));
  return { sigmas: [...sigmas, 0], timesteps };
}

/** torch.linspace(start, stop, num) in float32 as torch computes it on CPU: the first half from start,
 * the second from stop, each value rounded once. */
function linspace32(start: number, stop: number, num: number): number[] {
  const a = f32(start), b = f32(stop);
  const step = num > 1 ? f32(f32(b - a) / (num - 1)) : 0;
  const half = Math.floor(num / 2);
  return Array.from({ length: num }, (_, i) => (i < half ? f32(a + step * i) : f32(b - step * (num - 1 - i))));
}

/**
 * sigma(t) = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) for every training timestep t, in float32
 * as diffusers' EulerDiscreteScheduler has them (float32 betas; torch's cumprod of float32 accumulates in
 * double and stores float32): within one float32 ulp of diffusers' values (float64 throughout was up to
 * 2.4e-6 off).
 */
function trainingSigmas(numTrain: number, betaStart: number, betaEnd: number, schedule: BetaSchedule): number[] {
  const scaled = schedule === 'scaled_linear';
  const base = scaled ? linspace32(Math.sqrt(betaStart), Math.sqrt(betaEnd), numTrain) : linspace32(betaStart, betaEnd, numTrain);
  let cumprod = 1;
  return base.map((x) => {
    const beta = scaled ? f32(x * x) : x;
    cumprod *= f32(1 - beta);
    const a = f32(cumprod);
    return f32(Math.sqrt(f32(f32(1 - a) / a)));
  });
}

/** The decoder schedule of diffusers' EulerDiscreteScheduler (linear interpolation, final sigma 0). */
export function eulerDiscreteSchedule(steps: number, config: EulerDiscreteConfig): EulerDiscreteSchedule {
  checkSteps(steps);
  const { numTrainTimesteps: numTrain, betaStart, betaEnd, betaSchedule, timestepSpacing, stepsOffset } = config;

  if (betaSchedule !== 'linear' && betaSchedule !== 'scaled_linear') {
    throw new InvalidArgumentError(`unsupported beta schedule ${JSON.stringify(betaSchedule)}`);
  }
  const trainSigmas = trainingSigmas(numTrain, betaStart, betaEnd, betaSchedule);

  let timesteps: number[];
  if (timestepSpacing === 'linspace') {
    timesteps = linspace(0, numTrain - 1, steps).map(f32).reverse();
  } else if (timestepSpacing === 'leading') {
    const stepRatio = Math.floor(numTrain / steps);
    timesteps = [];
    for (let i = steps - 1; i >= 0; i--) timesteps.push(roundHalfEven(i * stepRatio) + stepsOffset);
  } else if (timestepSpacing === 'trailing') {
    // numpy.arange(numTrain, 0, -ratio) fills start + i * delta, delta = (start - ratio) - start;
    // then rounded, minus 1. For some step counts (61, 103, ...) numpy's length rounds up and
    // diffusers gets one extra timestep of -1; the schedule keeps exactly `steps` values.
    const stepRatio = numTrain / steps;
    const delta = numTrain - stepRatio - numTrain;
    timesteps = [];
    for (let i = 0; i < steps; i++) timesteps.push(roundHalfEven(numTrain + i * delta) - 1);
  } else {
    throw new InvalidArgumentError(`unsupported timestep spacing ${JSON.stringify(timestepSpacing)}`);
  }

  const sigmas = timesteps.map((t) => f32(interpAtIndex(t, trainSigmas)));
  const maxSigma = Math.max(...sigmas);
  const initNoiseSigma = timestepSpacing === 'leading' ? f32(Math.sqrt(f32(f32(maxSigma * maxSigma) + 1))) : maxSigma;
  return { sigmas: [...sigmas, 0], timesteps, initNoiseSigma };
}
