"""Last step: the trained components, as a bundle (the default one, models/tiny)."""
from pathlib import Path

from ..export import export
from ..presets import get_preset
from ..vae import build_vae
from . import common, pipeline
from .decoder import load_unet
from .generation import bundled_stage, load_generation
from .understanding import FROZEN_LM

NAME = "blip3o-tiny-shapes"


def build(out: Path) -> dict:
    """The queries and DiT come from the last generation stage that ran (bundled_stage); the LM from the
    questions stage when it has run."""
    p = get_preset("tiny")
    backbone, dit = load_generation(p, bundled_stage(), common.latest("questions", *FROZEN_LM))
    modules = {"backbone": backbone, "dit": dit, "decoder": load_unet(p), "vae": build_vae(p.vae).eval()}
    return export(p, out, modules=modules, name=NAME, sampler=pipeline.TINY_SAMPLER)
