"""Where along the noise levels does a generation stage's DiT do well? Its flow-matching loss on the
features of fresh scenes of each kind, with their true captions, at fixed noise levels (the same scenes and
noise for every stage): high levels decide the layout, low ones an object's shape.

    bash models/run-python.sh -m models.recipe.noise_levels [stage ...]   # default: the bundled DiT's stage
"""
import sys

import numpy as np
import torch

from .. import shapes
from ..presets import get_preset
from . import data
from .features import load_encoder
from .generation import bundled_stage, condition, load_generation, velocity_loss

SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.97)


@torch.no_grad()
def losses(stage: str, n: int = 96, seed: int = 11) -> dict:
    """{kind: [loss at each of SIGMAS]}."""
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    enc = load_encoder()
    backbone, dit = load_generation(p, stage)
    out = {}
    for kind in shapes.KINDS:
        rng = np.random.default_rng(seed)
        ss = [shapes.sample_scene(rng, kind, False) for _ in range(n)]
        x0 = enc(data.to_tensor([shapes.render(s, antialias=False) for s in ss]))
        cond = condition(backbone, [data.generation_ids(tok, s.caption) for s in ss])
        g = torch.Generator().manual_seed(seed)
        out[kind] = [float(velocity_loss(dit, x0, torch.full((n, 1, 1), sigma), torch.randn(x0.shape, generator=g), cond))
                     for sigma in SIGMAS]
    return out


def main() -> None:
    torch.set_num_threads(1)
    print("stage        kind    " + " ".join(f"sigma {s:<4}" for s in SIGMAS))
    for stage in sys.argv[1:] or [bundled_stage()]:
        for kind, row in losses(stage).items():
            print(f"{stage:12s} {kind:7s} " + " ".join(f"{x:10.4f}" for x in row), flush=True)


if __name__ == "__main__":
    main()
