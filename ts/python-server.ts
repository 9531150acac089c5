// A long-lived Python process that answers JSON lines: one request per line on its stdin, one answer
// per line on its stdout ({"error": "..."} when a request failed). Shared by the benchmark's reference
// (bench/reference.py) and the evaluation's shapes world (models/shapes.py).

import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { packageRoot } from './native';

/** The process answered a request with {"error": ...}: that request failed, the process goes on. */
export class PythonAnswerError extends Error {
  override name = 'PythonAnswerError';
}

export class PythonServer {
  private readonly lines: AsyncIterator<string>;
  private stderr = '';
  /** Requests run one at a time, in the order they were made. */
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly child: ChildProcessWithoutNullStreams,
    /** Names the process in error messages: "the Python reference". */
    private readonly label: string,
  ) {
    // A process that died shows as the end of its stdout; request() reports its stderr then.
    child.on('error', (err) => (this.stderr += `\n${err.message}`));
    child.stdin.on('error', () => undefined);
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      this.stderr = (this.stderr + chunk).slice(-4000);
    });
    this.lines = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }

  /** Starts `bash models/run-python.sh -m MODULE --serve` (a Python with torch) from the package root. */
  static start(module: string, label: string): PythonServer {
    const script = path.join(packageRoot, 'models', 'run-python.sh');
    const child = spawn('bash', [script, '-m', module, '--serve'], { cwd: packageRoot, stdio: 'pipe' });
    return new PythonServer(child, label);
  }

  /**
   * Sends one request and waits for its answer. Rejects with a PythonAnswerError when the process
   * answered {"error": ...}, with an Error when it exited.
   */
  request<T>(req: object): Promise<T> {
    const answer = this.queue.then(() => this.exchange<T>(req));
    this.queue = answer.catch(() => undefined);
    return answer;
  }

  /** Ends the process (closing stdin ends its loop) and waits for it to exit. */
  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((resolve) => this.child.once('exit', resolve));
    this.child.stdin.end();
    await exited;
  }

  private async exchange<T>(req: object): Promise<T> {
    this.child.stdin.write(`${JSON.stringify(req)}\n`);
    const next = await this.lines.next();
    if (next.done === true) {
      await new Promise((resolve) => (this.child.exitCode === null ? this.child.once('exit', resolve) : resolve(null)));
      throw new Error(`${this.label} exited (${this.child.exitCode}): ${this.stderr.trim().split('\n').pop() ?? ''}`);
    }
    const res = JSON.parse(next.value) as T & { error?: string };
    if (res.error !== undefined) throw new PythonAnswerError(`${this.label} failed: ${res.error}`);
    return res;
  }
}
