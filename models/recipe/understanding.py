"""Stage 2, understanding: the backbone (vision tower + LM) learns to caption scenes and answer the
questions of the shapes world, in the understanding template the runtime uses. BLIP3-o starts from a
trained Qwen2.5-VL and freezes it; ours is trained here first, then frozen for every later stage."""
from typing import List, Tuple

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


def embed(backbone: Backbone, ids: Tensor, images: Tensor, pad_id: int) -> Tensor:
    """Token embeddings with each image's tokens spliced in at its <|image_pad|> positions (as the runtime
    does); images [N, 3, H, W] normalised."""
    x = backbone.embed_tokens(ids)
    vis = backbone.visual(images)
    if images.shape[0] == 1:
        vis = vis.unsqueeze(0)  # [N, k, H]
    mask = (ids == pad_id).unsqueeze(-1)
    return x.masked_scatter(mask, vis.to(x.dtype))


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


def sample_tasks(rng: np.random.Generator, n: int) -> Tuple[List[np.ndarray], List[Tuple[str, str]]]:
    """n scenes, each rendered with or without anti-aliasing, with the default question (-> the canonical
    caption) two times in five, else one of its questions."""
    images, qas = [], []
    for s in data.scenes(rng, n):
        images.append(shapes.render(s, antialias=bool(rng.integers(2))))
        if rng.random() < 0.4:
            qas.append((TEMPLATES["defaultQuestion"], s.caption))
        else:
            qas.append(s.qa[int(rng.integers(len(s.qa)))])
    return images, qas


def pixels(images: List[np.ndarray]) -> Tensor:
    """HWC uint8 -> [N, 3, H, W] normalised as the runtime's image loader does: (x / 255 - mean) / std."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def train(steps: int = 2000, batch_size: int = 48, seed: int = 2) -> None:
    log = common.Log("understanding")
    common.seed_everything(seed)
    rng = np.random.default_rng(seed)
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    pad_id, k = tok.vocab["<|image_pad|>"], image_tokens(p)
    backbone = Backbone(p.backbone, p.vision)
    init_weights(backbone)
    params = [q for n, q in backbone.named_parameters() if n != "queries"]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for step in range(steps):
        common.set_lr(opt, common.lr_at(step, steps, 1e-3, warmup=200))
        images, qas = sample_tasks(rng, batch_size)
        seqs = [data.understanding_ids(tok, k, q, a) for q, a in qas]
        L = max(len(s) for s, _ in seqs)
        ids = torch.full((batch_size, L), PAD, dtype=torch.int64)
        target = torch.full((batch_size, L), -100, dtype=torch.int64)
        for i, (s, start) in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            target[i, start - 1:len(s) - 1] = torch.tensor(s[start:])
        out = logits(backbone, embed(backbone, ids, pixels(images), pad_id))
        loss = F.cross_entropy(out.flatten(0, 1), target.flatten(), ignore_index=-100)
        common.step(opt, loss, params)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f}")
        if step % 500 == 499 or step == steps - 1:
            log("greedy on fresh scenes: " + " ".join(f"{k} {v:.3f}" for k, v in evaluate(backbone, tok, p).items()))
    common.save("understanding", {"backbone": backbone.state_dict()})


@torch.no_grad()
def answer(backbone: Backbone, tok, p: Preset, images: List[np.ndarray], questions: List[str],
           max_tokens: int = 20) -> List[str]:
    """Greedy answers, prompts of one length batched together (no cache: a check, not the runtime)."""
    k, pad_id = image_tokens(p), tok.vocab["<|image_pad|>"]
    prompts = [tok.encode(TEMPLATES["understanding"].format(image="<|image_pad|>" * k, question=q)) for q in questions]
    outs: List[str] = [""] * len(prompts)
    for _, rows in sorted(data.by_length(prompts).items()):
        x = embed(backbone, torch.tensor([prompts[i] for i in rows]), pixels([images[i] for i in rows]), pad_id)
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
    backbone.train()
    return {"caption exact": float(np.mean([c == s.caption for c, s in zip(caps, ss)])),
            "question": float(np.mean([a == t for a, (_, t) in zip(ans, qs)]))}


def load_backbone(p: Preset) -> Backbone:
    backbone = Backbone(p.backbone, p.vision)
    backbone.load_state_dict(common.load("understanding")["backbone"])
    return backbone.eval().requires_grad_(False)
