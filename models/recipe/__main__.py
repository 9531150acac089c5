"""Trains the bundled tiny BLIP3-o on the shapes world, BLIP3-o's recipe in order, and writes the bundle.

    bash models/run-python.sh -m models.recipe all [--out models/tiny]     # from nothing, fixed seeds
    bash models/run-python.sh -m models.recipe decoder generation          # some stages, in this order

Stages (each writes models/recipe/checkpoints/<stage>.pt and starts from the committed checkpoints of the
ones before it):
    features       the "CLIP" encoder whose 8 x 8 patch features the DiT generates
    understanding  backbone (vision tower + LM) on captions and questions
    ground         the same continued, with dense cell targets for the vision tower and questions about
                   generation prompts; the backbone is frozen from here on
    decoder        UNet drawing images from features
    refine         the decoder trained further at a lower rate
    generation     the 64 query tokens + DiT, flow matching onto the features of the caption's image
    instruct       the same on a fixed curated set of hard scenes (pairs, counts)
    bundle         the trained components, exported as a bundle to --out
"""
import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

# stage -> (module, function), in recipe order; imported when the stage runs (each pulls in torch models)
TRAINERS = {"features": ("features", "train"), "understanding": ("understanding", "train"), "ground": ("understanding", "ground"),
            "decoder": ("decoder", "train"), "refine": ("decoder", "refine"),
            "generation": ("generation", "train"), "instruct": ("generation", "instruct")}
STAGES = tuple(TRAINERS) + ("bundle",)


def run(stage: str, out: Path) -> None:
    if stage == "bundle":
        from .bundle import build
        m = build(out)
        print(f"wrote {out} ({m['name']})", flush=True)
        return
    module, function = TRAINERS[stage]
    getattr(importlib.import_module(f".{module}", __package__), function)()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m models.recipe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("stages", nargs="+", choices=STAGES + ("all",))
    ap.add_argument("--out", type=Path, default=Path("models/tiny"), help="bundle directory (stage bundle)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    stages = STAGES if "all" in a.stages else [s for s in STAGES if s in a.stages]
    for stage in stages:
        start = time.time()
        run(stage, a.out)
        print(f"== stage {stage} took {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":  # byte-identical TorchScript files (see models/export.py)
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "models.recipe"] + sys.argv[1:])
    main()
