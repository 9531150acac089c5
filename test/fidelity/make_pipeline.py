#!/usr/bin/env python3
"""Build the whole-pipeline fidelity fixture: a micro BLIP3-o checkpoint in the released layout, and the
images that a Python pipeline made of the reference implementations draws from it.

Output (test/fidelity/pipeline/, or --out):
  checkpoint/                      a micro checkpoint in the released layout (see write_checkpoint):
    config.json                    transformers 4.51's layout of BLIP3-o's config (blip3o_qwen_inference)
    model.safetensors.index.json   + model-0000{1,2}-of-00002.safetensors (backbone, latent queries, DiT)
    tokenizer.json, tokenizer_config.json   the project's tiny tokenizer (models/tiny: 512 ids, [IMG] = 259)
    diffusion-decoder/{unet,vae}/  config.json (diffusers' save_config) + diffusion_pytorch_model.safetensors
    diffusion-decoder/scheduler/scheduler_config.json   SDXL's / Emu2-Gen's EulerDiscreteScheduler
  expected.json                    prompts, seeds, token ids, settings, versions, what every tensor is
  expected.safetensors             image.<i> uint8 [H, W, 3]; features.<i>, condition.<i>,
                                   negative.features, negative.condition float32

Every weight is drawn in float32, rounded to bfloat16 and stored in bfloat16 (as the release stores its
weights); the reference runs in float32 on the upcast values, which are exactly the stored ones. The
reference loads its modules back from the written checkpoint files, so what it ran is what is committed.

The reference pipeline (float32, CPU, one thread):
  backbone   transformers' Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration built from config.json, its
             language model called as BLIP3-o's generate_image calls it: inputs_embeds = [embed(ids),
             latent_queries], all-ones attention mask, no position_ids; condition = hidden_states[-1] (the
             final-normed last layer) at the last n_query positions)
  DiT        the official NextDiTCrossAttn (JiuhaiChen/BLIP3o branch main) on diffusers 0.32.2, sampled by
             the official blip3oQwenForInferenceLM.sample_images itself (CFG batch [zeros, cond], guidance 3,
             timestep = scheduler timestep cast to long, scheduler.step), with
             FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0) and its
             set_timesteps(S, sigmas=linspace(1, 1/S, S)); features = latents.view(1, C, -1).permute(0, 2, 1)
  decoder    diffusers' UNet2DConditionModel + EulerDiscreteScheduler (set_timesteps(D), init_noise_sigma,
             scale_model_input, step), CFG batch [cond, negative] at guidance 3, text_embeds = the
             features' mean, time_ids = [1024, 1024, 0, 0, H, W]; AutoencoderKL.decode(latents /
             scaling_factor); image = round((x / 2 + 0.5).clamp(0, 1) * 255) as uint8, HWC
  negative   the official negative prompt: the empty string, no template, then [IMG] (ids = [259]), through
             the same backbone and DiT sampler (S_negative = 30 steps, guidance 3: the runtime's manifest
             defaults, which its negative condition always uses)

Noise is drawn as the Node runtime draws it (its native generate / prepareNegative, and bench/reference.py),
not from torch's global generator as the official code does (the one deliberate difference):
  per image   g = torch.Generator().manual_seed(seed); eps_dit = randn([1, T, C], g) (token-major; the DiT's
              [1, C, 8, 8] input is eps_dit.transpose(1, 2).reshape(1, C, 8, 8), tokens row-major); then
              eps_dec = randn([1, latent_c, latent_h, latent_w], g) from the same generator
  negative    g = torch.Generator().manual_seed(0) (the manifest's negativeSeed); eps = randn([1, T, C], g)
The official sampler's own randn_tensor call is replaced by one that returns eps_dit so laid out.

How to run (sources outside the project, extracted with `git archive`; see test/fidelity/README.md):

  /tmp/fx-venv/bin/pip install torch==2.13.0 numpy safetensors transformers==5.18.0 tokenizers Pillow
  nice -n 10 /tmp/fx-venv/bin/python test/fidelity/make_pipeline.py \\
      --diffusers-legacy-src /tmp/diffusers-0.32.2/src --diffusers-legacy-commit <sha> \\
      --blip3o-src /tmp/blip3o --blip3o-commit <sha> \\
      [--diffusers-src /tmp/diffusers/src --diffusers-commit <sha>]

The reference runs in a child process whose PYTHONPATH holds diffusers 0.32.2 (the official DiT's FFN
width needs diffusers <= 0.32, see README), the BLIP3o tree and this project (for models/presets.py's
template). With --diffusers-src, a second child process reruns the decoder stage (UNet, Euler, VAE) on
current diffusers from the stored features and checks that it gives the same images; the result is
recorded in expected.json. Rerunning the script writes byte-identical files.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import types

from make_fixtures import git_commit, setup_torch  # (this folder: the script's directory is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TINY = os.path.join(ROOT, "models", "tiny")

PROMPTS = [("a red circle", 1), ("two blue squares", 2)]
DIT_STEPS = 30        # the official sampler's num_inference_steps
DIT_GUIDANCE = 3.0    # the official sample_images default
DECODER_STEPS = 50    # BLIP3O.md: the decoder pipeline's 50 Euler steps
DECODER_GUIDANCE = 3.0
NEGATIVE_SEED = 0     # the imported manifest's sampler.negativeSeed
NEGATIVE_PROMPT = ""  # generate_image(text=[""]): no template, then [IMG]
ORIGINAL_SIZE = (1024, 1024)
WEIGHT_SEED = 7001
MAX_BYTES = 4_000_000

IMG_TOKEN = "[IMG]"

# --- the micro model (the released structure at tiny widths) -----------------------------------------------
TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=128000,
            mrope_section=[2, 3, 3])
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
              tokens_per_second=2)
N_QUERY = 8
# NextDiTCrossAttnConfig: only the sizes differ from its defaults (grid 8, patch 1, multiple_of 256, eps 1e-5,
# qk_norm); latent_embedding_size = the backbone's hidden size, as build_dit sets it
DIT = dict(input_size=8, patch_size=1, in_channels=16, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
           multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, latent_embedding_size=64, learn_sigma=False,
           qk_norm=True)
IMAGE = (64, 64)
# Emu2-Gen's UNet structure (Down / CrossAttn / CrossAttn, text_time, linear projections, one head width)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[16, 32, 32], layers_per_block=2, transformer_layers_per_block=[1, 1, 2],
            attention_head_dim=[2, 4, 4], norm_num_groups=4, norm_eps=1e-5, cross_attention_dim=16,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8, act_fn="silu", upcast_attention=False)
# SDXL's AutoencoderKL structure (4 levels: factor 8, 4 latent channels, scaling factor 0.13025)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 16, 16, 16], layers_per_block=2,
           act_fn="silu", latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.13025,
           force_upcast=True)
# Emu2-Gen's diffusion_config/scheduler/scheduler_config.json (SDXL's)
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.21.2", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
FLOW = {"num_train_timesteps": 1000, "shift": 1.0}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-legacy-src", default=os.environ.get("DIFFUSERS_LEGACY_SRC"))
    p.add_argument("--diffusers-legacy-commit", default=os.environ.get("DIFFUSERS_LEGACY_COMMIT"))
    p.add_argument("--diffusers-src", default=os.environ.get("DIFFUSERS_SRC"))
    p.add_argument("--diffusers-commit", default=os.environ.get("DIFFUSERS_COMMIT"))
    p.add_argument("--blip3o-src", default=os.environ.get("BLIP3O_SRC"))
    p.add_argument("--blip3o-commit", default=os.environ.get("BLIP3O_COMMIT"))
    p.add_argument("--out", default=os.path.join(HERE, "pipeline"))
    p.add_argument("--worker", choices=["reference", "decoder-check"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args, worker, src):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [src, args.blip3o_src, ROOT] if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--out", args.out]
    for flag in ["diffusers_legacy_src", "diffusers_legacy_commit", "diffusers_src", "diffusers_commit",
                 "blip3o_src", "blip3o_commit"]:
        v = getattr(args, flag)
        if v:
            cmd += ["--" + flag.replace("_", "-"), v]
    print(f"[make_pipeline] {worker} (diffusers from {src})", flush=True)
    subprocess.run(cmd, env=env, check=True)


def driver(args):
    if not args.diffusers_legacy_src or not args.blip3o_src:
        raise SystemExit("needs --diffusers-legacy-src (diffusers v0.32.2's src/) and --blip3o-src (BLIP3o branch main)")
    child(args, "reference", args.diffusers_legacy_src)
    if args.diffusers_src:
        child(args, "decoder-check", args.diffusers_src)
    total = 0
    for dirpath, _, files in os.walk(args.out):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    ckpt = 0
    for dirpath, _, files in os.walk(os.path.join(args.out, "checkpoint")):
        ckpt += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    print(f"[make_pipeline] {args.out}: {total / 1e6:.3f} MB (checkpoint {ckpt / 1e6:.3f} MB)")


# ----------------------------------------------------------------------------------------------------------
# worker helpers
# ----------------------------------------------------------------------------------------------------------

def randomize_(named, seed):
    """Seeded random values, rounded to bfloat16, for every floating tensor of `named` (name -> tensor),
    in sorted-name order: matrices / kernels N(0, 1/fan_in); 1-D `weight` (norm scales) 1 + 0.1 N(0, 1);
    `bias` 0.1 N(0, 1); the DiT's per-head `gate` 1 + 0.1 N(0, 1) (tanh(gate) near 0.76, so the
    cross-attention to the condition matters); the latent queries N(0, 1/H) like the embeddings."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(named):
            t = named[name]
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if leaf == "latent_queries":
                v = r / math.sqrt(t.shape[-1])
            elif t.ndim >= 2:
                v = r / math.sqrt(t[0].numel())
            elif leaf == "bias":
                v = 0.1 * r
            elif leaf in ("gate", "weight"):
                v = 1.0 + 0.1 * r
            else:
                v = r
            t.data.copy_(v.to(torch.bfloat16).float())


