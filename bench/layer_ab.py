"""Kernels and time of one DiT step and one text decode step with the models/ on sys.path, at real
dimensions in bfloat16 on CUDA, random weights: kernels per step (profiler, one eager call) and the median
time of a CUDA-graph replay of it, scripted and run as the runtime runs it (graph executor optimisation
off). bench/cuda.sh runs it on this checkout's models/ and on an older one's, for an A/B of the layer
definitions in one call. With --compile, the same steps compiled by torch.compile (inductor, which fuses
the elementwise work into generated kernels) instead of scripted: what a fusing compiler would gain,
compile time included. With --profile, also where a step's GPU time goes (kernel time by kind, the
costliest kernels), and the decoder's UNet step at 1024 x 1024 with CFG. Prints one JSON object per
step as it is measured.

    python -m bench.layer_ab [--preset 4b] [--decode-preset 8b] [--cache 2048] [--compile] [--profile]
"""
import argparse
import json
import statistics
import time

import torch

from models import layers
from models.backbone import Backbone
from models.dit import DiT
from models.presets import get_preset
from models.unet import UNet

# kernel name fragments -> kind (first match; cuBLAS's Hopper GEMMs are "nvjet" or "sm90" kernels)
KINDS = (("matmul", ("gemm", "nvjet", "sm90_", "cutlass", "gemv")), ("attention", ("fmha", "flash", "attention")),
         ("conv", ("conv", "implicit", "xmma", "winograd", "cudnn")), ("norm", ("norm",)))


def kernel_events(fn) -> list:
    """The CUDA activities (kernels, copies) of one call, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def profile(events: list, top: int = 8) -> dict:
    """GPU time of one call's kernel events by kind of kernel, and its costliest kernels (microseconds)."""
    by_name, by_kind = {}, {}
    for e in events:
        us = e.time_range.elapsed_us()
        by_name[e.name] = by_name.get(e.name, 0) + us
        low = e.name.lower()
        kind = next((k for k, frags in KINDS if any(f in low for f in frags)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + us
    costliest = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"byKindUs": {k: round(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "costliestUs": [[name[:90], round(us)] for name, us in costliest]}


def replay_ms(fn, replays: int = 200) -> float:
    """Median milliseconds of one replay of fn captured as a CUDA graph (after 3 warm-up calls)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(cls, *cfg, compiled: bool = False):
    with torch.device("cuda"):
        module = cls(*cfg).to(torch.bfloat16).eval()
    return module if compiled else torch.jit.script(module)


def measure(name: str, fn, compiled: bool, profiled: bool, out: dict) -> None:
    t0 = time.time()
    if compiled:
        fn = torch.compile(fn)
        fn()
    compile_s = round(time.time() - t0, 1) if compiled else None
    events = kernel_events(fn)
    row = {"step": name, "compiled": compiled, "compileSeconds": compile_s, "kernels": len(events),
           "graphMs": replay_ms(fn)}
    if profiled:
        try:
            row["profile"] = profile(events)
        except Exception as e:  # (information only: keep the timings)
            row["profile"] = f"failed: {e}"
    print(json.dumps({**out, **row}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.layer_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="4b")
    ap.add_argument("--decode-preset", default="8b")
    ap.add_argument("--cache", type=int, default=2048)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch._C._set_graph_executor_optimize(False)
    # (an older models/ has no rms_norm choice: its norm is the plain one)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "rmsNorm": getattr(getattr(layers, "rms_norm", None), "__name__", "plain_rms_norm")}

    p = get_preset(a.preset)
    dit = build(DiT, p.dit, compiled=a.compile)
    with torch.inference_mode():
        x = torch.randn(2, p.dit.tokens, p.dit.channels, device="cuda")
        t = torch.full((2,), 500.0, device="cuda")
        prepared = dit.prepare(torch.randn(2, p.backbone.query_tokens, p.backbone.hidden, device="cuda"))
        measure("dit", lambda: dit.step(x, t, prepared), a.compile, a.profile, out)
    del dit, prepared

    q = get_preset(a.decode_preset)
    lm = build(Backbone, q.backbone, q.vision, compiled=a.compile)
    with torch.inference_mode():
        cache = lm.new_cache(1, a.cache)
        ids = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        position = torch.tensor([a.cache // 2], device="cuda")
        measure("decode", lambda: lm.decode(ids, position, cache), a.compile, a.profile, out)
    del lm, cache

    if a.profile:  # one decoder step of the image preset, CFG rows
        unet = build(UNet, p.unet, compiled=a.compile)
        with torch.inference_mode():
            sample = torch.randn(2, *p.latent, device="cuda")
            ts = torch.full((2,), 500.0, device="cuda")
            feats = torch.randn(2, p.dit.tokens, p.dit.channels, device="cuda")
            measure("unet", lambda: unet(sample, ts, feats), a.compile, a.profile, out)


if __name__ == "__main__":
    main()
