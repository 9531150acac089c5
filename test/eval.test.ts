// The shapes-world evaluation (`blip3o eval`) with tiny counts on the bundled model: the structure of its
// results and files, its option checks and its CLI (never an accuracy level: that depends on the
// bundle's training).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { evalMarkdown, kinds, questionType, questionTypes, relations, rgbPixels, runEval, ShapesWorld, type EvalReport, type Tally } from '../ts/eval';
import { encodeImage } from '../ts/image';
import { InvalidArgumentError } from '../ts/index';
import { cli, ensureCompiled, root, skipWithoutRuntime, skipWithoutWorld } from './fixtures/runtime';

const skip = skipWithoutRuntime || skipWithoutWorld;


function run(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const result = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}

const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-eval-'));
t.teardown(() => rmSync(scratch, { recursive: true, force: true }));

t.test('question types from the question text', async (t) => {
  t.equal(questionType('what color is the background?'), 'background');
  t.equal(questionType('what shape is it?'), 'shape');
  t.equal(questionType('what color is the triangle?'), 'color');
  t.equal(questionType('where is the circle?'), 'position');
  t.equal(questionType('is the square large or small?'), 'size');
  t.equal(questionType('how many circles are there?'), 'count');
  t.equal(questionType('what is this?'), 'other');
});

t.test('bad options are rejected before anything starts', async (t) => {
  const out = path.join(scratch, 'never');
  const cases: [object, RegExp][] = [
    [{ prompts: 0 }, /Expected integer between 1 and 100000 for prompts but received 0/],
    [{ prompts: -1 }, /for prompts but received -1/],
    [{ prompts: 1.5 }, /for prompts but received 1\.5/],
    [{ prompts: '3' }, /for prompts but received "3" of type string/],
    [{ unseen: 0 }, /for unseen but received 0/],
    [{ scenes: 2.5 }, /for scenes but received 2\.5/],
    [{ scenes: Number.NaN }, /for scenes but received NaN/],
    [{ seed: -1 }, /Expected integer between 0 and 4294967295 for seed/],
    [{ seed: 2 ** 32 }, /for seed but received 4294967296/],
    [{ threads: -1 }, /for threads but received -1/],
    [{ device: 'tpu' }, /for device/],
    [{ out: '' }, /Expected non-empty string for out/],
    [{ model: '' }, /Expected non-empty string for model/],
    [{ bogus: 1 }, /Unknown option "bogus" for runEval/],
  ];
  for (const [options, message] of cases) {
    await t.rejects(runEval({ out, ...options } as never), InvalidArgumentError, JSON.stringify(options));
    await t.rejects(runEval({ out, ...options } as never), { message }, JSON.stringify(options));
  }
  t.notOk(existsSync(out), 'no results directory was made');
});

