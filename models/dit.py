"""Lumina-Next DiT with cross-attention (BLIP3-o `NextDiTCrossAttn`): generates CLIP features [N, T, C]
on a sqrt(T) x sqrt(T) grid (patch 1) by flow matching, conditioned on the backbone's query states.

forward(x, timestep = sigma * 1000, condition [N, Q, H]) -> velocity (noise - data);
the same as step(x, timestep, prepare(condition)), which lets a sampling loop prepare once.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import RMSNorm, SwiGLU, TimestepMLP, apply_rope, grouped_attention, rope_2d, timestep_embedding
from .presets import DitConfig

TIME_FREQ_DIM = 256  # sinusoidal timestep embedding width (Lumina-Next)


class QKNormAttention(nn.Module):
    """Attention with LayerNorm over all heads of q and k (Lumina's "layer_norm_across_heads"). Returns the
    per-head outputs [N, L, heads, d] without an output projection: the block mixes self- and
    cross-attention first and projects once."""

    def __init__(self, cfg: DitConfig, kv_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.to_q = nn.Linear(cfg.width, cfg.heads * cfg.head_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.norm_q = nn.LayerNorm(cfg.heads * cfg.head_dim, eps=cfg.eps)
        self.norm_k = nn.LayerNorm(cfg.kv_heads * cfg.head_dim, eps=cfg.eps)

    def keys_values(self, context: Tensor) -> Tuple[Tensor, Tensor]:
        """k (normed) and v [N, kv_heads, S, d] of a context; for the caption, the same at every step."""
        N, S = context.shape[0], context.shape[1]
        k = self.norm_k(self.to_k(context)).view(N, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(N, S, self.kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, rope_keys: bool) -> Tensor:
        N, L = x.shape[0], x.shape[1]
        q = self.norm_q(self.to_q(x)).view(N, L, self.heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if rope_keys:  # self-attention only: caption keys have no position on the image grid
            k = apply_rope(k, cos, sin)
        groups = self.heads // self.kv_heads
        return grouped_attention(q, k, v, None, groups).transpose(1, 2)


class DitBlock(nn.Module):
    """Sandwich-normed block: adaLN (RMSNorm-zero) modulation, self-attention plus tanh-gated
    cross-attention sharing one output projection, then a modulated SwiGLU FFN."""

    def __init__(self, cfg: DitConfig, temb_dim: int):
        super().__init__()
        self.attn1 = QKNormAttention(cfg, cfg.width)
        self.attn2 = QKNormAttention(cfg, cfg.width)  # the caption was projected to the DiT width
        self.to_out = nn.Linear(cfg.heads * cfg.head_dim, cfg.width, bias=False)  # diffusers: attn2.to_out.0
        self.gate = nn.Parameter(torch.zeros(cfg.heads))  # per-head tanh gate of the cross-attention
        self.norm1 = RMSNorm(cfg.width, cfg.eps)
        self.norm1_linear = nn.Linear(temb_dim, 4 * cfg.width)  # diffusers: norm1.linear
        self.norm1_context = RMSNorm(cfg.width, cfg.eps)
        self.norm2 = RMSNorm(cfg.width, cfg.eps)
        self.ffn_norm1 = RMSNorm(cfg.width, cfg.eps)
        self.ffn_norm2 = RMSNorm(cfg.width, cfg.eps)
        self.feed_forward = SwiGLU(cfg.width, cfg.ffn)

    def caption_keys_values(self, caption: Tensor) -> Tuple[Tensor, Tensor]:
        return self.attn2.keys_values(self.norm1_context(caption))

    def forward(self, x: Tensor, caption_k: Tensor, caption_v: Tensor, temb: Tensor, cos: Tensor,
                sin: Tensor) -> Tensor:
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.norm1_linear(F.silu(temb)).chunk(4, dim=1)
        h = self.norm1(x) * (1 + scale_msa[:, None])
        k, v = self.attn1.keys_values(h)
        self_out = self.attn1.attend(h, k, v, cos, sin, True)
        cross_out = self.attn2.attend(h, caption_k, caption_v, cos, sin, False)
        mixed = self_out + cross_out * self.gate.tanh().to(x.dtype).view(1, 1, -1, 1)
        x = x + gate_msa[:, None].tanh() * self.norm2(self.to_out(mixed.flatten(2)))
        ff = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp[:, None]))
        return x + gate_mlp[:, None].tanh() * self.ffn_norm2(ff)


class CaptionProjection(nn.Module):
    """The released DiT's caption projection (PixArt-alpha's text projection): Linear, GELU (tanh), Linear."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class DiT(nn.Module):
    def __init__(self, cfg: DitConfig):
        super().__init__()
        self.grid, self.head_dim, self.rope_theta = cfg.grid, cfg.head_dim, cfg.rope_theta
        self.time_freq_dim = TIME_FREQ_DIM
        temb_dim = min(cfg.width, 1024)
        self.x_embedder = nn.Linear(cfg.channels, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.tokens, cfg.width)) if cfg.absolute_positions else None
        self.caption_projection = CaptionProjection(cfg.caption_dim, cfg.width) if cfg.caption_mlp \
            else nn.Linear(cfg.caption_dim, cfg.width)
        self.t_embedder = TimestepMLP(TIME_FREQ_DIM, temb_dim)
        # pooled caption -> adaLN input (Lumina pools with the caption mask; BLIP3-o's condition is
        # always the Q query states, so the masked mean is a plain mean)
        self.caption_embedder = nn.Sequential(nn.LayerNorm(cfg.width, eps=cfg.caption_norm_eps),
                                              nn.Linear(cfg.width, temb_dim))
        self.layers = nn.ModuleList([DitBlock(cfg, temb_dim) for _ in range(cfg.layers)])
        self.norm_out = nn.LayerNorm(cfg.width, eps=1e-6, elementwise_affine=False)
        self.norm_out_linear = nn.Linear(temb_dim, cfg.width)  # continuous LayerNorm: x * (1 + scale(temb))
        self.proj_out = nn.Linear(cfg.width, cfg.channels)

    def forward(self, x: Tensor, timestep: Tensor, condition: Tensor) -> Tensor:
        return self.step(x, timestep, self.prepare(condition))

    @torch.jit.export
    def prepare(self, condition: Tensor) -> List[Tensor]:
        """What depends on the condition [N, Q, H] alone, the same at every step of a sampling loop: the
        pooled caption's adaLN term, each block's cross-attention keys and values, the 2D RoPE tables (in
        the model's dtype).
        A runtime calls it once per request and step() per step; forward() is both."""
        dtype = self.x_embedder.weight.dtype
        caption = self.caption_projection(condition.to(dtype))
        T = self.grid * self.grid
        pos = torch.arange(T, device=condition.device)
        cos, sin = rope_2d(pos // self.grid, pos % self.grid, self.head_dim, self.rope_theta)
        out = [self.caption_embedder(caption.mean(1)), cos.to(dtype), sin.to(dtype)]
        for layer in self.layers:
            k, v = layer.caption_keys_values(caption)
            out += [k, v]
        return out

    @torch.jit.export
    def step(self, x: Tensor, timestep: Tensor, prepared: List[Tensor]) -> Tensor:
        """The velocity at x [N, T, C], timestep [N], given prepare(condition) of the same N rows."""
        dtype = self.x_embedder.weight.dtype
        cos, sin = prepared[1], prepared[2]
        h = self.x_embedder(x.to(dtype))
        if self.pos_embed is not None:
            h = h + self.pos_embed
        temb = self.t_embedder(timestep_embedding(timestep, self.time_freq_dim).to(dtype)) + prepared[0]
        for i, layer in enumerate(self.layers):
            h = layer(h, prepared[3 + 2 * i], prepared[4 + 2 * i], temb, cos, sin)
        h = self.norm_out(h) * (1 + self.norm_out_linear(F.silu(temb))[:, None])
        return self.proj_out(h)
