"""Colour questions about pairs ("what color is the square?"), the question understanding failed most: per
backbone stage, how many of them on fresh pairs of training combinations it answers right, and how many
misses name the other object's colour.

    bash models/run-python.sh -m models.recipe.pair_colors [stage ...]    # default: vision2 questions
"""
import argparse

import numpy as np
import torch

from .. import shapes
from ..presets import get_preset
from . import data
from .understanding import answer, load_backbone


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m models.recipe.pair_colors", description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="*", default=["vision2", "questions"])
    ap.add_argument("--n", type=int, default=300, help="pair scenes (default 300)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    p = get_preset("tiny")
    tok = data.tokenizer(p.backbone.vocab, p.backbone.context)
    rng = np.random.default_rng(777)
    images, questions, expected, other = [], [], [], []
    for s in (shapes.sample_scene(rng, "pair", False) for _ in range(a.n)):
        for q, color in s.qa:
            if q.startswith("what color is the") and q != "what color is the background?":
                images.append(shapes.render(s))
                questions.append(q)
                expected.append(color)
                other.append(next(o.color for o in s.objects if o.shape not in q))
    for stage in a.stages:
        got = answer(load_backbone(p, stage), tok, p, images, questions)
        right = sum(g == e for g, e in zip(got, expected))
        swapped = sum(g == o != e for g, o, e in zip(got, other, expected))
        print(f"{stage:10s} {right}/{len(questions)} right; {swapped} of the misses name the other object's colour",
              flush=True)


if __name__ == "__main__":
    main()
