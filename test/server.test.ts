// `blip3o serve` / createServer, driven with the official openai npm client as an application would:
// images (n = 2, judged by the shapes world), chat with an image (streamed and not), auth, schema
// errors, body limit, the queue's 429, client aborts, graceful shutdown (in process and SIGTERM).
import { spawn, spawnSync } from 'node:child_process';
import http from 'node:http';
import path from 'node:path';
import OpenAI from 'openai';
import sharp from 'sharp';
import t from 'tap';
import { rgbPixels, ShapesWorld } from '../ts/eval';
import { encodeImage } from '../ts/image';
import { scrubMessage } from '../ts/server';
import { createServer, InvalidArgumentError, loadModel, validateServerOptions, type Blip3oModel, type Blip3oServer } from '../ts/index';
import { cli, ensureCompiled, root, skipWithoutRuntime, skipWithoutWorld, squarePng } from './fixtures/runtime';

const caption = 'a large red circle at the center on a white background';
const key = 'test-key-0123456789';
const modelId = 'blip3o-tiny-shapes';

function client(url: string, apiKey = key): OpenAI {
  return new OpenAI({ baseURL: `${url}/v1`, apiKey, maxRetries: 0, timeout: 60_000 });
}

function dataUrl(png: Buffer): string {
  return `data:image/png;base64,${png.toString('base64')}`;
}

function chatBody(png: Buffer, question?: string): OpenAI.ChatCompletionCreateParamsNonStreaming {
  const content: OpenAI.ChatCompletionContentPart[] = [{ type: 'image_url', image_url: { url: dataUrl(png) } }];
  if (question !== undefined) content.push({ type: 'text', text: question });
  return { model: modelId, messages: [{ role: 'user', content }] };
}

/** The APIError a call rejects with (fails the test when it resolves). */
async function apiError(promise: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof OpenAI.APIError) return err;
    throw err;
  }
  throw new Error('expected the call to fail');
}

/** A raw request's status, headers and body text. */
async function raw(url: string, route: string, init: RequestInit = {}): Promise<{ status: number; headers: Headers; text: string }> {
  const res = await fetch(`${url}${route}`, init);
  return { status: res.status, headers: res.headers, text: await res.text() };
}

