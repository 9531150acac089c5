"""The hardware floor of what bench/cuda.sh measures, at a preset's real dimensions in bfloat16: the
bytes a step must read (its weights) over the card's memory bandwidth, and its FLOPs over the card's
dense bfloat16 tensor-core peak; a step's floor is the larger of the two. FLOPs are counted by torch's
FlopCounterMode on the meta device (no memory, no compute), so this runs anywhere torch 2.x does.

    bash models/run-python.sh -m bench.floors --preset 4b --decode-preset 8b --card "NVIDIA H100 80GB HBM3"

Prints one JSON object. Card figures are the vendors' datasheet numbers (SXM unless named).
"""
import argparse
import json
from typing import Dict, Tuple

import torch
import torch.nn as nn

from models.backbone import Backbone
from models.dit import DiT
from models.presets import Preset, get_preset
from models.unet import UNet
from models.vae import build_vae

BYTES = 2  # bfloat16

# name fragment -> (memory bandwidth in TB/s, dense bfloat16 TFLOP/s); the first match wins
CARDS = [("H100 PCIe", (2.0, 756.0)), ("H100 NVL", (3.9, 835.0)), ("H100", (3.35, 989.0)), ("H200", (4.8, 989.0)),
         ("A100", (2.0, 312.0))]


def card_figures(name: str) -> Tuple[float, float]:
    for fragment, figures in CARDS:
        if fragment in name:
            return figures
    raise SystemExit(f"no datasheet figures for {name!r} (known: {', '.join(f for f, _ in CARDS)})")


def flops(module: nn.Module, *args) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops())


def weight_bytes(module: nn.Module, skip: Tuple[str, ...] = ()) -> int:
    """Bytes of the parameters whose names contain none of `skip` (a shared parameter counted once)."""
    seen = set()
    total = 0
    for name, p in module.named_parameters():
        if id(p) in seen or any(s in name for s in skip):
            continue
        seen.add(id(p))
        total += p.numel() * BYTES
    return total


def floors(p: Preset, decode: Preset, bandwidth: float, peak: float) -> Dict:
    meta = torch.device("meta")
    bw, fl = bandwidth * 1e12, peak * 1e12

    def ms(nbytes: float, nflops: float) -> float:
        return max(nbytes / bw, nflops / fl) * 1e3

    with meta:
        dit, unet, vae = DiT(p.dit).eval(), UNet(p.unet).eval(), build_vae(p.vae).eval()
        lm = Backbone(decode.backbone, decode.vision).eval()
    # a DiT step with CFG: two rows of the 64 tokens; prepare() (the condition's share) runs once a loop
    rows, T = 2, p.dit.tokens
    prepared = dit.prepare(torch.zeros(rows, p.backbone.query_tokens, p.dit.caption_dim, device=meta))
    dit_flops = flops(lambda x, t: dit.step(x, t, prepared), torch.zeros(rows, T, p.dit.channels, device=meta),
                      torch.zeros(rows, device=meta))
    # what only prepare() reads: the caption's projection, pooling and keys/values
    dit_bytes = weight_bytes(dit, ("caption_projection", "caption_embedder", "attn2.to_k", "attn2.to_v",
                                   "attn2.norm_k", "norm1_context"))
    c, h, w = p.latent
    unet_flops = flops(unet, torch.zeros(2, c, h, w, device=meta), torch.zeros(2, device=meta),
                       torch.zeros(2, T, p.dit.channels, device=meta))
    vae_flops = flops(vae, torch.zeros(1, c, h, w, device=meta))
    # one decode step reads every language-model weight once (one row of the embedding table)
    lm_bytes = weight_bytes(lm, ("visual.", "queries", "embed_tokens")) + (
        decode.backbone.vocab * decode.backbone.hidden * BYTES if decode.backbone.tied else 0)
    dit_ms, unet_ms, vae_ms = ms(dit_bytes, dit_flops), ms(weight_bytes(unet), unet_flops), ms(weight_bytes(vae), vae_flops)
    token_ms = ms(lm_bytes, 2 * lm_bytes / BYTES)
    return {
        "ditStep": {"weightBytes": dit_bytes, "flops": dit_flops, "ms": dit_ms},
        "ditLoopMs": 30 * dit_ms,
        "decoderStep": {"weightBytes": weight_bytes(unet), "flops": unet_flops, "ms": unet_ms},
        "decoderStepMs": unet_ms,
        "vae": {"flops": vae_flops, "ms": vae_ms},
        # the DiT and decoder loops and the VAE at the bundle's defaults (30 and 50 steps); the backbone's
        # conditioning pass is left out (a few ms)
        "imageMs": 30 * dit_ms + 50 * unet_ms + vae_ms,
        "decodeToken": {"preset": decode.name, "weightBytes": lm_bytes, "ms": token_ms},
        "decodeTokensPerSec": 1e3 / token_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="4b", help="dimensions of the DiT, decoder and VAE floors")
    ap.add_argument("--decode-preset", default="8b", help="dimensions of the text decode floor")
    ap.add_argument("--card", help="GPU name (default: this machine's CUDA device)")
    a = ap.parse_args()
    card = a.card or torch.cuda.get_device_name()
    bandwidth, peak = card_figures(card)
    out = {"card": card, "bandwidthTBs": bandwidth, "bf16Tflops": peak, "preset": a.preset,
           **floors(get_preset(a.preset), get_preset(a.decode_preset), bandwidth, peak)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
