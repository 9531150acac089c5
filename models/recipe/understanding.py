"""Stage 2, understanding: the backbone (vision tower + LM) learns to caption scenes and answer the
questions of the shapes world, in the understanding template the runtime uses. BLIP3-o starts from a
trained Qwen2.5-VL and freezes it; ours is trained here first (understanding, then ground), then frozen for
every later stage until the last, questions (questions.py)."""
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import shapes
from ..backbone import Backbone
from ..presets import CLIP_MEAN, CLIP_STD, TEMPLATES, Preset, get_preset
from . import common, data

PAD = 257  # <|endoftext|>
IM_END = 258


def image_tokens(p: Preset) -> int:
    return (p.image[0] // (p.vision.patch * p.vision.merge)) * (p.image[1] // (p.vision.patch * p.vision.merge))


def visual(backbone: Backbone, images: Tensor) -> Tensor:
    """[N, 3, H, W] normalised -> image tokens [N, k, H]."""
    vis = backbone.visual(images)
    return vis.unsqueeze(0) if images.shape[0] == 1 else vis


def embed(backbone: Backbone, ids: Tensor, vis: Tensor, pad_id: int) -> Tensor:
    """Token embeddings with each image's tokens vis [N, k, H] spliced in at its <|image_pad|> positions
    (as the runtime does)."""
    x = backbone.embed_tokens(ids)
    return x.masked_scatter((ids == pad_id).unsqueeze(-1), vis.to(x.dtype))


def logits(backbone: Backbone, x: Tensor) -> Tensor:
    L = x.shape[1]
    h = backbone._run(x, torch.arange(L), torch.ones(L, L, dtype=torch.bool).tril(), None, None)
    return backbone.lm_head(h)


def init_weights(backbone: Backbone) -> None:
    """Qwen2's initialisation: normal(0, 0.02) weights, zero biases (PyTorch's default N(0, 1) embedding,
    tied to the LM head, starts with logits in the tens)."""
    for m in backbone.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)


def pick_question(rng: np.random.Generator, s: shapes.Scene, caption_share: float) -> Tuple[str, str]:
    """The default question (-> the canonical caption) with probability caption_share, else one of the
    scene's questions."""
    if rng.random() < caption_share:
        return TEMPLATES["defaultQuestion"], s.caption
    return s.qa[int(rng.integers(len(s.qa)))]


def sample_tasks(rng: np.random.Generator, n: int, caption_share: float = 0.4, kinds: Optional[List[str]] = None):
    """n scenes, each rendered with or without anti-aliasing, and a question about each: (scenes, images,
    question-answer pairs)."""
    ss, images, qas = data.scenes(rng, n, kinds), [], []
    for s in ss:
        images.append(shapes.render(s, antialias=bool(rng.integers(2))))
        qas.append(pick_question(rng, s, caption_share))
    return ss, images, qas


def pixels(images: List[np.ndarray]) -> Tensor:
    """HWC uint8 -> [N, 3, H, W] normalised as the runtime's image loader does: (x / 255 - mean) / std."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


class CellHeads(torch.nn.Module):
    """Training-only linear read-outs of each merged image token: the colour and shape of the object over
    each of the 2 x 2 feature cells it covers. Dense targets teach the vision tower shape far faster than a
    few caption tokens do (it answered "what shape is it?" near chance after the first stage)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, 4 * (len(data.COLOR_IDS) + 1 + len(data.SHAPE_IDS) + 1))

    def loss(self, tokens: Tensor, ss: List[shapes.Scene]) -> Tensor:
        t = data.target_batch(ss)  # per cell, row-major [N, 64]
        N, g = tokens.shape[0], data.GRID // 2
        out = self.proj(tokens).view(N, g, g, 2, 2, -1)  # merged token (row, col), its cell (row, col)
        n_col = len(data.COLOR_IDS) + 1
        loss = tokens.new_zeros(())
        for key, sl in (("color", slice(0, n_col)), ("shape", slice(n_col, None))):
            target = t[key].view(N, g, 2, g, 2).permute(0, 1, 3, 2, 4)
            loss = loss + F.cross_entropy(out[..., sl].flatten(0, 4), target.flatten())
        return loss


