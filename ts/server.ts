// `blip3o serve`: an OpenAI-compatible HTTP server over one loaded model (Fastify, JSON schemas).
// Routes: POST /v1/images/generations, POST /v1/chat/completions (streamed as server-sent events on
// request), GET /v1/models, GET /health, GET /ready, GET /metrics. Every job goes through the
// runtime (the model's request queue for images, a bounded count of chat jobs), is cancelled when
// its client goes away, and errors come back in OpenAI's shape, without stacks or file paths.

import { createHash, randomUUID, timingSafeEqual } from 'node:crypto';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { AbortError, Blip3oError, BusyError, DisposedError, InvalidArgumentError } from './errors';
import type { Blip3oModel, DescribeDetails } from './model';
import { invalidOption, maxSeed, type DescribeOptions } from './options';
import { ServerMetrics, type JobKind } from './server-metrics';

export { ServerMetrics } from './server-metrics';

/** The most images one /v1/images/generations request may ask for (one batch). */
export const maxImagesPerRequest = 8;

export interface ServerOptions {
  /** Interface to bind. Default '127.0.0.1' (loopback only). */
  host?: string;
  /** TCP port; 0 picks a free one (listen() resolves to the URL). Default 8080. */
  port?: number;
  /** When set, every /v1 route needs `Authorization: Bearer <apiKey>`. Default: none. */
  apiKey?: string;
  /** The model id in /v1/models, and the `model` requests must name. Default: the bundle's name. */
  modelId?: string;
  /** Largest request body in bytes (past it: 413). Default 8 MiB. */
  bodyLimit?: number;
  /** Largest decoded input image, width * height (past it: 400). Default 2048 * 2048. */
  maxImagePixels?: number;
  /** Longest image prompt and chat question, in characters. Default 4000. */
  maxPromptLength?: number;
  /** Largest max_tokens a chat completion may ask for. Default 512. */
  maxTokens?: number;
  /** Most chat completions waiting or running at once (past it: 429); image requests are bounded by
   * the model's own maxQueue. Default 64. */
  maxQueue?: number;
  /** Fetch http(s) image URLs in chat messages (the server then fetches any URL a client names).
   * Default false: only data: URLs. */
  allowRemoteImages?: boolean;
  /** Time limit of a remote image fetch, ms. Default 10000. */
  remoteImageTimeoutMs?: number;
  /** Seconds in the Retry-After header of a 429. Default 1. */
  retryAfterSeconds?: number;
  /** close(): how long in-flight requests may take before their jobs are cancelled, ms. Default 30000. */
  shutdownTimeoutMs?: number;
  /** Safety warnings (bound beyond loopback without an API key). Default: process.emitWarning. */
  onWarning?: (message: string) => void;
  /** Unexpected errors (answered 500 with a generic message). Default: none. */
  onError?: (err: unknown) => void;
}

export interface Blip3oServer {
  /** The Fastify instance (add routes or hooks before listen()). */
  readonly app: FastifyInstance;
  readonly metrics: ServerMetrics;
  /** Starts listening; resolves to 'http://HOST:PORT'. */
  listen(): Promise<string>;
  /** The URL once listening. */
  readonly url: string | undefined;
  /**
   * Stops accepting requests and waits for those in flight (at most shutdownTimeoutMs, then their
   * jobs are cancelled and the connections closed). Does not dispose the model. Idempotent.
   */
  close(): Promise<void>;
}

interface ResolvedOptions {
  host: string;
  port: number;
  apiKey: string | undefined;
  modelId: string;
  bodyLimit: number;
  maxImagePixels: number;
  maxPromptLength: number;
  maxTokens: number;
  maxQueue: number;
  allowRemoteImages: boolean;
  remoteImageTimeoutMs: number;
  retryAfterSeconds: number;
  shutdownTimeoutMs: number;
  onWarning: (message: string) => void;
  onError: (err: unknown) => void;
}

