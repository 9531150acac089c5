// The evaluation behind `blip3o eval`: the runtime over fresh random scenes of the shapes world
// (shared/SHAPES.md, implemented by models/shapes.py), driven through the public API and judged by the world's own Python module
// (models/shapes.py --serve). Generation: judge accuracy per kind, seen and held-out combinations
// apart (GenEval's per-task table), and for pairs per relation phrasing (pair prompts use the four
// phrasings equally often). Understanding: exact captions (a pair: either true phrasing) and answers to
// the world's questions. Round trip: describe(generate(prompt)) against the prompt, in canonical form.

import { performance } from 'node:perf_hooks';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { machineInfo, type MachineInfo } from './bench-report';
import { InvalidArgumentError, abortReason } from './errors';
import { encodeImage, writeFileAtomic } from './image';
import { bundledModelDir, loadModel, packageVersion } from './model';
import { packageRoot, type DeviceRequest, type DtypeRequest } from './native';
import { defaultMaxBatch, invalidOption, validateLoadOptions } from './options';
import { PythonAnswerError, PythonServer } from './python-server';

export type Kind = 'single' | 'pair' | 'count';
export const kinds: readonly Kind[] = ['single', 'pair', 'count'];

/** The pair relations of the grammar, as a pair prompt is phrased (SHAPES.md, "Caption grammar"). */
export type Relation = 'to the left of' | 'to the right of' | 'above' | 'below';
export const relations: readonly Relation[] = ['to the left of', 'to the right of', 'above', 'below'];

/** The world's questions, told apart by their text (SHAPES.md, "Questions and answers"). */
export type QuestionType = 'background' | 'shape' | 'color' | 'position' | 'size' | 'count' | 'other';
export const questionTypes: readonly QuestionType[] = ['background', 'shape', 'color', 'position', 'size', 'count', 'other'];

export const defaultEvalCounts = { prompts: 300, unseen: 60, scenes: 300 } as const;
/** Far from the seeds the training recipe samples its data and its own checks with. */
export const defaultEvalSeed = 100_000;
const maxCount = 100_000;
const maxEvalSeed = 2 ** 32 - 1;
/** The world's images: 64 x 64 RGB. */
const worldSize = 64;
/** Failure examples kept per section (and apart for seen and unseen images, captions and questions). */
const maxExamples = 5;
/** A progress line every this many items. */
const progressEvery = 25;

export interface EvalOptions {
  /** Bundle directory (default: the bundled model). Meaningful for bundles of the shapes world. */
  model?: string;
  device?: DeviceRequest;
  dtype?: DtypeRequest;
  /** CPU threads of the model; 0 (default) = the runtime's default. */
  threads?: number;
  /** CUDA graphs (loadModel's cudaGraphs; default true). */
  cudaGraphs?: boolean;
  /** Generation prompts of seen combinations, cycling single, pair, count (default 300). */
  prompts?: number;
  /** Generation prompts with a held-out combination (default 60). */
  unseen?: number;
  /** Scenes for understanding (default 300). */
  scenes?: number;
  /** Seed of the whole evaluation, 0 to 2^32-1 (default 100000). */
  seed?: number;
  /** Results directory (default: bench/results in the package). */
  out?: string;
  /** Progress lines (default: none). */
  log?: (line: string) => void;
  signal?: AbortSignal;
}

/** Passing items of a group, its items, and passed / total (null for an empty group). */
export interface Tally {
  passed: number;
  total: number;
  accuracy: number | null;
}

export type KindTable = Record<Kind | 'overall', Tally>;
/** Pair prompts by the relation they are phrased with; overall = the pair row of the kind table. */
export type RelationTable = Record<Relation | 'overall', Tally>;
export type QuestionTable = Record<QuestionType | 'overall', Tally>;

