"""Stage 1, the "CLIP" encoder: 64 x 64 image -> 8 x 8 grid of 32-dim features, the space the DiT generates
and the decoder draws from (BLIP3-o uses EVA-CLIP's features).

Ours is trained as a dense semantic probe: from each cell's feature alone, linear heads must read the
background, the colour and shape of the object covering the cell, that object's bounding box, and how much
of each quarter of the cell is covered. So a feature says *what* is where (low entropy: one object's cells
agree), not how its pixels look, which is what makes features easy for a DiT to generate (shared/TRAINING.md).
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import shapes
from . import common, data

WIDTH = 32  # = the preset's clip width (DitConfig.channels)
HEAD_SIZES = {"bg": 3, "color": 7, "shape": 4, "box": 4, "quad": 4}


class FeatureEncoder(nn.Module):
    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.GELU(),  # 32 x 32
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.GELU(),  # 16 x 16
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.GELU())  # 8 x 8
        self.mix = nn.ModuleList([nn.Conv2d(128, 128, 3, padding=1) for _ in range(3)])  # objects span cells
        self.out = nn.Conv2d(128, width, 1)

    def forward(self, images: Tensor) -> Tensor:
        """[N, 3, 64, 64] in [-1, 1] -> [N, 64, width], each token layer-normalised (unit scale)."""
        x = self.stem(images)
        for conv in self.mix:
            x = x + F.gelu(conv(x))
        f = self.out(x).flatten(2).transpose(1, 2)  # row-major cells, as the DiT's grid
        return F.layer_norm(f, [f.shape[-1]])


class Heads(nn.Module):
    """Linear read-outs of a cell's feature (training only)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.proj = nn.Linear(width, sum(HEAD_SIZES.values()))

    def forward(self, f: Tensor):
        return dict(zip(HEAD_SIZES, self.proj(f).split(list(HEAD_SIZES.values()), -1)))


def losses(out, t) -> dict:
    has = t["has"].float()
    n = has.sum().clamp(min=1)
    return {
        "bg": F.cross_entropy(out["bg"].flatten(0, 1), t["bg"].flatten()),
        "color": F.cross_entropy(out["color"].flatten(0, 1), t["color"].flatten()),
        "shape": F.cross_entropy(out["shape"].flatten(0, 1), t["shape"].flatten()),
        "box": ((out["box"] - t["box"]).abs().sum(-1) * has).sum() / n * 4,
        "quad": (out["quad"] - t["quad"]).abs().mean() * 4,
    }


def batch(rng: np.random.Generator, n: int):
    ss = data.scenes(rng, n)
    return data.to_tensor([shapes.render(s, antialias=False) for s in ss]), data.target_batch(ss)


def train(steps: int = 1600, batch_size: int = 48, seed: int = 1) -> None:
    log = common.Log("features")
    common.seed_everything(seed)
    rng = np.random.default_rng(seed)
    enc, heads = FeatureEncoder(), Heads()
    opt = torch.optim.AdamW(list(enc.parameters()) + list(heads.parameters()), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        common.set_lr(opt, common.lr_at(step, steps, 2e-3))
        images, t = batch(rng, batch_size)
        ls = losses(heads(enc(images)), t)
        loss = sum(ls.values())
        common.step(opt, loss)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} " + " ".join(f"{k} {v.item():.3f}" for k, v in ls.items()))
    acc = evaluate(enc, heads, np.random.default_rng(seed + 1000))
    log("held-out cells: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    common.save("features", {"encoder": enc.state_dict(), "heads": heads.state_dict(), "accuracy": acc})


@torch.no_grad()
def evaluate(enc: FeatureEncoder, heads: Heads, rng: np.random.Generator, n: int = 256) -> dict:
    images, t = batch(rng, n)
    out = heads(enc(images))
    has = t["has"]
    acc = {k: (out[k].argmax(-1) == t[k]).float().mean().item() for k in ("bg", "color", "shape")}
    acc["object cells: color"] = (out["color"].argmax(-1) == t["color"])[has].float().mean().item()
    acc["object cells: shape"] = (out["shape"].argmax(-1) == t["shape"])[has].float().mean().item()
    acc["box error px"] = ((out["box"] - t["box"]).abs()[has].mean() * shapes.SIZE).item()
    return acc


def load_encoder() -> FeatureEncoder:
    enc = FeatureEncoder()
    enc.load_state_dict(common.load("features")["encoder"])
    return enc.eval().requires_grad_(False)