const serverOptionNames = [
  'host', 'port', 'apiKey', 'modelId', 'bodyLimit', 'maxImagePixels', 'maxPromptLength', 'maxTokens', 'maxQueue',
  'allowRemoteImages', 'remoteImageTimeoutMs', 'retryAfterSeconds', 'shutdownTimeoutMs', 'onWarning', 'onError',
];

function resolveOptions(options: ServerOptions | undefined, defaultModelId: string): ResolvedOptions {
  if (options !== undefined && (typeof options !== 'object' || options === null || Array.isArray(options))) {
    throw invalidOption('createServer options', 'object', options);
  }
  const o = (options ?? {}) as Record<string, unknown>;
  for (const name of Object.keys(o)) {
    if (!serverOptionNames.includes(name)) {
      throw new InvalidArgumentError(`Unknown option ${JSON.stringify(name)} for createServer; expected one of ${serverOptionNames.join(', ')}`);
    }
  }
  const int = (name: string, min: number, max: number, fallback: number): number => {
    const value = o[name];
    if (value === undefined) return fallback;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      throw invalidOption(name, `integer between ${min} and ${max}`, value);
    }
    return value;
  };
  const str = (name: string, fallback: string | undefined): string | undefined => {
    const value = o[name];
    if (value === undefined) return fallback;
    if (typeof value !== 'string' || value.length === 0) throw invalidOption(name, 'non-empty string', value);
    return value;
  };
  const fn = <T>(name: string, fallback: T): T => {
    const value = o[name];
    if (value === undefined) return fallback;
    if (typeof value !== 'function') throw invalidOption(name, 'function', value);
    return value as T;
  };
  const allowRemote = o.allowRemoteImages;
  if (allowRemote !== undefined && typeof allowRemote !== 'boolean') throw invalidOption('allowRemoteImages', 'boolean', allowRemote);
  return {
    host: str('host', '127.0.0.1')!,
    port: int('port', 0, 65535, 8080),
    apiKey: str('apiKey', undefined),
    modelId: str('modelId', defaultModelId)!,
    bodyLimit: int('bodyLimit', 1024, 2 ** 31 - 1, 8 * 1024 * 1024),
    maxImagePixels: int('maxImagePixels', 1, maxSeed, 2048 * 2048),
    maxPromptLength: int('maxPromptLength', 1, 1_000_000, 4000),
    maxTokens: int('maxTokens', 1, 1_000_000, 512),
    maxQueue: int('maxQueue', 1, 1_000_000, 64),
    allowRemoteImages: allowRemote === true,
    remoteImageTimeoutMs: int('remoteImageTimeoutMs', 1, 600_000, 10_000),
    retryAfterSeconds: int('retryAfterSeconds', 0, 86_400, 1),
    shutdownTimeoutMs: int('shutdownTimeoutMs', 0, 86_400_000, 30_000),
    onWarning: fn('onWarning', (message: string) => process.emitWarning(message)),
    onError: fn('onError', () => undefined),
  };
}

/** Checks createServer's options without a model (the CLI does, before loading one). */
export function validateServerOptions(options: ServerOptions | undefined): void {
  resolveOptions(options, 'model');
}

// ---------------------------------------------------------------------------------------------
// Errors, in OpenAI's shape: { error: { message, type, param, code } }.

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly type: string,
    readonly code: string | null,
    readonly param: string | null = null,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

const invalidRequest = (message: string, code: string | null = null, param: string | null = null): HttpError =>
  new HttpError(400, message, 'invalid_request_error', code, param);

/** A message safe to send: one line, bounded, with anything that looks like a file path removed. */
export function scrubMessage(message: string): string {
  return message
    .replace(/\s+/g, ' ')
    .replace(/(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+){2,}[\\/]?/g, '<path>')
    .trim()
    .slice(0, 500);
}

