"""The decoder UNet and the VAE against diffusers' UNet2DConditionModel and AutoencoderKL: the reference
fixtures test/fidelity/fixtures/unet_sdxl and vae_sdxl (tiny configs with the release's structure, random
weights, float32 on CPU; see test/fidelity/README.md), built from the fixtures' config.json through
models/importer/decoder.py and loaded through its tensor maps, so the configs, the names and the
modules are checked together. diffusers is not needed.

    .venv/bin/python -m pytest -q -s test/python/test_fidelity_decoder.py   (-s prints the measured differences)
"""
import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.export import SAMPLER, script_module
from models.importer.decoder import (as_linear, decoder_sampler, unet_config, unet_tensors, vae_config,
                                     vae_tensors)
from models.presets import get_preset
from models.unet import UNet
from models.vae import AutoencoderKL

FIXTURES = Path(__file__).resolve().parents[1] / "fidelity" / "fixtures"
TOLERANCE = 1e-4  # of the reference output's range


def fixture(name):
    return json.loads((FIXTURES / f"{name}.json").read_text()), load_file(str(FIXTURES / f"{name}.safetensors"))


def load(module, mapping, tensors):
    """Fills module from the fixture's weights.* through mapping; returns (our parameters left unfilled,
    fixture weights left unused)."""
    state, used = {}, set()
    for ours, (theirs, transform) in mapping.items():
        key = "weights." + theirs
        if key not in tensors:
            continue
        t = tensors[key].float()  # float16 storing the float32 values the reference ran with, exactly
        state[ours] = transform(t) if transform is not None else t
        used.add(key)
    result = module.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    params = {n for n, _ in module.named_parameters()}
    unused = {k for k in tensors if k.startswith("weights.")} - used
    return params - set(state), unused


def relative(got, want):
    return ((got - want).abs().max() / (want.max() - want.min())).item()



def report(what, value):
    print(f"\n{what}: max abs difference = {value:.3g} of the output's range")


def run_capturing(module, names, *args):
    """module(*args) and the outputs of its named submodules during that call."""
    seen, hooks = {}, []
    for name in names:
        hooks.append(module.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, o)))
    try:
        with torch.no_grad():
            return module(*args), seen
    finally:
        for h in hooks:
            h.remove()


@pytest.fixture(scope="module")
def unet_case():
    meta, t = fixture("unet_sdxl")
    time_ids = t["in.time_ids"]
    assert torch.equal(time_ids, time_ids[:1].expand_as(time_ids))
    h, w = (int(v) for v in time_ids[0, 4:].tolist())
    oh, ow = (int(v) for v in time_ids[0, :2].tolist())
    assert time_ids[0, 2:4].tolist() == [0, 0]
    cfg = unet_config(meta["config"], (h, w), original_size=(oh, ow))
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    unfilled, unused = load(model, unet_tensors(cfg), t)
    assert not unfilled and not unused, (unfilled, unused)
    assert set(model.state_dict()) - {n for n, _ in model.named_parameters()} == {"time_ids"}
    return cfg, model, t


def test_unet_config_reads_the_fixture(unet_case):
    cfg, model, t = unet_case
    assert cfg.channels == (8, 16, 24) and cfg.layers_per_block == 2 and cfg.groups == 4
    assert cfg.transformer_depth == (0, 2, 3)  # DownBlock2D at level 0: no transformer there
    assert cfg.head_dim == 8 and cfg.cross_dim == 32 and cfg.time_id_dim == 8 and cfg.latent_channels == 4
    # what the module computes inside is what the reference was given
    assert torch.equal(model.time_ids, t["in.time_ids"][0])
    assert torch.equal(t["in.encoder_hidden_states"].mean(1), t["in.text_embeds"])


def test_unet_matches_diffusers(unet_case, fidelity):
    cfg, model, t = unet_case
    sample, features = t["in.sample"], t["in.encoder_hidden_states"]
    timestep = t["in.timestep"].expand(sample.shape[0]).contiguous()
    out, seen = run_capturing(model, ["time_embedding", "add_embedding", "mid_resnet2"], sample, timestep, features)
    want = t["out.sample"]
    for name, ref in [("time_embedding", "dbg.time_embedding"), ("add_embedding", "dbg.add_embedding"),
                      ("mid_resnet2", "dbg.mid_block")]:
        assert relative(seen[name], t[ref]) <= TOLERANCE, name
    fidelity("decoder UNet vs diffusers' UNet2DConditionModel (SDXL-style, text_time), max abs diff / range",
             relative(out, want), TOLERANCE)


