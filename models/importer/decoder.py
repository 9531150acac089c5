"""The released diffusion decoder (`diffusion-decoder/`: Emu2-Gen's SDXL-style UNet, SDXL's AutoencoderKL and
an EulerDiscreteScheduler, each in diffusers' format) onto models/unet.py, models/vae.py and the manifest's
`sampler.decoder`.

The configs are diffusers' config.json / scheduler_config.json, read as dicts. What a config says is either
represented by our modules or rejected with a ValueError naming the field; a key a config leaves out takes
the default of diffusers' class (what diffusers' from_config gives it).

The tensor maps give, for each parameter of our module, the tensor of diffusers' checkpoint
(diffusion_pytorch_model.safetensors) that fills it and a transform (None: as stored). The UNet's
`time_ids` buffer is not in a checkpoint: the module computes it from the config (image_size,
original_size).
"""
import math
import re
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..presets import UnetConfig, VaeConfig
from ..unet import UNet
from ..vae import AutoencoderKL

Mapping = Dict[str, Tuple[str, Optional[Callable[[Tensor], Tensor]]]]

# BLIP3-o's decoder pipeline (Emu2-Gen's EmuVisualGeneration): original_size [1024, 1024], crop [0, 0],
# then the generated (height, width), whatever that is
ORIGINAL_SIZE = (1024, 1024)
# and its sampling: 50 steps, guidance 3.0 (not in the scheduler's config)
DECODER_STEPS = 50
DECODER_CFG = 3.0

# diffusers' UNet2DConditionModel.__init__ defaults (a config.json lists every key; these cover one that does not)
UNET_DEFAULTS: Dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}

# diffusers' AutoencoderKL.__init__ defaults
VAE_DEFAULTS: Dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}

# diffusers' EulerDiscreteScheduler.__init__ defaults
EULER_DEFAULTS: Dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear", "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
    "timestep_spacing": "linspace", "timestep_type": "discrete", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


class _Config:
    """A diffusers config dict with its class's defaults, and checks that name the offending field."""

    def __init__(self, cfg: dict, defaults: Dict[str, Any], what: str):
        if not isinstance(cfg, dict):
            raise ValueError(f"{what}: expected a config dict, got {type(cfg).__name__}")
        self.cfg, self.defaults, self.what = cfg, defaults, what

    def __getitem__(self, key: str) -> Any:
        return self.cfg[key] if key in self.cfg else self.defaults[key]

    def fail(self, key: str, why: str) -> ValueError:
        return ValueError(f"{self.what}: {key} = {self[key]!r}: {why}")

    def expect(self, key: str, *allowed: Any) -> None:
        value = self[key]
        if not any(value == a and type(value) is not bool or value is a for a in allowed):
            want = " or ".join(repr(a) for a in allowed)
            raise self.fail(key, f"the module supports only {want}")

    def int_(self, key: str, minimum: int = 1) -> int:
        value = self[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}")
        return value

    def per_level(self, key: str, levels: int) -> List[Any]:
        """An int for every level, or a list of one per level (diffusers accepts both)."""
        value = self[key]
        if isinstance(value, (list, tuple)):
            if len(value) != levels:
                raise self.fail(key, f"expected one entry per level ({levels})")
            out = list(value)
        else:
            out = [value] * levels
        for v in out:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self.fail(key, "expected positive integers (nested per-layer lists are not supported)")
        return out


def _size(value: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"{what}: expected a positive int or (height, width), got {value!r}")
    return size


