#!/usr/bin/env node
// The blip3o command line: a thin layer over the public API (loadModel, generate, describe, info).
// Results go to stdout (one JSON object with --json), progress and errors to stderr; any failure
// exits 1 with one line "blip3o: <message>".

import { access, stat } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { AbortError, InvalidArgumentError, isAbortError } from './errors';
import { runBench } from './bench';
import { markdown, writeReport } from './bench-report';
import { evalMarkdown, runEval } from './eval';
import { formatFromFileName, writeFileAtomic } from './image';
import { importCheckpoint, importDtypes, type ImportDtype } from './import';
import { loadModel, packageVersion, runtimeInfo, type Blip3oModel } from './model';
import { packageRoot } from './native';
import { createServer, validateServerOptions, type ServerOptions } from './server';
import {
  deviceRequests,
  dtypeRequests,
  imageFormats,
  validateDescribeOptions,
  validateGenerateOptions,
  validateLoadOptions,
  type ImageFormat,
  type ProgressEvent,
} from './options';

const mainHelp = `Usage: blip3o <command> [options]

Native BLIP3-o runtime: text-to-image generation and image understanding on libtorch.

Commands:
  generate PROMPT -o FILE   generate an image from a caption
  describe IMAGE            describe an image, or answer --question about it
  info                      show the model bundle, device and runtime
  import CHECKPOINT --out DIR
                            turn a released BLIP3-o checkpoint into a bundle
  bench                     benchmark the runtime against the Python reference
  eval                      evaluate the model on fresh scenes of the shapes world
  serve                     serve an OpenAI-compatible HTTP API (images, chat)
  help [COMMAND]            show help for a command

Options:
  -h, --help                show help
  -v, --version             show the version

Without --model, the bundled tiny model (trained on the shapes world) is used.`;

const modelOptionsHelp = `  --model DIR               bundle directory (default: the bundled tiny model)
  --device auto|cpu|cuda    device (default auto: CUDA when available)
  --dtype auto|float32|bfloat16|float16
                            compute dtype (default auto)
  --threads N               CPU threads: a lone image's CFG halves and decoder
                            use them all, a batch spreads its calls over them;
                            0 = the number of cores, at most 8 (default 0)
  --no-cuda-graphs          CUDA: run every DiT and decode step eagerly instead of
                            replaying CUDA graphs`;

