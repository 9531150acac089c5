"""The released DiT (`model.dit.model.*`: the official copy of diffusers' LuminaNextDiT2DModel, with its
caption projection) onto models/dit.py.

Its hyperparameters are not in config.json (the official build_dit uses NextDiTCrossAttnConfig's
defaults): the shapes of its tensors tell them, and the rest are those defaults (grid 8, eps 1e-5,
RoPE theta 10000).
"""
import re
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from ..presets import DitConfig

PREFIX = "model.dit.model."
GRID = 8  # NextDiTCrossAttnConfig.input_size: the 8 x 8 grid of CLIP features
EPS = 1e-5
Mapping = Dict[str, Tuple[str, Optional[Callable[[Tensor], Tensor]]]]


def dit_config(shapes: Dict[str, Tuple[int, ...]], prefix: str = PREFIX) -> DitConfig:
    """The DitConfig that the checkpoint's DiT tensors (name -> shape) describe."""
    def shape(name: str) -> Tuple[int, ...]:
        if prefix + name not in shapes:
            raise ValueError(f"the checkpoint has no DiT tensor {prefix + name}")
        return tuple(shapes[prefix + name])

    width, channels = shape("patch_embedder.proj.weight")
    layers = len({int(m.group(1)) for n in shapes if (m := re.match(re.escape(prefix) + r"layers\.(\d+)\.", n))})
    heads = shape("layers.0.gate")[0]
    if layers == 0 or heads == 0 or width % heads:
        raise ValueError(f"DiT tensors describe {layers} layers of {heads} heads at width {width}")
    head_dim = width // heads
    kv_heads = shape("layers.0.attn1.to_k.weight")[0] // head_dim
    caption_mlp = prefix + "caption_projection.linear_1.weight" in shapes
    caption_dim = shape("caption_projection.linear_1.weight" if caption_mlp else "caption_projection.weight")[1]
    if head_dim % 4:
        raise ValueError(f"DiT head width {head_dim} is not a multiple of 4 (2-D RoPE needs it)")
    return DitConfig(channels=channels, grid=GRID, width=width, layers=layers, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, ffn=shape("layers.0.feed_forward.linear_1.weight")[0],
                     caption_dim=caption_dim, eps=EPS, caption_mlp=caption_mlp, caption_norm_eps=1e-5)


def rope_permutation(head_dim: int) -> Tensor:
    """Lumina rotates adjacent channels (2j, 2j+1) by the row (j even) or column (j odd) angle of frequency
    j // 2; models/layers.py rotates channel i with i + head_dim/2, rows in the first quarter of i,
    columns in the second. Our channel c holds Lumina's channel perm[c] of the same head."""
    half, quarter = head_dim // 2, head_dim // 4
    perm = torch.empty(head_dim, dtype=torch.long)
    for i in range(half):
        pair = 2 * i if i < quarter else 2 * (i - quarter) + 1
        perm[i], perm[i + half] = 2 * pair, 2 * pair + 1
    return perm


def _heads_permuted(head_dim: int) -> Callable[[Tensor], Tensor]:
    """Permutes the rows (or entries) of a q/k projection or of its norm, head by head. Applied to q and k
    alike, it leaves every attention score as it was (a dot product over the same channel pairs)."""
    perm = rope_permutation(head_dim)

    def permute(t: Tensor) -> Tensor:
        heads = t.shape[0] // head_dim
        index = (torch.arange(heads).unsqueeze(1) * head_dim + perm).reshape(-1)
        return t.index_select(0, index)
    return permute


def dit_tensors(cfg: DitConfig, prefix: str = PREFIX) -> Mapping:
    """Our DiT's state-dict name -> (checkpoint tensor name, transform or None)."""
    p = prefix
    rope = _heads_permuted(cfg.head_dim)
    out: Mapping = {
        "x_embedder.weight": (p + "patch_embedder.proj.weight", None),
        "x_embedder.bias": (p + "patch_embedder.proj.bias", None),
        "t_embedder.linear_1.weight": (p + "time_caption_embed.timestep_embedder.linear_1.weight", None),
        "t_embedder.linear_1.bias": (p + "time_caption_embed.timestep_embedder.linear_1.bias", None),
        "t_embedder.linear_2.weight": (p + "time_caption_embed.timestep_embedder.linear_2.weight", None),
        "t_embedder.linear_2.bias": (p + "time_caption_embed.timestep_embedder.linear_2.bias", None),
        "caption_embedder.0.weight": (p + "time_caption_embed.caption_embedder.0.weight", None),
        "caption_embedder.0.bias": (p + "time_caption_embed.caption_embedder.0.bias", None),
        "caption_embedder.1.weight": (p + "time_caption_embed.caption_embedder.1.weight", None),
        "caption_embedder.1.bias": (p + "time_caption_embed.caption_embedder.1.bias", None),
        "norm_out_linear.weight": (p + "norm_out.linear_1.weight", None),
        "norm_out_linear.bias": (p + "norm_out.linear_1.bias", None),
        "proj_out.weight": (p + "norm_out.linear_2.weight", None),
        "proj_out.bias": (p + "norm_out.linear_2.bias", None),
    }
    for name in (["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"] if cfg.caption_mlp
                 else ["weight", "bias"]):
        out[f"caption_projection.{name}"] = (p + f"caption_projection.{name}", None)
    ours_theirs = {"gate": "gate", "to_out.weight": "attn2.to_out.0.weight", "norm1.weight": "norm1.norm.weight",
                   "norm1_linear.weight": "norm1.linear.weight", "norm1_linear.bias": "norm1.linear.bias",
                   "norm1_context.weight": "norm1_context.weight", "norm2.weight": "norm2.weight",
                   "ffn_norm1.weight": "ffn_norm1.weight", "ffn_norm2.weight": "ffn_norm2.weight",
                   "feed_forward.gate_proj.weight": "feed_forward.linear_1.weight",
                   "feed_forward.up_proj.weight": "feed_forward.linear_3.weight",
                   "feed_forward.down_proj.weight": "feed_forward.linear_2.weight"}
    for i in range(cfg.layers):
        for ours, theirs in ours_theirs.items():
            out[f"layers.{i}.{ours}"] = (f"{p}layers.{i}.{theirs}", None)
        for attn in ("attn1", "attn2"):
            for name in ("to_q.weight", "to_k.weight", "norm_q.weight", "norm_q.bias", "norm_k.weight", "norm_k.bias"):
                out[f"layers.{i}.{attn}.{name}"] = (f"{p}layers.{i}.{attn}.{name}", rope)
            out[f"layers.{i}.{attn}.to_v.weight"] = (f"{p}layers.{i}.{attn}.to_v.weight", None)
    return out