def unet_config(cfg: dict, image_size: Union[int, Sequence[int]],
                original_size: Union[int, Sequence[int]] = ORIGINAL_SIZE) -> UnetConfig:
    """The UnetConfig of diffusers' `unet/config.json` (UNet2DConditionModel), for images of image_size
    (height, width): the target size of the added time ids. original_size: their original size, a fixed
    (1024, 1024) in BLIP3-o's pipeline."""
    c = _Config(cfg, UNET_DEFAULTS, "unet config")
    if "_class_name" in cfg and cfg["_class_name"] != "UNet2DConditionModel":
        raise c.fail("_class_name", "expected UNet2DConditionModel")
    image_size, original_size = _size(image_size, "image_size"), _size(original_size, "original_size")

    # what the module does not have: each must be diffusers' plain setting
    for key, allowed in [("center_input_sample", (False,)), ("flip_sin_to_cos", (True,)), ("freq_shift", (0,)),
                         ("mid_block_type", ("UNetMidBlock2DCrossAttn",)), ("downsample_padding", (1,)),
                         ("mid_block_scale_factor", (1,)), ("act_fn", ("silu",)), ("norm_eps", (1e-5,)),
                         ("encoder_hid_dim", (None,)), ("encoder_hid_dim_type", (None,)),
                         ("num_attention_heads", (None,)), ("dual_cross_attention", (False,)),
                         ("class_embed_type", (None,)), ("num_class_embeds", (None,)),
                         ("addition_embed_type", ("text_time",)), ("resnet_time_scale_shift", ("default",)),
                         ("resnet_skip_time_act", (False,)), ("resnet_out_scale_factor", (1,)),
                         ("time_embedding_type", ("positional",)), ("time_embedding_act_fn", (None,)),
                         ("timestep_post_act", (None,)), ("time_cond_proj_dim", (None,)), ("conv_in_kernel", (3,)),
                         ("conv_out_kernel", (3,)), ("attention_type", ("default",)),
                         ("class_embeddings_concat", (False,)), ("mid_block_only_cross_attention", (None, False)),
                         ("cross_attention_norm", (None,)), ("reverse_transformer_layers_per_block", (None,))]:
        c.expect(key, *allowed)
    # dropout is training only; upcast_attention is read only by diffusers' unfused attention processor (its
    # default, AttnProcessor2_0, calls scaled_dot_product_attention as the module does); use_linear_projection
    # False (1x1 convolutions around the transformers) is the same map: unet_tensors reshapes those weights

    channels = c["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or \
            any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in channels):
        raise c.fail("block_out_channels", "expected a list of positive integers")
    levels = len(channels)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != levels:
        raise c.fail("down_block_types", f"expected one per block_out_channels entry ({levels})")
    attends = []
    for t in down:
        if t not in ("DownBlock2D", "CrossAttnDownBlock2D"):
            raise c.fail("down_block_types", f"{t!r} is not DownBlock2D or CrossAttnDownBlock2D")
        attends.append(t == "CrossAttnDownBlock2D")
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)]
    if up != mirrored:
        raise c.fail("up_block_types", f"expected the down blocks mirrored: {mirrored}")
    only_cross = c["only_cross_attention"]
    if only_cross is not False and (not isinstance(only_cross, (list, tuple)) or any(v is not False for v in only_cross)):
        raise c.fail("only_cross_attention", "the module's transformers always self-attend")

    layers = c.per_level("layers_per_block", levels)
    if len(set(layers)) != 1:
        raise c.fail("layers_per_block", "the module has the same count at every level")
    depth = c.per_level("transformer_layers_per_block", levels)
    heads = c.per_level("attention_head_dim", levels)  # diffusers: the number of heads (num_attention_heads is null)
    cross = c.per_level("cross_attention_dim", levels)
    if len(set(cross)) != 1:
        raise c.fail("cross_attention_dim", "the module attends to one feature width at every level")
    # levels with a transformer, and the mid block (transformer_layers_per_block[-1] layers,
    # attention_head_dim[-1] heads at the last level's width)
    if not attends[-1]:
        raise c.fail("down_block_types", "the last level must be CrossAttnDownBlock2D (the module's mid "
                     "block attends at that level's depth)")
    head_dims = set()
    for i in range(levels):
        if attends[i]:
            if channels[i] % heads[i]:
                raise c.fail("attention_head_dim", f"{channels[i]} channels do not split into {heads[i]} heads")
            head_dims.add(channels[i] // heads[i])
    if len(head_dims) != 1:
        raise c.fail("attention_head_dim", f"head widths {sorted(head_dims)}: the module has one head width")
    head_dim = head_dims.pop()

    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or any(ch % groups for ch in channels):
        raise c.fail("norm_num_groups", "expected a positive integer dividing every block_out_channels entry")
    in_ch, out_ch = c.int_("in_channels"), c.int_("out_channels")
    if in_ch != out_ch:
        raise c.fail("out_channels", f"the module predicts as many channels as it takes ({in_ch})")
    time_dim = c["time_embedding_dim"]
    if time_dim is not None and time_dim != 4 * channels[0]:
        raise c.fail("time_embedding_dim", f"the module's time embedding is 4 x {channels[0]}")
    time_id_dim = c.int_("addition_time_embed_dim", 2)
    if time_id_dim % 2:
        raise c.fail("addition_time_embed_dim", "expected an even width")
    if channels[0] % 2:
        raise c.fail("block_out_channels", "the time embedding needs an even first width")
    pooled = cross[0] + 6 * time_id_dim  # text_embeds (the features' mean) then 6 time ids
    if c["projection_class_embeddings_input_dim"] != pooled:
        raise c.fail("projection_class_embeddings_input_dim",
                     f"the module pools the {cross[0]}-wide features and embeds 6 time ids: expected {pooled}")
    return UnetConfig(channels=tuple(channels), layers_per_block=layers[0],
                      transformer_depth=tuple(d if a else 0 for d, a in zip(depth, attends)), head_dim=head_dim,
                      cross_dim=cross[0], latent_channels=in_ch, image_size=image_size, groups=groups,
                      time_id_dim=time_id_dim, concat_features=False, original_size=original_size)


def vae_config(cfg: dict) -> VaeConfig:
    """The VaeConfig of diffusers' `vae/config.json` (AutoencoderKL)."""
    c = _Config(cfg, VAE_DEFAULTS, "vae config")
    if "_class_name" in cfg and cfg["_class_name"] != "AutoencoderKL":
        raise c.fail("_class_name", "expected AutoencoderKL")
    for key, allowed in [("in_channels", (3,)), ("out_channels", (3,)), ("act_fn", ("silu",)),
                         ("shift_factor", (None, 0, 0.0)), ("latents_mean", (None,)), ("latents_std", (None,)),
                         ("use_quant_conv", (True,)), ("use_post_quant_conv", (True,)),
                         ("mid_block_add_attention", (True,))]:
        c.expect(key, *allowed)
    channels = c["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or \
            any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in channels):
        raise c.fail("block_out_channels", "expected a list of positive integers")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(c[key]) != [kind] * len(channels):
            raise c.fail(key, f"expected {kind} at each of the {len(channels)} levels")
    groups = c["norm_num_groups"]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or any(ch % groups for ch in channels):
        raise c.fail("norm_num_groups", "expected a positive integer dividing every block_out_channels entry")
    scaling = c["scaling_factor"]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise c.fail("scaling_factor", "expected a positive number")
    force_upcast = c["force_upcast"]
    if not isinstance(force_upcast, bool):
        raise c.fail("force_upcast", "expected true or false")
    return VaeConfig(channels=tuple(channels), layers_per_block=c.int_("layers_per_block"),
                     latent_channels=c.int_("latent_channels"), groups=groups, scaling_factor=float(scaling),
                     patch=0, force_upcast=force_upcast)


def decoder_sampler(scheduler_config: dict, steps: int = DECODER_STEPS, cfg: float = DECODER_CFG) -> dict:
    """The manifest's sampler.decoder from diffusers' `scheduler/scheduler_config.json`
    (EulerDiscreteScheduler); steps and guidance are the pipeline's (BLIP3-o: 50 and 3.0)."""
    c = _Config(scheduler_config, EULER_DEFAULTS, "scheduler config")
    if "_class_name" in scheduler_config and scheduler_config["_class_name"] != "EulerDiscreteScheduler":
        raise c.fail("_class_name", "the runtime's decoder sampler is EulerDiscreteScheduler's")
    for key, allowed in [("beta_schedule", ("linear", "scaled_linear")), ("trained_betas", (None,)),
                         ("prediction_type", ("epsilon", "v_prediction", "sample")),
                         ("interpolation_type", ("linear",)), ("use_karras_sigmas", (False, None)),
                         ("use_exponential_sigmas", (False, None)), ("use_beta_sigmas", (False, None)),
                         ("sigma_min", (None,)), ("sigma_max", (None,)),
                         ("timestep_spacing", ("leading", "trailing", "linspace")), ("timestep_type", ("discrete",)),
                         ("rescale_betas_zero_snr", (False,)), ("final_sigmas_type", ("zero",))]:
        c.expect(key, *allowed)
    train = c.int_("num_train_timesteps")
    offset = c.int_("steps_offset", 0)
    if offset >= train:
        raise c.fail("steps_offset", "expected less than num_train_timesteps")
    betas = []
    for key in ("beta_start", "beta_end"):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise c.fail(key, "expected a number in (0, 1)")
        betas.append(float(v))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train:
        raise ValueError(f"decoder steps {steps!r}: expected an integer in [1, num_train_timesteps]")
    return {"steps": steps, "cfg": float(cfg), "numTrainTimesteps": train, "betaStart": betas[0],
            "betaEnd": betas[1], "betaSchedule": c["beta_schedule"], "timestepSpacing": c["timestep_spacing"],
            "stepsOffset": offset, "predictionType": c["prediction_type"]}


# --- tensor names: ours -> diffusers', rewritten in order

_UNET_RENAMES = [
    (r"^(down|up)_blocks\.(\d+)\.layers\.(\d+)\.resnet\.", r"\1_blocks.\2.resnets.\3."),
    (r"^(down|up)_blocks\.(\d+)\.layers\.(\d+)\.attention\.", r"\1_blocks.\2.attentions.\3."),
    (r"^down_blocks\.(\d+)\.down\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^up_blocks\.(\d+)\.up\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"^mid_resnet1\.", "mid_block.resnets.0."),
    (r"^mid_attention\.", "mid_block.attentions.0."),
    (r"^mid_resnet2\.", "mid_block.resnets.1."),
    (r"\.to_out\.", ".to_out.0."),
    (r"\.ff_proj\.", ".ff.net.0.proj."),
    (r"\.ff_out\.", ".ff.net.2."),
]

_VAE_RENAMES = [
    (r"\.mid_block\.resnet1\.", ".mid_block.resnets.0."),
    (r"\.mid_block\.resnet2\.", ".mid_block.resnets.1."),
    (r"\.mid_block\.attention\.", ".mid_block.attentions.0."),
    (r"\.down\.", ".downsamplers.0.conv."),
    (r"\.up\.", ".upsamplers.0.conv."),
    (r"\.to_out\.", ".to_out.0."),
]

# the VAE attention's names in checkpoints saved by diffusers before 0.14 (its loader still renames them)
_VAE_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _rename(name: str, rules) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def as_linear(t: Tensor) -> Tensor:
    """A Linear weight [out, in] from a Linear or a 1x1 convolution weight [out, in, 1, 1] (diffusers'
    Transformer2DModel without use_linear_projection, older VAE attentions): the same map over channels."""
    if t.dim() == 4 and t.shape[2:] != (1, 1):
        raise ValueError(f"a {tuple(t.shape)} convolution weight is not a 1x1 projection")
    return t.reshape(t.shape[0], t.shape[1])


def _parameter_names(module_cls, cfg) -> List[str]:
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation cost
        module = module_cls(cfg)
    return [name for name, _ in module.named_parameters()]


def unet_tensors(cfg: UnetConfig, prefix: str = "") -> Mapping:
    """Our UNet's parameter name -> (diffusers' UNet2DConditionModel tensor name, transform or None).
    Every parameter is covered; the time_ids buffer is computed from cfg."""
    if cfg.concat_features:
        raise ValueError("UnetConfig.concat_features (the tiny decoder's) has no diffusers counterpart")
    out: Mapping = {}
    for name in _parameter_names(UNet, cfg):
        theirs = prefix + _rename(name, _UNET_RENAMES)
        linear = re.search(r"\.proj_(in|out)\.weight$", name) is not None
        out[name] = (theirs, as_linear if linear else None)
    return out


def vae_tensors(cfg: VaeConfig, prefix: str = "", names: Optional[Collection[str]] = None) -> Mapping:
    """Our AutoencoderKL's parameter name -> (diffusers' AutoencoderKL tensor name, transform or None), encoder
    and quant_conv included (a bundle keeps only post_quant_conv and the decoder). names: the checkpoint's
    tensor names, if known; where it holds the old attention names (query, key, value, proj_attn) and not
    the new ones, those are used."""
    if cfg.patch > 0:
        raise ValueError("VaeConfig.patch > 0 (the tiny model's pixel folding) has no diffusers counterpart")
    present = set(names) if names is not None else None
    out: Mapping = {}
    for name in _parameter_names(AutoencoderKL, cfg):
        theirs = prefix + _rename(name, _VAE_RENAMES)
        attention = re.search(r"\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", theirs)
        if attention and present is not None and theirs not in present:
            legacy = theirs[:attention.start(1)] + _VAE_LEGACY_ATTENTION[attention.group(1)] + "." + attention.group(2)
            if legacy in present:
                theirs = legacy
        out[name] = (theirs, as_linear if attention and name.endswith(".weight") else None)
    return out