def test_unet_scripted_equals_eager(unet_case):
    cfg, model, t = unet_case
    args = (t["in.sample"], t["in.timestep"].expand(2).contiguous(), t["in.encoder_hidden_states"])
    with torch.no_grad():
        eager = model(*args)
        plain = torch.jit.script(copy.deepcopy(model))(*args)
        bundled = script_module("decoder", copy.deepcopy(model))(*args)  # the bundle's: per-sample linears
    report("UNet torch.jit.script vs eager", relative(plain, eager))
    report("UNet as exported (per-sample linears) vs eager", relative(bundled, eager))
    assert relative(plain, eager) <= 1e-6
    assert relative(bundled, eager) <= 1e-5
    assert relative(bundled, t["out.sample"]) <= TOLERANCE


def test_unet_odd_latent_sizes(unet_case):
    """diffusers upsamples to the skip's size where a latent side is not a multiple of 2^levels-1."""
    cfg, model, t = unet_case
    with torch.no_grad():
        out = model(torch.randn(1, 4, 13, 10), torch.tensor([500.0]), t["in.encoder_hidden_states"][:1])
    assert out.shape == (1, 4, 13, 10) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def vae_case():
    meta, t = fixture("vae_sdxl")
    cfg = vae_config(meta["config"])
    torch.manual_seed(0)
    model = AutoencoderKL(cfg).eval()
    unfilled, unused = load(model, vae_tensors(cfg), t)
    # the fixture holds what decoding uses: post_quant_conv and the decoder
    assert not unused, unused
    assert unfilled and all(n.startswith(("encoder.", "quant_conv.")) for n in unfilled), unfilled
    return cfg, model, t


def test_vae_config_reads_the_fixture(vae_case):
    cfg, model, t = vae_case
    assert cfg.channels == (8, 16, 32, 32) and cfg.layers_per_block == 2 and cfg.groups == 4
    assert cfg.latent_channels == 4 and cfg.scaling_factor == 0.13025 and cfg.force_upcast and cfg.factor == 8
    # the runtime divides the latents by the manifest's scalingFactor before the VAE, as the pipeline does
    assert torch.equal(t["in.latents"] / cfg.scaling_factor, t["in.z"])


def test_vae_matches_diffusers(vae_case, fidelity):
    cfg, model, t = vae_case
    out, seen = run_capturing(model, ["post_quant_conv", "decoder.mid_block"], t["in.z"])
    assert relative(seen["post_quant_conv"], t["dbg.post_quant_conv"]) <= TOLERANCE
    assert relative(seen["decoder.mid_block"], t["dbg.decoder_mid_block"]) <= TOLERANCE
    fidelity("VAE decode vs diffusers' AutoencoderKL (SDXL-style), max abs diff / range", relative(out, t["out.sample"]), TOLERANCE)


def test_vae_scripted_equals_eager(vae_case):
    cfg, model, t = vae_case
    with torch.no_grad():
        eager = model(t["in.z"])
        plain = torch.jit.script(copy.deepcopy(model))(t["in.z"])
        bundled = script_module("vae", copy.deepcopy(model))(t["in.z"])  # the bundle's: decoder only
    report("VAE torch.jit.script vs eager", relative(plain, eager))
    report("VAE as exported vs eager", relative(bundled, eager))
    assert relative(plain, eager) <= 1e-6 and relative(bundled, eager) <= 1e-6


# ---- the released configs (Emu2-Gen's diffusion_config, which BLIP3-o's diffusion-decoder/ repeats)

EMU2_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.21.2", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "attention_type": "default", "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "cross_attention_dim": 1792, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 3328,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
EMU2_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.21.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
EMU2_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.21.2", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}


@pytest.mark.parametrize("preset", ["4b", "8b"])
def test_released_configs_are_the_presets(preset):
    p = get_preset(preset)
    assert unet_config(EMU2_UNET, p.image) == p.unet
    assert vae_config(EMU2_VAE) == p.vae
    assert decoder_sampler(EMU2_SCHEDULER) == SAMPLER["decoder"]


