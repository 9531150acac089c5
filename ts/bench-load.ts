// Cold model load, measured in a fresh process: the benchmark forks this file, which loads the addon
// (libtorch), then the model, and sends back how long each took, the time since the process started,
// and its RSS.

import { performance } from 'node:perf_hooks';
import { loadModel, runtimeInfo } from './model';
import type { LoadOptions } from './options';

export interface ColdLoad {
  /** Loading the native addon and libtorch (the first call into the runtime). */
  addonMs: number;
  /** loadModel(): bundle validation (sha256), TorchScript loads, the negative condition. */
  loadMs: number;
  /** From the process start to the loaded model (Node start-up, modules, the addon, loadModel). */
  processMs: number;
  rssMb: number;
}

async function main(): Promise<void> {
  const { dir, options } = JSON.parse(process.argv[2]) as { dir: string; options: LoadOptions };
  const started = performance.now();
  runtimeInfo();
  const addonLoaded = performance.now();
  const model = await loadModel(dir, options);
  const loaded = performance.now();
  const rssMb = process.memoryUsage().rss / 2 ** 20;
  const result: ColdLoad = { addonMs: addonLoaded - started, loadMs: loaded - addonLoaded, processMs: loaded, rssMb };
  await model.dispose();
  process.send?.(result);
}

main().catch((err: unknown) => {
  process.send?.({ error: err instanceof Error ? err.message : String(err) });
  process.exitCode = 1;
});