export interface GenerationFailure {
  caption: string;
  kind: Kind;
  unseen: boolean;
  seed: number;
  /** The judge's reason ("judge error: ..." when the judge could not judge the image). */
  why: string;
}

export interface UnderstandingFailure {
  caption: string;
  /** null: the default question (the answer is compared with the caption). */
  question: string | null;
  expected: string;
  answer: string;
}

export interface RoundTripFailure {
  prompt: string;
  seed: number;
  answer: string;
  /** The answer's canonical form; null when it is not a caption of the grammar. */
  canonical: string | null;
}

export interface EvalReport {
  version: 1;
  date: string;
  machine: MachineInfo;
  runtime: { blip3o: string; libtorch: string };
  settings: {
    model: string;
    bundle: string;
    preset: string;
    device: string;
    dtype: string;
    threads: number;
    /** What was asked: generation prompts (seen, unseen) and understanding scenes. */
    prompts: number;
    unseen: number;
    scenes: number;
    seed: number;
    /**
     * The world's sampling seeds (prompts, unseen prompts, scenes) and the first image seed: the
     * i-th generated image (seen prompts, then unseen ones) has seed images + i.
     */
    seeds: { prompts: number; unseen: number; scenes: number; images: number };
    /** The bundle's default sampler settings, used for every image. */
    steps: number;
    cfg: number;
    /** The DiT sampler's eta (0: deterministic Euler). */
    eta: number;
    decoderSteps: number;
    decoderCfg: number;
    /** Prompts per generate() call. */
    batch: number;
    /** describe: greedy, the default maxTokens; the caption is asked with the bundle's default question. */
    defaultQuestion: string;
  };
  counts: { images: number; scenes: number; questions: number; roundTrips: number };
  generation: {
    seen: KindTable;
    unseen: KindTable;
    /** Pair prompts by relation phrasing, seen and unseen apart. */
    relations: { seen: RelationTable; unseen: RelationTable };
    judgeErrors: number;
    failures: GenerationFailure[];
  };
  /** captions: describe() of a scene equals its caption (a pair: either true phrasing of it). */
  understanding: { captions: KindTable; questions: QuestionTable; failures: UnderstandingFailure[] };
  /** relations: the round trips of seen pair prompts by relation phrasing. */
  roundTrip: { matches: KindTable; relations: RelationTable; notInGrammar: number; failures: RoundTripFailure[] };
  wallMs: number;
  phaseMs: { load: number; generation: number; understanding: number; roundTrip: number };
  files: { json: string; markdown: string };
}

interface WorldItem {
  caption: string;
  kind: Kind;
  unseen: boolean;
}

export interface WorldPrompt extends WorldItem {
  /** A pair prompt's relation as phrased (any of the four); null for the other kinds. */
  relation: Relation | null;
}

interface WorldScene extends WorldItem {
  pixels: string;
  qa: [string, string][];
}

interface Judgement {
  pass: boolean;
  why: string;
}

const knownOptions = ['model', 'device', 'dtype', 'threads', 'cudaGraphs', 'prompts', 'unseen', 'scenes', 'seed', 'out', 'log', 'signal'];

function integerIn(name: string, value: unknown, min: number, max: number, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalidOption(name, `integer between ${min} and ${max}`, value);
  }
  return value;
}

