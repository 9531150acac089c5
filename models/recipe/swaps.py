"""Does a generation stage's DiT use each word of a position? Its flow-matching loss on the features of
single-object scenes at a corner, conditioned on the true caption, on the caption with left and right
swapped, and with top and bottom swapped, at a few noise levels (same noise for all three). A word the DiT
reads raises the loss when swapped; one it ignores does not.

    bash models/run-python.sh -m models.recipe.swaps [stage]      # default: the bundled DiT's stage
"""
import sys

import numpy as np
import torch

from .. import shapes
from ..presets import get_preset
from . import data
from .features import load_encoder
from .generation import bundled_stage, condition, load_generation, velocity_loss

CORNERS = ("top left", "top right", "bottom left", "bottom right")


def swapped(caption: str, a: str, b: str) -> str:
    return caption.replace(a, "\0").replace(b, a).replace("\0", b)


@torch.no_grad()
def losses(stage: str, n: int = 64, sigmas=(0.3, 0.5, 0.7, 0.9), seed: int = 3) -> dict:
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    enc = load_encoder()
    backbone, dit = load_generation(p, stage)
    rng = np.random.default_rng(seed)
    ss = []
    while len(ss) < n:
        s = shapes.sample_scene(rng, "single", False)
        if s.position in CORNERS:
            ss.append(s)
    captions = {"true": [s.caption for s in ss],
                "left <-> right": [swapped(s.caption, "left", "right") for s in ss],
                "top <-> bottom": [swapped(s.caption, "top", "bottom") for s in ss]}
    x0 = enc(data.to_tensor([shapes.render(s, antialias=False) for s in ss]))
    conds = {k: condition(backbone, [data.generation_ids(tok, c) for c in v]) for k, v in captions.items()}
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in captions}
    for sigma in sigmas:
        noise = torch.randn(x0.shape, generator=g)
        for k, c in conds.items():
            out[k].append(float(velocity_loss(dit, x0, torch.full((n, 1, 1), sigma), noise, c)))
    return {"sigmas": list(sigmas), **out}


def main() -> None:
    torch.set_num_threads(1)
    r = losses(sys.argv[1] if len(sys.argv) > 1 else bundled_stage())
    print("caption          " + " ".join(f"sigma {s:.1f}" for s in r["sigmas"]))
    for k in ("true", "left <-> right", "top <-> bottom"):
        print(f"{k:16s} " + " ".join(f"{x:9.4f}" for x in r[k]))


if __name__ == "__main__":
    main()