const commandHelp: Record<string, string> = {
  generate: `Usage: blip3o generate PROMPT -o FILE [options]

Generates one image for PROMPT and writes it to FILE (atomically: a failed or interrupted run
leaves no file).

Options:
  -o, --output FILE         output file (required)
  --format png|jpeg|webp    image format (default: from the file extension)
  --seed N                  seed, 0 to 2^53-1 (default: random; printed)
  --steps N                 DiT steps (default: the bundle's)
  --cfg X                   DiT guidance scale (default: the bundle's)
  --decoder-steps N         decoder steps (default: the bundle's)
  --decoder-cfg X           decoder guidance scale (default: the bundle's)
${modelOptionsHelp}
  --json                    print one JSON object: file, width, height, seed, timings
  -h, --help                show this help`,
  describe: `Usage: blip3o describe IMAGE [options]

Describes IMAGE (a file, or - for stdin), or answers --question about it. The answer is streamed to
stdout as it is generated.

Options:
  -q, --question Q          question (default: the bundle's, "Describe this image.")
  --max-tokens N            most new tokens (default 128)
  --temperature X           sampling temperature, 0 = greedy (default 0)
  --top-k N                 sample among the N most likely tokens, 0 = off (default 0)
  --top-p X                 nucleus sampling mass, 0 < X <= 1 (default 1)
  --seed N                  sampling seed (default: random)
${modelOptionsHelp}
  --json                    print one JSON object: text
  -h, --help                show this help`,
  info: `Usage: blip3o info [options]

Loads the model and shows its bundle, device, dtype, threads and the libtorch version.

Options:
${modelOptionsHelp}
  --json                    print the info object as JSON
  -h, --help                show this help`,
  bench: `Usage: blip3o bench [options]

Benchmarks the model: cold load, time per stage and per step, the runtime's overhead per step,
end-to-end latency against the Python reference (bench/reference.py; same bundle, token ids, seeds
and settings, runs alternating), the largest pixel difference between both, throughput at batch
1, 2, 4 and 8 and through the request queue, understanding prefill and decode speed, peak memory.
Prints a Markdown report and writes it with the JSON under --out (<date>_<machine>.json/.md and
latest.json).

Options:
  --runs N                  measured runs per side (default 10; 2 with --quick)
  --steps N                 DiT steps (default: the bundle's)
  --decoder-steps N         decoder steps (default: the bundle's)
  --no-python               skip the Python reference
  --no-throughput           skip batch and request-queue throughput (minutes at real size)
  --quick                   few runs and tokens (for tests)
  --out DIR                 results directory (default: bench/results in the package)
${modelOptionsHelp}
  --json                    print the report as JSON instead of Markdown
  -h, --help                show this help`,
  eval: `Usage: blip3o eval [options]

Evaluates the model on fresh random scenes of the shapes world (models/shapes.py) through the
runtime. Generation: one image per prompt, --prompts captions of seen combinations (cycling single,
pair, count; pairs phrased with each of the four relations equally often) and --unseen captions with
a held-out combination, at the bundle's default settings, scored by the world's judge (accuracy per
kind and per pair phrasing, seen and unseen apart). Understanding: describes --scenes rendered scenes
(caption exact match per kind; a pair's caption matches in either true phrasing) and asks each its
questions (accuracy per question type). Round trip: describes the seen generated images and compares their canonical
captions with the prompts'. Prints a Markdown table and writes it with the JSON under --out
(<date>_eval.md/.json); progress goes to stderr.

Meaningful for bundles of the shapes world, such as the bundled one. The world (models/shapes.py)
runs in a Python with numpy, started through models/run-python.sh ($BLIP3O_PYTHON, else the Python
with torch).

Options:
  --prompts N               generation prompts, seen combinations (default 300)
  --unseen N                generation prompts, held-out combinations (default 60)
  --scenes M                understanding scenes (default 300)
  --seed S                  seed of the prompts, scenes and images, 0 to 2^32-1
                            (default 100000)
  --out DIR                 results directory (default: bench/results in the package)
${modelOptionsHelp}
  --json                    print the results as JSON instead of Markdown
  -h, --help                show this help`,
  import: `Usage: blip3o import CHECKPOINT --out DIR [options]

Turns a released BLIP3-o checkpoint directory, as downloaded (BLIP3o/BLIP3o-Model-4B or -8B:
config.json, the safetensors shards and their index, the tokenizer, diffusion-decoder/), into a bundle
directory that --model then runs. Every config, file header, tensor shape and dtype is checked
before anything is built; the components are then converted one at a time, into a temporary directory
renamed to DIR at the end: a failed or interrupted import leaves nothing.

Options:
  --out DIR                 bundle directory to write (must not exist; required)
  --dtype bfloat16|float16|float32
                            the bundle's dtype (default bfloat16)
  --name NAME               the bundle's name (default blip3o-<checkpoint directory name>)
  --json                    print one JSON object: bundle, name, seconds, peakRssBytes,
                            checkpointBytes, bundleBytes
  -h, --help                show this help`,
  serve: `Usage: blip3o serve [options]

Serves the model over HTTP with the OpenAI API's shapes, so that OpenAI clients work unchanged:
POST /v1/images/generations, POST /v1/chat/completions (an image and a question; stream: true
for server-sent events), GET /v1/models; GET /health, GET /ready and GET /metrics (Prometheus).
Prints "listening on http://HOST:PORT" when ready. SIGTERM or Ctrl-C stops accepting requests,
lets those in flight finish (at most 30 s), frees the model and exits 0.

Options:
  --host HOST               interface to bind (default 127.0.0.1: this machine only)
  --port N                  TCP port, 0 = any free port (default 8080)
  --api-key KEY             require "Authorization: Bearer KEY" on every /v1 route
                            (default: $BLIP3O_API_KEY; prefer it: arguments show in ps)
  --max-batch N             most images of concurrent requests merged into one batch
                            (default 8)
  --max-queue N             most image requests waiting, and most chat requests waiting
                            or running; past it: 429 with Retry-After (default 64)
  --max-tokens N            largest max_tokens a chat request may ask for (default 512)
  --max-image-pixels N      largest input image, width x height (default 4194304)
  --body-limit BYTES        largest request body; past it: 413 (default 8388608)
  --allow-remote-images     fetch http(s) image URLs in chat messages (default: only
                            base64 data: URLs)
${modelOptionsHelp}
  -h, --help                show this help`,
  help: `Usage: blip3o help [COMMAND]

Shows the help of COMMAND (generate, describe, info, import, bench, eval, serve), or the list of commands.`,
};