function validateEvalOptions(options: unknown) {
  if (typeof options !== 'object' || options === null || Array.isArray(options)) throw invalidOption('runEval options', 'object', options);
  const o = options as Record<string, unknown>;
  for (const name of Object.keys(o)) {
    if (!knownOptions.includes(name)) {
      throw new InvalidArgumentError(`Unknown option ${JSON.stringify(name)} for runEval; expected one of ${knownOptions.join(', ')}`);
    }
  }
  const text = (name: string): string | undefined => {
    const value = o[name];
    if (value !== undefined && (typeof value !== 'string' || value.length === 0)) throw invalidOption(name, 'non-empty string', value);
    return value as string | undefined;
  };
  if (o.log !== undefined && typeof o.log !== 'function') throw invalidOption('log', 'function', o.log);
  if (o.signal !== undefined && !(o.signal instanceof AbortSignal)) throw invalidOption('signal', 'AbortSignal', o.signal);
  return {
    load: validateLoadOptions({ device: o.device, dtype: o.dtype, threads: o.threads, cudaGraphs: o.cudaGraphs }),
    model: text('model'),
    out: text('out'),
    prompts: integerIn('prompts', o.prompts, 1, maxCount, defaultEvalCounts.prompts),
    unseen: integerIn('unseen', o.unseen, 1, maxCount, defaultEvalCounts.unseen),
    scenes: integerIn('scenes', o.scenes, 1, maxCount, defaultEvalCounts.scenes),
    seed: integerIn('seed', o.seed, 0, maxEvalSeed, defaultEvalSeed),
    log: (o.log as ((line: string) => void) | undefined) ?? (() => undefined),
    signal: o.signal as AbortSignal | undefined,
  };
}

/** The type of a world question, from its text. */
export function questionType(question: string): QuestionType {
  if (question === 'what color is the background?') return 'background';
  if (question === 'what shape is it?') return 'shape';
  if (/^what colou?r is the \w+\?$/.test(question)) return 'color';
  if (/^where is the \w+\?$/.test(question)) return 'position';
  if (/^is the \w+ large or small\?$/.test(question)) return 'size';
  if (/^how many \w+ are there\?$/.test(question)) return 'count';
  return 'other';
}

class Counter<K extends string> {
  private readonly counts = new Map<K | 'overall', { passed: number; total: number }>();

  constructor(private readonly keys: readonly K[]) {
    for (const key of [...keys, 'overall' as const]) this.counts.set(key, { passed: 0, total: 0 });
  }

  add(key: K, pass: boolean): void {
    for (const k of [key, 'overall' as const]) {
      const c = this.counts.get(k) ?? { passed: 0, total: 0 };
      c.total += 1;
      if (pass) c.passed += 1;
      this.counts.set(k, c);
    }
  }

  table(): Record<K | 'overall', Tally> {
    const out = {} as Record<K | 'overall', Tally>;
    for (const key of [...this.keys, 'overall' as const]) {
      const { passed, total } = this.counts.get(key)!;
      out[key] = { passed, total, accuracy: total === 0 ? null : passed / total };
    }
    return out;
  }
}

/** Logs "label done/total" every `progressEvery` items and at the end. */
function progress(log: (line: string) => void, label: string, total: number): (done: number) => void {
  let reported = 0;
  return (done) => {
    if (done === total || Math.floor(done / progressEvery) > Math.floor(reported / progressEvery)) {
      log(`${label} ${done}/${total}`);
      reported = done;
    }
  };
}

function clip(text: string, max = 200): string {
  return text.length <= max ? text : `${text.slice(0, max)}…`;
}

function kindOf(value: unknown): Kind {
  if (typeof value === 'string' && (kinds as readonly string[]).includes(value)) return value as Kind;
  throw new Error(`the shapes world server answered an unknown kind ${JSON.stringify(value)}`);
}

function relationOf(kind: Kind, value: unknown, caption: string): Relation | null {
  if (kind !== 'pair' && (value === null || value === undefined)) return null;
  if (kind === 'pair' && typeof value === 'string' && (relations as readonly string[]).includes(value) && caption.includes(` ${value} a `)) {
    return value as Relation;
  }
  throw new Error(`the shapes world server answered the relation ${JSON.stringify(value)} for the ${kind} prompt ${JSON.stringify(caption)}`);
}

/** The world's server (models/shapes.py --serve): prompts, scenes, the judge and canonical captions (cached). */
export class ShapesWorld {
  private readonly canonicalCache = new Map<string, string | null>();

  private constructor(private readonly server: PythonServer) {}

