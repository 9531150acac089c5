"""Trains the bundled tiny BLIP3-o on the shapes world, BLIP3-o's recipe in order, and writes the bundle.

    bash models/run-python.sh -m models.recipe all [--out models/tiny]     # from nothing, fixed seeds
    bash models/run-python.sh -m models.recipe decoder generation          # some stages, in this order

`all` runs features, then two lanes side by side, each stage a process of one thread: understanding, ground,
the generation stages (generation, generation2, generation3, generation4, instruct, layout), which read only the
frozen LM, and questions; and decoder, refine, vision, vision2 (the vision tower alone, the LM frozen), refine2
and refine3. vision waits for ground, questions for vision2. Then the bundle.

Stages (each writes models/recipe/checkpoints/<stage>.pt and starts from the committed checkpoints of the
ones before it):
    features       the "CLIP" encoder whose 8 x 8 patch features the DiT generates
    understanding  backbone (vision tower + LM) on captions and questions
    ground         the same continued, with dense cell targets for the vision tower and questions about
                   generation prompts; the LM is frozen from here on, until questions
    vision         the vision tower alone trained further, more pairs
    vision2        and once more, at half the rate, mostly questions about pairs
    decoder        UNet drawing images from features
    refine         the decoder trained further at a lower rate
    refine2        and once more at half that rate
    refine3        and a fourth time, a little slower again
    generation     the 64 query tokens + DiT, flow matching onto the features of the caption's image
    generation2    the same continued at half the rate
    generation3    and continued once more
    generation4    and once more at a lower rate
    instruct       the same on a fixed curated set of hard scenes (pairs, counts)
    layout         the same on all kinds at high noise levels, where the layout is decided
    questions      the LM on image questions, the query states of generation prompts held in place
    bundle         the trained components, exported as a bundle to --out
"""
import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# stage -> (module, function), in recipe order; imported when the stage runs (each pulls in torch models)
TRAINERS = {"features": ("features", "train"), "understanding": ("understanding", "train"), "ground": ("understanding", "ground"),
            "vision": ("understanding", "vision"), "vision2": ("understanding", "vision2"),
            "decoder": ("decoder", "train"), "refine": ("decoder", "refine"), "refine2": ("decoder", "refine2"), "refine3": ("decoder", "refine3"),
            "generation": ("generation", "train"),
            "generation2": ("generation", "more"), "generation3": ("generation", "more3"),
            "generation4": ("generation", "anneal"), "instruct": ("generation", "instruct"),
            "layout": ("generation", "layout"), "questions": ("questions", "train")}
STAGES = tuple(TRAINERS) + ("bundle",)
# Stages that `all` runs side by side after features, in two lanes, each stage a process of one thread. The
# generation stages read the LM, which the vision stages leave bit for bit as `ground` wrote it, and only
# their judge checks draw with whichever decoder checkpoint exists at the time. On this 2-core machine one
# thread per process is the faster setting anyway (a DiT training step: 0.66 s at one thread, 1.0-1.2 s at
# two), so two lanes take about the time of the longer one.
LANES = (("understanding", "ground", "generation", "generation2", "generation3", "generation4", "instruct", "layout",
          "questions"),
         ("decoder", "refine", "vision", "vision2", "refine2", "refine3"))
# What a stage needs from the other lane, waited for: vision trains on from ground's backbone, questions
# from vision2's (both are done long before, in the stage times of the README).
NEEDS = {"vision": ("ground",), "questions": ("vision2",)}


def run(stage: str, out: Path) -> None:
    if stage == "bundle":
        from .bundle import build
        m = build(out)
        print(f"wrote {out} ({m['name']})", flush=True)
        return
    module, function = TRAINERS[stage]
    getattr(importlib.import_module(f".{module}", __package__), function)()


def run_lanes(lanes, out: Path, needs=NEEDS) -> None:
    """Each lane's stages in order, each in a child process of one thread; a stage that needs one of
    another lane starts once that one has finished in this run. Raises if a stage fails (the running ones
    are stopped: a half-run recipe must not go on to stages that need its output)."""
    planned = {s for lane in lanes for s in lane}
    done, running, next_of = set(), {}, [0] * len(lanes)
    try:
        while True:
            for i, (stage, proc) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                if code != 0:
                    raise SystemExit(f"recipe: stage {stage} failed (exit {code})")
                done.add(stage)
                del running[i]
                next_of[i] += 1
            for i, lane in enumerate(lanes):
                if i in running or next_of[i] == len(lane):
                    continue
                stage = lane[next_of[i]]
                if all(n in done or n not in planned for n in needs.get(stage, ())):
                    running[i] = (stage, subprocess.Popen([sys.executable, "-m", "models.recipe", stage, "--out", str(out),
                                                           "--threads", "1"]))
            if not running:
                if all(n == len(lane) for n, lane in zip(next_of, lanes)):
                    return
                raise SystemExit("recipe: the lanes wait on each other")
            time.sleep(5)
    finally:
        for _, proc in running.values():
            if proc.poll() is None:
                proc.terminate()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m models.recipe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("stages", nargs="+", choices=STAGES + ("all",))
    ap.add_argument("--out", type=Path, default=Path("models/tiny"), help="bundle directory (stage bundle)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see LANES)")
    a = ap.parse_args()
    # Read at startup, so set it and start again: byte-identical TorchScript files (models/export.py).
    env = {"PYTHONHASHSEED": "0"}
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
        os.execv(sys.executable, [sys.executable, "-m", "models.recipe"] + sys.argv[1:])
    torch.set_num_threads(a.threads)
    laned = [s for lane in LANES for s in lane] if "all" in a.stages else []
    stages = [s for s in STAGES if ("all" in a.stages or s in a.stages) and s not in laned]
    for stage in stages:
        start = time.time()
        run(stage, a.out)
        print(f"== stage {stage} took {(time.time() - start) / 60:.1f} min", flush=True)
        if stage == "features" and laned:
            run_lanes(LANES, a.out)
            print(f"== stages {', '.join(laned)} took {(time.time() - start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