type Options = NonNullable<ParseArgsConfig['options']>;

const modelOptions: Options = {
  model: { type: 'string' },
  device: { type: 'string' },
  dtype: { type: 'string' },
  threads: { type: 'string' },
  'no-cuda-graphs': { type: 'boolean' },
  json: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
};

const commandOptions: Record<string, Options> = {
  generate: {
    ...modelOptions,
    output: { type: 'string', short: 'o' },
    format: { type: 'string' },
    seed: { type: 'string' },
    steps: { type: 'string' },
    cfg: { type: 'string' },
    'decoder-steps': { type: 'string' },
    'decoder-cfg': { type: 'string' },
  },
  describe: {
    ...modelOptions,
    question: { type: 'string', short: 'q' },
    'max-tokens': { type: 'string' },
    temperature: { type: 'string' },
    'top-k': { type: 'string' },
    'top-p': { type: 'string' },
    seed: { type: 'string' },
  },
  info: modelOptions,
  import: {
    out: { type: 'string' },
    dtype: { type: 'string' },
    name: { type: 'string' },
    json: { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
  },
  bench: {
    ...modelOptions,
    runs: { type: 'string' },
    steps: { type: 'string' },
    'decoder-steps': { type: 'string' },
    'no-python': { type: 'boolean' },
    'no-throughput': { type: 'boolean' },
    quick: { type: 'boolean' },
    out: { type: 'string' },
  },
  eval: {
    ...modelOptions,
    prompts: { type: 'string' },
    unseen: { type: 'string' },
    scenes: { type: 'string' },
    seed: { type: 'string' },
    out: { type: 'string' },
  },
  serve: {
    model: { type: 'string' },
    device: { type: 'string' },
    dtype: { type: 'string' },
    threads: { type: 'string' },
    'no-cuda-graphs': { type: 'boolean' },
    help: { type: 'boolean', short: 'h' },
    host: { type: 'string' },
    port: { type: 'string' },
    'api-key': { type: 'string' },
    'max-batch': { type: 'string' },
    'max-queue': { type: 'string' },
    'max-tokens': { type: 'string' },
    'max-image-pixels': { type: 'string' },
    'body-limit': { type: 'string' },
    'allow-remote-images': { type: 'boolean' },
  },
};

/** API option names as the CLI spells them, for error messages. */
const flagNames: Record<string, string> = {
  seed: '--seed',
  steps: '--steps',
  cfg: '--cfg',
  decoderSteps: '--decoder-steps',
  decoderCfg: '--decoder-cfg',
  format: '--format',
  maxTokens: '--max-tokens',
  temperature: '--temperature',
  topK: '--top-k',
  topP: '--top-p',
  device: '--device',
  dtype: '--dtype',
  threads: '--threads',
  question: '--question',
  prompt: 'PROMPT',
  runs: '--runs',
  prompts: '--prompts',
  unseen: '--unseen',
  scenes: '--scenes',
  model: '--model',
  out: '--out',
  maxBatch: '--max-batch',
  maxQueue: '--max-queue',
  port: '--port',
  host: '--host',
  apiKey: '--api-key',
  bodyLimit: '--body-limit',
  maxImagePixels: '--max-image-pixels',
};

type Values = Record<string, string | boolean | undefined>;

class UsageError extends Error {}

function oneLine(text: string): string {
  return text.replace(/^blip3o: /, '').replace(/\s*\n\s*/g, ' ').trim();
}

/** Rewrites "for decoderSteps but" as "for --decoder-steps but" in a validation message. */
function withFlagNames(err: unknown): unknown {
  if (!(err instanceof InvalidArgumentError)) return err;
  const message = err.message.replace(/ for (\w+) but received /, (match, name: string) =>
    flagNames[name] === undefined ? match : ` for ${flagNames[name]} but received `,
  );
  return new InvalidArgumentError(message, { cause: err });
}

const numberPattern = /^[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?$/i;

function numberOption(values: Values, flag: string): number | undefined {
  const raw = values[flag];
  if (raw === undefined || typeof raw === 'boolean') return undefined;
  if (!numberPattern.test(raw.trim())) {
    throw new InvalidArgumentError(`Expected a number for --${flag} but received ${JSON.stringify(raw)}`);
  }
  return Number(raw);
}

function stringOption(values: Values, flag: string): string | undefined {
  const raw = values[flag];
  return typeof raw === 'string' ? raw : undefined;
}

function pruned<T extends object>(options: T): T {
  return Object.fromEntries(Object.entries(options).filter(([, value]) => value !== undefined)) as T;
}

function loadOptionsOf(values: Values): { dir: string | undefined; options: ReturnType<typeof validateLoadOptions> } {
  const device = stringOption(values, 'device');
  const dtype = stringOption(values, 'dtype');
  const cudaGraphs = values['no-cuda-graphs'] === true ? false : undefined;
  const options = pruned({ device, dtype, threads: numberOption(values, 'threads'), cudaGraphs });
  try {
    return { dir: stringOption(values, 'model'), options: validateLoadOptions(options) };
  } catch (err) {
    throw withFlagNames(err);
  }
}

async function withModel<T>(values: Values, signal: AbortSignal | undefined, run: (model: Blip3oModel) => Promise<T>): Promise<T> {
  const { dir, options } = loadOptionsOf(values);
  const model = await loadModel(dir, options);
  try {
    if (signal?.aborted) throw new AbortError();
    return await run(model);
  } finally {
    await model.dispose();
  }
}

/** A progress bar on stderr, only when stderr is a terminal. */
function progressBar(label: string, totalUnits: number): { update(event: ProgressEvent): void; clear(): void } {
  const stream = process.stderr;
  if (!stream.isTTY) return { update: () => undefined, clear: () => undefined };
  let done = 0;
  let lastStage = '';
  let stageBase = 0;
  const width = 30;
  return {
    update(event) {
      if (event.stage !== lastStage) {
        stageBase = done;
        lastStage = event.stage;
      }
      done = stageBase + event.step;
      const fraction = Math.min(1, done / totalUnits);
      const filled = Math.round(fraction * width);
      stream.write(
        `\r\x1b[K${label} ${'#'.repeat(filled)}${'.'.repeat(width - filled)} ${Math.round(fraction * 100)}% ${event.stage} ${event.step}/${event.steps}`,
      );
    },
    clear() {
      stream.write('\r\x1b[K');
    },
  };
}

async function runGenerate(values: Values, positionals: string[], signal: AbortSignal): Promise<void> {
  if (positionals.length === 0) throw new UsageError('generate needs a PROMPT (see blip3o help generate)');
  if (positionals.length > 1) throw new UsageError('generate takes one PROMPT; quote it if it has spaces');
  const prompt = positionals[0];
  const output = stringOption(values, 'output');
  if (output === undefined || output.length === 0) throw new UsageError('generate needs -o FILE (see blip3o help generate)');
  const formatFlag = stringOption(values, 'format');
  const format = (formatFlag ?? formatFromFileName(output)) as ImageFormat | undefined;
  if (format === undefined) {
    throw new UsageError(
      `cannot tell the image format from ${JSON.stringify(path.basename(output))}; name the file .png, .jpg, .jpeg or .webp, or pass --format ${imageFormats.join('|')}`,
    );
  }
  const options = pruned({
    seed: numberOption(values, 'seed'),
    steps: numberOption(values, 'steps'),
    cfg: numberOption(values, 'cfg'),
    decoderSteps: numberOption(values, 'decoder-steps'),
    decoderCfg: numberOption(values, 'decoder-cfg'),
    format,
  });
  try {
    // Fails fast, before the model loads.
    validateGenerateOptions(options);
  } catch (err) {
    throw withFlagNames(err);
  }
  const outputDir = path.dirname(path.resolve(output));
  const dirStat = await stat(outputDir).catch(() => undefined);
  if (dirStat === undefined || !dirStat.isDirectory()) throw new UsageError(`output directory not found: ${outputDir}`);

  const result = await withModel(values, signal, async (model) => {
    const info = model.info();
    const bar = progressBar('generate', 1 + (options.steps ?? info.defaults.steps) + (options.decoderSteps ?? info.defaults.decoderSteps) + 1);
    try {
      return await model.generate(prompt, { ...options, signal, onProgress: (event) => bar.update(event) });
    } catch (err) {
      throw withFlagNames(err);
    } finally {
      bar.clear();
    }
  });
  if (signal.aborted) throw new AbortError();
  await writeFileAtomic(output, result.image);
  const file = path.resolve(output);
  if (values.json === true) {
    const { width, height, seed, timings } = result;
    process.stdout.write(`${JSON.stringify({ file, format: result.format, width, height, seed, timings })}\n`);
  } else {
    process.stdout.write(
      `${output}: ${result.width}x${result.height} ${result.format}, seed ${result.seed}, ${(result.timings.totalMs / 1000).toFixed(2)} s\n`,
    );
  }
}

async function runDescribe(values: Values, positionals: string[], signal: AbortSignal): Promise<void> {
  if (positionals.length === 0) throw new UsageError('describe needs an IMAGE (see blip3o help describe)');
  if (positionals.length > 1) throw new UsageError('describe takes one IMAGE; use --question for a question');
  const imagePath = positionals[0];
  const options = pruned({
    maxTokens: numberOption(values, 'max-tokens'),
    temperature: numberOption(values, 'temperature'),
    topK: numberOption(values, 'top-k'),
    topP: numberOption(values, 'top-p'),
    seed: numberOption(values, 'seed'),
  });
  try {
    validateDescribeOptions(options);
  } catch (err) {
    throw withFlagNames(err);
  }
  const question = stringOption(values, 'question');
  if (question !== undefined && question.length === 0) throw new UsageError('--question must not be empty');
  let image: Buffer | string = imagePath;
  if (imagePath === '-') {
    const chunks: Buffer[] = [];
    for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
    image = Buffer.concat(chunks);
  } else if (!(await access(imagePath).then(() => true, () => false))) {
    throw new UsageError(`image not found: ${imagePath}`);
  }

  await withModel(values, signal, async (model) => {
    const describeOptions = { ...options, signal };
    try {
      if (values.json === true) {
        const text = question === undefined ? await model.describe(image, describeOptions) : await model.describe(image, question, describeOptions);
        process.stdout.write(`${JSON.stringify({ text })}\n`);
      } else {
        const stream = question === undefined ? model.describeStream(image, describeOptions) : model.describeStream(image, question, describeOptions);
        for await (const piece of stream) process.stdout.write(piece);
        process.stdout.write('\n');
      }
    } catch (err) {
      throw withFlagNames(err);
    }
  });
}

async function runInfo(values: Values, positionals: string[], signal: AbortSignal): Promise<void> {
  if (positionals.length > 0) throw new UsageError(`info takes no arguments, got ${JSON.stringify(positionals[0])}`);
  const { info, runtime } = await withModel(values, signal, async (model) => ({ info: model.info(), runtime: runtimeInfo() }));
  if (values.json === true) {
    process.stdout.write(`${JSON.stringify({ ...info, runtime })}\n`);
    return;
  }
  const cuda = runtime.cudaBuilt ? `CUDA built, ${runtime.cudaDevices} device(s)` : 'CUDA not built';
  const lines = [
    `bundle     ${info.name} (preset ${info.preset}, format ${info.formatVersion})`,
    `directory  ${info.dir}`,
    `image      ${info.image.width}x${info.image.height}`,
    `device     ${info.device}, ${info.dtype}, ${info.threads} threads`,
    `graphs     DiT ${info.cudaGraphs.dit}; decode ${info.cudaGraphs.decode}`,
    `defaults   steps ${info.defaults.steps}, cfg ${info.defaults.cfg}, eta ${info.defaults.eta}, decoder steps ${info.defaults.decoderSteps}, decoder cfg ${info.defaults.decoderCfg}`,
    `libtorch   ${info.libtorch} (${cuda})`,
    `blip3o     ${runtime.version}`,
  ];
  if (info.source !== undefined) {
    const s = info.source;
    lines.splice(2, 0, `source     ${s.checkpoint} (${s.modelType}, ${(s.bytes / 1e9).toFixed(2)} GB), imported ${s.importedAt} as ${s.dtype}`);
  }
  process.stdout.write(`${lines.join('\n')}\n`);
}

async function runImport(values: Values, positionals: string[], signal: AbortSignal): Promise<void> {
  if (positionals.length === 0) throw new UsageError('import needs a CHECKPOINT directory (see blip3o help import)');
  if (positionals.length > 1) throw new UsageError(`import takes one CHECKPOINT, got ${JSON.stringify(positionals[1])} too`);
  const out = stringOption(values, 'out');
  if (out === undefined || out.length === 0) throw new UsageError('import needs --out DIR (see blip3o help import)');
  const dtype = stringOption(values, 'dtype') as ImportDtype | undefined;
  const stages = ['backbone', 'dit', 'decoder', 'vae'];
  const bar = progressBar('import', 100 * stages.length);
  let result;
  try {
    result = await importCheckpoint(positionals[0], {
      out, dtype, name: stringOption(values, 'name'), signal,
      onProgress: (e) => {
        if (e.tensors === undefined || e.total === undefined) return;
        bar.update({ stage: e.stage, step: Math.round((100 * e.tensors) / e.total), steps: 100 } as ProgressEvent);
      },
    });
  } finally {
    bar.clear();
  }
  if (values.json === true) {
    process.stdout.write(`${JSON.stringify(result)}\n`);
    return;
  }
  process.stdout.write(
    `wrote ${result.bundle} (${(result.bundleBytes / 1e9).toFixed(2)} GB) from ${(result.checkpointBytes / 1e9).toFixed(2)} GB of checkpoint ` +
      `in ${result.seconds.toFixed(1)} s; peak memory ${(result.peakRssBytes / 1e9).toFixed(2)} GB resident` +
      (result.peakAnonymousBytes === null ? '' : `, ${(result.peakAnonymousBytes / 1e9).toFixed(2)} GB of it its own (the rest: the checkpoint's mapped files)`) +
      '\n',
  );
}

async function runBenchCommand(values: Values, positionals: string[]): Promise<void> {
  if (positionals.length > 0) throw new UsageError(`bench takes no arguments, got ${JSON.stringify(positionals[0])}`);
  const { dir, options } = loadOptionsOf(values);
  const out = path.resolve(stringOption(values, 'out') ?? path.join(packageRoot, 'bench', 'results'));
  let report;
  try {
    report = await runBench({
      ...options,
      model: dir,
      runs: numberOption(values, 'runs'),
      steps: numberOption(values, 'steps'),
      decoderSteps: numberOption(values, 'decoder-steps'),
      python: values['no-python'] !== true,
      throughput: values['no-throughput'] !== true,
      quick: values.quick === true,
      log: (line) => process.stderr.write(`bench: ${line}\n`),
    });
  } catch (err) {
    throw withFlagNames(err);
  }
  const files = await writeReport(report, out);
  process.stderr.write(`bench: wrote ${files.json}, ${files.markdown} and ${files.latest}\n`);
  process.stdout.write(values.json === true ? `${JSON.stringify(report)}\n` : markdown(report));
}

async function runEvalCommand(values: Values, positionals: string[], signal: AbortSignal): Promise<void> {
  if (positionals.length > 0) throw new UsageError(`eval takes no arguments, got ${JSON.stringify(positionals[0])}`);
  const { dir, options } = loadOptionsOf(values);
  let report;
  try {
    report = await runEval({
      device: options.device,
      dtype: options.dtype,
      threads: options.threads,
      cudaGraphs: options.cudaGraphs,
      model: dir,
      prompts: numberOption(values, 'prompts'),
      unseen: numberOption(values, 'unseen'),
      scenes: numberOption(values, 'scenes'),
      seed: numberOption(values, 'seed'),
      out: stringOption(values, 'out'),
      log: (line) => process.stderr.write(`eval: ${line}\n`),
      signal,
    });
  } catch (err) {
    throw withFlagNames(err);
  }
  process.stderr.write(`eval: wrote ${report.files.json} and ${report.files.markdown}\n`);
  process.stdout.write(values.json === true ? `${JSON.stringify(report)}\n` : evalMarkdown(report));
}

async function runServe(values: Values, positionals: string[], signal: AbortSignal): Promise<void> {
  if (positionals.length > 0) throw new UsageError(`serve takes no arguments, got ${JSON.stringify(positionals[0])}`);
  const { dir, options } = loadOptionsOf(values);
  const apiKey = stringOption(values, 'api-key') ?? process.env.BLIP3O_API_KEY;
  if (apiKey !== undefined && apiKey.length === 0) throw new UsageError('the API key must not be empty (--api-key or BLIP3O_API_KEY)');
  const serverOptions: ServerOptions = pruned({
    host: stringOption(values, 'host'),
    port: numberOption(values, 'port'),
    apiKey,
    maxQueue: numberOption(values, 'max-queue'),
    maxTokens: numberOption(values, 'max-tokens'),
    maxImagePixels: numberOption(values, 'max-image-pixels'),
    bodyLimit: numberOption(values, 'body-limit'),
    allowRemoteImages: values['allow-remote-images'] === true ? true : undefined,
    onWarning: (message: string) => process.stderr.write(`blip3o: warning: ${message}\n`),
    onError: (err: unknown) => process.stderr.write(`blip3o: error: ${oneLine(err instanceof Error ? err.message : String(err))}\n`),
  });
  const loadOptions = pruned({ ...options, maxBatch: numberOption(values, 'max-batch'), maxQueue: serverOptions.maxQueue });
  try {
    validateLoadOptions(loadOptions);
    validateServerOptions(serverOptions);
  } catch (err) {
    throw withFlagNames(err);
  }
  // SIGTERM (or Ctrl-C: `signal`) stops the server; the first one is handled, a second one kills.
  const stop = new Promise<void>((resolve) => {
    process.once('SIGTERM', () => resolve());
    signal.addEventListener('abort', () => resolve(), { once: true });
  });
  const model = await loadModel(dir, loadOptions);
  try {
    const server = createServer(model, serverOptions);
    process.stdout.write(`listening on ${await server.listen()}\n`);
    await stop;
    process.stderr.write('blip3o: shutting down\n');
    await server.close();
  } finally {
    await model.dispose();
  }
}

const commands: Record<string, (values: Values, positionals: string[], signal: AbortSignal) => Promise<void>> = {
  generate: runGenerate,
  describe: runDescribe,
  info: runInfo,
  import: runImport,
  bench: runBenchCommand,
  eval: runEvalCommand,
  serve: runServe,
};

/** `--cfg -1` as `--cfg=-1`: parseArgs would take "-1" for an option; the API then says what is wrong. */
function joinNegativeNumbers(args: string[], options: Options): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const name = args[i].startsWith('--') ? args[i].slice(2) : undefined;
    const next = args[i + 1];
    if (name !== undefined && options[name]?.type === 'string' && next !== undefined && /^-(\d|\.\d)/.test(next)) {
      out.push(`${args[i]}=${next}`);
      i++;
    } else {
      out.push(args[i]);
    }
  }
  return out;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === undefined || command === '--help' || command === '-h') {
    process.stdout.write(`${mainHelp}\n`);
    return 0;
  }
  if (command === '--version' || command === '-v') {
    process.stdout.write(`${packageVersion()}\n`);
    return 0;
  }
  if (command === 'help') {
    const topic = rest[0];
    if (topic === undefined) {
      process.stdout.write(`${mainHelp}\n`);
      return 0;
    }
    if (commandHelp[topic] === undefined) throw new UsageError(`unknown command ${JSON.stringify(topic)} (commands: generate, describe, info, import, bench, eval, serve, help)`);
    process.stdout.write(`${commandHelp[topic]}\n`);
    return 0;
  }
  const run = commands[command];
  if (run === undefined) {
    throw new UsageError(`unknown command ${JSON.stringify(command)} (commands: generate, describe, info, import, bench, eval, serve, help; see blip3o --help)`);
  }
  const options = commandOptions[command];
  const { values, positionals } = parseArgs({ args: joinNegativeNumbers(rest, options), options, allowPositionals: true, strict: true });
  if (values.help === true) {
    process.stdout.write(`${commandHelp[command]}\n`);
    return 0;
  }
  const dtypes = command === 'import' ? importDtypes : dtypeRequests;
  for (const [flag, choices] of [['device', deviceRequests], ['dtype', dtypes], ['format', imageFormats]] as const) {
    const value = values[flag];
    if (typeof value === 'string' && !(choices as readonly string[]).includes(value)) {
      throw new UsageError(`--${flag} must be one of ${choices.join(', ')}; got ${JSON.stringify(value)}`);
    }
  }

  // Ctrl-C aborts the running job cleanly (no partial output file); a second one exits at once.
  const controller = new AbortController();
  const onSigint = (): void => {
    if (controller.signal.aborted) process.exit(130);
    controller.abort(new AbortError('interrupted'));
  };
  process.on('SIGINT', onSigint);
  try {
    await run(values as Values, positionals, controller.signal);
    return 0;
  } catch (err) {
    if (controller.signal.aborted && isAbortError(err, controller.signal)) {
      process.stderr.write('blip3o: interrupted\n');
      return 130;
    }
    throw err;
  } finally {
    process.off('SIGINT', onSigint);
  }
}

// A closed pipe on stdout (`blip3o describe img | head -c 10`) ends the program quietly.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(0);
  throw err;
});

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    const message = err instanceof Error ? err.message : String(err);
    process.stderr.write(`blip3o: ${oneLine(message)}\n`);
    process.exit(1);
  },
);
