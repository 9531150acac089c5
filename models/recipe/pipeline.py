"""The tiny bundle's sampler settings, and trained (eager) modules dressed as a bundle so that the
benchmark's Python reference pipeline (bench/reference.py) samples them: training checks its images with
the judge through the very loops the runtime is compared against."""
import copy
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from bench import reference
from .. import shapes
from ..export import SAMPLER
from ..presets import Preset

# The decoder predicts the clean image ("sample", which trained where epsilon did not: shared/TRAINING.md)
# and needs no guidance: the features already say everything. The DiT keeps BLIP3-o's guidance.
TINY_SAMPLER = copy.deepcopy(SAMPLER)
TINY_SAMPLER["dit"].update({"steps": 20, "cfg": 3.0, "shift": 1.0, "eta": 0.8})
TINY_SAMPLER["decoder"].update({"steps": 10, "cfg": 1.0, "predictionType": "sample"})


class EagerBundle:
    """What bench.reference needs of a bundle, from modules in memory."""

    def __init__(self, p: Preset, modules: Dict[str, nn.Module], sampler: Optional[dict] = None):
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.manifest = {"clip": {"tokens": p.dit.tokens, "width": p.dit.channels},
                         "latent": dict(zip(("channels", "height", "width"), p.latent)),
                         "vae": {"scalingFactor": p.vae.scaling_factor},
                         "sampler": copy.deepcopy(sampler or TINY_SAMPLER)}
        self.backbone, self.dit = modules.get("backbone"), modules.get("dit")
        self.decoder, self.vae = modules["decoder"], modules["vae"]
        self.negative: Dict = {}

    def sync(self) -> None:
        pass


@torch.inference_mode()
def decode(b: EagerBundle, feats: torch.Tensor, seed: int) -> np.ndarray:
    """Pixels drawn by the decoder from given features [1, T, C] (no negative: guidance 1)."""
    g = torch.Generator().manual_seed(seed)
    return reference.decode(b, feats, None, g, None, 1.0, reference.new_timings())


@torch.inference_mode()
def generate(b: EagerBundle, ids: List[int], seed: int) -> np.ndarray:
    """reference.generate at the bundle's settings (the tiny decoder's guidance 1 needs no negative ids)."""
    return reference.generate(b, ids, [], seed)[0]


def accuracy(results: List[dict]) -> Dict[str, float]:
    """Judge pass rate per kind and overall."""
    out = {}
    for kind in shapes.KINDS:
        r = [x["pass"] for x in results if x["kind"] == kind]
        if r:
            out[kind] = float(np.mean(r))
    out["overall"] = float(np.mean([x["pass"] for x in results]))
    return out


def fmt(acc: Dict[str, float]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in acc.items())
