// The HTTP server's metrics, in Prometheus' text exposition format (version 0.0.4): requests by route
// and status, a latency histogram per route, jobs in flight per kind, cancelled requests, images and
// tokens. No dependency: a handful of counters rendered on demand.

/** Upper bounds of the latency histogram, in seconds. */
export const latencyBuckets: readonly number[] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

export type JobKind = 'generate' | 'chat';

interface Histogram {
  counts: number[];
  sum: number;
  count: number;
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function labels(pairs: Record<string, string>): string {
  return `{${Object.entries(pairs).map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(',')}}`;
}

export class ServerMetrics {
  private readonly requests = new Map<string, number>();
  private readonly latency = new Map<string, Histogram>();
  private readonly cancelled = new Map<string, number>();
  private readonly inFlight: Record<JobKind, number> = { generate: 0, chat: 0 };
  private images = 0;
  private promptTokens = 0;
  private completionTokens = 0;

  /** One answered (or abandoned: status 499) request. */
  observe(method: string, route: string, status: number, seconds: number): void {
    const key = JSON.stringify([method, route, String(status)]);
    this.requests.set(key, (this.requests.get(key) ?? 0) + 1);
    let h = this.latency.get(route);
    if (h === undefined) {
      h = { counts: latencyBuckets.map(() => 0), sum: 0, count: 0 };
      this.latency.set(route, h);
    }
    latencyBuckets.forEach((bound, i) => {
      if (seconds <= bound) h!.counts[i]++;
    });
    h.sum += seconds;
    h.count++;
  }

  /** A request whose client went away (or that shutdown stopped) before its answer. */
  cancel(route: string): void {
    this.cancelled.set(route, (this.cancelled.get(route) ?? 0) + 1);
  }

  jobStarted(kind: JobKind): void {
    this.inFlight[kind]++;
  }

  jobEnded(kind: JobKind): void {
    this.inFlight[kind]--;
  }

  /** Jobs accepted and not yet settled (waiting or running), of one kind. */
  jobs(kind: JobKind): number {
    return this.inFlight[kind];
  }

  addImages(n: number): void {
    this.images += n;
  }

  addTokens(prompt: number, completion: number): void {
    this.promptTokens += prompt;
    this.completionTokens += completion;
  }

  /** The exposition text. */
  render(): string {
    const out: string[] = [];
    out.push('# HELP blip3o_http_requests_total HTTP requests answered, by method, route and status (499: the client went away).');
    out.push('# TYPE blip3o_http_requests_total counter');
    for (const [key, value] of this.requests) {
      const [method, route, status] = JSON.parse(key) as [string, string, string];
      out.push(`blip3o_http_requests_total${labels({ method, route, status })} ${value}`);
    }
    out.push('# HELP blip3o_http_request_duration_seconds Time from request to answer, by route.');
    out.push('# TYPE blip3o_http_request_duration_seconds histogram');
    for (const [route, h] of this.latency) {
      latencyBuckets.forEach((bound, i) => out.push(`blip3o_http_request_duration_seconds_bucket${labels({ route, le: String(bound) })} ${h.counts[i]}`));
      out.push(`blip3o_http_request_duration_seconds_bucket${labels({ route, le: '+Inf' })} ${h.count}`);
      out.push(`blip3o_http_request_duration_seconds_sum${labels({ route })} ${h.sum}`);
      out.push(`blip3o_http_request_duration_seconds_count${labels({ route })} ${h.count}`);
    }
    out.push('# HELP blip3o_requests_cancelled_total Requests whose job was cancelled because the client went away or the server shut down.');
    out.push('# TYPE blip3o_requests_cancelled_total counter');
    for (const [route, value] of this.cancelled) out.push(`blip3o_requests_cancelled_total${labels({ route })} ${value}`);
    out.push('# HELP blip3o_queue_depth Jobs accepted and not yet finished (waiting or running), by kind.');
    out.push('# TYPE blip3o_queue_depth gauge');
    for (const kind of ['generate', 'chat'] as const) out.push(`blip3o_queue_depth${labels({ kind })} ${this.inFlight[kind]}`);
    out.push('# HELP blip3o_images_generated_total Images generated and sent.');
    out.push('# TYPE blip3o_images_generated_total counter');
    out.push(`blip3o_images_generated_total ${this.images}`);
    out.push('# HELP blip3o_tokens_total Tokens of chat completions, prompt (image tokens included) and completion.');
    out.push('# TYPE blip3o_tokens_total counter');
    out.push(`blip3o_tokens_total${labels({ type: 'prompt' })} ${this.promptTokens}`);
    out.push(`blip3o_tokens_total${labels({ type: 'completion' })} ${this.completionTokens}`);
    return `${out.join('\n')}\n`;
  }
}