function validationMessage(err: FastifyError): { message: string; param: string | null } {
  const first = err.validation?.[0];
  if (first === undefined) return { message: 'invalid request body', param: null };
  const where = first.instancePath.replace(/^\//, '').replace(/\//g, '.');
  const params = first.params as Record<string, unknown>;
  if (first.keyword === 'additionalProperties') {
    const name = String(params.additionalProperty);
    return { message: `Unrecognized request argument supplied: ${where ? `${where}.` : ''}${name}`, param: where ? `${where}.${name}` : name };
  }
  if (first.keyword === 'required') {
    const name = String(params.missingProperty);
    return { message: `Missing required parameter: '${where ? `${where}.` : ''}${name}'`, param: where ? `${where}.${name}` : name };
  }
  let detail = first.message ?? 'is invalid';
  if (first.keyword === 'enum' && Array.isArray(params.allowedValues)) detail = `must be one of ${params.allowedValues.map((v) => JSON.stringify(v)).join(', ')}`;
  return { message: scrubMessage(`Invalid value for '${where || 'body'}': ${detail}`), param: where || null };
}

/** The HTTP answer for any error a route raised. */
function httpErrorOf(err: unknown, retryAfterSeconds: number): HttpError {
  if (err instanceof HttpError) return err;
  if (err instanceof BusyError) {
    return new HttpError(429, 'The server is busy: too many requests are waiting. Retry later.', 'rate_limit_error', 'server_busy', null, {
      'retry-after': String(retryAfterSeconds),
    });
  }
  if (err instanceof InvalidArgumentError) return invalidRequest(scrubMessage(err.message), 'invalid_value');
  if (err instanceof DisposedError) return new HttpError(503, 'The server is shutting down.', 'server_error', 'unavailable');
  if (err instanceof Blip3oError || !(err instanceof Error)) {
    return new HttpError(500, 'The server had an error while processing your request.', 'server_error', 'internal_error');
  }
  const fe = err as FastifyError;
  if (fe.validation !== undefined) {
    const { message, param } = validationMessage(fe);
    return invalidRequest(message, 'invalid_value', param);
  }
  switch (fe.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new HttpError(413, 'Request body too large.', 'invalid_request_error', 'request_too_large');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new HttpError(415, 'Unsupported content type: send application/json.', 'invalid_request_error', 'unsupported_media_type');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return invalidRequest('We could not parse the JSON body of your request.', 'invalid_json');
    default:
      break;
  }
  if (err instanceof SyntaxError && fe.statusCode === 400) {
    return invalidRequest('We could not parse the JSON body of your request.', 'invalid_json');
  }
  const status = typeof fe.statusCode === 'number' ? fe.statusCode : 500;
  if (status >= 400 && status < 500) return new HttpError(status, scrubMessage(fe.message), 'invalid_request_error', null);
  return new HttpError(500, 'The server had an error while processing your request.', 'server_error', 'internal_error');
}

function errorBody(e: HttpError): object {
  return { error: { message: e.message, type: e.type, param: e.param, code: e.code } };
}

// ---------------------------------------------------------------------------------------------
// Request bodies.

interface ImagesBody {
  prompt: string;
  model?: string;
  n?: number;
  size?: string;
  response_format?: string;
  seed?: number;
}

type ContentPart = { type: 'text'; text: string } | { type: 'image_url'; image_url: { url: string; detail?: string } };

interface ChatMessage {
  role: 'system' | 'developer' | 'user' | 'assistant';
  content?: string | ContentPart[] | null;
}

interface ChatBody {
  model: string;
  messages: ChatMessage[];
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  temperature?: number | null;
  top_p?: number | null;
  seed?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean } | null;
}

