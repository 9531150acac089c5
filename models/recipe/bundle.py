"""Last step: the trained components, as a bundle (the default one, models/tiny)."""
from pathlib import Path

from ..export import export
from ..presets import get_preset
from ..vae import build_vae
from . import common, pipeline
from .decoder import load_unet
from .generation import GENERATION_STAGES, load_dit
from .understanding import load_backbone

NAME = "blip3o-tiny-shapes"


def build(out: Path) -> dict:
    """The queries and DiT come from the last generation stage that ran: instruct, else the latest of
    GENERATION_STAGES."""
    p = get_preset("tiny")
    backbone = load_backbone(p)
    dit, queries = load_dit(p, common.latest("instruct", *GENERATION_STAGES))
    backbone.queries.data.copy_(queries)
    modules = {"backbone": backbone, "dit": dit, "decoder": load_unet(p), "vae": build_vae(p.vae).eval()}
    return export(p, out, modules=modules, name=NAME, sampler=pipeline.TINY_SAMPLER)