function post(body: unknown, headers: Record<string, string> = {}): RequestInit {
  return { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${key}`, ...headers }, body: typeof body === 'string' ? body : JSON.stringify(body) };
}

/** A number from the /metrics text (0 when the series is absent). */
async function metric(url: string, series: string): Promise<number> {
  const text = (await raw(url, '/metrics')).text;
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}

async function until(check: () => Promise<boolean>, ms = 10_000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, 20));
  }
  return false;
}

/** No stack trace or file path in a response. */
function clean(text: string): boolean {
  return !/\bat .*:\d+/.test(text) && !text.includes(root) && !/\/(?:work|home|tmp|usr)\//.test(text);
}

t.test('server options are checked', async (t) => {
  t.throws(() => validateServerOptions({ port: 70000 }), InvalidArgumentError);
  t.throws(() => validateServerOptions({ port: 70000 }), { message: /Expected integer between 0 and 65535 for port but received 70000/ });
  t.throws(() => validateServerOptions({ apiKey: '' }), { message: /non-empty string for apiKey/ });
  t.throws(() => validateServerOptions({ bogus: 1 } as never), { message: /Unknown option "bogus" for createServer/ });
  t.doesNotThrow(() => validateServerOptions({ host: '::1', port: 0, maxQueue: 2 }));
});

t.test('with the model', { skip: skipWithoutRuntime }, async (t) => {
  const model = await loadModel();
  const warnings: string[] = [];
  const errors: unknown[] = [];
  const server = createServer(model, {
    port: 0,
    apiKey: key,
    bodyLimit: 256 * 1024,
    maxImagePixels: 96 * 96,
    onWarning: (w) => warnings.push(w),
    onError: (e) => errors.push(e),
  });
  const url = await server.listen();
  t.teardown(async () => {
    await server.close();
    await model.dispose();
  });
  t.match(url, /^http:\/\/127\.0\.0\.1:\d+$/);
  t.same(warnings, [], 'no warning on loopback');
  const openai = client(url);

  t.test('models, health, readiness, metrics', async (t) => {
    const models = await openai.models.list();
    t.same(models.data.map((m) => m.id), [modelId]);
    t.equal((await openai.models.retrieve(modelId)).id, modelId);
    t.equal((await apiError(openai.models.retrieve('gpt-4o'))).status, 404);
    t.same(JSON.parse((await raw(url, '/health')).text), { status: 'ok' });
    const ready = await raw(url, '/ready');
    t.equal(ready.status, 200);
    t.equal(JSON.parse(ready.text).status, 'ready');
    const metrics = await raw(url, '/metrics');
    t.match(metrics.headers.get('content-type'), /^text\/plain; version=0\.0\.4/);
    t.match(metrics.text, /blip3o_http_requests_total\{method="GET",route="\/v1\/models",status="200"\} 1/);
    t.match(metrics.text, /# TYPE blip3o_http_request_duration_seconds histogram/);
    t.match(metrics.text, /blip3o_queue_depth\{kind="generate"\} 0/);
  });

  t.test('images.generate, n = 2: one batch, the bundle size, the seeds\' images', async (t) => {
    const result = await openai.images.generate({ model: modelId, prompt: caption, n: 2, size: '64x64' as never, response_format: 'b64_json', seed: 11 } as never);
    t.equal(result.data?.length, 2);
    const images = result.data!.map((d) => Buffer.from(d.b64_json!, 'base64'));
    for (const png of images) {
      const meta = await sharp(png).metadata();
      t.same([meta.format, meta.width, meta.height], ['png', 64, 64]);
    }
    t.notOk(images[0].equals(images[1]), 'the two images differ');
    // Sample i has seed 11 + i: the same bytes as the API gives for that seed alone.
    const alone = await model.generate(caption, { seed: 12 });
    t.ok(images[1].equals(alone.image), 'the second image is seed 12\'s');
    t.same(result.data!.map((d) => (d as { seed?: number }).seed), [11, 12]);
    if (skipWithoutWorld) {
      t.comment(`not judged: ${skipWithoutWorld}`);
      return;
    }
    const world = ShapesWorld.start();
    t.teardown(() => world.close());
    for (const png of images) {
      const verdict = await world.judge(caption, await rgbPixels(png));
      t.notOk(verdict.error, `the judge judged it: ${verdict.why || 'pass'}`);
      // Seeds 11 and 12 give passing images on CPU (other devices: within float rounding, not asserted).
      if (model.info().device === 'cpu') t.ok(verdict.pass, `the judge passes it: ${verdict.why}`);
      else t.comment(`judge: ${verdict.pass ? 'pass' : `fail (${verdict.why})`}`);
    }
  });

  t.test('chat with an image: a correct answer; streamed equals non-streamed', { skip: skipWithoutWorld }, async (t) => {
    const world = ShapesWorld.start();
    t.teardown(() => world.close());
    const scenes = await world.scenes(6, 4242);
    const asked: Array<{ png: Buffer; question: string; answer: string }> = [];
    for (const scene of scenes) {
      const png = await encodeImage(Buffer.from(scene.pixels, 'base64'), 64, 64, 'png');
      const qa = scene.qa.find(([q]) => /^what color is the (circle|square|triangle)\?$/.test(q));
      if (qa !== undefined) asked.push({ png, question: qa[0], answer: qa[1] });
    }
    t.ok(asked.length >= 2, 'scenes with a colour question');
    for (const { png, question, answer } of asked.slice(0, 3)) {
      const completion = await openai.chat.completions.create(chatBody(png, question));
      const choice = completion.choices[0];
      t.equal(choice.message.content, answer, `${question} -> ${answer}`);
      t.equal(choice.message.role, 'assistant');
      t.equal(choice.finish_reason, 'stop');
      t.equal(completion.object, 'chat.completion');
      t.equal(completion.model, modelId);
      t.ok(completion.usage!.prompt_tokens > 0);
      t.equal(completion.usage!.total_tokens, completion.usage!.prompt_tokens + completion.usage!.completion_tokens);
      t.equal(choice.message.content, await model.describe(png, question), 'the API\'s answer');
    }
    // The default question (a caption), streamed and not.
    const { png } = asked[0];
    const plain = await openai.chat.completions.create(chatBody(png));
    const stream = await openai.chat.completions.create({ ...chatBody(png), stream: true, stream_options: { include_usage: true } });
    let text = '';
    let pieces = 0;
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      t.equal(chunk.object, 'chat.completion.chunk');
      const delta = chunk.choices[0]?.delta.content;
      if (delta) {
        text += delta;
        pieces++;
      }
      finish = chunk.choices[0]?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
    }
    t.equal(text, plain.choices[0].message.content, 'the streamed text equals the non-streamed answer');
    t.ok(pieces > 1, `streamed in ${pieces} pieces`);
    t.equal(finish, plain.choices[0].finish_reason);
    t.same(usage, plain.usage, 'usage in the last chunk');
    t.equal(await metric(url, 'blip3o_queue_depth{kind="chat"}'), 0);
  });

  t.test('401 without the right key, on every /v1 route; health and metrics stay open', async (t) => {
    for (const apiKey of ['wrong-key', `${key}x`, key.slice(0, -1)]) {
      const err = await apiError(client(url, apiKey).models.list());
      t.equal(err.status, 401);
      t.equal(err.code, 'invalid_api_key');
    }
    const png = await squarePng();
    t.equal((await apiError(client(url, 'nope').images.generate({ prompt: caption }))).status, 401);
    t.equal((await apiError(client(url, 'nope').chat.completions.create(chatBody(png)))).status, 401);
    const missing = await raw(url, '/v1/models');
    t.equal(missing.status, 401);
    t.equal(missing.headers.get('www-authenticate'), 'Bearer');
    t.equal(JSON.parse(missing.text).error.type, 'invalid_request_error');
    t.equal((await raw(url, '/v1/models', { headers: { authorization: `Basic ${key}` } })).status, 401);
    t.equal((await raw(url, '/%761/models')).status, 401, 'a percent-encoded path that routes to /v1 needs the key too');
    t.equal((await raw(url, '/%761/models', { headers: { authorization: `Bearer ${key}` } })).status, 200);
    t.equal((await raw(url, '/health')).status, 200);
    t.equal((await raw(url, '/metrics')).status, 200);
  });

  t.test('400 for bad requests, in the OpenAI error shape, without paths or stacks', async (t) => {
    const png = await squarePng();
    const cases: Array<[string, unknown, RegExp]> = [
      ['/v1/images/generations', { prompt: caption, n: 9 }, /'n': must be <= 8/],
      ['/v1/images/generations', { prompt: caption, n: 0 }, /'n'/],
      ['/v1/images/generations', { prompt: caption, n: '2' }, /'n': must be integer/],
      ['/v1/images/generations', { prompt: caption, size: '1024x1024' }, /'size': must be one of "64x64"/],
      ['/v1/images/generations', { prompt: caption, response_format: 'url' }, /'response_format': must be one of "b64_json"/],
      ['/v1/images/generations', { prompt: '' }, /'prompt'/],
      ['/v1/images/generations', { prompt: 'x'.repeat(4001) }, /'prompt'/],
      ['/v1/images/generations', { n: 1 }, /Missing required parameter: 'prompt'/],
      ['/v1/images/generations', { prompt: caption, bogus: 1 }, /Unrecognized request argument supplied: bogus/],
      ['/v1/images/generations', { prompt: caption, seed: -1 }, /'seed'/],
      ['/v1/images/generations', { prompt: 'word '.repeat(400) }, /prompt is too long/],
      ['/v1/chat/completions', { model: modelId, messages: [] }, /'messages'/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: 'what color is the circle?' }] }, /exactly one image_url part, got 0/],
      ['/v1/chat/completions', { ...chatBody(png), max_tokens: 0 }, /'max_tokens'/],
      ['/v1/chat/completions', { ...chatBody(png), max_tokens: 100_000 }, /'max_tokens': must be <= 512/],
      ['/v1/chat/completions', { ...chatBody(png), temperature: 3 }, /'temperature'/],
      ['/v1/chat/completions', { ...chatBody(png), top_p: 0 }, /'top_p'/],
      ['/v1/chat/completions', { ...chatBody(png), n: 2 }, /'n'/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://example.com/a.png' } }] }] }, /Remote image URLs are disabled/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'file:///etc/passwd' } }] }] }, /must be a data: URL/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'data:image/png;base64,@@@' } }] }] }, /invalid base64/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: dataUrl(Buffer.from('not an image at all')) } }] }] }, /image/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: dataUrl(await squarePng(128, 128)) } }] }] }, /pixel/i],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: dataUrl(png) } }, { type: 'image_url', image_url: { url: dataUrl(png) } }] }] }, /got 2/],
      ['/v1/chat/completions', { model: modelId, messages: [{ role: 'robot', content: 'hi' }] }, /role/],
    ];
    for (const [route, body, message] of cases) {
      const res = await raw(url, route, post(body));
      t.equal(res.status, 400, `${route} ${JSON.stringify(body).slice(0, 120)}: ${res.text.slice(0, 200)}`);
      const json = JSON.parse(res.text) as { error: { message: string; type: string; code: unknown } };
      t.match(json.error.message, message);
      t.equal(json.error.type, 'invalid_request_error');
      t.ok('code' in json.error, 'a code');
      t.ok(clean(res.text), `no path or stack: ${json.error.message}`);
    }
    const badJson = await raw(url, '/v1/images/generations', post('{"prompt": '));
    t.equal(badJson.status, 400);
    t.match(JSON.parse(badJson.text).error.message, /could not parse the JSON body/);
    const wrongModel = await raw(url, '/v1/chat/completions', post({ ...chatBody(png), model: 'gpt-4o' }));
    t.equal(wrongModel.status, 404);
    t.equal(JSON.parse(wrongModel.text).error.code, 'model_not_found');
    const unknown = await raw(url, '/v1/nothing', { headers: { authorization: `Bearer ${key}` } });
    t.equal(unknown.status, 404);
    t.ok(JSON.parse(unknown.text).error.message);
    const sdk = await apiError(openai.images.generate({ prompt: caption, n: 9 }));
    t.equal(sdk.status, 400, 'the client sees a 400 (BadRequestError)');
    t.ok(sdk instanceof OpenAI.BadRequestError);
    t.same(errors, [], 'no unexpected errors');
  });

  t.test('413 past the body limit', async (t) => {
    const big = Buffer.alloc(300 * 1024, 7);
    const err = await apiError(openai.chat.completions.create(chatBody(big)));
    t.equal(err.status, 413);
    const res = await raw(url, '/v1/chat/completions', post(chatBody(big)));
    t.equal(res.status, 413);
    t.same(Object.keys(JSON.parse(res.text).error).sort(), ['code', 'message', 'param', 'type']);
    t.equal(JSON.parse(res.text).error.code, 'request_too_large');
  });

  t.test('a client that disconnects cancels its job (streaming too)', async (t) => {
    const before = await metric(url, 'blip3o_images_generated_total');
    const controller = new AbortController();
    const pending = openai.images.generate({ prompt: caption, n: 8 }, { signal: controller.signal });
    await until(async () => (await metric(url, 'blip3o_queue_depth{kind="generate"}')) === 1);
    controller.abort();
    await t.rejects(pending);
    t.ok(await until(async () => (await metric(url, 'blip3o_requests_cancelled_total{route="/v1/images/generations"}')) === 1), 'counted as cancelled');
    t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="generate"}')) === 0), 'its place is freed');
    t.equal(await metric(url, 'blip3o_http_requests_total{method="POST",route="/v1/images/generations",status="499"}'), 1);
    t.equal(await metric(url, 'blip3o_images_generated_total'), before, 'no image was sent');

    const png = await squarePng();
    // A streamed chat waiting behind a batch (the tiny model answers faster than a client can
    // leave mid-answer): its client leaves, its job is cancelled before it produced a token.
    const tokensBefore = await metric(url, 'blip3o_tokens_total{type="completion"}');
    const blocker = openai.images.generate({ prompt: caption, n: 8 });
    t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="generate"}')) === 1));
    const streamController = new AbortController();
    const stream = openai.chat.completions.create({ ...chatBody(png), stream: true }, { signal: streamController.signal });
    t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="chat"}')) === 1));
    streamController.abort();
    await t.rejects(stream);
    t.ok(await until(async () => (await metric(url, 'blip3o_requests_cancelled_total{route="/v1/chat/completions"}')) === 1), 'the stream was cancelled');
    t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="chat"}')) === 0));
    t.equal((await blocker).data?.length, 8);
    t.equal(await metric(url, 'blip3o_tokens_total{type="completion"}'), tokensBefore, 'no answer was produced');
    // The model still answers, the same as before.
    const again = await openai.images.generate({ prompt: caption, seed: 12 });
    t.ok(Buffer.from(again.data![0].b64_json!, 'base64').equals((await model.generate(caption, { seed: 12 })).image));
  });

  t.test('remote image URLs, when enabled, are fetched (bounded)', async (t) => {
    const png = await squarePng();
    const files = http.createServer((req, res) => {
      if (req.url === '/square.png') res.writeHead(200, { 'content-type': 'image/png' }).end(png);
      else if (req.url === '/big') res.writeHead(200).end(Buffer.alloc(300 * 1024));
      else res.writeHead(404).end();
    });
    await new Promise<void>((resolve) => files.listen(0, '127.0.0.1', resolve));
    t.teardown(() => files.close());
    const base = `http://127.0.0.1:${(files.address() as { port: number }).port}`;
    const remote = createServer(model, { port: 0, allowRemoteImages: true, bodyLimit: 256 * 1024 });
    const remoteUrl = await remote.listen();
    t.teardown(() => remote.close());
    const ask = (imageUrl: string): Promise<OpenAI.ChatCompletion> =>
      client(remoteUrl).chat.completions.create({
        model: modelId,
        messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: imageUrl } }, { type: 'text', text: 'what color is the square?' }] }],
      });
    t.equal((await ask(`${base}/square.png`)).choices[0].message.content, await model.describe(png, 'what color is the square?'));
    const missing = await apiError(ask(`${base}/nothing.png`));
    t.equal(missing.status, 400);
    t.match(missing.message, /Could not fetch the image URL: HTTP 404/);
    const big = await apiError(ask(`${base}/big`));
    t.equal(big.status, 400);
    t.match(big.message, /larger than 262144 bytes/);
  });

  t.test('close() lets an in-flight request finish, then refuses connections', async (t) => {
    const other = createServer(model, { port: 0 });
    const otherUrl = await other.listen();
    const pending = client(otherUrl).images.generate({ prompt: caption, n: 4, seed: 3 });
    t.ok(await until(async () => other.metrics.jobs('generate') === 1));
    const closed = other.close();
    const ready = await raw(otherUrl, '/ready').catch(() => undefined);
    if (ready !== undefined) t.equal(ready.status, 503, 'not ready while draining');
    const result = await pending;
    t.equal(result.data?.length, 4, 'the in-flight request was answered');
    await closed;
    await t.rejects(fetch(`${otherUrl}/health`), 'no longer listening');
  });
});