t.test('the world server: renders pass its judge through the eval\'s pixel path', { skip: skipWithoutWorld }, async (t) => {
  const world = ShapesWorld.start();
  t.teardown(() => world.close());
  const scenes = await world.scenes(3, 7);
  t.same(
    scenes.map((s) => s.kind),
    ['single', 'pair', 'count'],
  );
  for (const scene of scenes) {
    const png = await encodeImage(Buffer.from(scene.pixels, 'base64'), 64, 64, 'png');
    const verdict = await world.judge(scene.caption, await rgbPixels(png));
    t.same(verdict, { pass: true, why: '', error: false }, scene.caption);
    t.ok(scene.qa.length > 0, 'questions');
  }
  const prompts = await world.prompts(4, 7, true);
  t.equal(prompts.length, 4);
  t.ok(prompts.every((p) => p.unseen), 'unseen prompts hold a held-out combination');

  // Pair prompts in all four phrasings, about a quarter each; the others as before; seeded.
  const many = await world.prompts(600, 100_000, false);
  t.same(await world.prompts(600, 100_000, false), many, 'the same seed gives the same prompts');
  t.same(many.map((p) => p.kind), Array.from({ length: 600 }, (_, i) => kinds[i % 3]), 'cycling single, pair, count');
  const pairs = many.filter((p) => p.kind === 'pair');
  t.ok(many.every((p) => (p.kind === 'pair') === (p.relation !== null)), 'a relation for pairs only');
  for (const relation of relations) {
    const phrased = pairs.filter((p) => p.relation === relation);
    t.ok(phrased.length >= 35 && phrased.length <= 65, `${relation}: ${phrased.length} of 200 pair prompts (50 expected)`);
    t.ok(phrased.every((p) => new RegExp(`^a \\w+ \\w+ ${relation} a \\w+ \\w+ on a \\w+ background$`).test(p.caption)), `${relation}: phrased so`);
  }
  const flipped = pairs.find((p) => p.relation === 'to the right of')!;
  const canonical = (await world.canonical(flipped.caption))!;
  t.match(canonical, / to the left of /, 'its canonical form is the other phrasing');

  // The judge takes a prompt as phrased: a render of the scene passes in both phrasings, not reversed.
  const scene = scenes[1];
  const pixels = await rgbPixels(await encodeImage(Buffer.from(scene.pixels, 'base64'), 64, 64, 'png'));
  const [, a, relation, b, background] = /^(a \w+ \w+) (to the left of|above) (a \w+ \w+) (on a \w+ background)$/.exec(scene.caption)!;
  const inverse = relation === 'above' ? 'below' : 'to the right of';
  t.ok((await world.judge(`${b} ${inverse} ${a} ${background}`, pixels)).pass, 'the other phrasing passes');
  t.notOk((await world.judge(`${a} ${inverse} ${b} ${background}`, pixels)).pass, 'the reversed relation fails');

  // Caption match: a pair in either true phrasing; anything else exactly.
  t.ok(await world.captionMatches(scene.caption, scene.caption, 'pair'));
  t.ok(await world.captionMatches(`${b} ${inverse} ${a} ${background}`, scene.caption, 'pair'), 'the other phrasing of a pair');
  t.notOk(await world.captionMatches(`${a} ${inverse} ${b} ${background}`, scene.caption, 'pair'), 'not the reversed relation');
  t.notOk(await world.captionMatches(`${b} ${relation} ${a} ${background}`, scene.caption, 'pair'), 'not the objects swapped');
  t.notOk(await world.captionMatches(`${scene.caption} `, scene.caption, 'pair'), 'not a caption of the grammar');
  t.notOk(await world.captionMatches('', scene.caption, 'pair'));
  t.ok(await world.captionMatches(scenes[0].caption, scenes[0].caption, 'single'));
  t.notOk(await world.captionMatches(scenes[0].caption.replace(' on a ', ' on  a '), scenes[0].caption, 'single'));

  t.equal(await world.canonical(''), null, 'an empty answer is not a caption');
  t.equal(await world.canonical('zzz ### a red'), null, 'garbage is not a caption');
  t.equal(
    await world.canonical('a red circle to the right of a blue square on a white background'),
    'a blue square to the left of a red circle on a white background',
  );
  const bad = await world.judge('not a caption', Buffer.alloc(64 * 64 * 3));
  t.equal(bad.pass, false);
  t.equal(bad.error, true, 'a judge error is a failed image, not a crash');
  t.match(bad.why, /^judge error: /);
  const small = await world.judge(scenes[0].caption, Buffer.alloc(10));
  t.equal(small.error, true);
});

const isTally = (value: Tally): boolean =>
  Number.isInteger(value.passed) &&
  Number.isInteger(value.total) &&
  value.passed >= 0 &&
  value.passed <= value.total &&
  (value.total === 0 ? value.accuracy === null : value.accuracy !== null && value.accuracy >= 0 && value.accuracy <= 1);

