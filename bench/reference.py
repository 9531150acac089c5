"""The Python reference of the benchmark: a bundle loaded with torch.jit.load and driven by Python loops the
way a diffusers-style pipeline drives its models (contract section 3, step by step: the native runtime must
produce the same pixels). Same seeds, settings and token ids as the runtime; torch.inference_mode, CFG as
one batch, the negative features computed once.

    bash models/run-python.sh -m bench.reference models/tiny --seed 1 [--ids 1,2,3] [--out x.npy]
    bash models/run-python.sh -m bench.reference --serve      # JSON lines on stdin -> JSON lines on stdout

Serve protocol (one JSON object per line each way; a failure answers {"error": "..."}):
    {"op": "load", "bundle": DIR, "device": "cpu", "dtype": "float32", "threads": 0, "negativeIds": [...]}
        -> {"loadMs", "threads", "torch"}                 threads 0 = torch's default
    {"op": "generate", "ids": [...], "seed": N, "steps"?, "cfg"?, "decoderSteps"?, "decoderCfg"?}
        -> {"width", "height", "pixels": base64 of HWC uint8, "timings": {...Ms, ditStepMs, decoderStepMs}}
    {"op": "decode", "promptTokens": L, "tokens": N, "cacheLength": C} -> {"decodeMs", "tokens"}
    {"op": "stats"} -> {"peakRssMb", "peakCudaMb"}
"""
import argparse
import base64
import json
import resource
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from models import jsonlines

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def flow_match_schedule(steps: int, shift: float, integer: bool = False) -> Tuple[Tensor, Tensor]:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/steps, steps)): float32 sigmas
    (shifted, then a final 0) and timesteps sigma * 1000 (truncated to integers: the official sampler)."""
    s = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    s = np.float32(shift) * s / (1 + np.float32(shift - 1) * s)
    sigmas = torch.from_numpy(s.astype(np.float32))
    timesteps = sigmas * 1000.0
    return torch.cat([sigmas, torch.zeros(1)]), timesteps.trunc() if integer else timesteps


def train_sigmas(cfg: dict) -> np.ndarray:
    """sigma(t) = sqrt((1 - alphas_cumprod) / alphas_cumprod) for t = 0 .. numTrainTimesteps - 1 of the
    decoder's beta schedule, in float32 as diffusers' EulerDiscreteScheduler computes them."""
    n = cfg["numTrainTimesteps"]
    if cfg["betaSchedule"] == "scaled_linear":
        betas = torch.linspace(cfg["betaStart"] ** 0.5, cfg["betaEnd"] ** 0.5, n, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg["betaStart"], cfg["betaEnd"], n, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def euler_discrete_schedule(cfg: dict, steps: int) -> Tuple[Tensor, Tensor, float]:
    """EulerDiscreteScheduler.set_timesteps(steps) ("leading" spacing, scaled-linear betas): float32
    sigmas (then a final 0), timesteps and the initial noise sigma."""
    n = cfg["numTrainTimesteps"]
    timesteps = (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float64) + cfg["stepsOffset"]
    sigmas = torch.from_numpy(np.interp(timesteps, np.arange(n), train_sigmas(cfg)).astype(np.float32))
    init_sigma = float((sigmas.max() ** 2 + 1) ** 0.5)  # "leading" spacing
    return torch.cat([sigmas, torch.zeros(1)]), torch.from_numpy(timesteps.astype(np.float32)), init_sigma


class Bundle:
    """The four TorchScript components of a bundle on one device, in one dtype."""

    def __init__(self, path: Path, device: str = "cpu", dtype: Optional[str] = None):
        self.path, self.device = Path(path), torch.device(device)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.dtype = DTYPES[dtype or self.manifest["dtype"]]

        def load(key: str) -> torch.jit.ScriptModule:
            module = torch.jit.load(str(self.path / self.manifest["files"][key]["path"]), map_location=self.device)
            return module.to(self.dtype).eval()

        self.backbone, self.dit, self.decoder, self.vae = (load(k) for k in ("backbone", "dit", "decoder", "vae"))
        self.negative: Dict[Tuple[int, ...], Tensor] = {}

    def sync(self) -> None:
        """Waits for the device (CUDA runs asynchronously), so that stage times are real."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def dit_loop(b: Bundle, cond: Tensor, x: Tensor, sigmas: Tensor, timesteps: Tensor, cfg: float, t: Dict,
             eta: float = 0.0, noise: Optional[Tensor] = None) -> Tensor:
    """The DiT's flow-matching loop with CFG as one batch ([uncond, cond]; the conditional branch alone at
    guidance 1 or less, as diffusers does); x stays float32. With eta > 0, every step but the last goes
    from the clean estimate x - sigma v and the noise estimate x + (1 - sigma) v to
    (1 - sigma') clean + sigma' (sqrt(1 - eta^2) noise estimate + eta noise[i])."""
    guided = cfg > 1
    uncond_cond = torch.cat([torch.zeros_like(cond), cond]) if guided else cond
    timesteps = timesteps.to(b.device)
    for i in range(len(timesteps)):
        step = time.perf_counter()
        x_in = (torch.cat([x, x]) if guided else x).to(b.dtype)
        call = time.perf_counter()
        v = b.dit(x_in, timesteps[i].expand(x_in.shape[0]), uncond_cond).float()
        t["ditCallMs"] += ms_since(call)
        if guided:
            v_u, v_c = v.chunk(2)
            v = v_u + cfg * (v_c - v_u)
        if eta > 0 and i + 1 < len(timesteps):
            eps = (x + (1 - sigmas[i]) * v) * (1 - eta * eta) ** 0.5 + eta * noise[i].to(b.device)
            x = (1 - sigmas[i + 1]) * (x - sigmas[i] * v) + sigmas[i + 1] * eps
        else:
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        t["ditStepMs"].append(ms_since(step))
    return x


