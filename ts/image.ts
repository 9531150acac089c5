// Image I/O through sharp: decoding an input image for the vision encoder (Qwen2.5-VL's
// preprocessing: RGB, smart_resize, rescale + normalise, CHW), encoding generated pixels, and the
// atomic file write the CLI uses.

import { randomBytes } from 'node:crypto';
import { open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { InvalidArgumentError } from './errors';
import { invalidOption, type ImageFormat } from './options';
import { roundHalfEven } from './numeric';

/** An image given to describe: encoded bytes (PNG, JPEG, WebP, ...) or a file path. */
export type ImageInput = Buffer | Uint8Array | string;

export interface VisionConfig {
  patch: number;
  merge: number;
  minPixels: number;
  maxPixels: number;
  mean: readonly number[];
  std: readonly number[];
}

export interface VisionPixels {
  /** 3 x height x width, normalised with the vision mean/std. */
  pixels: Float32Array;
  height: number;
  width: number;
  /** Merged image tokens: (height / factor) * (width / factor). */
  tokens: number;
}


/**
 * Qwen2-VL's smart_resize: both sides multiples of `factor`, the area within
 * [minPixels, maxPixels], the aspect ratio kept as closely as possible. Unlike transformers, sides
 * smaller than `factor` are not rejected: they are scaled up like any image under minPixels, and no
 * side ever rounds down to 0.
 */
export function smartResize(
  height: number,
  width: number,
  factor: number,
  minPixels: number,
  maxPixels: number,
): { height: number; width: number } {
  if (Math.max(height, width) / Math.min(height, width) > 200) {
    throw new InvalidArgumentError(
      `image aspect ratio must be at most 200:1, got ${width}x${height} (${(Math.max(height, width) / Math.min(height, width)).toFixed(1)}:1)`,
    );
  }
  let hBar = Math.max(factor, roundHalfEven(height / factor) * factor);
  let wBar = Math.max(factor, roundHalfEven(width / factor) * factor);
  if (hBar * wBar > maxPixels) {
    const beta = Math.sqrt((height * width) / maxPixels);
    hBar = Math.max(factor, Math.floor(height / beta / factor) * factor);
    wBar = Math.max(factor, Math.floor(width / beta / factor) * factor);
  } else if (hBar * wBar < minPixels) {
    const beta = Math.sqrt(minPixels / (height * width));
    hBar = Math.ceil((height * beta) / factor) * factor;
    wBar = Math.ceil((width * beta) / factor) * factor;
  }
  return { height: hBar, width: wBar };
}

function inputName(input: ImageInput): string {
  return typeof input === 'string' ? input : 'the image';
}

function checkImageInput(input: unknown): asserts input is ImageInput {
  if (typeof input === 'string') {
    if (input.length === 0) throw new InvalidArgumentError('Expected image file path or Buffer for image but received "" of type string');
    return;
  }
  if (input instanceof Uint8Array) {
    if (input.length === 0) throw new InvalidArgumentError('Expected image file path or Buffer for image but received an empty Buffer');
    return;
  }
  // invalidOption describes any value safely (String() throws on an object without a prototype).
  throw invalidOption('image', 'image file path or Buffer', input);
}

function imageError(input: ImageInput, err: unknown): InvalidArgumentError {
  const message = err instanceof Error ? err.message : String(err);
  return new InvalidArgumentError(`could not read ${inputName(input)}: ${message}`, { cause: err });
}

/**
 * Decodes `input` for the vision encoder: EXIF orientation applied, alpha flattened on white (as
 * transformers' convert_to_rgb does), any colourspace/bit depth/palette to 8-bit sRGB, resized with
 * a bicubic kernel to smart_resize's size, then (x / 255 - mean) / std, channels first.
 */
export async function loadVisionPixels(
  input: unknown,
  vision: VisionConfig,
  options: { limitInputPixels: number },
): Promise<VisionPixels> {
  checkImageInput(input);
  const source = typeof input === 'string' ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  const sharpOptions: sharp.SharpOptions = { failOn: 'error', limitInputPixels: options.limitInputPixels };

  let metadata: sharp.Metadata;
  try {
    metadata = await sharp(source, { ...sharpOptions, limitInputPixels: false }).metadata();
  } catch (err) {
    throw imageError(input, err);
  }
  const inWidth = metadata.width;
  const inHeight = metadata.height;
  if (inWidth === undefined || inHeight === undefined) {
    throw new InvalidArgumentError(`could not read ${inputName(input)}: its size is unknown`);
  }
  if (inWidth * inHeight > options.limitInputPixels) {
    throw new InvalidArgumentError(
      `${inputName(input)} is ${inWidth}x${inHeight} = ${inWidth * inHeight} pixels, over the limit of ${options.limitInputPixels} (limitInputPixels)`,
    );
  }
  // Orientations 5-8 swap width and height.
  const swapped = (metadata.orientation ?? 1) >= 5;
  const height = swapped ? inWidth : inHeight;
  const width = swapped ? inHeight : inWidth;
  const factor = vision.patch * vision.merge;
  const target = smartResize(height, width, factor, vision.minPixels, vision.maxPixels);

  let data: Buffer;
  try {
    let pipeline = sharp(source, sharpOptions).autoOrient().flatten({ background: '#ffffff' }).toColourspace('srgb');
    if (target.width !== width || target.height !== height) {
      pipeline = pipeline.resize(target.width, target.height, { fit: 'fill', kernel: 'cubic' });
    }
    const result = await pipeline.raw({ depth: 'uchar' }).toBuffer({ resolveWithObject: true });
    if (result.info.width !== target.width || result.info.height !== target.height || result.info.channels !== 3) {
      throw new Error(`decoded to ${result.info.width}x${result.info.height}x${result.info.channels}, expected ${target.width}x${target.height}x3`);
    }
    data = result.data;
  } catch (err) {
    throw imageError(input, err);
  }

  const plane = target.width * target.height;
  const pixels = new Float32Array(3 * plane);
  for (let c = 0; c < 3; c++) {
    const mean = vision.mean[c];
    const std = vision.std[c];
    for (let i = 0; i < plane; i++) pixels[c * plane + i] = (data[i * 3 + c] / 255 - mean) / std;
  }
  return {
    pixels,
    height: target.height,
    width: target.width,
    tokens: (target.height / factor) * (target.width / factor),
  };
}

/** Encodes uint8 RGB pixels (height x width x 3) as PNG, JPEG or WebP. */
export async function encodeImage(pixels: Buffer, width: number, height: number, format: ImageFormat): Promise<Buffer> {
  const image = sharp(pixels, { raw: { width, height, channels: 3 } });
  switch (format) {
    case 'png':
      return image.png().toBuffer();
    case 'jpeg':
      return image.jpeg({ quality: 90 }).toBuffer();
    case 'webp':
      return image.webp({ quality: 90 }).toBuffer();
  }
}

/** The output format a file name implies (.png, .jpg/.jpeg, .webp), or undefined. */
export function formatFromFileName(file: string): ImageFormat | undefined {
  switch (path.extname(file).toLowerCase()) {
    case '.png':
      return 'png';
    case '.jpg':
    case '.jpeg':
      return 'jpeg';
    case '.webp':
      return 'webp';
    default:
      return undefined;
  }
}

/**
 * Writes `data` to `file` atomically: to a temporary name in the same directory, flushed, then
 * renamed over `file`. On any failure the temporary file is removed and `file` is untouched.
 */
export async function writeFileAtomic(file: string, data: Uint8Array): Promise<void> {
  const dir = path.dirname(file);
  const temp = path.join(dir, `.${path.basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  try {
    const handle = await open(temp, 'wx');
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await rename(temp, file);
  } catch (err) {
    await unlink(temp).catch(() => undefined);
    throw err;
  }
}
