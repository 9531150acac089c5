"""Reference generation in Python over an exported bundle, following contract section 3 step by step
(the native runtime must produce the same pixels). Also the timing budget of a bundle:

    bash models/run-python.sh -m models.sample models/tiny --prompt "a red circle" --seed 1 [--out x.npy]
"""
import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor


def flow_match_sigmas(steps: int, shift: float) -> Tuple[List[float], List[float]]:
    """DiT schedule: linspace(1, 1/steps) shifted as diffusers' FlowMatchEulerDiscreteScheduler, then 0."""
    s = np.linspace(1.0, 1.0 / steps, steps)
    s = shift * s / (1 + (shift - 1) * s)
    return list(s) + [0.0], list(s * 1000.0)


def euler_discrete_sigmas(cfg: dict) -> Tuple[List[float], List[float], float]:
    """Decoder schedule of diffusers' EulerDiscreteScheduler ("leading" spacing, scaled-linear betas):
    sigmas (steps + 1, ending in 0), timesteps, and the initial noise sigma."""
    n, steps = cfg["numTrainTimesteps"], cfg["steps"]
    betas = np.linspace(cfg["betaStart"] ** 0.5, cfg["betaEnd"] ** 0.5, n, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    all_sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    timesteps = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float64) + cfg["stepsOffset"]
    sigmas = np.interp(timesteps, np.arange(n), all_sigmas)
    init_sigma = float((sigmas.max() ** 2 + 1) ** 0.5)  # "leading" spacing
    return list(sigmas) + [0.0], list(timesteps), init_sigma


class Bundle:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        load = lambda key: torch.jit.load(str(self.path / self.manifest["files"][key]["path"]), map_location="cpu")
        self.backbone, self.dit, self.decoder, self.vae = (load(k) for k in ("backbone", "dit", "decoder", "vae"))
        tok = json.loads((self.path / "tokenizer.json").read_text())
        self.vocab = tok["model"]["vocab"]


def features(b: Bundle, ids: List[int], seed: int, sigmas: List[float], timesteps: List[float], cfg: float) -> Tensor:
    """Backbone condition, then the DiT flow-matching loop with CFG ([uncond, cond]): CLIP features [1,T,C]."""
    m = b.manifest
    cond = b.backbone.condition(torch.tensor([ids], dtype=torch.int64))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([1, m["clip"]["tokens"], m["clip"]["width"]], generator=g)
    for i, t in enumerate(timesteps):
        v = b.dit(torch.cat([x, x]), torch.tensor([t, t], dtype=torch.float32), torch.cat([torch.zeros_like(cond), cond]))
        v = v.float()
        v = v[:1] + cfg * (v[1:] - v[:1])
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, g


def generate(b: Bundle, ids: List[int], negative_ids: List[int], seed: int) -> Tuple[np.ndarray, Dict[str, float]]:
    m, s = b.manifest, b.manifest["sampler"]
    times = {}
    start = time.perf_counter()
    dit_sigmas, dit_t = flow_match_sigmas(s["dit"]["steps"], s["dit"]["shift"])
    neg, _ = features(b, negative_ids, s["negativeSeed"], dit_sigmas, dit_t, s["dit"]["cfg"])
    times["negative"] = time.perf_counter() - start

    start = time.perf_counter()
    feats, g = features(b, ids, seed, dit_sigmas, dit_t, s["dit"]["cfg"])  # g continues: eps_dec follows eps_dit
    lat = m["latent"]
    eps_dec = torch.randn([1, lat["channels"], lat["height"], lat["width"]], generator=g)
    times["condition+dit"] = time.perf_counter() - start

    start = time.perf_counter()
    sigmas, timesteps, init_sigma = euler_discrete_sigmas(s["decoder"])
    z, cfg = eps_dec * init_sigma, s["decoder"]["cfg"]
    for i, t in enumerate(timesteps):
        zin = z / (sigmas[i] ** 2 + 1) ** 0.5
        out = b.decoder(torch.cat([zin, zin]), torch.tensor([t, t], dtype=torch.float32), torch.cat([feats, neg])).float()
        out = out[1:] + cfg * (out[:1] - out[1:])
        denoised = z - sigmas[i] * out  # epsilon prediction
        z = z + (sigmas[i + 1] - sigmas[i]) * (z - denoised) / sigmas[i]
    times["decoder"] = time.perf_counter() - start

    start = time.perf_counter()
    image = b.vae(z / m["vae"]["scalingFactor"]).float()
    pixels = (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    times["vae"] = time.perf_counter() - start
    return pixels, times


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m models.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--ids", help="comma-separated prompt token ids (default: a stand-in prompt of [IMG] only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the HWC uint8 pixels as .npy")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    b = Bundle(a.bundle)
    # without a Python tokenizer, the default prompt is the ids the TS side would send for a short prompt:
    # any ids of the right length exercise the same computation
    ids = [int(x) for x in a.ids.split(",")] if a.ids else list(range(40)) + [b.manifest["tokens"]["img"]]
    neg = [b.vocab["\u0120"]]  # the negative prompt " " is the byte-level symbol of a space
    with torch.inference_mode():
        generate(b, ids, neg, a.seed)  # warm-up (TorchScript profiles and optimises on the first runs)
        generate(b, ids, neg, a.seed)
        start = time.perf_counter()
        pixels, times = generate(b, ids, neg, a.seed)
        total = time.perf_counter() - start - times["negative"]
    print(f"{a.bundle}: one default generation (negative features cached) in {total * 1000:.0f} ms "
          f"on {a.threads} thread(s) "
          f"({', '.join(f'{k} {v * 1000:.0f} ms' for k, v in times.items())}); "
          f"pixels mean {pixels.mean():.1f} std {pixels.std():.1f}, finite: {np.isfinite(pixels).all()}")
    if a.out:
        np.save(a.out, pixels)


if __name__ == "__main__":
    main()