function schemas(o: ResolvedOptions, size: string): { images: object; chat: object } {
  const nullable = (schema: Record<string, unknown>): object => ({ ...schema, type: [schema.type as string, 'null'] });
  const text = { type: 'string', maxLength: o.maxPromptLength };
  const textPart = {
    type: 'object',
    required: ['type', 'text'],
    properties: { type: { const: 'text' }, text },
  };
  const imagePart = {
    type: 'object',
    required: ['type', 'image_url'],
    properties: {
      type: { const: 'image_url' },
      image_url: {
        type: 'object',
        required: ['url'],
        properties: { url: { type: 'string', minLength: 1 }, detail: { type: 'string', enum: ['auto', 'low', 'high'] } },
      },
    },
  };
  const part = {
    type: 'object',
    required: ['type'],
    properties: { type: { type: 'string', enum: ['text', 'image_url'] } },
    if: { properties: { type: { const: 'text' } } },
    then: textPart,
    else: imagePart,
  };
  const message = {
    type: 'object',
    required: ['role'],
    properties: {
      role: { type: 'string', enum: ['system', 'developer', 'user', 'assistant'] },
      content: { anyOf: [text, { type: 'array', maxItems: 16, items: part }, { type: 'null' }] },
      name: { type: 'string' },
    },
  };
  const tokens = { type: 'integer', minimum: 1, maximum: o.maxTokens };
  return {
    images: {
      type: 'object',
      required: ['prompt'],
      additionalProperties: false,
      properties: {
        prompt: { type: 'string', minLength: 1, maxLength: o.maxPromptLength },
        model: { type: 'string' },
        n: { type: 'integer', minimum: 1, maximum: maxImagesPerRequest },
        size: { type: 'string', enum: [size] },
        response_format: { type: 'string', enum: ['b64_json'] },
        seed: { type: 'integer', minimum: 0, maximum: maxSeed - (maxImagesPerRequest - 1) },
        quality: { type: 'string' },
        style: { type: 'string' },
        user: { type: 'string' },
      },
    },
    chat: {
      type: 'object',
      required: ['model', 'messages'],
      additionalProperties: false,
      properties: {
        model: { type: 'string' },
        messages: { type: 'array', minItems: 1, maxItems: 64, items: message },
        max_tokens: nullable(tokens),
        max_completion_tokens: nullable(tokens),
        temperature: nullable({ type: 'number', minimum: 0, maximum: 2 }),
        top_p: nullable({ type: 'number', exclusiveMinimum: 0, maximum: 1 }),
        seed: nullable({ type: 'integer', minimum: 0, maximum: maxSeed }),
        stream: nullable({ type: 'boolean' }),
        stream_options: {
          type: ['object', 'null'],
          additionalProperties: false,
          properties: { include_usage: { type: 'boolean' } },
        },
        n: nullable({ type: 'integer', minimum: 1, maximum: 1 }),
        user: { type: 'string' },
      },
    },
  };
}

const dataUrlPattern = /^data:([^;,]*)((?:;[^;,]*)*),(.*)$/s;
const base64Pattern = /^[A-Za-z0-9+/]*={0,2}$/;

