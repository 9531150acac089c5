// What the bundled model has learned, checked the way a user meets it: through the runtime, on fixed
// prompts and seeds (generation, judged from the pixels by the shapes world's judge) and on fixed rendered
// scenes (understanding). Deterministic: the same bundle gives the same images and answers every run.
// The broad measurement, over hundreds of fresh scenes, is `npm run eval` (README, "The bundled model").
import t from 'tap';
import { rgbPixels, ShapesWorld } from '../ts/eval';
import { encodeImage } from '../ts/image';
import { loadModel, type Blip3oModel } from '../ts/index';
import { skipWithoutRuntime, skipWithoutWorld } from './fixtures/runtime';

const skip = skipWithoutRuntime || skipWithoutWorld;

// One of each kind and then some: positions, sizes, relations, counts, all three backgrounds.
const prompts = [
  'a large red circle at the center on a white background',
  'a small blue square at the top left on a black background',
  'a large yellow triangle at the bottom right on a gray background',
  'a small green circle at the right on a black background',
  'a large purple square at the bottom on a white background',
  'a small orange triangle at the top on a gray background',
  'a red square to the left of a blue circle on a white background',
  'a green triangle above a yellow square on a black background',
  'two blue circles on a white background',
  'three red squares on a gray background',
];

t.test('the bundled model', { skip }, async (t) => {
  const model: Blip3oModel = await loadModel();
  const world = ShapesWorld.start();
  t.teardown(async () => {
    await world.close();
    await model.dispose();
  });

  t.test('generates judge-passing images for fixed prompts and seeds', async (t) => {
    const images = await model.generate(prompts, { seed: 1 });
    const verdicts = [];
    for (const [i, image] of images.entries()) {
      verdicts.push({ prompt: prompts[i], ...(await world.judge(prompts[i], await rgbPixels(image.image))) });
    }
    const failed = verdicts.filter((v) => !v.pass);
    t.same(failed, [], 'every image shows its caption');
  });

  t.test('describes and answers questions about rendered scenes', async (t) => {
    const scenes = await world.scenes(6, 4242);
    for (const scene of scenes) {
      const png = await encodeImage(Buffer.from(scene.pixels, 'base64'), 64, 64, 'png');
      t.equal((await model.describe(png)).trim(), scene.caption, `caption of ${scene.caption}`);
      for (const [question, answer] of scene.qa) {
        t.equal((await model.describe(png, question)).trim(), answer, `${question} (${scene.caption})`);
      }
    }
  });
});