def lm_loss(backbone: Backbone, seqs: List[Tuple[List[int], int]], vis: Optional[Tensor], pad_id: int) -> Tensor:
    """Next-token loss on what follows each sequence's prompt (images spliced in at <|image_pad|>)."""
    L = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), L), PAD, dtype=torch.int64)
    target = torch.full((len(seqs), L), -100, dtype=torch.int64)
    for i, (s, start) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        target[i, start - 1:len(s) - 1] = torch.tensor(s[start:])
    x = backbone.embed_tokens(ids) if vis is None else embed(backbone, ids, vis, pad_id)
    return F.cross_entropy(logits(backbone, x).flatten(0, 1), target.flatten(), ignore_index=-100)


def train(stage: str = "understanding", steps: int = 2000, batch_size: int = 48, seed: int = 2, lr: float = 1e-3,
          start: Optional[str] = None, caption_share: float = 0.4, text_rows: int = 0, cells: float = 0.0,
          vision_only: bool = False, kinds: Optional[List[str]] = None) -> None:
    """Captions and questions on rendered scenes. A continuing stage may add `text_rows` rows per step of
    questions about a generation prompt's caption (no image) and the dense `cells` loss on image tokens,
    train the vision tower alone (`vision_only`: the LM, and so every generation prompt's query states,
    stay as they were), and draw scene kinds from `kinds` (repeats weight them)."""
    log = common.Log(stage)
    common.seed_everything(seed)
    rng = np.random.default_rng(seed)
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    pad_id, k = tok.vocab["<|image_pad|>"], image_tokens(p)
    backbone = Backbone(p.backbone, p.vision)
    state = common.load(start) if start else {}
    if start:
        backbone.load_state_dict(state["backbone"])
    else:
        init_weights(backbone)
    heads = CellHeads(p.backbone.hidden) if cells else None
    if heads and "cell_heads" in state:
        heads.load_state_dict(state["cell_heads"])
    trained = backbone.visual if vision_only else backbone
    params = [q for n, q in trained.named_parameters() if n != "queries"] + (list(heads.parameters()) if heads else [])
    backbone.requires_grad_(False)
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(steps):
        common.set_lr(opt, common.lr_at(step, steps, lr, warmup=100 if start else 200))
        ss, images, qas = sample_tasks(rng, batch_size, caption_share, kinds)
        vis = visual(backbone, pixels(images))
        seqs = [data.understanding_ids(tok, k, q, a) for q, a in qas]
        losses = {"image": lm_loss(backbone, seqs, vis, pad_id)}
        if heads:
            losses["cells"] = cells * heads.loss(vis, ss)
        if text_rows:
            seqs = [data.follow_up_ids(tok, s.caption, *pick_question(rng, s, caption_share))
                    for s in data.scenes(rng, text_rows)]
            losses["text"] = lm_loss(backbone, seqs, None, pad_id)
        common.step(opt, sum(losses.values()), params)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} " + " ".join(f"{n} {v.item():.4f}" for n, v in losses.items()))
        if step % 500 == 499 or step == steps - 1:
            log("greedy on fresh scenes: " + " ".join(f"{k} {v:.3f}" for k, v in evaluate(backbone, tok, p).items()))
    common.save(stage, {"backbone": backbone.state_dict(), **({"cell_heads": heads.state_dict()} if heads else {})})


def ground(steps: int = 2000) -> None:
    """Understanding continued from its checkpoint, with dense cell targets for the vision tower and
    questions about generation prompts (the LM must carry a prompt's content in its states, which is what
    the query tokens will read), more captions, at half the rate."""
    train("ground", steps=steps, seed=7, lr=5e-4, start="understanding", caption_share=0.5, text_rows=8, cells=1.0)