/** The bytes of an image part's URL: a data: URL, or (when enabled) an http(s) URL fetched. */
async function imageBytes(url: string, o: ResolvedOptions, signal: AbortSignal): Promise<Buffer> {
  const data = dataUrlPattern.exec(url);
  if (data !== null) {
    const mime = data[1].toLowerCase();
    if (mime !== '' && !mime.startsWith('image/')) throw invalidRequest(`image_url must hold an image, got a data: URL of type ${JSON.stringify(mime.slice(0, 64))}`, 'invalid_image_url');
    if (!data[2].toLowerCase().split(';').includes('base64')) throw invalidRequest('image_url data: URLs must be base64-encoded', 'invalid_image_url');
    const payload = data[3].replace(/\s+/g, '');
    if (payload.length === 0 || !base64Pattern.test(payload)) throw invalidRequest('image_url holds invalid base64 data', 'invalid_image_url');
    return Buffer.from(payload, 'base64');
  }
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalidRequest('image_url must be a data: URL (base64) or an http(s) URL', 'invalid_image_url');
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw invalidRequest('image_url must be a data: URL (base64) or an http(s) URL', 'invalid_image_url');
  }
  if (!o.allowRemoteImages) {
    throw invalidRequest('Remote image URLs are disabled on this server: send the image as a base64 data: URL', 'remote_images_disabled');
  }
  let response: Response;
  try {
    response = await fetch(parsed, { signal: AbortSignal.any([signal, AbortSignal.timeout(o.remoteImageTimeoutMs)]), redirect: 'follow' });
  } catch {
    if (signal.aborted) throw new AbortError();
    throw invalidRequest('Could not fetch the image URL', 'image_fetch_failed');
  }
  if (!response.ok || response.body === null) {
    await response.body?.cancel().catch(() => undefined);
    throw invalidRequest(`Could not fetch the image URL: HTTP ${response.status}`, 'image_fetch_failed');
  }
  const chunks: Buffer[] = [];
  let bytes = 0;
  try {
    for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
      bytes += chunk.length;
      if (bytes > o.bodyLimit) throw invalidRequest(`The image at the URL is larger than ${o.bodyLimit} bytes`, 'image_too_large');
      chunks.push(Buffer.from(chunk));
    }
  } catch (err) {
    if (err instanceof HttpError) throw err;
    if (signal.aborted) throw new AbortError();
    throw invalidRequest('Could not fetch the image URL', 'image_fetch_failed');
  }
  return Buffer.concat(chunks);
}

/**
 * The model answers one question about one image: the conversation must hold exactly one image
 * (in a user message); the question is the text of the last user message (the bundle's default
 * question when it has none). System, developer and assistant messages are not shown to the model.
 */
function conversation(messages: ChatMessage[]): { imageUrl: string; question: string | undefined } {
  const images: string[] = [];
  let lastUser: ChatMessage | undefined;
  for (const m of messages) {
    if (m.role !== 'user') continue;
    lastUser = m;
    if (Array.isArray(m.content)) for (const p of m.content) if (p.type === 'image_url') images.push(p.image_url.url);
  }
  if (lastUser === undefined) throw invalidRequest('messages must contain a user message', 'invalid_value', 'messages');
  if (images.length !== 1) {
    throw invalidRequest(
      `This model answers questions about one image: the user messages must hold exactly one image_url part, got ${images.length}`,
      'invalid_value',
      'messages',
    );
  }
  const content = lastUser.content;
  const text =
    typeof content === 'string'
      ? content
      : Array.isArray(content)
        ? content.filter((p): p is { type: 'text'; text: string } => p.type === 'text').map((p) => p.text).join('\n')
        : '';
  const question = text.trim();
  return { imageUrl: images[0], question: question.length > 0 ? question : undefined };
}

// ---------------------------------------------------------------------------------------------

interface Job {
  signal: AbortSignal;
  /** The client closed its connection before the answer was complete. */
  clientGone(): boolean;
  end(): void;
}

const loopbackHosts = new Set(['127.0.0.1', '::1', 'localhost', '::ffff:127.0.0.1']);

