"""Pieces shared by the BLIP3-o components: norms, rotary embeddings, attention, MLPs, timestep embeddings.

Everything here compiles with torch.jit.script on the project's torch (2.x).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    """q [B,h,L,d], k/v [B,h,S,d], mask bool broadcastable to [B,h,L,S] (True = attend): torch's fused
    kernels (flash on CPU and CUDA; on CPU as fast as the plain matmul-softmax-matmul for the tiny model)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, kvHeads, S, d] -> [B, kvHeads*groups, S, d] for grouped-query attention."""
    if groups == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, groups, S, D).reshape(B, H * groups, S, D)


def one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], groups: int) -> Tensor:
    """attention() of one query token (q [B, heads, 1, d]) over k/v [B, kvHeads, S, d] without repeating
    k/v per head: each key head's `groups` query heads are one batch of the matmuls, so the keys and
    values are read once (decoding reads the whole cache every token). Scores and weights in float32."""
    B, H, L, D = q.shape
    qg = q.reshape(B, H // groups, groups, D).float()
    scores = torch.matmul(qg, k.float().transpose(-2, -1)) * (1.0 / math.sqrt(D))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v.float()).to(q.dtype).reshape(B, H, L, D)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], groups: int) -> Tensor:
    """attention() with k/v [B, heads/groups, S, d]. Decoding (one query) reads k/v once; otherwise
    they are repeated per head for the fused kernels."""
    if q.shape[2] == 1 and groups > 1:
        return one_query_attention(q, k, v, mask, groups)
    return attention(q, repeat_kv(k, groups), repeat_kv(v, groups), mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Normalised in float32 (as Qwen2 and Lumina do), scaled in the weight's dtype, as one op (aten
    rms_norm: one kernel on CUDA, where a DiT step at the 4B dimensions runs about 2000 kernels, 5 of these
    norms per block; on CPU as fast as the plain formula's eight)."""
    return torch.rms_norm(x, [x.shape[-1]], weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the FFN of Qwen2, the Qwen2.5-VL vision tower and Lumina-Next
    (Lumina's linear_1 / linear_3 / linear_2 are gate / up / down)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_1d(positions: Tensor, dim: int, theta: float) -> Tuple[Tensor, Tensor]:
    """cos, sin [N, dim] (float32) for integer positions [N], rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def rope_2d(rows: Tensor, cols: Tensor, dim: int, theta: float) -> Tuple[Tensor, Tensor]:
    """cos, sin [N, dim] for 2-D positions: half of the rotated pairs turn with the row, half with the
    column (Qwen2.5-VL vision tower, Lumina-Next). Lumina pairs adjacent channels (complex numbers) where
    we pair channel i with i + dim/2; the two differ by a fixed permutation of q/k channels, which a
    weight loader applies to the q/k projections, so the attention scores are identical."""
    half = dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=rows.device, dtype=torch.float32) / half)
    freqs = torch.cat([rows.float()[:, None] * inv_freq[None, :], cols.float()[:, None] * inv_freq[None, :]], -1)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., N, dim] rotated by cos/sin [N, dim]. Callers pass tables already in x's dtype (the casts
    here are then no-ops instead of two kernels per call)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [N, dim] (float32) of (possibly fractional) timesteps [N] (DDPM / diffusers
    `Timesteps` with downscale_freq_shift 0; flip puts cos first, as SDXL and Lumina-Next do)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    if flip_sin_to_cos:
        return torch.cat([args.cos(), args.sin()], -1)
    return torch.cat([args.sin(), args.cos()], -1)


class TimestepMLP(nn.Module):
    """Linear - SiLU - Linear on a sinusoidal embedding (diffusers `TimestepEmbedding`)."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class SampleLinear(nn.Linear):
    """nn.Linear (same parameters) that, on CPU, multiplies each sample (first dimension) on its own.
    The BLAS (MKL, OpenBLAS) rounds a row differently depending on where it falls in the GEMM, so a sample batched with
    others would not give its lone bytes; one GEMM per sample does, whatever else the call holds, so a
    runtime may split a batch into calls as it likes. CUDA keeps the single GEMM."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda or (x.dim() != 2 and x.dim() != 3):
            return F.linear(x, self.weight, self.bias)
        rows = x if x.dim() == 3 else x.unsqueeze(1)
        y = torch.bmm(rows, self.weight.t().expand(rows.shape[0], -1, -1))
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 3 else y.squeeze(1)


def per_sample_linears(module: nn.Module) -> nn.Module:
    """Makes module's nn.Linear layers SampleLinear, in place (a class change: no state moves)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = SampleLinear
    return module