def test_released_tensor_names():
    """The maps at the release's dimensions use SDXL's checkpoint names (built on the meta device)."""
    unet = unet_tensors(unet_config(EMU2_UNET, 1024))
    theirs = {name for name, _ in unet.values()}
    assert len(theirs) == len(unet) == 1680  # SDXL's UNet: 1680 tensors
    for name in ["conv_in.weight", "time_embedding.linear_2.bias", "add_embedding.linear_1.weight",
                 "down_blocks.0.resnets.1.time_emb_proj.weight", "down_blocks.0.downsamplers.0.conv.weight",
                 "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj.weight",
                 "down_blocks.2.attentions.0.proj_in.weight", "mid_block.resnets.1.conv2.bias",
                 "mid_block.attentions.0.transformer_blocks.9.attn2.to_k.weight",
                 "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0.bias",
                 "up_blocks.1.upsamplers.0.conv.weight", "up_blocks.2.resnets.2.conv_shortcut.weight",
                 "conv_norm_out.weight", "conv_out.bias"]:
        assert name in theirs, name
    assert not any("up_blocks.2.attentions" in n or "down_blocks.0.attentions" in n for n in theirs)
    vae = vae_tensors(vae_config(EMU2_VAE))
    assert len(vae) == 248  # SDXL's AutoencoderKL: 248 tensors
    assert vae["decoder.mid_block.attention.to_out.weight"][0] == "decoder.mid_block.attentions.0.to_out.0.weight"
    assert vae["decoder.up_blocks.0.up.weight"][0] == "decoder.up_blocks.0.upsamplers.0.conv.weight"
    assert vae["encoder.down_blocks.2.down.bias"][0] == "encoder.down_blocks.2.downsamplers.0.conv.bias"


def test_vae_legacy_attention_names():
    cfg = vae_config(EMU2_VAE)
    names = {theirs for theirs, _ in vae_tensors(cfg).values()}
    legacy = {n.replace("attentions.0.to_q.", "attentions.0.query.").replace("attentions.0.to_out.0.",
                                                                            "attentions.0.proj_attn.") for n in names}
    mapped = vae_tensors(cfg, names=legacy)
    assert mapped["decoder.mid_block.attention.to_q.weight"][0] == "decoder.mid_block.attentions.0.query.weight"
    assert mapped["encoder.mid_block.attention.to_out.bias"][0] == "encoder.mid_block.attentions.0.proj_attn.bias"
    assert mapped["decoder.mid_block.attention.to_k.weight"][0] == "decoder.mid_block.attentions.0.to_k.weight"


def test_as_linear():
    w = torch.randn(6, 5)
    assert torch.equal(as_linear(w), w) and torch.equal(as_linear(w[:, :, None, None]), w)
    with pytest.raises(ValueError):
        as_linear(torch.randn(6, 5, 3, 3))


@pytest.mark.parametrize("edit,field", [
    ({"freq_shift": 1}, "freq_shift"),
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"addition_embed_type": None}, "addition_embed_type"),
    ({"projection_class_embeddings_input_dim": 2816}, "projection_class_embeddings_input_dim"),
    ({"attention_head_dim": 8}, "attention_head_dim"),  # SD 1.x style: 8 heads everywhere, head widths differ
    ({"num_attention_heads": [5, 10, 20]}, "num_attention_heads"),
    ({"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, "up_block_types"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"]}, "down_block_types"),
    ({"layers_per_block": [2, 2, 3]}, "layers_per_block"),
    ({"transformer_layers_per_block": [[1], [2, 2], [10] * 10]}, "transformer_layers_per_block"),
    ({"out_channels": 8}, "out_channels"),
    ({"time_cond_proj_dim": 256}, "time_cond_proj_dim"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"norm_num_groups": 48}, "norm_num_groups"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"only_cross_attention": [False, True, True]}, "only_cross_attention"),
])
def test_unet_config_rejects(edit, field):
    with pytest.raises(ValueError, match=field):
        unet_config({**EMU2_UNET, **edit}, 1024)


@pytest.mark.parametrize("edit,field", [
    ({"latent_channels": 16, "shift_factor": 0.1159}, "shift_factor"),
    ({"use_post_quant_conv": False}, "use_post_quant_conv"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
])
def test_vae_config_rejects(edit, field):
    with pytest.raises(ValueError, match=field):
        vae_config({**EMU2_VAE, **edit})


@pytest.mark.parametrize("edit,field", [
    ({"_class_name": "DPMSolverMultistepScheduler"}, "_class_name"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"interpolation_type": "log_linear"}, "interpolation_type"),
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ({"timestep_type": "continuous"}, "timestep_type"),
    ({"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_decoder_sampler_rejects(edit, field):
    with pytest.raises(ValueError, match=field):
        decoder_sampler({**EMU2_SCHEDULER, **edit})


def test_decoder_sampler_defaults():
    """Keys a config leaves out take diffusers' defaults, as from_config gives them."""
    s = decoder_sampler({"_class_name": "EulerDiscreteScheduler"}, steps=20, cfg=5.0)
    assert s == {"steps": 20, "cfg": 5.0, "numTrainTimesteps": 1000, "betaStart": 0.0001, "betaEnd": 0.02,
                 "betaSchedule": "linear", "timestepSpacing": "linspace", "stepsOffset": 0, "predictionType": "epsilon"}


def test_tiny_decoder_has_no_diffusers_counterpart():
    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match="concat_features"):
        unet_tensors(tiny.unet)
    with pytest.raises(ValueError, match="patch"):
        vae_tensors(tiny.vae)
