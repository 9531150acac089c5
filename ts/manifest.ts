// Types of a bundle's manifest.json (contract section 1). The native loader validates every field
// before a model exists; TypeScript reads the validated text it hands back.

import { BundleError } from './errors';
import type { EulerDiscreteConfig } from './schedules';

export interface BundleFileEntry {
  path: string;
  sha256: string;
}

export interface BundleManifest {
  format: 'blip3o-bundle';
  formatVersion: 1;
  name: string;
  preset: string;
  dtype: 'float32' | 'bfloat16' | 'float16';
  files: {
    backbone: BundleFileEntry;
    dit: BundleFileEntry;
    decoder: BundleFileEntry;
    vae: BundleFileEntry;
    tokenizer: BundleFileEntry;
    tokenizerConfig: BundleFileEntry;
  };
  image: { width: number; height: number };
  backbone: {
    hidden: number;
    layers: number;
    heads: number;
    kvHeads: number;
    headDim: number;
    vocab: number;
    context: number;
    queryTokens: number;
  };
  vision: {
    patch: number;
    merge: number;
    minPixels: number;
    maxPixels: number;
    mean: [number, number, number];
    std: [number, number, number];
  };
  clip: { tokens: number; width: number };
  latent: { channels: number; height: number; width: number };
  /** forceUpcast: the VAE decodes in float32 when the model runs in float16 (SDXL's VAE overflows). */
  vae: { scalingFactor: number; forceUpcast?: boolean };
  tokens: { img: number; imagePad: number; stop: number[] };
  templates: {
    generation: string;
    understanding: string;
    negative: string;
    defaultQuestion: string;
  };
  sampler: {
    /** eta: share of fresh noise in each DiT step (0, the deterministic Euler step, when the file has none);
     * integerTimesteps: the DiT is given sigma * 1000 truncated to an integer, as the official BLIP3-o
     * sampler does (false when the file has none). */
    dit: { steps: number; cfg: number; shift: number; eta: number; integerTimesteps: boolean };
    decoder: EulerDiscreteConfig & {
      steps: number;
      cfg: number;
      predictionType: 'epsilon' | 'sample' | 'v_prediction';
    };
    negativeSeed: number;
  };
  /** dit.pt and decoder.pt compute each sample of a call on its own, so the runtime may split a batch
   * into calls freely (false, one call per sample on CPU, when the file has none). */
  batchInvariant: boolean;
  architecture?: Record<string, unknown>;
  /** Set by the importer: the checkpoint a bundle was made from. */
  source?: BundleSource;
}

/** The checkpoint an imported bundle was made from. */
export interface BundleSource {
  checkpoint: string;
  modelType: string;
  architectures?: string[];
  bytes: number;
  importedAt: string;
  dtype: string;
}

/** Parses the manifest text the native loader validated. */
export function parseManifest(text: string, bundleDir: string): BundleManifest {
  let manifest: BundleManifest;
  try {
    manifest = JSON.parse(text) as BundleManifest;
  } catch (err) {
    throw new BundleError(`${bundleDir}/manifest.json: not valid JSON (${(err as Error).message})`, { cause: err });
  }
  manifest.sampler.dit.eta ??= 0;  // optional in the format
  manifest.sampler.dit.integerTimesteps ??= false;
  manifest.batchInvariant ??= false;
  return manifest;
}
