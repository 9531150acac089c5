// Templates and tokenisation with the real Qwen2.5 tokenizer files (BLIP3-o's backbone tokenizer).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { BundleError } from '../ts/errors';
import { PromptTokenizer, StreamDecoder, fillTemplate, type PromptTemplates } from '../ts/tokenizer';

const qwenDir = path.join(__dirname, '..', 'node_modules', '@lenml', 'tokenizer-qwen2_5', 'models');
const tokenizerJson = JSON.parse(readFileSync(path.join(qwenDir, 'tokenizer.json'), 'utf8')) as {
  added_tokens: Array<Record<string, unknown>>;
};
const tokenizerConfig = JSON.parse(readFileSync(path.join(qwenDir, 'tokenizer_config.json'), 'utf8')) as object;

// The BLIP3-o templates (BLIP3O.md): the open assistant turn ends in [IMG].
const templates: PromptTemplates = {
  generation:
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPlease generate image based on the following caption: {prompt}<|im_end|>\n<|im_start|>assistant\n[IMG]',
  understanding:
    '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n',
  negative: ' ',
  defaultQuestion: 'Describe this image.',
};

/** Qwen2.5's tokenizer with BLIP3-o's added tokens [IMG] [/IMG] <image> appended. */
function blip3oTokenizerJson(): object {
  const json = structuredClone(tokenizerJson);
  ['[IMG]', '[/IMG]', '<image>'].forEach((content, index) => {
    json.added_tokens.push({
      id: 151665 + index,
      content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: true,
    });
  });
  return json;
}

const plain = new PromptTokenizer(tokenizerJson, tokenizerConfig, templates);
const blip3o = new PromptTokenizer(blip3oTokenizerJson(), tokenizerConfig, templates);

// "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" in Qwen2.5's vocabulary.
const systemTurn = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198];
const userStart = [151644, 872, 198];
const assistantStart = [151644, 77091, 198];

t.test('the generation template tokenizes to Qwen ids', async (t) => {
  const ids = plain.encode(fillTemplate(templates.generation.replace('[IMG]', ''), { prompt: 'a red circle' }));
  t.same(ids.slice(0, systemTurn.length), systemTurn, 'system turn with <|im_start|> 151644 and <|im_end|> 151645');
  t.same(ids.slice(systemTurn.length, systemTurn.length + 3), userStart);
  // "Please generate image based on the following caption: a red circle"
  t.same(
    ids,
    [
      ...systemTurn,
      ...userStart,
      5501, 6923, 2168, 3118, 389, 279, 2701, 17256, 25, 264, 2518, 12671,
      151645, 198,
      ...assistantStart,
    ],
  );
});

t.test('[IMG] [/IMG] <image> as added tokens get 151665..151667', async (t) => {
  const ids = blip3o.generationIds('a red circle');
  t.equal(ids[0], 151644, 'starts with <|im_start|>');
  t.equal(ids.at(-1), 151665, 'ends with [IMG]');
  t.same(ids.slice(-4), [...assistantStart, 151665]);
  t.same(blip3o.encode('[IMG][/IMG]<image>'), [151665, 151666, 151667]);
  t.equal(blip3o.tokenToId('[/IMG]'), 151666);
  t.equal(blip3o.idToToken(151667), '<image>');
  // Without the added tokens, [IMG] is ordinary text of several tokens.
  t.ok(plain.encode('[IMG]').length > 1);
});

t.test('the understanding template repeats the image-pad token', async (t) => {
  const imagePad = plain.tokenToId('<|image_pad|>');
  t.equal(imagePad, 151655);
  const ids = plain.understandingIds('what color is the circle?', 6, 151655);
  const start = ids.indexOf(151652); // <|vision_start|>
  t.ok(start > 0);
  t.same(ids.slice(start, start + 8), [151652, 151655, 151655, 151655, 151655, 151655, 151655, 151653]);
  t.same(ids.slice(0, systemTurn.length), systemTurn);
  t.same(ids.slice(-5), [151645, 198, ...assistantStart]);
  t.throws(() => plain.understandingIds('q', 2, 999999), BundleError, 'an image-pad id outside the vocabulary');
});