t.test('runEval with tiny counts', { skip }, async (t) => {
  const out = path.join(scratch, 'results');
  const lines: string[] = [];
  const report = await runEval({ device: 'cpu', prompts: 3, unseen: 1, scenes: 3, seed: 5, out, log: (line) => lines.push(line) });

  t.same(readdirSync(out).sort(), [path.basename(report.files.json), path.basename(report.files.markdown)].sort(), 'two files');
  t.match(path.basename(report.files.json), /^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_eval\.json$/);
  t.match(path.basename(report.files.markdown), /^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_eval\.md$/);
  const written = JSON.parse(readFileSync(report.files.json, 'utf8')) as EvalReport;
  t.same(written, JSON.parse(JSON.stringify(report)), 'the JSON file is the returned report');
  const md = readFileSync(report.files.markdown, 'utf8');
  t.equal(md, evalMarkdown(report), 'the Markdown file');
  t.match(md, /\| kind \| seen \| unseen \| caption exact match \| round trip \|/);
  t.match(md, /\| question \| accuracy \|/);
  t.match(md, /\| pair prompt phrased \| seen \| unseen \| round trip \|/);
  for (const relation of relations) t.match(md, new RegExp(`\\n\\| ${relation} \\| `), `a row for ${relation}`);

  t.equal(report.settings.bundle, JSON.parse(readFileSync(path.join(root, 'models', 'tiny', 'manifest.json'), 'utf8')).name);
  t.match(report.settings, { prompts: 3, unseen: 1, scenes: 3, seed: 5, device: 'cpu', seeds: { prompts: 5, unseen: 6, scenes: 7, images: 5 } });
  t.same(report.counts.images, 4);
  t.same(report.counts.scenes, 3);
  t.same(report.counts.roundTrips, 3);

  for (const table of [report.generation.seen, report.generation.unseen, report.understanding.captions, report.roundTrip.matches]) {
    t.same(Object.keys(table).sort(), [...kinds, 'overall'].sort(), 'a row per kind and overall');
    t.ok(Object.values(table).every(isTally), 'tallies with accuracies in [0, 1]');
  }
  const byRelation = [report.generation.relations.seen, report.generation.relations.unseen, report.roundTrip.relations];
  for (const table of byRelation) {
    t.same(Object.keys(table).sort(), [...relations, 'overall'].sort(), 'a row per relation phrasing and overall');
    t.ok(Object.values(table).every(isTally), 'tallies with accuracies in [0, 1]');
    const sum = (key: 'passed' | 'total') => relations.reduce((n, r) => n + table[r][key], 0);
    t.same([sum('passed'), sum('total')], [table.overall.passed, table.overall.total], 'the phrasings add up to overall');
  }
  t.same(report.generation.relations.seen.overall, report.generation.seen.pair, 'seen: overall is the pair row');
  t.same(report.generation.relations.unseen.overall, report.generation.unseen.pair, 'unseen: overall is the pair row');
  t.same(report.roundTrip.relations.overall, report.roundTrip.matches.pair, 'round trip: overall is the pair row');
  t.equal(report.generation.seen.overall.total, 3, 'one image per seen prompt');
  for (const kind of kinds) t.equal(report.generation.seen[kind].total, 1, `seen ${kind}`);
  t.equal(report.generation.unseen.overall.total, 1, 'one image per unseen prompt');
  t.equal(report.understanding.captions.overall.total, 3, 'one caption per scene');
  for (const kind of kinds) t.equal(report.understanding.captions[kind].total, 1, `scene ${kind}`);
  t.equal(report.roundTrip.matches.overall.total, 3, 'one round trip per seen image');
  t.ok(report.roundTrip.notInGrammar >= 0 && report.roundTrip.notInGrammar <= 3);

  const q = report.understanding.questions;
  t.same(Object.keys(q).sort(), [...questionTypes, 'overall'].sort());
  t.ok(Object.values(q).every(isTally));
  t.equal(q.overall.total, report.counts.questions);
  t.ok(q.overall.total >= 3, 'every scene has questions');
  t.equal(q.background.total, 3, 'every scene asks its background');
  t.equal(q.other.total, 0, 'every question has a type');

  t.ok(Number.isInteger(report.generation.judgeErrors));
  t.ok(report.generation.failures.length <= 10 && report.understanding.failures.length <= 10 && report.roundTrip.failures.length <= 5, 'a few failure examples');
  for (const f of report.generation.failures) t.ok(typeof f.caption === 'string' && typeof f.why === 'string');
  t.ok(report.wallMs > 0 && Object.values(report.phaseMs).every((ms) => ms >= 0));
  t.ok(lines.some((line) => /^generate \+ judge 4\/4$/.test(line)), 'progress lines');
  t.ok(lines.some((line) => /^describe scenes 3\/3$/.test(line)));
});