def import_official(src):
    """The official modules (BLIP3o branch main): blip3o.model.nextdit_crossattn and
    blip3o.model.language_model.blip3o_qwen_inference, imported without blip3o/__init__ and blip3o_arch
    (which pull in the training stack and every vision encoder). Two stand-ins, neither used by what runs
    here: blip3o_arch's two mixin classes (empty), and diffusers.pipelines.pipeline_utils (diffusers 0.32.2's
    does not import under transformers 5; the inference module imports only numpy_to_pil from it, used
    by decode_latents, which is not called)."""
    import importlib
    for name in ["blip3o", "blip3o.model", "blip3o.model.language_model"]:
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__path__ = [os.path.join(src, *name.split("."))]
            sys.modules[name] = m
    arch = types.ModuleType("blip3o.model.blip3o_arch")
    arch.blip3oMetaModel = type("blip3oMetaModel", (), {})
    arch.blip3oMetaForCausalLM = type("blip3oMetaForCausalLM", (), {})
    sys.modules["blip3o.model.blip3o_arch"] = arch
    utils = types.ModuleType("diffusers.pipelines.pipeline_utils")

    def numpy_to_pil(*_a, **_k):
        raise NotImplementedError("stand-in")
    utils.numpy_to_pil = numpy_to_pil
    sys.modules["diffusers.pipelines.pipeline_utils"] = utils
    dit = importlib.import_module("blip3o.model.nextdit_crossattn")
    inference = importlib.import_module("blip3o.model.language_model.blip3o_qwen_inference")
    return dit, inference


