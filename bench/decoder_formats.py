"""How fast one CFG step of a bundle's decoder (decoder.pt) runs on CUDA in bfloat16 under the
settings the runtime does not use yet: channels-last weights and input, and cuDNN's autotuner
(benchmark mode). Median of `--steps` timed calls after warm-up, each variant in turn; prints JSON.
For deciding what the runtime's decoder should do next (bench/cuda.sh runs it last, for the log).

    bash models/run-python.sh -m bench.decoder_formats BUNDLE [--steps 10]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def time_steps(decoder, x, t, features, steps: int) -> float:
    for _ in range(3):
        decoder(x, t, features)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        decoder(x, t, features)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decoder_formats", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    manifest = json.loads((a.bundle / "manifest.json").read_text())
    decoder = torch.jit.load(str(a.bundle / manifest["files"]["decoder"]["path"]), map_location="cuda")
    decoder = decoder.to(torch.bfloat16).eval()
    lat = manifest["latent"]
    clip = manifest["clip"]
    x = torch.randn(2, lat["channels"], lat["height"], lat["width"], device="cuda", dtype=torch.bfloat16)
    t = torch.full((2,), 500.0, device="cuda")
    features = torch.randn(2, clip["tokens"], clip["width"], device="cuda", dtype=torch.bfloat16)
    out = {}
    with torch.inference_mode():
        out["nchw"] = time_steps(decoder, x, t, features, a.steps)
        torch.backends.cudnn.benchmark = True
        out["nchwCudnnBenchmark"] = time_steps(decoder, x, t, features, a.steps)
        torch.backends.cudnn.benchmark = False
        for p in decoder.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        out["channelsLast"] = time_steps(decoder, x_cl, t, features, a.steps)
        torch.backends.cudnn.benchmark = True
        out["channelsLastCudnnBenchmark"] = time_steps(decoder, x_cl, t, features, a.steps)
    print(json.dumps({"decoderStepMs": out, "device": torch.cuda.get_device_name(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