t.test('an abort stops the eval and its Python process', { skip }, async (t) => {
  const out = path.join(scratch, 'aborted');
  const controller = new AbortController();
  const reason = new Error('stop');
  const pending = runEval({
    prompts: 3,
    unseen: 1,
    scenes: 3,
    out,
    signal: controller.signal,
    log: (line) => {
      if (line.startsWith('generate')) controller.abort(reason);
    },
  });
  await t.rejects(pending, reason);
  t.same(readdirSync(out), [], 'no results written');
});

t.test('the CLI', async (t) => {
  ensureCompiled();
  const help = run(['eval', '--help']);
  t.equal(help.code, 0);
  t.match(help.stdout, /^Usage: blip3o eval \[options\]/);
  t.equal(run(['help', 'eval']).stdout, help.stdout, 'help eval');
  for (const flag of ['--prompts N', '--unseen N', '--scenes M', '--seed S', '--threads N', '--json', '--out DIR', '--model DIR']) {
    t.match(help.stdout, `  ${flag}`, flag);
  }
  t.match(help.stdout, /run-python\.sh/);
  t.match(run(['--help']).stdout, /\n {2}eval {2,}/, 'listed in the main help');
  const options = help.stdout.slice(help.stdout.indexOf('Options:\n') + 'Options:\n'.length);
  t.ok(readFileSync(path.join(root, 'README.md'), 'utf8').includes(options), 'README lists the options as --help does');

  for (const [args, message] of [
    [['--prompts', '0'], /Expected integer between 1 and 100000 for --prompts but received 0/],
    [['--prompts', '-1'], /for --prompts but received -1/],
    [['--unseen', '1.5'], /for --unseen but received 1\.5/],
    [['--scenes', 'many'], /Expected a number for --scenes but received "many"/],
    [['--seed', '-2'], /for --seed but received -2/],
    [['--bogus'], /Unknown option '--bogus'/],
    [['extra'], /eval takes no arguments/],
  ] as [string[], RegExp][]) {
    const result = run(['eval', ...args, '--out', path.join(scratch, 'never')]);
    t.equal(result.code, 1, `${args.join(' ')}: exit 1`);
    t.equal(result.stdout, '', 'nothing on stdout');
    const lines = result.stderr.split('\n').filter((line) => line.length > 0);
    t.equal(lines.length, 1, `one stderr line: ${JSON.stringify(result.stderr)}`);
    t.match(lines[0], /^blip3o: /);
    t.match(lines[0], message);
  }
  t.notOk(existsSync(path.join(scratch, 'never')));
});

t.test('the CLI end to end, --json', { skip }, async (t) => {
  const out = path.join(scratch, 'cli');
  const result = run(['eval', '--prompts', '1', '--unseen', '1', '--scenes', '1', '--device', 'cpu', '--out', out, '--json']);
  t.equal(result.code, 0, `exit 0: ${result.stderr}`);
  const report = JSON.parse(result.stdout) as EvalReport;
  t.equal(report.counts.images, 2);
  t.ok(existsSync(report.files.json) && existsSync(report.files.markdown));
  t.match(result.stderr, /^eval: /m, 'progress on stderr');
  t.notMatch(result.stdout, /^eval: /m, 'none on stdout');
});
