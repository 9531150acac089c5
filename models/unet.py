"""SDXL-style conditional UNet: the BLIP3-o diffusion decoder, CLIP features -> VAE latents.

forward(sample [N,c,h,w], timestep [N] float32, features [N,T,C]) -> epsilon prediction. The features are
the cross-attention context; SDXL's pooled text embedding becomes their mean, and the added time ids are
the fixed (original size, crop 0 0, target size) of the generated image, as BLIP3-o's decoder pipeline
passes them (text_embeds = the features' mean over tokens, time_ids = (1024, 1024, 0, 0, height, width)).

Without concat_features this is diffusers' UNet2DConditionModel as an SDXL-style config builds it
(positional time embedding with flip_sin_to_cos and no frequency shift, `text_time` added embedding,
DownBlock2D / CrossAttnDownBlock2D levels with mirrored up blocks, UNetMidBlock2DCrossAttn, transformers
with linear projections, GEGLU feed-forward): models/importer/decoder.py maps the configs and tensor names
and test/python/test_fidelity_decoder.py checks it against diffusers' outputs.
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import TimestepMLP, attention, timestep_embedding
from .presets import UnetConfig


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between (time_dim 0: none, as in the VAE)."""

    def __init__(self, cin: int, cout: int, groups: int, time_dim: int = 0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6 if time_dim == 0 else 1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, cout) if time_dim > 0 else None
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6 if time_dim == 0 else 1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, temb: Optional[Tensor]) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)  # diffusers: to_out.0

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        N, L, D = x.shape
        S = context.shape[1]
        q = self.to_q(x).view(N, L, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(N, S, self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(N, S, self.heads, -1).transpose(1, 2)
        return self.to_out(attention(q, k, v, None).transpose(1, 2).reshape(N, L, D))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the CLIP features, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff_proj = nn.Linear(dim, 8 * dim)  # GEGLU: value and gate halves of 4 * dim each
        self.ff_out = nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        value, gate = self.ff_proj(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(value * F.gelu(gate))


class Transformer2D(nn.Module):
    def __init__(self, channels: int, depth: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, context_dim, heads) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        N, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(N, H * W, C))
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h).view(N, H, W, C).permute(0, 3, 1, 2)


class ResnetAttention(nn.Module):
    """A resnet, then (at levels with attention) a transformer over its output."""

    def __init__(self, cin: int, cout: int, depth: int, cfg: UnetConfig, time_dim: int):
        super().__init__()
        self.resnet = ResnetBlock(cin, cout, cfg.groups, time_dim)
        self.attention = (Transformer2D(cout, depth, cfg.cross_dim, cout // cfg.head_dim, cfg.groups)
                          if depth > 0 else None)

    def forward(self, x: Tensor, temb: Tensor, features: Tensor) -> Tensor:
        x = self.resnet(x, temb)
        if self.attention is not None:
            x = self.attention(x, features)
        return x


class Stage(nn.Module):
    """One resolution level of the down or up path (up stages concatenate a skip before each layer)."""

    def __init__(self, cins: List[int], cout: int, depth: int, cfg: UnetConfig, time_dim: int, sample: str):
        super().__init__()
        self.layers = nn.ModuleList([ResnetAttention(c, cout, depth, cfg, time_dim) for c in cins])
        self.down = nn.Conv2d(cout, cout, 3, stride=2, padding=1) if sample == "down" else None
        self.up = nn.Conv2d(cout, cout, 3, padding=1) if sample == "up" else None


class UNet(nn.Module):
    def __init__(self, cfg: UnetConfig):
        super().__init__()
        ch, L, levels = cfg.channels, cfg.layers_per_block, len(cfg.channels)
        self.base_channels, self.time_id_dim = ch[0], cfg.time_id_dim
        time_dim = 4 * ch[0]
        self.time_embedding = TimestepMLP(ch[0], time_dim)
        self.add_embedding = TimestepMLP(cfg.cross_dim + 6 * cfg.time_id_dim, time_dim)
        h, w = cfg.image_size
        oh, ow = cfg.original_size or cfg.image_size
        self.register_buffer("time_ids", torch.tensor([oh, ow, 0, 0, h, w], dtype=torch.float32))
        self.concat_features = cfg.concat_features
        self.conv_in = nn.Conv2d(cfg.latent_channels + (cfg.cross_dim if cfg.concat_features else 0), ch[0], 3,
                                 padding=1)

        skips, cin = [ch[0]], ch[0]
        self.down_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            last = i == levels - 1
            self.down_blocks.append(Stage([cin] + [cout] * (L - 1), cout, cfg.transformer_depth[i], cfg, time_dim,
                                          "none" if last else "down"))
            skips += [cout] * (L if last else L + 1)
            cin = cout
        self.mid_resnet1 = ResnetBlock(cin, cin, cfg.groups, time_dim)
        self.mid_attention = Transformer2D(cin, max(cfg.transformer_depth[-1], 1), cfg.cross_dim,
                                           cin // cfg.head_dim, cfg.groups)
        self.mid_resnet2 = ResnetBlock(cin, cin, cfg.groups, time_dim)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            cout = ch[i]
            cins = []
            for _ in range(L + 1):
                cins.append(cin + skips.pop())
                cin = cout
            self.up_blocks.append(Stage(cins, cout, cfg.transformer_depth[i], cfg, time_dim,
                                        "up" if i > 0 else "none"))
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.latent_channels, 3, padding=1)

    def forward(self, sample: Tensor, timestep: Tensor, features: Tensor) -> Tensor:
        dtype = self.conv_in.weight.dtype
        N = sample.shape[0]
        features = features.to(dtype)
        temb = self.time_embedding(timestep_embedding(timestep, self.base_channels).to(dtype))
        time_ids = timestep_embedding(self.time_ids.float(), self.time_id_dim).reshape(1, -1).expand(N, -1)
        added = torch.cat([features.mean(1), time_ids.to(dtype)], -1)  # SDXL: [pooled text, time ids]
        temb = temb + self.add_embedding(added)

        x = sample.to(dtype)
        if self.concat_features:  # [N, T, C] on a sqrt(T) grid -> [N, C, h, w], nearest
            grid = int(math.sqrt(features.shape[1]))
            f = features.transpose(1, 2).reshape(N, features.shape[2], grid, grid)
            x = torch.cat([x, F.interpolate(f, size=[x.shape[2], x.shape[3]], mode="nearest")], 1)
        x = self.conv_in(x)
        skips = [x]
        for stage in self.down_blocks:
            for layer in stage.layers:
                x = layer(x, temb, features)
                skips.append(x)
            if stage.down is not None:
                x = stage.down(x)
                skips.append(x)
        x = self.mid_resnet2(self.mid_attention(self.mid_resnet1(x, temb), features), temb)
        for stage in self.up_blocks:
            for layer in stage.layers:
                x = layer(torch.cat([x, skips.pop()], 1), temb, features)
            if stage.up is not None:  # nearest, to the next skip's size (2x, unless the latent is odd-sized there)
                skip = skips[-1]
                x = stage.up(F.interpolate(x, size=[skip.shape[2], skip.shape[3]], mode="nearest"))
        return self.conv_out(F.silu(self.conv_norm_out(x)))