function formatUrl(host: string, port: number): string {
  return `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
}

function sha256(text: string): Buffer {
  return createHash('sha256').update(text, 'utf8').digest();
}

/**
 * An OpenAI-compatible HTTP server over `model` (which the caller keeps owning: close() does not
 * dispose it). Call listen() to start it.
 */
export function createServer(model: Blip3oModel, options?: ServerOptions): Blip3oServer {
  const o = resolveOptions(options, model.manifest.name);
  const info = model.info();
  const size = `${info.image.width}x${info.image.height}`;
  const created = Math.floor(Date.now() / 1000);
  const metrics = new ServerMetrics();
  const keyHash = o.apiKey === undefined ? undefined : sha256(o.apiKey);
  /** Abort controllers of the jobs in flight (shutdown cancels them past its time limit). */
  const active = new Set<AbortController>();
  const recorded = new WeakSet<FastifyRequest>();
  let draining = false;
  let closing: Promise<void> | undefined;
  let url: string | undefined;

  const app = Fastify({
    logger: false,
    bodyLimit: o.bodyLimit,
    requestTimeout: 60_000,
    // Requests during the drain reach the hooks: /v1 answers 503 in OpenAI's shape, /ready 503.
    return503OnClosing: false,
    ajv: { customOptions: { removeAdditional: false, coerceTypes: false, useDefaults: false, allErrors: false } },
  });

  const routeOf = (request: FastifyRequest): string => request.routeOptions.url ?? 'unmatched';
  const record = (request: FastifyRequest, status: number, seconds: number): void => {
    if (recorded.has(request)) return;
    recorded.add(request);
    metrics.observe(request.method, routeOf(request), status, seconds);
  };

  app.addHook('onRequest', async (request, reply) => {
    // By the matched route (however its URL was spelled), and by the raw path for unmatched ones.
    const route = request.routeOptions.url;
    const path = request.url.split('?')[0];
    if (!(route?.startsWith('/v1/') ?? false) && !path.startsWith('/v1/') && path !== '/v1') return;
    if (draining) throw new HttpError(503, 'The server is shutting down.', 'server_error', 'unavailable');
    if (keyHash === undefined) return;
    const header = request.headers.authorization;
    const match = typeof header === 'string' ? /^Bearer\s+(.+)$/i.exec(header.trim()) : null;
    if (match === null || !timingSafeEqual(sha256(match[1]), keyHash)) {
      reply.header('www-authenticate', 'Bearer');
      throw new HttpError(
        401,
        match === null ? 'Missing API key: send it as Authorization: Bearer KEY' : 'Incorrect API key provided.',
        'invalid_request_error',
        'invalid_api_key',
      );
    }
  });

  app.addHook('onSend', async (_request, reply, payload) => {
    if (draining) reply.header('connection', 'close');
    return payload;
  });

  app.addHook('onResponse', async (request, reply) => {
    record(request, reply.statusCode, reply.elapsedTime / 1000);
  });

  app.setErrorHandler((err, _request, reply) => {
    const e = httpErrorOf(err, o.retryAfterSeconds);
    if (e.status >= 500 && !(err instanceof HttpError) && !(err instanceof DisposedError)) o.onError(err);
    void reply.code(e.status).headers(e.headers).send(errorBody(e));
  });

  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0].slice(0, 200);
    void reply.code(404).send(errorBody(new HttpError(404, `Unknown route: ${request.method} ${path}`, 'invalid_request_error', 'unknown_route')));
  });

  function checkModel(requested: string | undefined): void {
    if (requested !== undefined && requested !== o.modelId) {
      throw new HttpError(404, `The model ${JSON.stringify(requested.slice(0, 200))} does not exist: this server serves ${JSON.stringify(o.modelId)}`, 'invalid_request_error', 'model_not_found', 'model');
    }
  }

  function startJob(kind: JobKind, request: FastifyRequest, reply: FastifyReply): Job {
    const controller = new AbortController();
    let gone = false;
    const onClose = (): void => {
      if (reply.raw.writableFinished) return;
      gone = true;
      controller.abort(new AbortError('the client went away'));
    };
    reply.raw.once('close', onClose);
    if (request.raw.socket?.destroyed === true) onClose();
    active.add(controller);
    metrics.jobStarted(kind);
    let ended = false;
    return {
      signal: controller.signal,
      clientGone: () => gone,
      end() {
        if (ended) return;
        ended = true;
        metrics.jobEnded(kind);
        active.delete(controller);
        reply.raw.off('close', onClose);
      },
    };
  }

  /** The client is gone: nothing to answer; count it (status 499) and drop the connection. */
  function abandon(request: FastifyRequest, reply: FastifyReply): void {
    metrics.cancel(routeOf(request));
    record(request, 499, reply.elapsedTime / 1000);
    reply.hijack();
    if (!reply.raw.destroyed) reply.raw.destroy();
  }

  /** A job that shutdown cancelled (its client still there) answers 503. */
  function failure(job: Job, err: unknown): unknown {
    if (job.signal.aborted && !job.clientGone()) return new HttpError(503, 'The server shut down before the request finished.', 'server_error', 'unavailable');
    return err;
  }

  const bodySchemas = schemas(o, size);

  app.post('/v1/images/generations', { schema: { body: bodySchemas.images } }, async (request, reply) => {
    const body = request.body as ImagesBody;
    checkModel(body.model);
    const n = body.n ?? 1;
    const job = startJob('generate', request, reply);
    try {
      const results = await model.generate(Array<string>(n).fill(body.prompt), { seed: body.seed, format: 'png', signal: job.signal });
      if (job.clientGone()) return abandon(request, reply);
      metrics.addImages(n);
      return {
        created: Math.floor(Date.now() / 1000),
        data: results.map((r) => ({ b64_json: r.image.toString('base64'), revised_prompt: body.prompt, seed: r.seed })),
      };
    } catch (err) {
      if (job.clientGone()) return abandon(request, reply);
      // The n prompts went in as a batch: name the prompt as the client sent it.
      if (err instanceof InvalidArgumentError) throw new InvalidArgumentError(err.message.replace(/^prompt\[\d+\] /, 'prompt '));
      throw failure(job, err);
    } finally {
      job.end();
    }
  });

  app.post('/v1/chat/completions', { schema: { body: bodySchemas.chat } }, async (request, reply) => {
    const body = request.body as ChatBody;
    checkModel(body.model);
    const { imageUrl, question } = conversation(body.messages);
    if (metrics.jobs('chat') >= o.maxQueue) throw new BusyError('chat queue full');
    const job = startJob('chat', request, reply);
    const id = `chatcmpl-${randomUUID()}`;
    const createdAt = Math.floor(Date.now() / 1000);
    let streaming = false;
    try {
      const image = await imageBytes(imageUrl, o, job.signal);
      const maxTokens = body.max_completion_tokens ?? body.max_tokens;
      const describeOptions: DescribeOptions = {
        limitInputPixels: o.maxImagePixels,
        signal: job.signal,
        ...(maxTokens != null ? { maxTokens } : {}),
        ...(body.temperature != null ? { temperature: body.temperature } : {}),
        ...(body.top_p != null ? { topP: body.top_p } : {}),
        ...(body.seed != null ? { seed: body.seed } : {}),
      };
      if (body.stream !== true) {
        const d = await model.describeDetailed(image, question, describeOptions);
        if (job.clientGone()) return abandon(request, reply);
        metrics.addTokens(d.promptTokens, d.generatedTokens);
        return {
          id,
          object: 'chat.completion',
          created: createdAt,
          model: o.modelId,
          system_fingerprint: null,
          choices: [{ index: 0, message: { role: 'assistant', content: d.text, refusal: null }, logprobs: null, finish_reason: d.stopReason }],
          usage: { prompt_tokens: d.promptTokens, completion_tokens: d.generatedTokens, total_tokens: d.promptTokens + d.generatedTokens },
        };
      }

      let details: DescribeDetails | undefined;
      const pieces = model.describeStreamDetailed(image, question, describeOptions, (d) => (details = d))[Symbol.asyncIterator]();
      // The first piece (or the error of a bad image or question) before any byte is sent: errors
      // before it are answered as JSON errors with their status.
      let next = await pieces.next();
      if (job.clientGone()) {
        await pieces.return(undefined);
        return abandon(request, reply);
      }
      streaming = true;
      reply.hijack();
      const raw = reply.raw;
      raw.writeHead(200, {
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache',
        'x-accel-buffering': 'no',
        ...(draining ? { connection: 'close' } : {}),
      });
      const chunk = (choices: object[], extra: object = {}): void => {
        raw.write(`data: ${JSON.stringify({ id, object: 'chat.completion.chunk', created: createdAt, model: o.modelId, system_fingerprint: null, choices, ...extra })}\n\n`);
      };
      chunk([{ index: 0, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }]);
      try {
        while (next.done !== true) {
          if (job.clientGone()) {
            await pieces.return(undefined);
            return abandon(request, reply);
          }
          chunk([{ index: 0, delta: { content: next.value }, logprobs: null, finish_reason: null }]);
          next = await pieces.next();
        }
      } catch (err) {
        if (job.clientGone()) return abandon(request, reply);
        const e = httpErrorOf(failure(job, err), o.retryAfterSeconds);
        if (e.status >= 500 && !(err instanceof DisposedError) && !job.signal.aborted) o.onError(err);
        raw.write(`data: ${JSON.stringify(errorBody(e))}\n\n`);
        raw.end();
        return reply;
      }
      const d = details!;
      metrics.addTokens(d.promptTokens, d.generatedTokens);
      chunk([{ index: 0, delta: {}, logprobs: null, finish_reason: d.stopReason }]);
      const usage = { prompt_tokens: d.promptTokens, completion_tokens: d.generatedTokens, total_tokens: d.promptTokens + d.generatedTokens };
      if (body.stream_options?.include_usage === true) chunk([], { usage });
      raw.end('data: [DONE]\n\n');
      return reply;
    } catch (err) {
      if (job.clientGone()) return abandon(request, reply);
      if (streaming) throw err;
      throw failure(job, err);
    } finally {
      job.end();
    }
  });

  app.get('/v1/models', async () => ({
    object: 'list',
    data: [{ id: o.modelId, object: 'model', created, owned_by: 'blip3o' }],
  }));

  app.get('/v1/models/:id', async (request) => {
    const { id } = request.params as { id: string };
    checkModel(id);
    return { id: o.modelId, object: 'model', created, owned_by: 'blip3o' };
  });

  app.get('/health', async () => ({ status: 'ok' }));

  app.get('/ready', async (_request, reply) => {
    if (draining || model.isDisposed) return reply.code(503).send({ status: 'draining' });
    return { status: 'ready', model: o.modelId };
  });

  app.get('/metrics', async (_request, reply) => {
    void reply.type('text/plain; version=0.0.4; charset=utf-8');
    return metrics.render();
  });

  return {
    app,
    metrics,
    get url() {
      return url;
    },
    async listen() {
      await app.listen({ host: o.host, port: o.port });
      const bound = app.server.address();
      const port = typeof bound === 'object' && bound !== null ? bound.port : o.port;
      url = formatUrl(o.host, port);
      if (!loopbackHosts.has(o.host) && o.apiKey === undefined) {
        o.onWarning(
          `listening on ${o.host} without an API key: anyone who can reach ${url} can use the model (set an API key: --api-key or BLIP3O_API_KEY)`,
        );
      }
      return url;
    },
    close() {
      closing ??= (async () => {
        draining = true;
        const timer = setTimeout(() => {
          for (const controller of active) controller.abort(new AbortError('the server is shutting down'));
          // Give the cancelled jobs a moment to answer 503, then drop what is left.
          setTimeout(() => app.server.closeAllConnections(), 1000).unref();
        }, o.shutdownTimeoutMs);
        timer.unref();
        // Keep-alive connections whose last answer went out before the drain began (answers sent
        // during it carry Connection: close) are closed as soon as they are idle.
        const idle = setInterval(() => app.server.closeIdleConnections(), 100);
        idle.unref();
        try {
          await app.close();
        } finally {
          clearTimeout(timer);
          clearInterval(idle);
        }
      })();
      return closing;
    },
  };
}