def features(b: Bundle, ids: List[int], g: torch.Generator, steps: int, cfg: float, t: Dict) -> Tensor:
    """Backbone condition, then the DiT loop from randn([1,T,C], g): the CLIP features [1,T,C]."""
    m = b.manifest
    start = time.perf_counter()
    cond = b.backbone.condition(torch.tensor([ids], dtype=torch.int64, device=b.device))
    b.sync()
    t["conditionMs"] = t["conditionCallMs"] = ms_since(start)
    start = time.perf_counter()
    x = torch.randn([1, m["clip"]["tokens"], m["clip"]["width"]], generator=g).to(b.device)
    sigmas, timesteps = flow_match_schedule(steps, m["sampler"]["dit"]["shift"],
                                           m["sampler"]["dit"].get("integerTimesteps", False))
    eta = m["sampler"]["dit"].get("eta", 0.0)
    noise = torch.randn([steps - 1, 1, m["clip"]["tokens"], m["clip"]["width"]], generator=g) if eta > 0 else None
    x = dit_loop(b, cond, x, sigmas, timesteps, cfg, t, eta, noise)
    b.sync()
    t["ditMs"] = ms_since(start)
    return x


def new_timings() -> Dict:
    return {"ditCallMs": 0.0, "decoderCallMs": 0.0, "ditStepMs": [], "decoderStepMs": []}


def negative_features(b: Bundle, negative_ids: List[int]) -> Tensor:
    """The decoder's negative condition: the negative prompt through backbone + DiT with the manifest's
    defaults and negativeSeed. Computed once per bundle and prompt."""
    key = tuple(negative_ids)
    if key not in b.negative:
        s = b.manifest["sampler"]
        g = torch.Generator().manual_seed(s["negativeSeed"])
        b.negative[key] = features(b, negative_ids, g, s["dit"]["steps"], s["dit"]["cfg"], new_timings())
    return b.negative[key]