  static start(): ShapesWorld {
    return new ShapesWorld(PythonServer.start('models.shapes', 'the shapes world server'));
  }

  /** Prompts cycling single, pair, count; a pair phrased with each of the four relations equally often. */
  async prompts(n: number, seed: number, unseen: boolean): Promise<WorldPrompt[]> {
    const res = await this.server.request<{ prompts: WorldPrompt[] }>({ op: 'prompts', n, seed, kinds: [...kinds], unseen });
    if (!Array.isArray(res.prompts) || res.prompts.length !== n) throw new Error(`the shapes world server answered ${res.prompts?.length} prompts, expected ${n}`);
    return res.prompts.map((p) => {
      const caption = String(p.caption);
      const kind = kindOf(p.kind);
      return { caption, kind, unseen: p.unseen === true, relation: relationOf(kind, p.relation, caption) };
    });
  }

  async scenes(n: number, seed: number): Promise<WorldScene[]> {
    const res = await this.server.request<{ scenes: WorldScene[] }>({ op: 'scenes', n, seed });
    if (!Array.isArray(res.scenes) || res.scenes.length !== n) throw new Error(`the shapes world server answered ${res.scenes?.length} scenes, expected ${n}`);
    return res.scenes.map((s) => ({ ...s, kind: kindOf(s.kind) }));
  }

  /** The judge's verdict; a request the judge refuses (bad image, unknown caption) fails with the reason. */
  async judge(caption: string, pixels: Buffer): Promise<Judgement & { error: boolean }> {
    try {
      const res = await this.server.request<Judgement>({ op: 'judge', caption, pixels: pixels.toString('base64') });
      return { pass: res.pass === true, why: typeof res.why === 'string' ? res.why : '', error: false };
    } catch (err) {
      if (!(err instanceof PythonAnswerError)) throw err;
      return { pass: false, why: `judge error: ${err.message.replace(/^the shapes world server failed: /, '')}`, error: true };
    }
  }

  /** The canonical form of a caption, null when it is not one of the grammar. */
  async canonical(caption: string): Promise<string | null> {
    const cached = this.canonicalCache.get(caption);
    if (cached !== undefined) return cached;
    let value: string | null;
    try {
      const res = await this.server.request<{ caption: string | null }>({ op: 'canonical', caption });
      value = typeof res.caption === 'string' ? res.caption : null;
    } catch (err) {
      if (!(err instanceof PythonAnswerError)) throw err;
      value = null;
    }
    this.canonicalCache.set(caption, value);
    return value;
  }

  /**
   * Whether describe()'s answer is a scene's caption: the same text, or for a pair the other true
   * phrasing of it (`B to the right of A` for `A to the left of B`): the same canonical form.
   */
  async captionMatches(answer: string, caption: string, kind: Kind): Promise<boolean> {
    if (answer === caption) return true;
    if (kind !== 'pair') return false;
    const want = await this.canonical(caption);
    return want !== null && (await this.canonical(answer)) === want;
  }

  close(): Promise<void> {
    return this.server.close();
  }
}

/** The RGB pixels (HWC uint8) of an encoded image, as the judge takes them. */
export async function rgbPixels(png: Buffer): Promise<Buffer> {
  const { data } = await sharp(png).removeAlpha().raw().toBuffer({ resolveWithObject: true });
  return data;
}

function checkAbort(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw abortReason(signal);
}

/** <date>_eval: 2026-11-26T06-41-03_eval. */
export function evalReportName(date: string): string {
  return `${date.slice(0, 19).replace(/:/g, '-')}_eval`;
}

/**
 * Runs the whole evaluation and writes <date>_eval.json and .md under `out`. The Python server is
 * stopped and the model disposed afterwards, also on errors and aborts.
 */
