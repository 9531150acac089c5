"""Every dimension of every component, by name. Presets: `tiny` (random, CPU-fast, bundled), `4b`, `8b`
(the real BLIP3-o sizes, see shared/BLIP3O.md)."""
from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Prompt templates (manifest.json `templates`). Generation leaves the assistant turn open and ends in
# [IMG], as BLIP3-o's inference does; the queries are appended natively.
TEMPLATES = {
    "generation": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "Please generate image based on the following caption: {prompt}<|im_end|>\n"
                  "<|im_start|>assistant\n[IMG]",
    "understanding": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                     "<|vision_start|>{image}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n",
    "negative": " ",
    "defaultQuestion": "Describe this image.",
}


@dataclass
class BackboneConfig:  # Qwen2.5 language model + the learnable query tokens
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    context: int
    tied: bool
    query_tokens: int = 64
    rope_theta: float = 1e6
    eps: float = 1e-6
    # Qwen2-VL multimodal RoPE: the head's dim/2 rotary frequencies cut into (temporal, height, width)
    # sections, e.g. (16, 24, 24); image tokens then get 3-D positions (backbone.rope_positions, used by
    # prefill_mrope). () = 1-D positions for every token, images included (the tiny model was trained so)
    mrope_section: Tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass
class VisionConfig:  # Qwen2.5-VL vision tower
    width: int
    layers: int
    heads: int
    ffn: int
    patch: int = 14
    merge: int = 2
    window: int = 0  # window attention side in merged tokens (0 = every layer attends globally)
    full_attention_layers: Tuple[int, ...] = ()  # layers that attend globally when window > 0
    min_pixels: int = 256 * 28 * 28
    max_pixels: int = 1605632
    rope_theta: float = 10000.0
    eps: float = 1e-6
    # apply the 2-D RoPE to q / k in float32 and round once (transformers' Qwen2.5-VL vision attention);
    # False: in the activations' dtype (the same in float32, the tiny model's)
    rope_float32: bool = False


@dataclass
class DitConfig:  # Lumina-Next DiT with cross-attention (BLIP3-o NextDiTCrossAttn)
    channels: int  # CLIP feature width: in = out channels
    grid: int  # tokens lie on a grid x grid square, patch 1
    width: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    caption_dim: int  # = backbone hidden
    eps: float = 1e-5
    rope_theta: float = 10000.0
    # a learned embedding per grid cell added to the input (not in Lumina-Next, whose only positions are
    # RoPE's relative ones): the tiny DiT learns where a caption puts things faster with it
    absolute_positions: bool = False
    # the released caption projection: Linear(H, width), GELU (tanh), Linear(width, width) (PixArt-alpha's
    # text projection); the tiny DiT has one Linear
    caption_mlp: bool = False
    caption_norm_eps: float = 1e-6  # the pooled caption's LayerNorm (released: torch's default 1e-5)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid


@dataclass
class UnetConfig:  # SDXL-style UNet decoder, conditioned on CLIP features
    channels: Tuple[int, ...]
    layers_per_block: int
    transformer_depth: Tuple[int, ...]  # per level, 0 = no attention at that level
    head_dim: int
    cross_dim: int  # = CLIP width
    latent_channels: int
    image_size: Tuple[int, int]  # (height, width): the added time ids (orig size, crop 0 0, target size)
    groups: int = 32
    time_id_dim: int = 256
    # the feature grid, upsampled to the latent size, joins the sample at conv_in (the tiny decoder: it
    # draws where the features say; SDXL and the real decoder only cross-attend)
    concat_features: bool = False
    # (height, width) of the time ids' original size; () = image_size. BLIP3-o's decoder pipeline (Emu2-Gen's)
    # passes a fixed (1024, 1024) whatever size it generates: time ids (1024, 1024, 0, 0, height, width)
    original_size: Tuple[int, ...] = ()


@dataclass
class VaeConfig:  # SDXL AutoencoderKL, or (patch > 0) pixels folded into patch x patch "latents"
    channels: Tuple[int, ...]  # spatial factor = 2 ** (len(channels) - 1)
    layers_per_block: int
    latent_channels: int
    groups: int = 32
    scaling_factor: float = 0.13025
    patch: int = 0  # > 0: no autoencoder, the decoder works on pixels folded by pixel_unshuffle(patch)
    # the checkpoint's config says its activations overflow float16 (SDXL's VAE): diffusers' pipelines then
    # decode in float32 when the rest runs in float16 (bfloat16 and float32 need nothing)
    force_upcast: bool = False

    @property
    def factor(self) -> int:
        return self.patch or 2 ** (len(self.channels) - 1)


