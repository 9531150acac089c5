// The bundle's Hugging Face tokenizer, its prompt templates, and incremental detokenisation for
// streaming. Templates are filled in one pass, so text inside a prompt that looks like a
// placeholder ("{question}") is never substituted again.

import { readFile } from 'node:fs/promises';
import path from 'node:path';
import type { Tokenizer as HfTokenizer } from '@huggingface/tokenizers' with { 'resolution-mode': 'import' };
import { BundleError } from './errors';

// The package ships CommonJS next to its ESM build; require() picks the CommonJS one.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { Tokenizer } = require('@huggingface/tokenizers') as { Tokenizer: typeof HfTokenizer };

export interface PromptTemplates {
  generation: string;
  understanding: string;
  negative: string;
  defaultQuestion: string;
}

export interface TemplateValues {
  prompt?: string;
  question?: string;
  image?: string;
}

const placeholder = /\{(prompt|question|image)\}/g;

/** Replaces {prompt}, {question} and {image} in one pass; a placeholder without a value stays. */
export function fillTemplate(template: string, values: TemplateValues): string {
  return template.replace(placeholder, (match, name: keyof TemplateValues) => values[name] ?? match);
}

export class PromptTokenizer {
  private readonly tokenizer: HfTokenizer;
  readonly templates: PromptTemplates;

  constructor(tokenizerJson: object, tokenizerConfig: object, templates: PromptTemplates) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.templates = templates;
  }

  /** Reads tokenizer.json and tokenizer_config.json (paths relative to the bundle dir). */
  static async load(
    bundleDir: string,
    files: { tokenizer: string; tokenizerConfig: string },
    templates: PromptTemplates,
  ): Promise<PromptTokenizer> {
    const readJson = async (file: string): Promise<object> => {
      const full = path.join(bundleDir, file);
      let text: string;
      try {
        text = await readFile(full, 'utf8');
      } catch (err) {
        throw new BundleError(`could not read ${file}: ${(err as Error).message}`, { cause: err });
      }
      try {
        return JSON.parse(text) as object;
      } catch (err) {
        throw new BundleError(`${file} is not valid JSON: ${(err as Error).message}`, { cause: err });
      }
    };
    const [tokenizerJson, tokenizerConfig] = await Promise.all([readJson(files.tokenizer), readJson(files.tokenizerConfig)]);
    try {
      return new PromptTokenizer(tokenizerJson, tokenizerConfig, templates);
    } catch (err) {
      throw new BundleError(`could not build the tokenizer from ${files.tokenizer}: ${(err as Error).message}`, { cause: err });
    }
  }

  /** Token ids of `text` as is: no BOS/EOS or other post-processing (the templates hold them). */
  encode(text: string): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: false }).ids;
  }

  /** Text of `ids`, special tokens left out. */
  decode(ids: number[]): string {
    if (ids.length === 0) return '';
    return this.tokenizer.decode(ids, { skip_special_tokens: true });
  }

  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** The generation template around `prompt` (it ends in [IMG]; the queries are appended natively). */
  generationIds(prompt: string): number[] {
    return this.encode(fillTemplate(this.templates.generation, { prompt }));
  }

  /** The negative prompt, tokenized raw (no template); it must give at least one token. */
  negativeIds(): number[] {
    const ids = this.encode(this.templates.negative);
    if (ids.length === 0) {
      throw new BundleError(
        `manifest.json: templates.negative ${JSON.stringify(this.templates.negative)} gives no tokens; the negative prompt needs at least one (BLIP3-o's is " ")`,
      );
    }
    return ids;
  }

  /**
   * The understanding template: {image} becomes the image-pad token string repeated `imageTokens`
   * times, {question} the question.
   */
  understandingIds(question: string, imageTokens: number, imagePadId: number): number[] {
    const padToken = this.idToToken(imagePadId);
    if (padToken === undefined) {
      throw new BundleError(`manifest.json: tokens.imagePad ${imagePadId} is not a token of the bundle's tokenizer`);
    }
    const ids = this.encode(fillTemplate(this.templates.understanding, { question, image: padToken.repeat(imageTokens) }));
    const pads = ids.reduce((count, id) => count + (id === imagePadId ? 1 : 0), 0);
    if (pads !== imageTokens) {
      throw new BundleError(
        `the understanding template gave ${pads} image-pad tokens where ${imageTokens} were expected (is ${padToken} a special token of the tokenizer?)`,
      );
    }
    return ids;
  }

  /** An incremental detokeniser over this tokenizer. */
  streamDecoder(): StreamDecoder {
    return new StreamDecoder((ids) => this.decode(ids));
  }
}

/**
 * Turns token ids, one at a time, into text pieces that are complete UTF-8: a byte-level token
 * can end in the middle of a character, which decodes to a trailing U+FFFD; such text is held back
 * until the next token completes it. Decoding a window that starts a few tokens back (the prefix)
 * keeps decoders that treat the start of text specially (leading-space rules) consistent, so the
 * pieces joined equal the decoding of all ids.
 */
export class StreamDecoder {
  private readonly ids: number[] = [];
  private prefixOffset = 0;
  private readOffset = 0;

  constructor(private readonly decode: (ids: number[]) => string) {}

  /** Adds one token; returns the new complete text ('' while a character is incomplete). */
  push(id: number): string {
    this.ids.push(id);
    const prefixText = this.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decode(this.ids.slice(this.prefixOffset));
    if (newText.length > prefixText.length && !newText.endsWith('\uFFFD')) {
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      return newText.slice(prefixText.length);
    }
    return '';
  }

  /** The text still held back (an incomplete character at the very end decodes to U+FFFD). */
  flush(): string {
    const prefixText = this.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decode(this.ids.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.ids.length;
    return newText.length > prefixText.length ? newText.slice(prefixText.length) : '';
  }
}