export async function runEval(options: EvalOptions = {}): Promise<EvalReport> {
  const o = validateEvalOptions(options);
  const { log, signal } = o;
  const started = performance.now();
  const date = new Date().toISOString();
  const dir = path.resolve(o.model ?? bundledModelDir);
  const out = path.resolve(o.out ?? path.join(packageRoot, 'bench', 'results'));
  const seeds = { prompts: o.seed, unseen: o.seed + 1, scenes: o.seed + 2, images: o.seed };
  checkAbort(signal);
  try {
    await mkdir(out, { recursive: true });
  } catch (err) {
    throw new InvalidArgumentError(`cannot create the results directory ${out}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }

  log(`loading the model from ${dir}`);
  const loadStarted = performance.now();
  // A bad bundle fails before the Python process starts.
  const model = await loadModel(dir, o.load);
  const loadMs = performance.now() - loadStarted;
  let world: ShapesWorld | undefined;
  try {
    const info = model.info();
    checkAbort(signal);
    log('starting the shapes world server');
    world = ShapesWorld.start();
    const seen = await world.prompts(o.prompts, seeds.prompts, false);
    const unseen = await world.prompts(o.unseen, seeds.unseen, true);
    const scenes = await world.scenes(o.scenes, seeds.scenes);
    checkAbort(signal);

    // Generation: every prompt at the bundle's defaults, `batch` prompts per call, judged from pixels.
    const generationStarted = performance.now();
    const all = [...seen, ...unseen];
    const batch = defaultMaxBatch;
    const seenTable = new Counter(kinds);
    const unseenTable = new Counter(kinds);
    const seenRelations = new Counter(relations);
    const unseenRelations = new Counter(relations);
    const generationFailures: GenerationFailure[] = [];
    const seenImages: Buffer[] = [];
    let judgeErrors = 0;
    const failuresOf = [0, 0]; // seen, unseen
    const generated = progress(log, 'generate + judge', all.length);
    for (let first = 0; first < all.length; first += batch) {
      const group = all.slice(first, first + batch);
      const results = await model.generate(
        group.map((p) => p.caption),
        { seed: seeds.images + first, signal },
      );
      for (const [offset, result] of results.entries()) {
        const index = first + offset;
        const prompt = group[offset];
        const isUnseen = index >= seen.length;
        if (!isUnseen) seenImages.push(result.image);
        const verdict = await world.judge(prompt.caption, await rgbPixels(result.image));
        if (verdict.error) judgeErrors += 1;
        (isUnseen ? unseenTable : seenTable).add(prompt.kind, verdict.pass);
        if (prompt.relation !== null) (isUnseen ? unseenRelations : seenRelations).add(prompt.relation, verdict.pass);
        if (!verdict.pass && failuresOf[isUnseen ? 1 : 0]++ < maxExamples) {
          generationFailures.push({ caption: prompt.caption, kind: prompt.kind, unseen: isUnseen, seed: result.seed, why: verdict.why });
        }
      }
      generated(first + group.length);
      checkAbort(signal);
    }
    const generationMs = performance.now() - generationStarted;

    // Understanding: the caption (default question) and every question of each scene, exact match.
    const understandingStarted = performance.now();
    const captions = new Counter(kinds);
    const questions = new Counter(questionTypes);
    const understandingFailures: UnderstandingFailure[] = [];
    const described = progress(log, 'describe scenes', scenes.length);
    let questionCount = 0;
    let captionFailures = 0;
    let questionFailures = 0;
    for (const [index, scene] of scenes.entries()) {
      const pixels = Buffer.from(scene.pixels, 'base64');
      if (pixels.length !== worldSize * worldSize * 3) {
        throw new Error(`the shapes world server answered a scene of ${pixels.length} bytes, expected ${worldSize}x${worldSize} RGB`);
      }
      const png = await encodeImage(pixels, worldSize, worldSize, 'png');
      const caption = (await model.describe(png, { signal })).trim();
      const captionOk = await world.captionMatches(caption, scene.caption, scene.kind);
      captions.add(scene.kind, captionOk);
      if (!captionOk && captionFailures++ < maxExamples) {
        understandingFailures.push({ caption: scene.caption, question: null, expected: scene.caption, answer: clip(caption) });
      }
      for (const [question, expected] of scene.qa) {
        const answer = (await model.describe(png, question, { signal })).trim();
        const ok = answer === expected;
        questions.add(questionType(question), ok);
        questionCount += 1;
        if (!ok && questionFailures++ < maxExamples) {
          understandingFailures.push({ caption: scene.caption, question, expected, answer: clip(answer) });
        }
      }
      described(index + 1);
    }
    const understandingMs = performance.now() - understandingStarted;

    // Round trip: describe each seen generated image; its canonical caption against the prompt's.
    const roundTripStarted = performance.now();
    const matches = new Counter(kinds);
    const roundTripRelations = new Counter(relations);
    const roundTripFailures: RoundTripFailure[] = [];
    let notInGrammar = 0;
    const tripped = progress(log, 'round trip', seenImages.length);
    for (const [index, image] of seenImages.entries()) {
      const prompt = seen[index];
      const answer = (await model.describe(image, { signal })).trim();
      const [want, got] = [await world.canonical(prompt.caption), await world.canonical(answer)];
      if (got === null) notInGrammar += 1;
      const ok = got !== null && got === want;
      matches.add(prompt.kind, ok);
      if (prompt.relation !== null) roundTripRelations.add(prompt.relation, ok);
      if (!ok && roundTripFailures.length < maxExamples) {
        roundTripFailures.push({ prompt: prompt.caption, seed: seeds.images + index, answer: clip(answer), canonical: got });
      }
      tripped(index + 1);
    }
    const roundTripMs = performance.now() - roundTripStarted;

    const base = path.join(out, evalReportName(date));
    const report: EvalReport = {
      version: 1,
      date,
      machine: machineInfo(),
      runtime: { blip3o: packageVersion(), libtorch: info.libtorch },
      settings: {
        model: info.dir,
        bundle: info.name,
        preset: info.preset,
        device: info.device,
        dtype: info.dtype,
        threads: info.threads,
        prompts: o.prompts,
        unseen: o.unseen,
        scenes: o.scenes,
        seed: o.seed,
        seeds,
        steps: info.defaults.steps,
        cfg: info.defaults.cfg,
        eta: info.defaults.eta,
        decoderSteps: info.defaults.decoderSteps,
        decoderCfg: info.defaults.decoderCfg,
        batch,
        defaultQuestion: model.manifest.templates.defaultQuestion,
      },
      counts: { images: all.length, scenes: scenes.length, questions: questionCount, roundTrips: seenImages.length },
      generation: {
        seen: seenTable.table(),
        unseen: unseenTable.table(),
        relations: { seen: seenRelations.table(), unseen: unseenRelations.table() },
        judgeErrors,
        failures: generationFailures,
      },
      understanding: { captions: captions.table(), questions: questions.table(), failures: understandingFailures },
      roundTrip: { matches: matches.table(), relations: roundTripRelations.table(), notInGrammar, failures: roundTripFailures },
      wallMs: performance.now() - started,
      phaseMs: { load: loadMs, generation: generationMs, understanding: understandingMs, roundTrip: roundTripMs },
      files: { json: `${base}.json`, markdown: `${base}.md` },
    };
    await writeFileAtomic(report.files.json, Buffer.from(`${JSON.stringify(report, null, 2)}\n`));
    await writeFileAtomic(report.files.markdown, Buffer.from(evalMarkdown(report)));
    return report;
  } catch (err) {
    // Ctrl-C also reaches the Python process: an abort wins over its exit.
    if (signal?.aborted) throw abortReason(signal);
    throw err;
  } finally {
    await world?.close();
    await model.dispose().catch(() => undefined);
  }
}

function cell(t: Tally): string {
  return t.accuracy === null ? '–' : `${(t.accuracy * 100).toFixed(1)}% (${t.passed}/${t.total})`;
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

/** The report as Markdown: settings, then the per-kind, per-relation-phrasing and question tables. */
export function evalMarkdown(r: EvalReport): string {
  const s = r.settings;
  const g = r.generation;
  const u = r.understanding;
  const rows = [...kinds, 'overall' as const];
  const lines = [
    `### Shapes-world evaluation of ${s.bundle} on ${s.device} (${s.dtype}), ${r.date.slice(0, 10)}`,
    '',
    `${r.machine.cpu}, ${r.machine.cores} cores; Node ${r.machine.node}; libtorch ${r.runtime.libtorch}; blip3o ${r.runtime.blip3o}; ${s.threads} threads.`,
    `${s.prompts} seen + ${s.unseen} unseen prompts, ${s.scenes} scenes (${r.counts.questions} questions); seed ${s.seed}. ` +
      `Bundle defaults: DiT ${s.steps} steps (CFG ${s.cfg}, eta ${s.eta}), decoder ${s.decoderSteps} steps (CFG ${s.decoderCfg}); greedy describe. ` +
      `Wall time ${seconds(r.wallMs)} (generation ${seconds(r.phaseMs.generation)}, understanding ${seconds(r.phaseMs.understanding)}, round trip ${seconds(r.phaseMs.roundTrip)}).`,
    '',
    '| kind | seen | unseen | caption exact match | round trip |',
    '|---|---:|---:|---:|---:|',
    ...rows.map((k) => `| ${k} | ${cell(g.seen[k])} | ${cell(g.unseen[k])} | ${cell(u.captions[k])} | ${cell(r.roundTrip.matches[k])} |`),
    '',
    '| pair prompt phrased | seen | unseen | round trip |',
    '|---|---:|---:|---:|',
    ...[...relations, 'overall' as const].map(
      (k) => `| ${k} | ${cell(g.relations.seen[k])} | ${cell(g.relations.unseen[k])} | ${cell(r.roundTrip.relations[k])} |`,
    ),
    '',
    '| question | accuracy |',
    '|---|---:|',
    ...[...questionTypes, 'overall' as const].filter((q) => q !== 'other' || u.questions[q].total > 0).map((q) => `| ${q} | ${cell(u.questions[q])} |`),
    '',
    'Seen / unseen: judge accuracy of generated images (unseen: a held-out combination, purple triangle or orange circle); ' +
      'pair prompts are phrased with each of the four relations equally often, the pair table splits them by phrasing. ' +
      'Caption exact match: describe() of a rendered scene equals its caption (a pair: either true phrasing). Round trip: describe() of a seen generated image, ' +
      'in canonical form, equals the prompt in canonical form ' +
      `(${r.roundTrip.notInGrammar} of ${r.counts.roundTrips} answers were not captions of the grammar). Judge errors: ${g.judgeErrors}.`,
  ];
  const examples = [
    ...g.failures.map((f) => `- generate ${JSON.stringify(f.caption)} (${f.unseen ? 'unseen, ' : ''}seed ${f.seed}): ${f.why}`),
    ...u.failures.map((f) =>
      f.question === null
        ? `- describe a scene of ${JSON.stringify(f.expected)}: ${JSON.stringify(f.answer)}`
        : `- ${JSON.stringify(f.question)} about ${JSON.stringify(f.caption)}: ${JSON.stringify(f.answer)}, expected ${JSON.stringify(f.expected)}`,
    ),
    ...r.roundTrip.failures.map((f) => `- round trip of ${JSON.stringify(f.prompt)} (seed ${f.seed}): ${JSON.stringify(f.answer)}`),
  ];
  if (examples.length > 0) lines.push('', 'Failure examples:', '', ...examples);
  return `${lines.join('\n')}\n`;
}