t.test('templates are filled in one pass', async (t) => {
  t.equal(fillTemplate('a {prompt} b {question}', { prompt: '{question}', question: 'Q' }), 'a {question} b Q');
  t.equal(fillTemplate('{image}{image}', { image: 'x' }), 'xx');
  t.equal(fillTemplate('{prompt} {other}', { prompt: '$&' }), '$& {other}');
});

t.test('the negative prompt is tokenized raw', async (t) => {
  t.same(blip3o.negativeIds(), [220]);
});

t.test('streaming detokenisation emits only complete UTF-8 text', async (t) => {
  const text = 'a 🎨🧑‍🎨 世界 héllo, wörld!\n日本語';
  const ids = plain.encode(text);
  const decoder = plain.streamDecoder();
  const pieces: string[] = [];
  for (const id of ids) {
    const piece = decoder.push(id);
    t.notOk(piece.includes('\uFFFD'), `no replacement character in ${JSON.stringify(piece)}`);
    if (piece) pieces.push(piece);
  }
  pieces.push(decoder.flush());
  t.equal(pieces.join(''), text);
  t.equal(pieces.join(''), plain.decode(ids));
  t.ok(pieces.length > 5, 'text arrives in several pieces');

  // An emoji split over byte-level tokens: nothing until it is complete.
  const emoji = plain.encode(' 🎨');
  t.ok(emoji.length > 1, 'the emoji spans several tokens');
  const partial = plain.streamDecoder();
  t.equal(partial.push(emoji[0]), '', 'held back');
  t.equal(partial.flush(), ' \uFFFD', 'an incomplete character at the end surfaces on flush');
  const whole = plain.streamDecoder();
  t.same(emoji.map((id) => whole.push(id)), [...emoji.slice(1).map(() => ''), ' 🎨'], 'emitted once complete');
});

t.test('special tokens are left out of decoded text', async (t) => {
  const decoder = blip3o.streamDecoder();
  const ids = blip3o.encode('x<|im_end|>y');
  const text = ids.map((id) => decoder.push(id)).join('') + decoder.flush();
  t.equal(text, 'xy');
});

t.test('StreamDecoder with a decoder that treats the start of text specially', async (t) => {
  // A Metaspace-like decoder drops the leading space of the whole text only.
  const vocab = ['▁a', '▁b', 'c'];
  const decode = (ids: number[]): string => ids.map((id) => vocab[id]).join('').replace(/▁/g, ' ').replace(/^ /, '');
  const decoder = new StreamDecoder(decode);
  const all = [0, 1, 2, 0];
  const text = all.map((id) => decoder.push(id)).join('') + decoder.flush();
  t.equal(text, decode(all));
});

t.test('PromptTokenizer.load reads the bundle files', async (t) => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'blip3o-tok-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(blip3oTokenizerJson()));
  writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(tokenizerConfig));
  const loaded = await PromptTokenizer.load(dir, { tokenizer: 'tokenizer.json', tokenizerConfig: 'tokenizer_config.json' }, templates);
  t.same(loaded.generationIds('a red circle'), blip3o.generationIds('a red circle'));
  await t.rejects(
    PromptTokenizer.load(dir, { tokenizer: 'missing.json', tokenizerConfig: 'tokenizer_config.json' }, templates),
    BundleError,
  );
  writeFileSync(path.join(dir, 'broken.json'), '{');
  await t.rejects(
    PromptTokenizer.load(dir, { tokenizer: 'broken.json', tokenizerConfig: 'tokenizer_config.json' }, templates),
    { name: 'BundleError', message: /broken\.json is not valid JSON/ },
  );
});