def generate(b: Bundle, ids: List[int], negative_ids: List[int], seed: int, steps: Optional[int] = None,
             cfg: Optional[float] = None, decoder_steps: Optional[int] = None,
             decoder_cfg: Optional[float] = None) -> Tuple[np.ndarray, Dict]:
    """One image: HWC uint8 pixels and the timings (per stage: wall ms and ms inside the TorchScript calls;
    per step wall ms of both loops)."""
    s = b.manifest["sampler"]
    guided = (s["decoder"]["cfg"] if decoder_cfg is None else decoder_cfg) > 1
    neg = negative_features(b, negative_ids) if guided else None  # unused at guidance 1 or less
    started = time.perf_counter()
    t = new_timings()
    g = torch.Generator().manual_seed(seed)  # eps_dit, then eps_dec, from the same generator
    feats = features(b, ids, g, steps or s["dit"]["steps"], s["dit"]["cfg"] if cfg is None else cfg, t)

    pixels = decode(b, feats, neg, g, decoder_steps, decoder_cfg, t)
    t["totalMs"] = ms_since(started)
    return pixels, t


def decode(b: Bundle, feats: Tensor, neg: Optional[Tensor], g: torch.Generator, decoder_steps: Optional[int],
           decoder_cfg: Optional[float], t: Dict) -> np.ndarray:
    """The decoder's Euler discrete loop from randn(latent shape, g) on CLIP features [1,T,C] (CFG against
    the negative features as one batch, none at guidance 1 as in diffusers), then the VAE: HWC uint8."""
    m, dec = b.manifest, b.manifest["sampler"]["decoder"]
    start = time.perf_counter()
    lat = m["latent"]
    eps = torch.randn([1, lat["channels"], lat["height"], lat["width"]], generator=g).to(b.device)
    sigmas, timesteps, init_sigma = euler_discrete_schedule(dec, decoder_steps or dec["steps"])
    guidance = dec["cfg"] if decoder_cfg is None else decoder_cfg
    guided = guidance > 1
    cond = torch.cat([feats, neg]) if guided else feats
    z, cond, timesteps = eps * init_sigma, cond.to(b.dtype), timesteps.to(b.device)
    for i in range(len(timesteps)):
        step = time.perf_counter()
        sigma = sigmas[i]
        z_in = (z / (sigma ** 2 + 1) ** 0.5).to(b.dtype)
        call = time.perf_counter()
        out = b.decoder(torch.cat([z_in, z_in]) if guided else z_in, timesteps[i].expand(cond.shape[0]), cond)
        t["decoderCallMs"] += ms_since(call)
        if guided:
            o_cond, o_neg = out.float().chunk(2)
            out = o_neg + guidance * (o_cond - o_neg)
        denoised = denoise(dec["predictionType"], z, out.float(), sigma)
        z = z + (sigmas[i + 1] - sigma) * (z - denoised) / sigma
        t["decoderStepMs"].append(ms_since(step))
    b.sync()
    t["decoderMs"] = ms_since(start)

    start = time.perf_counter()
    image = b.vae((z / m["vae"]["scalingFactor"]).to(b.dtype)).float()
    b.sync()
    t["vaeCallMs"] = ms_since(start)
    pixels = (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
    t["vaeMs"] = ms_since(start)
    return pixels


def denoise(prediction: str, z: Tensor, out: Tensor, sigma: Tensor) -> Tensor:
    """The denoised sample from the decoder output, per sampler.decoder.predictionType."""
    if prediction == "epsilon":
        return z - sigma * out
    if prediction == "sample":
        return out
    return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + z / (sigma ** 2 + 1)  # v_prediction


def decode_speed(b: Bundle, prompt_tokens: int, tokens: int, cache_length: int) -> Dict:
    """Greedy text decoding the way an eager runtime does it: a prompt of stand-in ids prefilled into a
    static cache of `cache_length` positions, then one decode call per token, each token read back to
    choose the next. The time per token depends on the sizes, not on which ids."""
    ids = torch.arange(prompt_tokens, device=b.device).remainder(1000).unsqueeze(0)
    cache = b.backbone.new_cache(1, cache_length)
    logits = b.backbone.prefill(b.backbone.embed(ids), cache)
    b.sync()
    start = time.perf_counter()
    for i in range(tokens):
        token = int(logits[0].argmax())
        if i + 1 < tokens:  # the last token needs no decode call (as in the runtime's loop)
            logits = b.backbone.decode(torch.tensor([[token]], device=b.device),
                                       torch.tensor([prompt_tokens + i], device=b.device), cache)
    b.sync()
    return {"decodeMs": ms_since(start), "tokens": tokens}


def serve() -> None:
    """The benchmark's long-lived reference process: JSON requests on stdin, JSON answers on stdout."""
    state: Dict = {"bundle": None, "negativeIds": []}

    def answer(req: dict) -> dict:
        op, b = req["op"], state["bundle"]
        if op == "load":
            start = time.perf_counter()
            if req.get("threads", 0) > 0:
                torch.set_num_threads(req["threads"])
            b = state["bundle"] = Bundle(Path(req["bundle"]), req.get("device", "cpu"), req.get("dtype"))
            state["negativeIds"] = req["negativeIds"]
            with torch.inference_mode():
                negative_features(b, state["negativeIds"])
            return {"loadMs": ms_since(start), "threads": torch.get_num_threads(), "torch": torch.__version__}
        if op == "generate":
            assert b is not None, "generate before load"
            with torch.inference_mode():
                pixels, timings = generate(b, req["ids"], state["negativeIds"], req["seed"], req.get("steps"),
                                           req.get("cfg"), req.get("decoderSteps"), req.get("decoderCfg"))
            return {"width": pixels.shape[1], "height": pixels.shape[0], "timings": timings,
                    "pixels": base64.b64encode(pixels.tobytes()).decode("ascii")}
        if op == "decode":
            assert b is not None, "decode before load"
            with torch.inference_mode():
                return decode_speed(b, req["promptTokens"], req["tokens"], req["cacheLength"])
        if op == "stats":
            cuda = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
            return {"peakRssMb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peakCudaMb": cuda}
        raise ValueError(f"unknown op {op!r}")

    jsonlines.serve(answer)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?")
    ap.add_argument("--serve", action="store_true", help="answer JSON requests on stdin (the benchmark's mode)")
    ap.add_argument("--ids", help="comma-separated prompt token ids (default: a stand-in prompt ending in [IMG])")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    ap.add_argument("--out", type=Path, help="write the HWC uint8 pixels as .npy")
    a = ap.parse_args()
    if a.serve:
        return serve()
    if a.bundle is None:
        ap.error("a bundle directory is required without --serve")
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    b = Bundle(a.bundle)
    # without a tokenizer, any ids of the right length exercise the same computation as a short prompt
    ids = [int(x) for x in a.ids.split(",")] if a.ids else list(range(40)) + [b.manifest["tokens"]["img"]]
    vocab = json.loads((b.path / "tokenizer.json").read_text())["model"]["vocab"]
    neg = [vocab["\u0120"]]  # the negative prompt " " is the byte-level symbol of a space
    with torch.inference_mode():
        for _ in range(2):  # warm-up: TorchScript profiles and optimises on the first runs
            generate(b, ids, neg, a.seed)
        pixels, t = generate(b, ids, neg, a.seed)
    stages = ", ".join(f"{k[:-2]} {t[k]:.0f} ms" for k in ("conditionMs", "ditMs", "decoderMs", "vaeMs"))
    print(f"{a.bundle}: one default generation in {t['totalMs']:.0f} ms on {torch.get_num_threads()} thread(s) "
          f"({stages}); pixels mean {pixels.mean():.1f} std {pixels.std():.1f}")
    if a.out:
        np.save(a.out, pixels)


if __name__ == "__main__":
    main()
