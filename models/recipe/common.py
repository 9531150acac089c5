"""What every stage shares: seeds, the learning-rate schedule, logging, and the committed checkpoints that
let a stage start from the output of the one before it."""
import math
import time
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)


def step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: Optional[Iterable[torch.Tensor]] = None) -> None:
    """One optimiser step on `loss`; gradients of `clip` (when given) clipped to norm 1 first."""
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


class Log:
    """Prints `[stage mm:ss] message`, flushed, so that a background run's log file can be followed."""

    def __init__(self, stage: str):
        self.stage, self.start = stage, time.time()

    def minutes(self) -> float:
        return (time.time() - self.start) / 60

    def __call__(self, msg: str) -> None:
        s = int(time.time() - self.start)
        print(f"[{self.stage} {s // 60:3d}:{s % 60:02d}] {msg}", flush=True)


def save(name: str, state: Dict) -> Path:
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    path = CHECKPOINTS / f"{name}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a stage killed mid-write leaves the previous checkpoint intact
    return path


def latest(*names: str) -> str:
    """The first of `names` (later stages first) whose checkpoint exists, else the last: a stage that
    continues another's output replaces it for the stages after it."""
    return next((n for n in names if (CHECKPOINTS / f"{n}.pt").exists()), names[-1])


def load(name: str) -> Dict:
    path = CHECKPOINTS / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage {name!r} first")
    return torch.load(path, map_location="cpu")