def model_config_json():
    """config.json in the layout transformers 4.51 writes for the release (Qwen2_5_VLConfig's text fields
    flat at the top level, vision_config nested, rope_scaling mrope; BLIP3-o's own fields; sorted keys)."""
    t, v = TEXT, VISION
    cfg = {
        "_name_or_path": "BLIP3o-Model-micro", "architectures": ["blip3oQwenForInferenceLM"],
        "attention_dropout": 0.0, "bos_token_id": 257, "eos_token_id": 258, "gen_pooling": "early_pool2d_4",
        "gen_vision_tower": "eva-clip-E-14-plus", "hidden_act": "silu", "hidden_size": t["hidden_size"],
        "image_token_id": 263, "initializer_range": 0.02, "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"], "max_window_layers": t["num_hidden_layers"],
        "model_type": "blip3o_qwen_inference", "n_query": N_QUERY, "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"], "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": t["rms_norm_eps"],
        "rope_scaling": {"mrope_section": t["mrope_section"], "rope_type": "default", "type": "mrope"},
        "rope_theta": t["rope_theta"], "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "use_cache": True,
        "use_sliding_window": False, "video_token_id": 151656, "vision_end_token_id": 264,
        "vision_start_token_id": 262, "vision_token_id": 151654, "vocab_size": t["vocab_size"],
        "vision_config": {"depth": v["depth"], "fullatt_block_indexes": v["fullatt_block_indexes"],
                          "hidden_act": "silu", "hidden_size": v["hidden_size"], "in_chans": 3,
                          "intermediate_size": v["intermediate_size"], "model_type": "qwen2_5_vl",
                          "num_heads": v["num_heads"], "out_hidden_size": v["out_hidden_size"],
                          "patch_size": v["patch_size"], "spatial_merge_size": v["spatial_merge_size"],
                          "spatial_patch_size": v["patch_size"], "temporal_patch_size": v["temporal_patch_size"],
                          "tokens_per_second": v["tokens_per_second"], "torch_dtype": "bfloat16",
                          "window_size": v["window_size"]},
    }
    return cfg


def qwen_config(cfg_json):
    """transformers 5's Qwen2_5_VLConfig from the 4.51-layout config.json (it reads the flat text fields)."""
    from transformers import Qwen2_5_VLConfig
    d = {k: v for k, v in cfg_json.items()
         if k not in ("architectures", "model_type", "n_query", "gen_pooling", "gen_vision_tower", "_name_or_path",
                      "transformers_version", "torch_dtype", "vision_token_id")}
    d["vision_config"] = {k: v for k, v in d["vision_config"].items()
                          if k not in ("in_chans", "model_type", "spatial_patch_size", "torch_dtype")}
    d["vision_config"]["in_channels"] = cfg_json["vision_config"]["in_chans"]
    return Qwen2_5_VLConfig(**d)


