"""The BLIP3-o backbone: a Qwen2.5-VL style multimodal LM plus the learnable image-query embeddings.

Exported methods (contract section 2): condition, embed, encode_image, new_cache, prefill, decode; and, for
understanding with an image (M-RoPE), prefill_mrope and decode_mrope. rope_positions() (plain Python) gives
the [3, L] positions prefill_mrope takes.
Module names follow the Hugging Face Qwen2.5-VL checkpoints (minus their `model.` prefixes), so loading
real weights is a walk over the state dict (models/importer/backbone.py maps every name).

Checked against transformers' Qwen2_5_VLForConditionalGeneration (test/python/test_fidelity_backbone.py):
the vision tower (patch order, 2-D RoPE, window partition, full-attention layers, merger) and the language
model (Qwen2 layers, M-RoPE) compute what it computes, up to float32 rounding.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .layers import RMSNorm, SwiGLU, apply_rope, attention, grouped_attention, rope_1d, rope_2d
from .presets import BackboneConfig, VisionConfig


def rope_mrope(positions: Tensor, dim: int, theta: float, sections: List[int]) -> Tuple[Tensor, Tensor]:
    """cos, sin [L, dim] (float32) of Qwen2-VL's multimodal RoPE for positions [3, L] (temporal, height,
    width), rotate-half layout. The dim/2 frequencies of rope_1d are cut into consecutive sections
    (mrope_section, e.g. [16, 24, 24] for head dim 128); section i turns with axis i % 3. With the three
    axes equal this is rope_1d; with no sections, every axis is taken to be positions[0] (1-D RoPE)."""
    if len(sections) == 0:
        return rope_1d(positions[0], dim, theta)
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    freqs = positions.float()[:, :, None] * inv_freq[None, None, :]  # [3, L, dim/2]
    parts: List[Tensor] = []
    start = 0
    for i, size in enumerate(sections):
        parts.append(freqs[i % 3, :, start:start + size])
        start += size
    f = torch.cat(parts, -1)
    emb = torch.cat([f, f], -1)
    return emb.cos(), emb.sin()


def rope_positions(input_ids: Sequence[int], image_pad: int, grids: Sequence[Tuple[int, int]],
                   mrope: bool = True) -> Tuple[Tensor, int]:
    """The [3, L] int64 rope positions (temporal, height, width) of a prompt for prefill_mrope, and the rope
    delta for decoding after it: what transformers' Qwen2.5-VL get_rope_index computes for still images.

    input_ids: the prompt, with the image pad token (`<|image_pad|>`, whose id is `image_pad`) repeated once
    per merged image token where each image goes. grids: per image, in prompt order, its merged grid (rows, cols) =
    (H / (patch * merge), W / (patch * merge)) of the pixels given to encode_image (28 px per merged
    token for Qwen2.5-VL); image k occupies the next rows * cols pad tokens, row-major as encode_image
    returns them.

    The rule: a counter p starts at 0. A text token (anything outside an image's pad run) gets (p, p, p),
    then p += 1. An image of rows x cols merged tokens starting when the counter is s: its token at row
    r, column c (index r * cols + c in its run) gets (s, s + r, s + c); after the image p = s + max(rows,
    cols) (the next text token continues from there, not from s + rows * cols). The vision start / end
    tokens around the pads are text tokens.
    delta = p_final - L, where p_final is the counter after the last token (= 1 + the largest position)
    and L the prompt length; it is <= 0. Decoding: the token written at KV-cache index n (n >= L) has rope
    position n + delta on all three axes (decode_mrope's `position`, its `slot` being n).
    Without images every token gets (i, i, i) and delta is 0: M-RoPE reduces to the 1-D positions of
    prefill/decode. mrope=False (a backbone with no mrope_section, the tiny model) gives those 1-D
    positions for image prompts too, as that model was trained with them.
    """
    ids = [int(t) for t in input_ids]
    L = len(ids)
    if not mrope:
        return torch.arange(L, dtype=torch.int64).view(1, L).expand(3, L).contiguous(), 0
    pos = torch.zeros(3, L, dtype=torch.int64)
    p, i, image = 0, 0, 0
    while i < L:
        if ids[i] != image_pad:
            pos[:, i] = p
            p += 1
            i += 1
            continue
        if image >= len(grids):
            raise ValueError(f"more image pad runs than the {len(grids)} image grid(s) given")
        rows, cols = int(grids[image][0]), int(grids[image][1])
        n = rows * cols
        if i + n > L or any(t != image_pad for t in ids[i:i + n]):
            raise ValueError(f"image {image}: expected {n} = {rows} x {cols} pad tokens at index {i}")
        r = torch.arange(rows, dtype=torch.int64).view(-1, 1).expand(rows, cols).reshape(-1)
        c = torch.arange(cols, dtype=torch.int64).view(1, -1).expand(rows, cols).reshape(-1)
        pos[0, i:i + n] = p
        pos[1, i:i + n] = p + r
        pos[2, i:i + n] = p + c
        p += max(rows, cols)
        i += n
        image += 1
    if image != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) given but {image} image pad run(s) found")
    return pos, p - L


class SelfAttention(nn.Module):
    """Qwen2 attention: grouped-query heads, biases on q/k/v (not on the output), RoPE on q and k."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                cache: Optional[Tensor], position: Optional[Tensor]) -> Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # cache: this layer's [2, B, kvHeads, max_len, headDim], written in place
            if position is None:  # prefill: the prompt occupies positions 0..L-1
                cache[0].narrow(2, 0, L).copy_(k)
                cache[1].narrow(2, 0, L).copy_(v)
            else:  # decode: write one step, then attend over the whole static cache (mask hides the rest)
                cache[0].index_copy_(2, position, k)
                cache[1].index_copy_(2, position, v)
                k, v = cache[0], cache[1]
        groups = self.heads // self.kv_heads
        y = grouped_attention(q, k, v, mask, groups)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.ffn)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                cache: Optional[Tensor], position: Optional[Tensor]) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, position)
        return x + self.mlp(self.post_attention_layernorm(x))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.width // cfg.heads
        self.rope_float32 = cfg.rope_float32
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                windows: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        """x [N, width] (one image) or [B, N, width] (a batch of same-size images, training). mask: which
        keys each query attends to; windows (one image): attention within windows instead, computed window
        by window (see VisionTower.windows)."""
        batched = x.dim() == 3
        xb = x if batched else x.unsqueeze(0)
        B, N = xb.shape[0], xb.shape[1]
        q, k, v = self.qkv(xb).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.rope_float32:  # (cos / sin are float32 then) rotated in float32, rounded once, as transformers does
            q, k = apply_rope(q.float(), cos, sin).to(v.dtype), apply_rope(k.float(), cos, sin).to(v.dtype)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if windows is not None and not batched:
            gather, keys, slots = windows
            nw, S = keys.shape[0], keys.shape[-1]
            q = q[0].index_select(1, gather).view(self.heads, nw, S, self.head_dim).transpose(0, 1)
            k = k[0].index_select(1, gather).view(self.heads, nw, S, self.head_dim).transpose(0, 1)
            v = v[0].index_select(1, gather).view(self.heads, nw, S, self.head_dim).transpose(0, 1)
            y = attention(q, k, v, keys)  # [windows, heads, S, d]
            return self.proj(y.transpose(1, 2).reshape(nw * S, -1).index_select(0, slots))
        y = attention(q, k, v, mask)  # [B, heads, N, d]
        y = self.proj(y.transpose(1, 2).reshape(B, N, -1))
        return y if batched else y[0]


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, windowed: bool):
        super().__init__()
        self.windowed = windowed
        self.norm1 = RMSNorm(cfg.width, cfg.eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.width, cfg.eps)
        self.mlp = SwiGLU(cfg.width, cfg.ffn, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, window_mask: Optional[Tensor],
                windows: Optional[Tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        if self.windowed:
            x = x + self.attn(self.norm1(x), cos, sin, window_mask, windows)
        else:
            x = x + self.attn(self.norm1(x), cos, sin, None)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of patches (consecutive rows) -> MLP -> one LM token."""

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.group = cfg.merge * cfg.merge
        self.ln_q = RMSNorm(cfg.width, cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.width * self.group, cfg.width * self.group), nn.GELU(),
                                 nn.Linear(cfg.width * self.group, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # a batch [B, N, width]
            return self.mlp(self.ln_q(x).view(x.shape[0], x.shape[1] // self.group, -1))
        return self.mlp(self.ln_q(x).view(x.shape[0] // self.group, -1))


class VisionTower(nn.Module):
    """Qwen2.5-VL ViT for one image. Its Conv3d patch embedding (temporal patch 2) over a still image's
    two identical frames equals this Conv2d with the two temporal kernel slices summed (the importer sums
    them). Its token order is the image processor's (merge groups row-major, row-major inside a group);
    the merged tokens come out row-major, as transformers returns them. Window attention: transformers
    reorders the patches window by window and attends within each (cu_window_seqlens); a block-diagonal
    mask over the same windows in this order is the same attention (a permutation of the tokens)."""

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.patch, self.merge, self.window = cfg.patch, cfg.merge, cfg.window
        self.head_dim, self.rope_theta, self.rope_float32 = cfg.width // cfg.heads, cfg.rope_theta, cfg.rope_float32
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.blocks = nn.ModuleList([VisionBlock(cfg, cfg.window > 0 and i not in cfg.full_attention_layers)
                                     for i in range(cfg.layers)])
        self.merger = PatchMerger(cfg, out_dim)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [1, 3, H, W] already normalised with the CLIP mean / std (the caller's job, as Qwen's
        image processor does it) -> [H/28 * W/28, out_dim]; [B, 3, H, W] -> [B, H/28 * W/28, out_dim]."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [1, D, gh, gw]
        D, gh, gw = x.shape[1], x.shape[2], x.shape[3]
        m = self.merge
        # order the patches merge-group by merge-group (row-major groups, row-major inside a group), so
        # that the merger can take 4 consecutive rows and its output is row-major over merged tokens
        B = x.shape[0]
        x = x.view(B, D, gh // m, m, gw // m, m).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, D)
        if B == 1:
            x = x[0]
        idx = torch.arange(gh * gw, device=x.device).view(gh // m, gw // m, m, m)
        group_row = torch.arange(gh // m, device=x.device).view(-1, 1, 1, 1)
        group_col = torch.arange(gw // m, device=x.device).view(1, -1, 1, 1)
        rows = (group_row * m + torch.arange(m, device=x.device).view(1, 1, -1, 1)).expand_as(idx).reshape(-1)
        cols = (group_col * m + torch.arange(m, device=x.device).view(1, 1, 1, -1)).expand_as(idx).reshape(-1)
        cos, sin = rope_2d(rows, cols, self.head_dim, self.rope_theta)
        if not self.rope_float32:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        window_mask: Optional[Tensor] = None
        windows: Optional[Tuple[Tensor, Tensor, Tensor]] = None
        if self.window > 0:
            # windows of window x window merged tokens (Qwen2.5-VL: 112 px = 4 x 4), tiled from the top
            # left; the last row / column of windows holds what is left (partial windows at the bottom and
            # right edges), as transformers' get_vision_window_index partitions them
            w = self.window * m
            win = (rows // w) * ((gw + w - 1) // w) + cols // w
            if B == 1:
                windows = self.windows(win, ((gh + w - 1) // w) * ((gw + w - 1) // w), w * w)
            else:
                window_mask = win[:, None] == win[None, :]
        for block in self.blocks:
            x = block(x, cos, sin, window_mask, windows)
        return self.merger(x)

    def windows(self, win: Tensor, count: int, size: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Window attention as a batch of windows (O(N x size) work, not the O(N^2) of a mask over all
        pairs): for tokens whose window is `win` [N] (count windows of at most size tokens), the token
        each padded window slot holds (gather [count * size]; padding holds token 0), which slots are
        real keys (keys [count, 1, 1, size]), and each token's slot (slots [N])."""
        order = torch.sort(win, stable=True)[1]  # tokens window by window
        n = torch.zeros(count, dtype=torch.long, device=win.device).index_add_(0, win, torch.ones_like(win))
        first = torch.cumsum(n, 0) - n
        ordered = win.index_select(0, order)
        slot_of_ordered = ordered * size + torch.arange(win.shape[0], device=win.device) - first.index_select(0, ordered)
        gather = torch.zeros(count * size, dtype=torch.long, device=win.device)
        gather[slot_of_ordered] = order
        keys = torch.zeros(count * size, dtype=torch.bool, device=win.device)
        keys[slot_of_ordered] = True
        slots = torch.empty_like(win)
        slots[order] = slot_of_ordered
        return gather, keys.view(count, 1, 1, size), slots


class Backbone(nn.Module):
    mrope_section: List[int]  # (annotated: TorchScript cannot type an empty list)

    def __init__(self, cfg: BackboneConfig, vision: VisionConfig):
        super().__init__()
        self.layer_count, self.kv_heads, self.head_dim = cfg.layers, cfg.kv_heads, cfg.head_dim
        self.query_tokens, self.rope_theta = cfg.query_tokens, cfg.rope_theta
        if cfg.mrope_section and 2 * sum(cfg.mrope_section) != cfg.head_dim:
            raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim / 2 = {cfg.head_dim // 2}")
        self.mrope_section = [int(n) for n in cfg.mrope_section]
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.embed_tokens.weight
        self.visual = VisionTower(vision, cfg.hidden)
        # BLIP3-o's 64 learnable queries: appended after the prompt, their last hidden states condition the DiT
        self.queries = nn.Parameter(torch.randn(cfg.query_tokens, cfg.hidden) * 0.02)

    def _run(self, x: Tensor, positions: Tensor, mask: Optional[Tensor],
             cache: Optional[Tensor], position: Optional[Tensor]) -> Tensor:
        # 1-D positions: what M-RoPE reduces to for text (and for generation, whose official code gives
        # no position ids: plain sequential positions on all three axes). Image prompts: the *_mrope methods.
        cos, sin = rope_1d(positions, self.head_dim, self.rope_theta)
        return self._layers(x, cos, sin, mask, cache, position)

    def _layers(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Optional[Tensor],
                cache: Optional[Tensor], slot: Optional[Tensor]) -> Tensor:
        """The decoder layers and the final norm; slot: the KV-cache index a decode step writes."""
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once here, not in each layer's apply_rope
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], slot)
        return self.norm(x)

    def logits_mrope(self, embeds: Tensor, positions: Tensor) -> Tensor:
        """Float32 logits [B, L, V] of a whole sequence of embeddings with M-RoPE positions [3, L], no
        cache (eager reference for prefill_mrope / decode_mrope; not exported)."""
        L = embeds.shape[1]
        cos, sin = rope_mrope(positions, self.head_dim, self.rope_theta, self.mrope_section)
        h = self._layers(embeds, cos, sin, self._causal(L, embeds.device), None, None)
        return self.lm_head(h).float()

    def _causal(self, L: int, device: torch.device) -> Tensor:
        return torch.ones(L, L, dtype=torch.bool, device=device).tril()

    def forward(self, input_ids: Tensor) -> Tensor:
        """Float32 logits [B, L, V] of a whole sequence, no cache (reference for prefill/decode)."""
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)
        h = self._run(self.embed_tokens(input_ids), positions, self._causal(L, input_ids.device), None, None)
        return self.lm_head(h).float()

    @torch.jit.export
    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    @torch.jit.export
    def condition(self, input_ids: Tensor) -> Tensor:
        """[B, L] ids (ending in [IMG]) -> [B, Q, H]: last-layer, final-normed states of the queries."""
        B = input_ids.shape[0]
        x = torch.cat([self.embed_tokens(input_ids), self.queries.unsqueeze(0).expand(B, -1, -1)], 1)
        L = x.shape[1]
        h = self._run(x, torch.arange(L, device=x.device), self._causal(L, x.device), None, None)
        return h[:, L - self.query_tokens:]

    @torch.jit.export
    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.visual(pixels)

    @torch.jit.export
    def new_cache(self, batch: int, max_len: int) -> Tensor:
        w = self.embed_tokens.weight
        return torch.zeros([self.layer_count, 2, batch, self.kv_heads, max_len, self.head_dim],
                           dtype=w.dtype, device=w.device)

    @torch.jit.export
    def prefill(self, embeds: Tensor, cache: Tensor) -> Tensor:
        L = embeds.shape[1]
        positions = torch.arange(L, device=embeds.device)
        h = self._run(embeds, positions, self._causal(L, embeds.device), cache, None)
        return self.lm_head(h[:, -1]).float()

    @torch.jit.export
    def decode(self, input_ids: Tensor, position: Tensor, cache: Tensor) -> Tensor:
        # shapes never depend on the value of `position`, so one captured CUDA graph serves every step
        keys = torch.arange(cache.shape[4], device=cache.device)
        mask = (keys <= position).view(1, 1, 1, -1)
        h = self._run(self.embed_tokens(input_ids), position, mask, cache, position)
        return self.lm_head(h[:, -1]).float()

    @torch.jit.export
    def prefill_mrope(self, embeds: Tensor, positions: Tensor, cache: Tensor) -> Tensor:
        """prefill() with M-RoPE: embeds [B, L, H] (image tokens already in place), positions [3, L] int64
        (rope_positions(); the same for every row) -> float32 logits [B, V] of the last token. The prompt
        fills KV-cache slots 0..L-1."""
        L = embeds.shape[1]
        cos, sin = rope_mrope(positions, self.head_dim, self.rope_theta, self.mrope_section)
        h = self._layers(embeds, cos, sin, self._causal(L, embeds.device), cache, None)
        return self.lm_head(h[:, -1]).float()

    @torch.jit.export
    def decode_mrope(self, input_ids: Tensor, slot: Tensor, position: Tensor, cache: Tensor) -> Tensor:
        """decode() after prefill_mrope: input_ids [B, 1], slot [1] int64 = the KV-cache index written
        (attention covers slots 0..slot), position [1] int64 = the rope position, the same on all three
        axes (slot + the rope delta of rope_positions()). Shapes never depend on the values."""
        keys = torch.arange(cache.shape[4], device=cache.device)
        mask = (keys <= slot).view(1, 1, 1, -1)
        cos, sin = rope_1d(position, self.head_dim, self.rope_theta)
        h = self._layers(self.embed_tokens(input_ids), cos, sin, mask, cache, slot)
        return self.lm_head(h[:, -1]).float()
