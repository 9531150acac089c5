// The blip3o command line, run as users run it: node dist/cli.js (compiled here when stale).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import sharp from 'sharp';
import t, { type Test } from 'tap';
import { cli, ensureCompiled, root, skipWithoutRuntime, squarePng } from './fixtures/runtime';

const fastFlags = ['--steps', '3', '--decoder-steps', '3'];


interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function run(args: string[], input?: Buffer): Run {
  const result = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', input, timeout: 120_000 });
  return { code: result.status, stdout: result.stdout, stderr: result.stderr };
}

/** Exit 1 with exactly one stderr line "blip3o: ...", nothing on stdout. */
function failsCleanly(t: Test, result: Run, message: RegExp): void {
  t.equal(result.code, 1, 'exit code 1');
  t.equal(result.stdout, '', 'nothing on stdout');
  const lines = result.stderr.split('\n').filter((line) => line.length > 0);
  t.equal(lines.length, 1, `one stderr line: ${JSON.stringify(result.stderr)}`);
  t.match(lines[0], /^blip3o: /);
  t.match(lines[0], message);
  t.notMatch(result.stderr, /\bat .*\.js:\d+/, 'no stack trace');
}

ensureCompiled();
const scratch = mkdtempSync(path.join(os.tmpdir(), 'blip3o-cli-'));
t.teardown(() => rmSync(scratch, { recursive: true, force: true }));

t.test('help and version need no model', async (t) => {
  const help = run(['--help']);
  t.equal(help.code, 0);
  t.match(help.stdout, /Usage: blip3o <command>/);
  t.match(help.stdout, /generate PROMPT -o FILE/);
  t.equal(run([]).code, 0, 'no arguments prints the help');
  for (const command of ['generate', 'describe', 'info']) {
    const viaHelp = run(['help', command]);
    t.equal(viaHelp.code, 0);
    t.match(viaHelp.stdout, new RegExp(`Usage: blip3o ${command}`));
    t.equal(run([command, '--help']).stdout, viaHelp.stdout, `${command} --help`);
  }
  const version = run(['--version']);
  t.equal(version.code, 0);
  t.equal(version.stdout.trim(), (JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string }).version);
});

t.test('usage errors: exit 1, one line, no file', async (t) => {
  const out = path.join(scratch, 'never.png');
  failsCleanly(t, run(['frobnicate']), /unknown command "frobnicate"/);
  failsCleanly(t, run(['help', 'frobnicate']), /unknown command "frobnicate"/);
  failsCleanly(t, run(['generate', '-o', out]), /generate needs a PROMPT/);
  failsCleanly(t, run(['generate', 'a red circle']), /generate needs -o FILE/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--steps', '0']), /Expected integer between 1 and 1000 for --steps but received 0/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--steps', 'many']), /Expected a number for --steps but received "many"/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--decoder-cfg', '-1']), /for --decoder-cfg but received -1/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--bogus']), /Unknown option '--bogus'/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--device', 'tpu']), /--device must be one of auto, cpu, cuda/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--format', 'gif']), /--format must be one of png, jpeg, webp/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', path.join(scratch, 'x.bmp')]), /cannot tell the image format from "x\.bmp"/);
  failsCleanly(t, run(['generate', 'a red circle', '-o', path.join(scratch, 'no-dir', 'x.png')]), /output directory not found/);
  failsCleanly(t, run(['describe']), /describe needs an IMAGE/);
  failsCleanly(t, run(['describe', path.join(scratch, 'missing.png')]), /image not found: .*missing\.png/);
  failsCleanly(t, run(['describe', 'x.png', '--top-p', '2']), /for --top-p but received 2/);
  failsCleanly(t, run(['info', 'extra']), /info takes no arguments/);
  t.notOk(existsSync(out), 'no output file');
  t.same(readdirSync(scratch), [], 'no temporary files either');
});