def legacy_name(name):
    """transformers 5's in-memory Qwen2.5-VL names -> the release's (transformers 4.51) names."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def save_safetensors(path, tensors, metadata=None):
    from safetensors.torch import save_file
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, path, metadata=metadata)
    os.chmod(path, 0o644)


def write_json(path, data, sort_keys=False):
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=sort_keys)
        f.write("\n")
    os.chmod(path, 0o644)


def bf16_state(module):
    import torch
    out = {}
    for k, v in module.state_dict().items():
        v = v.detach()
        if v.is_floating_point():
            b = v.to(torch.bfloat16)
            assert b.float().equal(v.float()), f"{k} is not exactly bfloat16"
            v = b
        out[k] = v.clone()
    return out


def write_checkpoint(ckpt, dit_mod):
    """Builds the reference modules, randomises them (seeded, bfloat16 values) and writes their state dicts
    in the released layout."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    if os.path.exists(ckpt):
        shutil.rmtree(ckpt)
    os.makedirs(os.path.join(ckpt, "diffusion-decoder", "scheduler"))
    cfg_json = model_config_json()
    write_json(os.path.join(ckpt, "config.json"), cfg_json, sort_keys=True)

    torch.manual_seed(WEIGHT_SEED)
    qwen = Qwen2_5_VLForConditionalGeneration(qwen_config(cfg_json)).eval()
    named = dict(qwen.named_parameters())
    named["model.latent_queries"] = torch.empty(1, N_QUERY, TEXT["hidden_size"])
    randomize_(named, WEIGHT_SEED)
    assert qwen.lm_head.weight is qwen.model.language_model.embed_tokens.weight, "expected tied embeddings"
    model = {legacy_name(k): v for k, v in bf16_state(qwen).items() if k != "lm_head.weight"}
    model["model.latent_queries"] = named["model.latent_queries"].to(torch.bfloat16)

    dit = dit_mod.NextDiTCrossAttn(dit_mod.NextDiTCrossAttnConfig(**DIT)).eval()
    randomize_(dict(dit.named_parameters()), WEIGHT_SEED + 1)
    model.update({"model.dit." + k: v for k, v in bf16_state(dit).items()})

    # two shards and an index, as the release (names in sorted order, split in half)
    names = sorted(model)
    half = (len(names) + 1) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_safetensors(os.path.join(ckpt, file), {n: model[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in model.values())
    write_json(os.path.join(ckpt, "model.safetensors.index.json"),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})

    for name, cls, cfg, seed in (("unet", UNet2DConditionModel, UNET, WEIGHT_SEED + 2),
                                 ("vae", AutoencoderKL, VAE, WEIGHT_SEED + 3)):
        module = cls(**cfg).eval()
        randomize_(dict(module.named_parameters()), seed)
        d = os.path.join(ckpt, "diffusion-decoder", name)
        module.save_config(d)
        os.chmod(os.path.join(d, "config.json"), 0o644)
        save_safetensors(os.path.join(d, "diffusion_pytorch_model.safetensors"), bf16_state(module),
                         metadata={"format": "pt"})
    write_json(os.path.join(ckpt, "diffusion-decoder", "scheduler", "scheduler_config.json"), SCHEDULER)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TINY, f), os.path.join(ckpt, f))
        os.chmod(os.path.join(ckpt, f), 0o644)


def read_model_tensors(ckpt):
    """The model's tensors through the index, upcast to float32."""
    import torch
    from safetensors.torch import load_file
    with open(os.path.join(ckpt, "model.safetensors.index.json")) as f:
        index = json.load(f)
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        for k, v in load_file(os.path.join(ckpt, file)).items():
            assert index["weight_map"][k] == file
            out[k] = v.to(torch.float32)
    assert set(out) == set(index["weight_map"])
    return out