t.test('a disposed model: 503 in the OpenAI shape, not ready', { skip: skipWithoutRuntime }, async (t) => {
  const model = await loadModel();
  const server = createServer(model, { port: 0 });
  const url = await server.listen();
  t.teardown(() => server.close());
  await model.dispose();
  const res = await raw(url, '/v1/images/generations', post({ prompt: caption }));
  t.equal(res.status, 503);
  t.same(JSON.parse(res.text), { error: { message: 'The server is shutting down.', type: 'server_error', param: null, code: 'unavailable' } });
  t.equal((await raw(url, '/ready')).status, 503);
  t.equal((await raw(url, '/health')).status, 200);
});

t.test('the queue: 429 with Retry-After; an abandoned place is given back', { skip: skipWithoutRuntime }, async (t) => {
  const model: Blip3oModel = await loadModel({ maxQueue: 1, maxBatch: 1 });
  const server: Blip3oServer = createServer(model, { port: 0, maxQueue: 1, retryAfterSeconds: 2 });
  const url = await server.listen();
  t.teardown(async () => {
    await server.close();
    await model.dispose();
  });
  const openai = client(url);

  // A runs (8 images), B waits in the queue (its one place), C finds the queue full.
  const a = openai.images.generate({ prompt: caption, n: 8, seed: 1 });
  t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="generate"}')) === 1));
  const bController = new AbortController();
  const b = openai.images.generate({ prompt: caption, seed: 2 }, { signal: bController.signal });
  t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="generate"}')) === 2));
  const busy = await apiError(openai.images.generate({ prompt: caption, seed: 3 }));
  t.equal(busy.status, 429);
  t.equal(busy.headers?.['retry-after'], '2');
  t.equal(busy.code, 'server_busy');
  t.equal(busy.type, 'rate_limit_error');
  // B's client leaves: its place is free again while A still runs.
  bController.abort();
  await t.rejects(b);
  t.ok(await until(async () => (await metric(url, 'blip3o_queue_depth{kind="generate"}')) === 1), 'B left the queue');
  const d = openai.images.generate({ prompt: caption, seed: 4 });
  // Two chats while the executor is busy: one takes the one chat place (it waits behind A), the other is refused.
  const png = await squarePng();
  const chats = await Promise.allSettled([
    openai.chat.completions.create(chatBody(png, 'what color is the square?')),
    openai.chat.completions.create(chatBody(png, 'what color is the square?')),
  ]);
  const answered = chats.filter((c) => c.status === 'fulfilled');
  const refused = chats.flatMap((c) => (c.status === 'rejected' ? [c.reason as InstanceType<typeof OpenAI.APIError>] : []));
  t.equal(answered.length, 1, 'one chat answered');
  t.equal(refused.length, 1, 'one chat refused');
  t.equal(refused[0]?.status, 429, 'chat past maxQueue: 429');
  t.equal(refused[0]?.headers?.['retry-after'], '2');
  t.equal((answered[0] as PromiseFulfilledResult<OpenAI.ChatCompletion>).value.choices[0].message.content, 'red');
  t.equal((await a).data?.length, 8);
  t.equal((await d).data?.length, 1, 'the freed place took a new request');
  t.equal(await metric(url, 'blip3o_images_generated_total'), 9, 'B never produced an image');
});

