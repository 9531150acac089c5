"""SDXL-style AutoencoderKL. forward(latents) decodes (the caller already divided by scalingFactor) to an
image in about [-1, 1]; encode() (eager only, for training) returns the posterior mean and log-variance.

AutoencoderKL is diffusers' AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D levels (resnets with
GroupNorm eps 1e-6, a single-head attention in each mid block, post_quant_conv before decoding):
models/importer/decoder.py maps the config and tensor names, test/python/test_fidelity_decoder.py checks
decoding against diffusers' outputs."""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .layers import attention
from .presets import VaeConfig
from .unet import ResnetBlock


class SpatialAttention(nn.Module):
    """Single-head self-attention over all pixels of the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        h = self.group_norm(x).view(N, C, H * W).transpose(1, 2)
        y = attention(self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None], None)[:, 0]
        return x + self.to_out(y).transpose(1, 2).reshape(N, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnet1 = ResnetBlock(channels, channels, groups)
        self.attention = SpatialAttention(channels, groups)
        self.resnet2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.resnet2(self.attention(self.resnet1(x, None)), None)


class Level(nn.Module):
    """Resnets at one resolution, then an optional 2x down- or upsampling conv."""

    def __init__(self, cin: int, cout: int, count: int, groups: int, sample: str):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(count)])
        # downsampling pads right/bottom only, then a stride-2 conv (SDXL's VAE encoder)
        self.down = nn.Conv2d(cout, cout, 3, stride=2) if sample == "down" else None
        self.up = nn.Conv2d(cout, cout, 3, padding=1) if sample == "up" else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, None)
        if self.down is not None:
            x = self.down(F.pad(x, [0, 1, 0, 1]))
        if self.up is not None:
            x = self.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Decoder(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        ch = list(reversed(cfg.channels))
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], cfg.groups)
        self.up_blocks = nn.ModuleList([
            Level(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, cfg.groups, "up" if i < len(ch) - 1 else "none")
            for i, c in enumerate(ch)])
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(ch[max(i - 1, 0)], c, cfg.layers_per_block, cfg.groups, "down" if i < len(ch) - 1 else "none")
            for i, c in enumerate(ch)])
        self.mid_block = MidBlock(ch[-1], cfg.groups)
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VaeConfig):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, latents: Tensor) -> Tensor:
        dtype = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(latents.to(dtype)))

    @torch.jit.unused
    def encode(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """images [N,3,H,W] in [-1,1] -> (mean, logvar) of the latent posterior (unscaled)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class PatchPixels(nn.Module):
    """The "VAE" of a pixel-space decoder: latents are the image in [-1, 1] folded patch x patch into
    channels (pixel_unshuffle), so decoding is an exact unfold and nothing is learned or lost."""

    def __init__(self, cfg: VaeConfig):
        super().__init__()
        self.patch = cfg.patch
        self.register_buffer("scale", torch.ones(1))  # carries the dtype and device of the bundle

    def forward(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents.to(self.scale.dtype), self.patch)

    @torch.jit.unused
    def encode(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        mean = F.pixel_unshuffle(images, self.patch)
        return mean, torch.full_like(mean, -30.0)


def build_vae(cfg: VaeConfig) -> nn.Module:
    return PatchPixels(cfg) if cfg.patch > 0 else AutoencoderKL(cfg)