def load_reference(ckpt, dit_mod):
    """The reference modules, built from the checkpoint's configs and filled from its files (float32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    with open(os.path.join(ckpt, "config.json")) as f:
        cfg_json = json.load(f)
    tensors = read_model_tensors(ckpt)
    qwen = Qwen2_5_VLForConditionalGeneration(qwen_config(cfg_json)).eval()
    sd = {}
    for k in qwen.state_dict():
        src = "model.embed_tokens.weight" if k == "lm_head.weight" else legacy_name(k)
        sd[k] = tensors[src]
    qwen.load_state_dict(sd, strict=True)
    queries = tensors["model.latent_queries"]
    dit = dit_mod.NextDiTCrossAttn(dit_mod.NextDiTCrossAttnConfig(**DIT)).eval()
    dit.load_state_dict({k[len("model.dit."):]: v for k, v in tensors.items() if k.startswith("model.dit.")},
                        strict=True)
    used = {legacy_name(k) for k in qwen.state_dict() if k != "lm_head.weight"} | {"model.latent_queries"}
    used |= {"model.dit." + k for k in dit.state_dict()}
    assert used == set(tensors), sorted(set(tensors) ^ used)[:5]
    dec = os.path.join(ckpt, "diffusion-decoder")
    unet = UNet2DConditionModel.from_pretrained(dec, subfolder="unet", torch_dtype=torch.float32,
                                                low_cpu_mem_usage=False).eval()
    vae = AutoencoderKL.from_pretrained(dec, subfolder="vae", torch_dtype=torch.float32,
                                        low_cpu_mem_usage=False).eval()
    return qwen, queries, dit, unet, vae


def token_ids(ckpt, prompt):
    """BLIP3-o's generation ids: the template (models/presets.py, ending in [IMG]) applied to the prompt,
    tokenized with the checkpoint's tokenizer.json, no special tokens added. Checked against the official
    way (the templated prompt without [IMG] tokenized, then the [IMG] id appended)."""
    from tokenizers import Tokenizer
    from models.presets import TEMPLATES
    tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    template = TEMPLATES["generation"]
    assert template.endswith(IMG_TOKEN)
    ids = tok.encode(template.format(prompt=prompt), add_special_tokens=False).ids
    img = tok.token_to_id(IMG_TOKEN)
    official = tok.encode(template[:-len(IMG_TOKEN)].format(prompt=prompt), add_special_tokens=False).ids + [img]
    assert ids == official, (ids, official)
    return ids, img, template


def condition(qwen, queries, ids):
    """generate_image's backbone step: [embed(ids), latent_queries] through the language model with an
    all-ones mask and no position_ids; the last hidden state (final-normed) at the last n_query positions."""
    import torch
    lm = qwen.model.language_model
    input_ids = torch.tensor([ids], dtype=torch.long)
    embeds = torch.cat([lm.embed_tokens(input_ids), queries.expand(1, -1, -1)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    out = lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, return_dict=True)
    assert out.hidden_states[-1].equal(out.last_hidden_state)
    return out.hidden_states[-1][:, -N_QUERY:, :]


def sample_features(inference_mod, dit, cond, eps_dit, steps):
    """The official blip3oQwenForInferenceLM.sample_images, run as it is, with its initial latents
    (randn_tensor) replaced by eps_dit laid out as the runtime lays it out; then generate_image's reshape to
    [1, T, C] (its 1792 is the released width; C here)."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    C, n = DIT["in_channels"], DIT["input_size"]
    latents = eps_dit.transpose(1, 2).reshape(1, C, n, n).contiguous()

    def randn_tensor(shape, generator=None, device=None, dtype=None):
        assert tuple(shape) == (1, C, n, n) and dtype == torch.float32, (shape, dtype)
        return latents.clone()

    scheduler = FlowMatchEulerDiscreteScheduler(**FLOW)
    shim = types.SimpleNamespace(get_model=lambda: types.SimpleNamespace(dit=dit))
    saved = inference_mod.randn_tensor
    inference_mod.randn_tensor = randn_tensor
    try:
        out = inference_mod.blip3oQwenForInferenceLM.sample_images(
            shim, cond, scheduler, guidance_scale=DIT_GUIDANCE, num_inference_steps=steps)
    finally:
        inference_mod.randn_tensor = saved
    sig = scheduler.sigmas.numpy()
    assert np.array_equal(sig[:-1], np.linspace(1.0, 1 / steps, steps).astype(np.float32)) and sig[-1] == 0
    return out.view(1, C, -1).permute(0, 2, 1).contiguous(), scheduler