t.test('blip3o serve (CLI)', { skip: skipWithoutRuntime }, async (t) => {
  ensureCompiled();
  const help = spawnSync(process.execPath, [cli, 'serve', '--help'], { encoding: 'utf8' });
  t.equal(help.status, 0);
  t.match(help.stdout, /^Usage: blip3o serve \[options\]/);
  t.equal(spawnSync(process.execPath, [cli, 'help', 'serve'], { encoding: 'utf8' }).stdout, help.stdout);
  t.match(spawnSync(process.execPath, [cli, '--help'], { encoding: 'utf8' }).stdout, /\n {2}serve {21}serve an OpenAI-compatible HTTP API/);
  for (const [args, message] of [
    [['serve', '--port', '70000'], /for --port but received 70000/],
    [['serve', '--port', 'x'], /Expected a number for --port/],
    [['serve', 'extra'], /serve takes no arguments/],
    [['serve', '--max-queue', '0'], /for --max-queue but received 0/],
  ] as const) {
    const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 60_000 });
    t.equal(r.status, 1, args.join(' '));
    t.match(r.stderr, message);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }

  t.test('SIGTERM: the in-flight request finishes, exit 0', async (t) => {
    const child = spawn(process.execPath, [cli, 'serve', '--port', '0', '--host', '0.0.0.0'], {
      env: { ...process.env, BLIP3O_API_KEY: key },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const listening = await new Promise<string>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => {
        stdout += d.toString();
        const m = /^listening on (http:\/\/\S+)\n/.exec(stdout);
        if (m !== null) resolve(m[1]);
      });
      child.on('exit', () => reject(new Error(`exited early: ${stderr}`)));
    });
    t.match(listening, /^http:\/\/0\.0\.0\.0:\d+$/);
    t.notMatch(stderr, /warning/, 'no warning: an API key is set');
    const url = listening.replace('0.0.0.0', '127.0.0.1');
    t.equal((await raw(url, '/v1/models')).status, 401, 'the key comes from BLIP3O_API_KEY');
    const pending = client(url).images.generate({ prompt: caption, n: 4 });
    await until(async () => /blip3o_queue_depth\{kind="generate"\} 1/.test((await raw(url, '/metrics')).text));
    child.kill('SIGTERM');
    const result = await pending;
    t.equal(result.data?.length, 4, 'answered after SIGTERM');
    t.equal(await exited, 0, 'exit code 0');
    t.equal(stdout, `listening on ${listening}\n`, 'one line on stdout');
    t.notMatch(stderr, /\bat .*:\d+/, 'no stack trace');
  });

  t.test('bound beyond loopback without a key: a warning', async (t) => {
    const env = { ...process.env };
    delete env.BLIP3O_API_KEY;
    const child = spawn(process.execPath, [cli, 'serve', '--port', '0', '--host', '0.0.0.0'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    await new Promise<void>((resolve) => child.stdout.on('data', (d: Buffer) => d.toString().includes('listening on') && resolve()));
    t.ok(await until(async () => stderr.includes('warning'), 2000));
    t.match(stderr, /blip3o: warning: listening on 0\.0\.0\.0 without an API key/);
    child.kill('SIGTERM');
    t.equal(await exited, 0);
  });
});

// The shape of a path the tests above would catch in a message.
t.test('messages are scrubbed of paths', async (t) => {
  t.equal(scrubMessage(`cannot read ${path.join(root, 'models', 'tiny', 'x.pt')}: bad\n  at foo`), 'cannot read <path>: bad at foo');
});