def vision(steps: int = 4000) -> None:
    """The vision tower trained on from ground, alone, with pairs drawn twice as often: understanding fails
    mostly at binding each colour to its shape in pairs. The LM is frozen, so the generation stages, which
    read only the LM, are unaffected."""
    train("vision", steps=steps, seed=8, lr=5e-4, start="ground", caption_share=0.5, cells=1.0, vision_only=True,
          kinds=["single", "pair", "pair", "count"])


def vision2(steps: int = 3000) -> None:
    """The vision tower once more, from vision, at half its rate, on pairs three times as often and a
    question three times in four: colour questions about pairs ("what color is the square?" answered with
    the other object's colour) were the one kind of question still failing."""
    train("vision2", steps=steps, seed=9, lr=2.5e-4, start="vision", caption_share=0.25, cells=1.0, vision_only=True,
          kinds=["single", "pair", "pair", "pair", "count"])


@torch.no_grad()
def answer(backbone: Backbone, tok, p: Preset, images: Optional[List[np.ndarray]], questions: List[str],
           max_tokens: int = 20, captions: Optional[List[str]] = None) -> List[str]:
    """Greedy answers about images, or (captions given) follow-up answers about generation prompts; prompts
    of one length batched together (no cache: a check, not the runtime)."""
    k, pad_id = image_tokens(p), tok.vocab["<|image_pad|>"]
    if captions is None:
        prompts = [data.understanding_prompt(tok, k, q) for q in questions]
    else:
        prompts = [data.follow_up_prompt(tok, c, q) for c, q in zip(captions, questions)]
    outs: List[str] = [""] * len(prompts)
    for _, rows in sorted(data.by_length(prompts).items()):
        ids = torch.tensor([prompts[i] for i in rows])
        x = backbone.embed_tokens(ids) if images is None else embed(backbone, ids, visual(backbone, pixels([images[i] for i in rows])), pad_id)
        gen = torch.zeros(len(rows), 0, dtype=torch.int64)
        for _ in range(max_tokens):
            nxt = logits(backbone, x)[:, -1].argmax(-1)
            gen = torch.cat([gen, nxt[:, None]], 1)
            if bool(((gen == PAD) | (gen == IM_END)).any(1).all()):
                break
            x = torch.cat([x, backbone.embed_tokens(nxt[:, None])], 1)
        for j, i in enumerate(rows):
            ids = gen[j].tolist()
            stop = [n for n, t in enumerate(ids) if t in (PAD, IM_END)]
            outs[i] = tok.decode(ids[:stop[0]] if stop else ids)
    return outs


def evaluate(backbone: Backbone, tok, p: Preset, n: int = 48, seed: int = 12345) -> dict:
    backbone.eval()
    rng = np.random.default_rng(seed)
    ss = [shapes.sample_scene(rng, shapes.KINDS[i % 3], None) for i in range(n)]
    imgs = [shapes.render(s) for s in ss]
    caps = answer(backbone, tok, p, imgs, [TEMPLATES["defaultQuestion"]] * n)
    qs = [s.qa[i % len(s.qa)] for i, s in enumerate(ss)]
    ans = answer(backbone, tok, p, imgs, [q for q, _ in qs])
    follow = answer(backbone, tok, p, None, [q for q, _ in qs], captions=[s.caption for s in ss])
    backbone.train()
    return {"caption exact": float(np.mean([c == s.caption for c, s in zip(caps, ss)])),
            "question": float(np.mean([a == t for a, (_, t) in zip(ans, qs)])),
            "follow-up": float(np.mean([a == t for a, (_, t) in zip(follow, qs)]))}


# The stages whose LM the generation stages read (bit for bit the same LM), latest first.
FROZEN_LM = ("vision2", "vision", "ground", "understanding")


def load_backbone(p: Preset, stage: Optional[str] = None) -> Backbone:
    """A backbone stage's weights, by default the latest one whose LM the generation stages read. A
    checkpoint without queries (questions) leaves them as initialised: they come from a generation stage."""
    backbone = Backbone(p.backbone, p.vision)
    state = common.load(stage or common.latest(*FROZEN_LM))["backbone"]
    backbone.load_state_dict({"queries": backbone.queries.detach(), **state})
    return backbone.eval().requires_grad_(False)
