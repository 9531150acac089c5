"""Stage 7, questions: the LM trained once more on questions about images, after the generation stages, with
a distillation term that holds the query states of generation prompts where the frozen LM had them.

The LM is frozen for generation (BLIP3-o freezes its backbone), and with it frozen only the vision tower
could still learn which colour goes with which shape in a pair, which it stopped learning (a `vision3`
stage did not move it). The DiT reads only the last-layer states of the 64 queries after a generation
prompt, so this stage trains the whole LM on image questions while a mean squared error, in the
standardised units the DiT reads them in, keeps those states where the DiT learned them: the generation
stages need not run again."""
import copy

import numpy as np
import torch

from ..presets import get_preset
from . import common, data
from . import understanding as U
from .generation import Conditions, bundled_stage, condition

KINDS = ["single", "pair", "pair", "pair", "count"]  # pairs are where questions failed


def train(steps: int = 1000, batch_size: int = 48, distill_rows: int = 16, weight: float = 10.0, lr: float = 2e-4,
          seed: int = 21) -> None:
    log = common.Log("questions")
    common.seed_everything(seed)
    rng = np.random.default_rng(seed)
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    pad_id, k = tok.vocab["<|image_pad|>"], U.image_tokens(p)
    backbone = U.load_backbone(p)
    generation = common.load(bundled_stage())
    backbone.queries.data.copy_(generation["queries"])
    sd = generation["sd"]
    teacher = Conditions(copy.deepcopy(backbone), tok)  # the frozen LM's query states, each caption once
    params = [q for n, q in backbone.named_parameters() if not n.startswith("visual.") and n != "queries"]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(steps):
        common.set_lr(opt, common.lr_at(step, steps, lr, warmup=100))
        _, images, qas = U.sample_tasks(rng, batch_size, 0.25, KINDS)
        with torch.no_grad():  # the vision tower stays as vision2 left it
            vis = U.visual(backbone, U.pixels(images))
        losses = {"image": U.lm_loss(backbone, [data.understanding_ids(tok, k, q, a) for q, a in qas], vis, pad_id)}
        captions = [s.caption for s in data.scenes(rng, distill_rows)]
        states = condition(backbone, [data.generation_ids(tok, c) for c in captions])
        losses["states"] = weight * (((states - teacher.get(captions)) / sd) ** 2).mean()
        common.step(opt, sum(losses.values()), params)
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step} " + " ".join(f"{n} {v.item():.5f}" for n, v in losses.items()))
        if step % 300 == 299 or step == steps - 1:
            log("greedy on fresh scenes: " + " ".join(f"{n} {v:.3f}" for n, v in U.evaluate(backbone, tok, p).items()))
    state = backbone.state_dict()
    del state["queries"]  # the generation stage's, unchanged: the bundle takes them from there
    common.save("questions", {"backbone": state})
