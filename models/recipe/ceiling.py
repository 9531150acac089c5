"""The decoder's ceiling: judge accuracy of the images a decoder stage draws from real scenes' features
(the encoder's, not the DiT's), the best the full pipeline could reach with it.

    bash models/run-python.sh -m models.recipe.ceiling [stage ...]    # default: the bundled decoder's stage
"""
import argparse

import torch

from ..presets import get_preset
from . import common, pipeline
from .decoder import DECODER_STAGES, ceiling, load_unet
from .features import load_encoder


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m models.recipe.ceiling", description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="*", default=[common.latest(*DECODER_STAGES)])
    ap.add_argument("--n", type=int, default=300, help="scenes, kinds in turn (default 300)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    p, enc = get_preset("tiny"), load_encoder()
    for stage in a.stages:
        print(f"{stage:8s} " + pipeline.fmt(ceiling(enc, load_unet(p, stage), p, n=a.n)), flush=True)


if __name__ == "__main__":
    main()