t.test('with the model', { skip: skipWithoutRuntime }, async (t) => {
  t.test('generate writes a PNG', async (t) => {
    const out = path.join(scratch, 'circle.png');
    const result = run(['generate', 'a large red circle at the center on a white background', '-o', out, '--seed', '5', ...fastFlags]);
    t.equal(result.code, 0, result.stderr);
    t.equal(result.stderr, '', 'no progress bar when stderr is not a terminal');
    t.match(result.stdout, /circle\.png: 64x64 png, seed 5/);
    const meta = await sharp(out).metadata();
    t.equal(meta.format, 'png');
    t.equal(meta.width, 64);
    t.equal(meta.height, 64);
    const again = path.join(scratch, 'again.png');
    t.equal(run(['generate', 'a large red circle at the center on a white background', '-o', again, '--seed', '5', ...fastFlags]).code, 0);
    t.ok(readFileSync(out).equals(readFileSync(again)), 'same seed, same bytes');
  });

  t.test('BLIP3O_JIT_OPTIMIZE=1 (the profiling executor) still generates the image', async (t) => {
    const out = path.join(scratch, 'optimized.png');
    const args = [cli, 'generate', 'a large red circle at the center on a white background', '-o', out, '--seed', '5', ...fastFlags];
    const result = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 120_000, env: { ...process.env, BLIP3O_JIT_OPTIMIZE: '1' } });
    t.equal(result.status, 0, result.stderr);
    const { data, info } = await sharp(out).raw().toBuffer({ resolveWithObject: true });
    t.same([info.width, info.height], [64, 64]);
    const plain = await sharp(path.join(scratch, 'circle.png')).raw().toBuffer();
    let max = 0;
    for (let i = 0; i < data.length; i++) max = Math.max(max, Math.abs(data[i] - plain[i]));
    t.ok(max <= 1, `within 1/255 of the default executor's image (max ${max})`);
  });

  t.test('generate --json prints one JSON object; the format follows the extension', async (t) => {
    for (const [name, format] of [['out.jpg', 'jpeg'], ['out.webp', 'webp'], ['out.png', 'png']] as const) {
      const out = path.join(scratch, name);
      const result = run(['generate', 'two blue squares on a gray background', '-o', out, '--json', ...fastFlags]);
      t.equal(result.code, 0, result.stderr);
      const lines = result.stdout.trim().split('\n');
      t.equal(lines.length, 1, 'one line');
      const json = JSON.parse(lines[0]) as Record<string, unknown>;
      t.equal(json.file, out);
      t.equal(json.format, format);
      t.equal(json.width, 64);
      t.equal(json.height, 64);
      t.ok(Number.isInteger(json.seed));
      t.type((json.timings as Record<string, unknown>).totalMs, 'number');
      t.equal((await sharp(out).metadata()).format, format);
    }
    const forced = path.join(scratch, 'forced.img');
    t.equal(run(['generate', 'a red circle', '-o', forced, '--format', 'webp', ...fastFlags]).code, 0);
    t.equal((await sharp(forced).metadata()).format, 'webp', '--format wins over the extension');
  });

  t.test('a failed generate leaves no file', async (t) => {
    const out = path.join(scratch, 'failed.png');
    failsCleanly(t, run(['generate', 'a red circle', '-o', out, '--model', path.join(scratch, 'no-bundle'), ...fastFlags]), /bundle directory not found/);
    failsCleanly(t, run(['generate', 'word '.repeat(400), '-o', out, ...fastFlags]), /prompt is too long/);
    t.notOk(existsSync(out));
    t.same(readdirSync(scratch).filter((f) => f.includes('failed')), []);
  });

  t.test('SIGINT during generate aborts cleanly, no partial file', async (t) => {
    const out = path.join(scratch, 'interrupted.png');
    const child = spawn(process.execPath, [cli, 'generate', 'a red circle', '-o', out, '--steps', '1000', '--decoder-steps', '1000']);
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    // Interrupt once the model is loaded and working (or earlier: the outcome must be the same).
    await new Promise((resolve) => setTimeout(resolve, 3000));
    child.kill('SIGINT');
    const code = await new Promise<number | null>((resolve) => child.on('exit', resolve));
    t.equal(code, 130);
    t.equal(stderr, 'blip3o: interrupted\n');
    t.notOk(existsSync(out), 'no output file');
    t.same(readdirSync(scratch).filter((f) => f.includes('interrupted')), [], 'no temporary file');
  });

  t.test('describe streams text; --json prints {text}', async (t) => {
    const image = path.join(scratch, 'square.png');
    writeFileSync(image, await squarePng());
    const plain = run(['describe', image, '--question', 'what color is the square?', '--max-tokens', '8']);
    t.equal(plain.code, 0, plain.stderr);
    t.ok(plain.stdout.endsWith('\n'));
    const json = run(['describe', image, '-q', 'what color is the square?', '--max-tokens', '8', '--json']);
    t.equal(json.code, 0, json.stderr);
    const parsed = JSON.parse(json.stdout) as { text: string };
    t.type(parsed.text, 'string');
    t.equal(plain.stdout, `${parsed.text}\n`, 'the same answer');
    const stdin = run(['describe', '-', '--max-tokens', '8', '--json'], readFileSync(image));
    t.equal(stdin.code, 0, stdin.stderr);
    failsCleanly(t, run(['describe', path.join(root, 'package.json')]), /could not read .*package\.json/);
  });

  t.test('info', async (t) => {
    const json = run(['info', '--json', '--device', 'cpu', '--threads', '1']);
    t.equal(json.code, 0, json.stderr);
    const info = JSON.parse(json.stdout) as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
    t.equal(info.name, 'blip3o-tiny-shapes');
    t.equal(info.device, 'cpu');
    t.equal(info.threads, 1);
    t.same(info.image, { width: 64, height: 64 });
    t.type(info.libtorch, 'string');
    t.type(info.runtime.cudaBuilt, 'boolean');
    const text = run(['info']);
    t.equal(text.code, 0, text.stderr);
    t.match(text.stdout, /bundle +blip3o-tiny-shapes/);
    t.match(text.stdout, /libtorch +\d+\.\d+/);
    const eager = run(['info', '--json', '--device', 'cpu', '--no-cuda-graphs']);
    t.equal(eager.code, 0, eager.stderr);
    t.same(JSON.parse(eager.stdout).cudaGraphs, { dit: 'off (cpu)', decode: 'off (cpu)' }, '--no-cuda-graphs is accepted; CPU has none anyway');
  });
});