@dataclass
class Preset:
    name: str
    image: Tuple[int, int]  # (height, width) of generated images
    backbone: BackboneConfig
    vision: VisionConfig
    dit: DitConfig
    unet: UnetConfig
    vae: VaeConfig

    @property
    def latent(self) -> Tuple[int, int, int]:
        factor = self.vae.factor
        return (self.vae.latent_channels, self.image[0] // factor, self.image[1] // factor)

    def to_dict(self) -> dict:
        return asdict(self)


def _tiny() -> Preset:
    """The bundled model of the shapes world (models/recipe trains it): small enough to train on two CPU
    cores in hours and to generate a 64 x 64 image in well under a second."""
    backbone = BackboneConfig(vocab=512, hidden=128, layers=4, heads=4, kv_heads=2, ffn=384, context=256, tied=True)
    return Preset(
        name="tiny", image=(64, 64), backbone=backbone,
        vision=VisionConfig(width=96, layers=4, heads=4, ffn=256, patch=8, merge=2,
                            min_pixels=64 * 64, max_pixels=128 * 128),
        dit=DitConfig(channels=32, grid=8, width=128, layers=4, heads=4, kv_heads=4, head_dim=32, ffn=384,
                      caption_dim=backbone.hidden, absolute_positions=True),
        unet=UnetConfig(channels=(48, 96), layers_per_block=1, transformer_depth=(0, 1), head_dim=32,
                        cross_dim=32, latent_channels=48, image_size=(64, 64), groups=16, time_id_dim=16,
                        concat_features=True),
        vae=VaeConfig(channels=(), layers_per_block=0, latent_channels=48, scaling_factor=1.0, patch=4))


def _real(name: str, backbone: BackboneConfig) -> Preset:
    return Preset(
        name=name, image=(1024, 1024), backbone=backbone,
        # Qwen2.5-VL vision: windows of 112 px = 4x4 merged tokens, global attention every 8th layer
        vision=VisionConfig(width=1280, layers=32, heads=16, ffn=3420, patch=14, merge=2, window=4,
                            full_attention_layers=(7, 15, 23, 31), rope_float32=True),
        dit=DitConfig(channels=1792, grid=8, width=1792, layers=24, heads=28, kv_heads=28, head_dim=64,
                      ffn=4864, caption_dim=backbone.hidden, caption_mlp=True, caption_norm_eps=1e-5),
        # Emu2-Gen's UNet (diffusion-decoder/unet/config.json): Down / CrossAttn / CrossAttn, 5 / 10 / 20 heads
        unet=UnetConfig(channels=(320, 640, 1280), layers_per_block=2, transformer_depth=(0, 2, 10), head_dim=64,
                        cross_dim=1792, latent_channels=4, image_size=(1024, 1024), original_size=(1024, 1024)),
        vae=VaeConfig(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, force_upcast=True))


# 4b / 8b context: a practical cap on prompt + generated tokens (the checkpoints allow 128000). vocab: the
# base Qwen2.5-VL's; the released checkpoints have 151668 embedding rows (models/importer/backbone.py
# takes the count from the checkpoint)
PRESETS = {
    "tiny": _tiny,
    "4b": lambda: _real("4b", BackboneConfig(vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2,
                                             ffn=11008, context=32768, tied=True, mrope_section=(16, 24, 24))),
    "8b": lambda: _real("8b", BackboneConfig(vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                                             ffn=18944, context=32768, tied=False, mrope_section=(16, 24, 24))),
}


def get_preset(name: str, backbone_layers: Optional[int] = None, vision_layers: Optional[int] = None,
               dit_layers: Optional[int] = None, unet_depth: Optional[Tuple[int, ...]] = None,
               unet_layers_per_block: Optional[int] = None) -> Preset:
    """A preset with optional smaller layer counts (tests, quick timing); widths always stay real."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    p = PRESETS[name]()
    if backbone_layers is not None:
        p.backbone = replace(p.backbone, layers=backbone_layers)
    if vision_layers is not None:
        # keep some global-attention layer: the ones that still exist, else the last one
        full = tuple(i for i in p.vision.full_attention_layers if i < vision_layers)
        if p.vision.window and not full:
            full = (vision_layers - 1,)
        p.vision = replace(p.vision, layers=vision_layers, full_attention_layers=full)
    if dit_layers is not None:
        p.dit = replace(p.dit, layers=dit_layers)
    if unet_depth is not None:
        p.unet = replace(p.unet, transformer_depth=tuple(unet_depth))
    if unet_layers_per_block is not None:
        p.unet = replace(p.unet, layers_per_block=unet_layers_per_block)
    return p