def decode(unet, vae, sched_cfg, feats, neg, eps_dec, steps, guidance):
    """The decoder pipeline: Euler discrete with CFG [cond, negative], then the VAE; HWC uint8 pixels."""
    import torch
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler.from_config(sched_cfg)
    scheduler.set_timesteps(steps)
    latents = eps_dec * scheduler.init_noise_sigma
    cond = torch.cat([feats, neg])
    H, W = IMAGE
    added = {"text_embeds": cond.mean(dim=1),
             "time_ids": torch.tensor([[*ORIGINAL_SIZE, 0, 0, H, W]] * 2, dtype=cond.dtype)}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = unet(model_in, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        eps_cond, eps_neg = eps.chunk(2)
        eps = eps_neg + guidance * (eps_cond - eps_neg)
        latents = scheduler.step(eps, t, latents, generator=torch.Generator().manual_seed(0)).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    pixels = (image / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()
    return pixels, scheduler, latents


def decoder_noise_shape():
    return [1, UNET["in_channels"], IMAGE[0] // 8, IMAGE[1] // 8]


def clip_noise_shape():
    return [1, DIT["input_size"] ** 2, DIT["in_channels"]]


def versions(args, legacy):
    import diffusers
    import tokenizers
    import torch
    import transformers
    v = {"torch": torch.__version__, "python": sys.version.split()[0], "transformers": transformers.__version__,
         "tokenizers": tokenizers.__version__, "diffusers_version": diffusers.__version__,
         "diffusers_commit": (args.diffusers_legacy_commit if legacy else args.diffusers_commit)
         or git_commit(args.diffusers_legacy_src if legacy else args.diffusers_src) or "unknown"}
    if legacy:
        v["blip3o_branch"] = "main"
        v["blip3o_commit"] = args.blip3o_commit or git_commit(args.blip3o_src) or "unknown"
    return v


def file_list(out):
    files = {}
    for dirpath, _, names in os.walk(out):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, out)
            if rel == "expected.json":
                continue
            with open(p, "rb") as f:
                files[rel] = {"bytes": os.path.getsize(p), "sha256": hashlib.sha256(f.read()).hexdigest()}
    return dict(sorted(files.items()))


def worker_reference(args):
    torch = setup_torch()
    dit_mod, inference_mod = import_official(args.blip3o_src)
    from models.presets import TEMPLATES
    out = args.out
    ckpt = os.path.join(out, "checkpoint")
    os.makedirs(out, exist_ok=True)
    write_checkpoint(ckpt, dit_mod)
    qwen, queries, dit, unet, vae = load_reference(ckpt, dit_mod)
    with open(os.path.join(ckpt, "diffusion-decoder", "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)

    tensors, cases = {}, []
    with torch.no_grad():
        # the negative condition: "" (no template) then [IMG]
        _, img, template = token_ids(ckpt, "")
        neg_ids = [img]
        neg_cond = condition(qwen, queries, neg_ids)
        g = torch.Generator().manual_seed(NEGATIVE_SEED)
        neg_feats, _ = sample_features(inference_mod, dit, neg_cond, torch.randn(clip_noise_shape(), generator=g),
                                       DIT_STEPS)
        tensors["negative.condition"], tensors["negative.features"] = neg_cond, neg_feats
        for i, (prompt, seed) in enumerate(PROMPTS):
            ids, _, _ = token_ids(ckpt, prompt)
            cond = condition(qwen, queries, ids)
            g = torch.Generator().manual_seed(seed)
            eps_dit = torch.randn(clip_noise_shape(), generator=g)
            eps_dec = torch.randn(decoder_noise_shape(), generator=g)
            feats, flow = sample_features(inference_mod, dit, cond, eps_dit, DIT_STEPS)
            pixels, euler, _ = decode(unet, vae, sched_cfg, feats, neg_feats, eps_dec, DECODER_STEPS,
                                      DECODER_GUIDANCE)
            tensors[f"condition.{i}"], tensors[f"features.{i}"], tensors[f"image.{i}"] = cond, feats, pixels
            cases.append({"index": i, "prompt": prompt, "seed": seed, "ids": ids,
                          "pixels": {"mean": round(float(pixels.float().mean()), 3),
                                     "std": round(float(pixels.float().std()), 3),
                                     "saturated_fraction": round(float(((pixels == 0) | (pixels == 255)).float().mean()), 4)}})
        # how much the condition matters: prompt 0's image with prompt 1's features
        g = torch.Generator().manual_seed(PROMPTS[0][1])
        torch.randn(clip_noise_shape(), generator=g)
        swapped, _, _ = decode(unet, vae, sched_cfg, tensors["features.1"], neg_feats,
                               torch.randn(decoder_noise_shape(), generator=g), DECODER_STEPS, DECODER_GUIDANCE)
        sensitivity = int((swapped.int() - tensors["image.0"].int()).abs().max())
        # ... and the DiT's: prompt 0's noise with prompt 1's condition
        g = torch.Generator().manual_seed(PROMPTS[0][1])
        other, _ = sample_features(inference_mod, dit, tensors["condition.1"],
                                   torch.randn(clip_noise_shape(), generator=g), DIT_STEPS)
        feature_gap = float((other - tensors["features.0"]).abs().max())

    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_safetensors(os.path.join(out, "expected.safetensors"), tensors, metadata={"fixture": "pipeline"})

    n_params = {"model": 0}
    for k, v in read_model_tensors(ckpt).items():
        n_params["model"] += v.numel()
    n_params["unet"] = sum(p.numel() for p in unet.parameters())
    n_params["vae"] = sum(p.numel() for p in vae.parameters())
    ffn = dit.model.layers[0].feed_forward.linear_1.weight.shape[0]
    T, C = clip_noise_shape()[1:]
    meta = {
        "description": ("Whole-pipeline reference: prompt -> token ids -> Qwen2.5-VL backbone (transformers) -> "
                        "official BLIP3-o DiT sampler (NextDiTCrossAttn + sample_images, diffusers 0.32.2) -> "
                        "diffusers UNet2DConditionModel + EulerDiscreteScheduler -> AutoencoderKL -> uint8 image, "
                        "in float32 on CPU, on the micro checkpoint in checkpoint/ (random seeded weights)."),
        "checkpoint": {
            "path": "checkpoint", "layout": "the released BLIP3-o checkpoint directory (see make_pipeline.py)",
            "weights_dtype": "bfloat16 (drawn in float32, rounded to bfloat16; the reference ran in float32 on "
                             "these values exactly)",
            "config_json": "written by make_pipeline.py in the layout transformers 4.51.3 writes for the release "
                           "(text fields flat, rope_scaling mrope, vision_config nested)",
            "decoder_configs": "diffusers save_config of the reference UNet / VAE; the scheduler config is "
                               "Emu2-Gen's (SDXL's) EulerDiscreteScheduler config",
            "tokenizer": "models/tiny's tokenizer.json / tokenizer_config.json (512 ids; [IMG] = 259, "
                         "<|image_pad|> = 263)",
            "weight_seed": WEIGHT_SEED,
            "init": ("N(0, 1/fan_in) matrices and kernels; 1-D weights (norm scales) 1 + 0.1 N; biases 0.1 N; "
                     "DiT per-head gates 1 + 0.1 N; latent queries N(0, 1/H); seeds weight_seed (backbone + "
                     "queries), +1 (DiT), +2 (UNet), +3 (VAE)"),
            "parameters": n_params,
            "backbone": dict(TEXT, tie_word_embeddings=True, n_query=N_QUERY, vision=VISION),
            "dit": dict(DIT, ffn_inner_dim=ffn, grid_tokens=T, channels=C),
            "unet": UNET, "vae": VAE, "scheduler": SCHEDULER,
            "image": {"height": IMAGE[0], "width": IMAGE[1]},
        },
        "template": template,
        "negative": {"prompt": NEGATIVE_PROMPT, "ids": neg_ids, "seed": NEGATIVE_SEED, "steps": DIT_STEPS,
                     "guidance": DIT_GUIDANCE,
                     "what": "generate_image(text=['']): the empty string, no template, then [IMG]; backbone + DiT "
                             "with S_negative steps; its features are the decoder's negative condition"},
        "cases": cases,
        "settings": {
            "dit": {"steps": DIT_STEPS, "guidance": DIT_GUIDANCE, "scheduler": "FlowMatchEulerDiscreteScheduler",
                    "scheduler_config": FLOW, "set_timesteps": f"set_timesteps({DIT_STEPS}, sigmas=np.linspace(1, 1/{DIT_STEPS}, {DIT_STEPS}))",
                    "timesteps_to_model": [int(x) for x in flow.timesteps.to(torch.long).tolist()],
                    "cfg_batch": "[zeros_like(condition), condition], out = u + guidance * (c - u)",
                    "timestep": "scheduler timestep cast to torch.long (sigma * 1000 truncated)",
                    "sampler": "blip3oQwenForInferenceLM.sample_images (official, run unchanged but for its randn_tensor)"},
            "decoder": {"steps": DECODER_STEPS, "guidance": DECODER_GUIDANCE, "scheduler": "EulerDiscreteScheduler",
                        "timesteps": [int(x) for x in euler.timesteps.tolist()],
                        "init_noise_sigma": float(euler.init_noise_sigma),
                        "cfg_batch": "[features, negative features], out = n + guidance * (c - n)",
                        "added_cond_kwargs": f"text_embeds = features.mean(dim=1); time_ids = [{ORIGINAL_SIZE[0]}, "
                                             f"{ORIGINAL_SIZE[1]}, 0, 0, {IMAGE[0]}, {IMAGE[1]}]",
                        "vae": "AutoencoderKL.decode(latents / scaling_factor).sample; "
                               "pixels = round((x / 2 + 0.5).clamp(0, 1) * 255) as uint8, HWC"},
            "runtime_options": {"steps": DIT_STEPS, "cfg": DIT_GUIDANCE, "decoderSteps": DECODER_STEPS,
                                "decoderCfg": DECODER_GUIDANCE},
        },
        "noise": {
            "per_image": (f"g = torch.Generator().manual_seed(seed); eps_dit = torch.randn([1, {T}, {C}], generator=g) "
                          f"(token-major; the DiT input is eps_dit.transpose(1, 2).reshape(1, {C}, 8, 8)); then "
                          f"eps_dec = torch.randn({decoder_noise_shape()}, generator=g); the decoder starts from "
                          "eps_dec * init_noise_sigma"),
            "negative": f"g = torch.Generator().manual_seed({NEGATIVE_SEED}); eps = torch.randn([1, {T}, {C}], generator=g)",
            "official_difference": ("the official code draws its latents from torch's global generator "
                                    "(randn_tensor with generator=None), in [B, C, 8, 8] order; this fixture draws "
                                    "them as the Node runtime does, so that images are comparable. Nothing else "
                                    "differs."),
        },
        "checks": {"condition_sensitivity_max_pixel_diff": sensitivity,
                   "condition_sensitivity_what": "max |pixel| between image.0 and the same seed decoded from "
                                                 "features.1 instead of features.0",
                   "dit_condition_sensitivity_max_abs_diff": feature_gap,
                   "dit_condition_sensitivity_what": "max |features.0 - the DiT loop from case 0's noise on "
                                                     "condition.1| (features.0 max |value|: "
                                                     f"{float(tensors['features.0'].abs().max()):.3f})"},
        "versions": versions(args, legacy=True),
        "tensors": {
            "image.<i>": f"uint8 [{IMAGE[0]}, {IMAGE[1]}, 3] (HWC, RGB): the reference image of cases[i]",
            "features.<i>": f"float32 [1, {T}, {C}]: the CLIP features after the DiT loop (token-major), cases[i]",
            "condition.<i>": f"float32 [1, {N_QUERY}, {TEXT['hidden_size']}]: the backbone's condition (last hidden "
                             "state at the query positions), cases[i]",
            "negative.features": f"float32 [1, {T}, {C}]: the negative prompt's features (decoder CFG)",
            "negative.condition": f"float32 [1, {N_QUERY}, {TEXT['hidden_size']}]: the negative prompt's condition",
        },
        "torch_settings": "torch.set_num_threads(1), torch.use_deterministic_algorithms(True), torch.no_grad; "
                          "transformers' default attention (sdpa)",
    }
    meta["files"] = file_list(out)
    size = sum(f["bytes"] for k, f in meta["files"].items() if k.startswith("checkpoint"))
    assert size < MAX_BYTES, f"checkpoint {size} bytes"
    write_json(os.path.join(out, "expected.json"), meta)
    for c in cases:
        print(f"  case {c['index']} {c['prompt']!r} seed {c['seed']}: {len(c['ids'])} ids, pixels {c['pixels']}")
    print(f"  condition sensitivity: image {sensitivity}/255, DiT features {feature_gap:.3f}; "
          f"checkpoint {size / 1e6:.3f} MB; params {n_params}")


def worker_decoder_check(args):
    """The decoder stage again on current diffusers, from the stored features: the same images?"""
    torch = setup_torch()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    out = args.out
    dec = os.path.join(out, "checkpoint", "diffusion-decoder")
    unet = UNet2DConditionModel.from_pretrained(dec, subfolder="unet", torch_dtype=torch.float32,
                                                low_cpu_mem_usage=False).eval()
    vae = AutoencoderKL.from_pretrained(dec, subfolder="vae", torch_dtype=torch.float32,
                                        low_cpu_mem_usage=False).eval()
    with open(os.path.join(dec, "scheduler", "scheduler_config.json")) as f:
        sched_cfg = json.load(f)
    expected = load_file(os.path.join(out, "expected.safetensors"))
    diffs = []
    with torch.no_grad():
        for i, (_, seed) in enumerate(PROMPTS):
            g = torch.Generator().manual_seed(seed)
            torch.randn(clip_noise_shape(), generator=g)
            pixels, _, _ = decode(unet, vae, sched_cfg, expected[f"features.{i}"], expected["negative.features"],
                                  torch.randn(decoder_noise_shape(), generator=g), DECODER_STEPS, DECODER_GUIDANCE)
            diffs.append(int((pixels.int() - expected[f"image.{i}"].int()).abs().max()))
    path = os.path.join(out, "expected.json")
    with open(path) as f:
        meta = json.load(f)
    meta["checks"]["decoder_on_current_diffusers"] = {
        "versions": versions(args, legacy=False), "max_pixel_diff_per_image": diffs,
        "what": "the decoder stage (UNet, Euler, VAE) rerun on current diffusers from features.<i> and "
                "negative.features: max |pixel| against image.<i>"}
    write_json(path, meta)
    print(f"  decoder stage on diffusers {meta['checks']['decoder_on_current_diffusers']['versions']['diffusers_version']}: "
          f"max pixel diff {diffs}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker == "reference":
        worker_reference(args)
    elif args.worker == "decoder-check":
        worker_decoder_check(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
