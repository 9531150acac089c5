#!/usr/bin/env python3
"""Build reference fixtures for the fidelity tests.

Each fixture is produced by running the *reference* implementation (diffusers, and
the official BLIP3-o code, branch `main`) on tiny, randomly initialised modules with
fixed seeds, in float32 on CPU.  Nothing from those projects is vendored here: their
source trees are only put on PYTHONPATH of a child process while this script runs.

Output, one pair per case, in test/fidelity/fixtures/ (or --out):
  <case>.safetensors   weights.<reference parameter name>  (float16, see below)
                       in.<name>   inputs given to the reference call
                       out.<name>  outputs of the reference call
                       dbg.<name>  optional intermediate values (for debugging only)
  <case>.json          config, versions/commits, exact call, description of every tensor

Weights are drawn in float32 and then rounded to float16 *before* the reference ran,
so the float16 values stored here, upcast to float32, are exactly the weights used.
Inputs and outputs are float32 (int64 for integer timesteps).  Complex tensors (the
Lumina RoPE table) are stored as torch.view_as_real(...) (last dim = [real, imag]).

Cases: dit_lumina, dit_lumina_gqa, dit_blip3o, unet_sdxl, vae_sdxl, schedulers.

How to run (sources fetched outside the project, e.g. with `git archive`):

  python3 -m venv /tmp/fx-venv
  /tmp/fx-venv/bin/pip install torch==2.13.0 numpy safetensors transformers \
      importlib_metadata Pillow requests
  # diffusers main checkout (src/), diffusers v0.32.2 (src/), BLIP3o branch main (repo root)
  nice -n 19 /tmp/fx-venv/bin/python test/fidelity/make_fixtures.py \
      --diffusers-src /tmp/diffusers/src --diffusers-commit <sha> \
      --diffusers-legacy-src /tmp/diffusers-0.32.2/src --diffusers-legacy-commit <sha> \
      --blip3o-src /tmp/blip3o --blip3o-commit <sha>

The same paths/commits can be given as environment variables DIFFUSERS_SRC,
DIFFUSERS_COMMIT, DIFFUSERS_LEGACY_SRC, DIFFUSERS_LEGACY_COMMIT, BLIP3O_SRC,
BLIP3O_COMMIT.  If a source path lies in a git work tree its commit is read from git.

Why two diffusers trees: the official BLIP3-o DiT (blip3o/model/lumina_nextdit2d.py)
builds its FFN with diffusers' LuminaFeedForward(inner_dim=4*dim).  diffusers <= 0.32.x
shrinks that to int(2*inner_dim/3) inside LuminaFeedForward (the width of the released
checkpoints: 4864 for dim 1792); diffusers >= 0.33 dropped that line (the callers in
diffusers now pass the 2/3 themselves), so the official code on a current diffusers
builds a 4*dim FFN that does not match the released weights.  The dit_blip3o case is
therefore made with the legacy tree; the upstream-diffusers cases with the current one.

Each case runs in its own child process with torch.set_num_threads(1).  A self-check
reloads the stored (float16) weights into a freshly built module and requires the
outputs to be reproduced bit-exactly.
"""

import argparse
import json
import math
import os
import subprocess
import sys

CASES = ["dit_lumina", "dit_lumina_gqa", "dit_blip3o", "unet_sdxl", "vae_sdxl", "schedulers"]
# which diffusers tree each case needs
NEEDS_LEGACY = {"dit_blip3o"}

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------

def git_commit(path):
    if not path:
        return None
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-src", default=os.environ.get("DIFFUSERS_SRC"))
    p.add_argument("--diffusers-commit", default=os.environ.get("DIFFUSERS_COMMIT"))
    p.add_argument("--diffusers-legacy-src", default=os.environ.get("DIFFUSERS_LEGACY_SRC"))
    p.add_argument("--diffusers-legacy-commit", default=os.environ.get("DIFFUSERS_LEGACY_COMMIT"))
    p.add_argument("--blip3o-src", default=os.environ.get("BLIP3O_SRC"))
    p.add_argument("--blip3o-commit", default=os.environ.get("BLIP3O_COMMIT"))
    p.add_argument("--out", default=os.path.join(HERE, "fixtures"))
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def driver(args):
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c}")
    os.makedirs(args.out, exist_ok=True)
    for c in cases:
        legacy = c in NEEDS_LEGACY
        src = args.diffusers_legacy_src if legacy else args.diffusers_src
        if not src:
            raise SystemExit(f"case {c} needs --diffusers{'-legacy' if legacy else ''}-src")
        if c == "dit_blip3o" and not args.blip3o_src:
            raise SystemExit("case dit_blip3o needs --blip3o-src")
        env = dict(os.environ)
        env["PYTHONPATH"] = src
        env["OMP_NUM_THREADS"] = "1"
        env["MKL_NUM_THREADS"] = "1"
        env["HF_HUB_OFFLINE"] = "1"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", c, "--out", args.out]
        for flag in ["diffusers_src", "diffusers_commit", "diffusers_legacy_src", "diffusers_legacy_commit",
                     "blip3o_src", "blip3o_commit"]:
            v = getattr(args, flag)
            if v:
                cmd += ["--" + flag.replace("_", "-"), v]
        print(f"[make_fixtures] {c} (diffusers from {src})", flush=True)
        subprocess.run(cmd, env=env, check=True)
    total = 0
    for f in sorted(os.listdir(args.out)):
        total += os.path.getsize(os.path.join(args.out, f))
    print(f"[make_fixtures] fixtures dir: {total / 1e6:.3f} MB")


# ----------------------------------------------------------------------------------
# worker helpers (run inside the child process)
# ----------------------------------------------------------------------------------

def setup_torch():
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def randomize_(module, seed):
    """Give every floating parameter/buffer a seeded random value, rounded to float16.

    matrices/kernels: N(0, 1/fan_in); 1-D `weight` (norm scales): 1 + 0.1 N(0,1);
    `bias`: 0.1 N(0,1); Lumina `gate`: 0.8 N(0,1); anything else: N(0,1).
    Iteration is over sorted state_dict names, so the result depends only on the seed
    and on the set of names/shapes.
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    sd = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name in sorted(sd):
            t = sd[name]
            if not t.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            r = torch.randn(t.shape, generator=g, dtype=torch.float32)
            if t.ndim >= 2:
                v = r / math.sqrt(t[0].numel())
            elif leaf == "bias":
                v = 0.1 * r
            elif leaf == "gate":
                v = 0.8 * r
            elif leaf == "weight":
                v = 1.0 + 0.1 * r
            else:
                v = r
            t.data.copy_(v.half().float())


def weights_of(module, keep=None):
    sd = module.state_dict()
    out = {}
    for k in sorted(sd):
        if keep is not None and not keep(k):
            continue
        t = sd[k].detach()
        if t.is_floating_point():
            h = t.half()
            assert h.float().equal(t.float()), f"{k} not exactly representable in float16"
            t = h
        out["weights." + k] = t.contiguous().clone()
    return out


def load_weights(module, tensors, strict=True):
    import torch
    sd = {k[len("weights."):]: v.float() for k, v in tensors.items() if k.startswith("weights.")}
    missing, unexpected = module.load_state_dict(sd, strict=strict)
    return missing, unexpected


def describe(tensors, meanings):
    d = {}
    for k in sorted(tensors):
        if k.startswith("weights."):
            continue
        t = tensors[k]
        d[k] = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                "meaning": meanings.get(k, "")}
    return d


def versions(args, legacy=False, blip3o=False):
    import torch
    import diffusers
    v = {"torch": torch.__version__, "diffusers_version": diffusers.__version__,
         "diffusers_commit": (args.diffusers_legacy_commit if legacy else args.diffusers_commit)
         or git_commit(args.diffusers_legacy_src if legacy else args.diffusers_src) or "unknown",
         "python": sys.version.split()[0]}
    if blip3o:
        import transformers
        v["blip3o_commit"] = args.blip3o_commit or git_commit(args.blip3o_src) or "unknown"
        v["blip3o_branch"] = "main"
        v["transformers"] = transformers.__version__
    return v


def write_case(args, case, tensors, meta):
    from safetensors.torch import save_file
    os.makedirs(args.out, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    path = os.path.join(args.out, case + ".safetensors")
    save_file(tensors, path, metadata={"case": case})
    os.chmod(path, 0o644)
    meta = dict(meta)
    meta["case"] = case
    meta["weights_storage"] = ("weights.* are float16; they were rounded to float16 before the reference ran, "
                               "so upcasting them to float32 gives exactly the weights used. The reference "
                               "ran entirely in float32 on CPU.")
    meta["weights_count"] = sum(1 for k in tensors if k.startswith("weights."))
    meta["weights_params"] = int(sum(v.numel() for k, v in tensors.items() if k.startswith("weights.")))
    with open(os.path.join(args.out, case + ".json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"  wrote {case}: {meta['weights_params']} params, "
          f"{os.path.getsize(os.path.join(args.out, case + '.safetensors')) / 1e3:.1f} kB")


def capture(module_map):
    """Register forward hooks; returns (dict name->output, remove())."""
    store = {}
    handles = []
    for name, mod in module_map.items():
        def hook(_m, _i, o, name=name):
            store[name] = (o[0] if isinstance(o, tuple) else o).detach().clone()
        handles.append(mod.register_forward_hook(hook))

    def remove():
        for h in handles:
            h.remove()
    return store, remove


def exact_check(a, b, what):
    if not a.equal(b):
        diff = (a - b).abs().max().item()
        raise SystemExit(f"self-check failed for {what}: max abs diff {diff}")


# ----------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------

FLOW_CFG = {"num_train_timesteps": 1000, "shift": 1.0}
SDXL_EULER_CFG = {  # Emu2-Gen diffusion_config/scheduler/scheduler_config.json (diffusers 0.21.2)
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}


def official_flow_timesteps(n):
    """BLIP3o sampler (blip3o_qwen_inference.py sample_images): sigmas=linspace(1, 1/n, n)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    s = FlowMatchEulerDiscreteScheduler(**FLOW_CFG)
    s.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n))
    return s


def case_dit_lumina(args, case):
    torch = setup_torch()
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    gqa = case == "dit_lumina_gqa"
    cfg = dict(sample_size=4, patch_size=1, in_channels=32, hidden_size=64, num_layers=2,
               num_attention_heads=4, num_kv_heads=2 if gqa else 4, multiple_of=32, ffn_dim_multiplier=None,
               norm_eps=1e-5, learn_sigma=False, qk_norm=True, cross_attention_dim=48, scaling_factor=1.0)
    seed = 1001 if not gqa else 1002
    torch.manual_seed(seed)
    model = LuminaNextDiT2DModel(**cfg).eval()
    randomize_(model, seed)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    ffn = model.layers[0].feed_forward.linear_1.weight.shape[0]

    g = torch.Generator().manual_seed(seed + 1)
    B, L = 2, 8
    x = torch.randn(B, cfg["in_channels"], 4, 4, generator=g)
    enc = torch.randn(B, L, cfg["cross_attention_dim"], generator=g)
    mask = torch.ones(B, L)
    sched = official_flow_timesteps(30)
    steps = [0, 19]
    t_sched = sched.timesteps[steps]
    t = t_sched.to(torch.long)
    rope_args = dict(embed_dim=head_dim, len_h=8, len_w=8, linear_factor=1.0, ntk_factor=1.0)
    rope = get_2d_rotary_pos_embed_lumina(head_dim, 8, 8)

    dbg_mods = {"dbg.patch_embed": model.patch_embedder, "dbg.temb": model.time_caption_embed}
    for i, layer in enumerate(model.layers):
        dbg_mods[f"dbg.layer{i}_out"] = layer
    dbg, remove = capture(dbg_mods)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=enc, encoder_mask=mask,
                    image_rotary_emb=rope, cross_attention_kwargs={}).sample
    remove()
    tensors = weights_of(model)
    tensors.update({"in.hidden_states": x, "in.timestep": t, "in.encoder_hidden_states": enc,
                    "in.encoder_mask": mask, "in.image_rotary_emb": torch.view_as_real(rope),
                    "out.sample": out})
    tensors.update(dbg)
    meanings = {
        "in.hidden_states": "noisy latent grid [B, C, H, W] (patch_size 1 -> H*W = 16 tokens, row-major h then w)",
        "in.timestep": "int64 timesteps, one per sample: int(FlowMatchEulerDiscreteScheduler(shift=1).timesteps[k]) "
                       f"after set_timesteps(30, sigmas=linspace(1,1/30,30)), k={steps}, i.e. sigma*1000 truncated, "
                       "as the BLIP3o sampler gives them (NOT the 1 - t/1000 convention of diffusers' LuminaPipeline)",
        "in.encoder_hidden_states": "caption/condition tokens [B, L, cross_attention_dim]",
        "in.encoder_mask": "float32 ones [B, L] (all tokens valid), as BLIP3o passes it",
        "in.image_rotary_emb": f"view_as_real of get_2d_rotary_pos_embed_lumina({head_dim}, 8, 8): complex64 "
                               f"[8, 8, {head_dim // 2}] (a table larger than the 4x4 grid; the model slices "
                               "[:4, :4] then flattens row-major)",
        "out.sample": "model(...).sample [B, C, H, W]",
        "dbg.patch_embed": "patch_embedder output tokens [B, 16, hidden] (first element of its output tuple)",
        "dbg.temb": "time_caption_embed output [B, min(hidden,1024)] = timestep embedding + caption embedding",
    }
    for i in range(cfg["num_layers"]):
        meanings[f"dbg.layer{i}_out"] = f"output of layers.{i} [B, 16, hidden]"

    if not gqa:
        # second call with a partial encoder mask (sample 1 has its last 3 tokens masked)
        mask2 = mask.clone()
        mask2[1, 5:] = 0
        with torch.no_grad():
            out2 = model(hidden_states=x, timestep=t, encoder_hidden_states=enc, encoder_mask=mask2,
                         image_rotary_emb=rope, cross_attention_kwargs={}).sample
        tensors["in.encoder_mask_partial"] = mask2
        tensors["out.sample_masked"] = out2
        meanings["in.encoder_mask_partial"] = "float32 mask [B, L]: row 0 all ones, row 1 ones for tokens 0..4, zeros 5..7"
        meanings["out.sample_masked"] = "same call as out.sample but encoder_mask=in.encoder_mask_partial"

    # self-check: reload stored weights into a fresh module
    fresh = LuminaNextDiT2DModel(**cfg).eval()
    load_weights(fresh, tensors)
    with torch.no_grad():
        again = fresh(hidden_states=x, timestep=t, encoder_hidden_states=enc, encoder_mask=mask,
                      image_rotary_emb=rope, cross_attention_kwargs={}).sample
    exact_check(again, out, case)

    meta = {
        "description": ("diffusers LuminaNextDiT2DModel (upstream class, current diffusers) configured like the "
                        "BLIP3-o DiT (patch 1, learn_sigma False, qk_norm, eps 1e-5)"
                        + (", with grouped-query attention (kv_heads < heads)" if gqa else "")
                        + ". Upstream class: NO caption_projection (cross-attention keys/values and the pooled "
                          "caption embedder read encoder_hidden_states directly), and it has an unused `pad_token` "
                          "parameter (torch.empty in diffusers; randomised here)."),
        "module": "diffusers.LuminaNextDiT2DModel",
        "config": cfg,
        "derived": {"head_dim": head_dim, "ffn_inner_dim": ffn, "time_caption_embed_width": min(cfg["hidden_size"], 1024),
                    "ffn_formula": "diffusers main lumina_nextdit2d.py passes inner_dim=int(4*2*dim/3) to "
                                   "LuminaFeedForward, which then applies ffn_dim_multiplier and rounds up to "
                                   "multiple_of: here int(8*64/3)=170 -> 192 (released formula; 4864 for dim 1792)"},
        "call": ("model(hidden_states=in.hidden_states, timestep=in.timestep, encoder_hidden_states="
                 "in.encoder_hidden_states, encoder_mask=in.encoder_mask, image_rotary_emb=<complex "
                 "in.image_rotary_emb>, cross_attention_kwargs={}).sample"),
        "rope_args": {"function": "diffusers.models.embeddings.get_2d_rotary_pos_embed_lumina", **rope_args,
                      "dtype": str(rope.dtype)},
        "timestep_info": {"scheduler_config": FLOW_CFG, "set_timesteps": "set_timesteps(30, sigmas=np.linspace(1, 1/30, 30))",
                          "step_indices": steps, "scheduler_timesteps_float32": t_sched.tolist(),
                          "given_to_model_int64": t.tolist()},
        "seeds": {"weights": seed, "inputs": seed + 1},
        "versions": versions(args),
        "tensors": describe(tensors, meanings),
    }
    write_case(args, case, tensors, meta)


def import_blip3o(blip3o_src):
    """Import blip3o.model.nextdit_crossattn without running blip3o/__init__ (which pulls the LLM stack)."""
    import types
    for name in ["blip3o", "blip3o.model"]:
        if name not in sys.modules:
            m = types.ModuleType(name)
            m.__path__ = [os.path.join(blip3o_src, *name.split("."))]
            sys.modules[name] = m
    import importlib
    return importlib.import_module("blip3o.model.nextdit_crossattn")


def case_dit_blip3o(args, case):
    torch = setup_torch()
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    mod = import_blip3o(args.blip3o_src)
    NextDiTCrossAttn, NextDiTCrossAttnConfig = mod.NextDiTCrossAttn, mod.NextDiTCrossAttnConfig

    cfg = dict(input_size=4, patch_size=1, in_channels=32, dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
               multiple_of=32, ffn_dim_multiplier=None, norm_eps=1e-5, latent_embedding_size=48,
               learn_sigma=False, qk_norm=True)
    seed = 2001
    torch.manual_seed(seed)
    dit = NextDiTCrossAttn(NextDiTCrossAttnConfig(**cfg)).eval()
    randomize_(dit, seed)
    ffn = dit.model.layers[0].feed_forward.linear_1.weight.shape[0]
    head_dim = cfg["dim"] // cfg["n_heads"]

    g = torch.Generator().manual_seed(seed + 1)
    Q, H = 8, cfg["latent_embedding_size"]
    cond = torch.randn(1, Q, H, generator=g) * 2.0
    z_in = torch.cat([torch.zeros_like(cond), cond], 0)  # official order [uncond(all zeros), cond]
    guidance = 3.0

    tensors = {}
    meanings = {
        "in.condition": "condition = LLM last-layer hidden states at the Q query positions [1, Q, H] (random here)",
        "in.z_latents": "DiT condition batch [2, Q, H] = cat([zeros_like(condition), condition]) (order uncond, cond)",
        "in.sigmas": "scheduler.sigmas after set_timesteps(30, sigmas=np.linspace(1, 1/30, 30)) [31] (last = 0)",
        "in.scheduler_timesteps": "scheduler.timesteps (float32, = sigmas*1000) [30]",
        "dbg.caption_projection": "dit.model.caption_projection(in.z_latents) [2, Q, dim] (Linear H->dim, GELU(tanh), Linear dim->dim); same for both steps",
    }
    steps = [0, 10]  # step 10: sigma*1000 = 666.67 -> 666 (truncation differs from rounding)
    model_calls = []
    dbg_store, remove = capture({"dbg.caption_projection": dit.model.caption_projection,
                                 "dbg.temb": dit.model.time_caption_embed})
    for k in steps:
        sched = FlowMatchEulerDiscreteScheduler(**FLOW_CFG)
        sched.set_timesteps(30, sigmas=np.linspace(1.0, 1 / 30, 30))
        t = sched.timesteps[k]
        latents = torch.randn(1, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
        latent_model_input = latents.repeat(2, 1, 1, 1)
        t_model = t.unsqueeze(0).expand(latent_model_input.shape[0]).to(latent_model_input.device, torch.long)
        with torch.no_grad():
            v = dit(x=latent_model_input, timestep=t_model, z_latents=z_in)
        u, c = v.chunk(2)
        guided = u + guidance * (c - u)
        prev = sched.step(guided, t, latents).prev_sample
        tensors.update({f"in.latents_step{k}": latents, f"in.t_step{k}": t.reshape(1),
                        f"in.timestep_model_step{k}": t_model, f"out.model_output_step{k}": v,
                        f"out.guided_step{k}": guided, f"out.prev_latents_step{k}": prev,
                        "dbg.caption_projection": dbg_store["dbg.caption_projection"],
                        f"dbg.temb_step{k}": dbg_store["dbg.temb"]})
        meanings.update({
            f"in.latents_step{k}": f"latents entering denoising step index {k} [1, C, 4, 4]",
            f"in.t_step{k}": f"scheduler.timesteps[{k}] (float32) [1]",
            f"in.timestep_model_step{k}": f"timestep given to the DiT: t.unsqueeze(0).expand(2).to(torch.long) [2] (truncation of sigma*1000)",
            f"out.model_output_step{k}": f"dit(x=latents.repeat(2,1,1,1), timestep=in.timestep_model_step{k}, z_latents=in.z_latents) [2, C, 4, 4] (velocity prediction, rows [uncond, cond])",
            f"out.guided_step{k}": f"u + 3.0*(c - u) with u, c = out.model_output_step{k}.chunk(2) [1, C, 4, 4]",
            f"out.prev_latents_step{k}": f"scheduler.step(guided, t, latents).prev_sample = latents + (sigmas[{k}+1]-sigmas[{k}])*guided [1, C, 4, 4]",
            f"dbg.temb_step{k}": "dit.model.time_caption_embed output [2, min(dim,1024)]",
        })
        model_calls.append({"step_index": k, "t_float32": float(t), "t_model_int64": t_model.tolist()})
    remove()
    tensors["in.condition"] = cond
    tensors["in.z_latents"] = z_in
    tensors["in.sigmas"] = sched.sigmas.clone()
    tensors["in.scheduler_timesteps"] = sched.timesteps.clone()
    rope_used = dit.freqs_cis[:4, :4]
    tensors["dbg.image_rotary_emb_used"] = torch.view_as_real(rope_used).contiguous()
    meanings["dbg.image_rotary_emb_used"] = ("view_as_real of dit.freqs_cis[:4, :4] (complex64 [4, 4, head_dim/2]); "
                                             "dit.freqs_cis = get_2d_rotary_pos_embed_lumina(dim // n_heads, 384, 384)")

    tensors.update(weights_of(dit))

    # self-check
    fresh = NextDiTCrossAttn(NextDiTCrossAttnConfig(**cfg)).eval()
    load_weights(fresh, tensors)
    k = steps[-1]
    with torch.no_grad():
        again = fresh(x=tensors[f"in.latents_step{k}"].repeat(2, 1, 1, 1),
                      timestep=tensors[f"in.timestep_model_step{k}"], z_latents=z_in)
    exact_check(again, tensors[f"out.model_output_step{k}"], case)

    meta = {
        "description": ("Official BLIP3-o DiT: blip3o.model.nextdit_crossattn.NextDiTCrossAttn (branch main), which "
                        "wraps the repo's own copy of LuminaNextDiT2DModel (blip3o/model/lumina_nextdit2d.py: adds "
                        "caption_projection = PixArtAlphaTextProjection(H -> dim, GELU tanh, dim -> dim); cross-attention "
                        "and the caption embedder read the projected condition, so their width is dim; no pad_token). "
                        "Run as the official sampler does for one denoising step (blip3o_qwen_inference.py "
                        "sample_images): CFG batch [zeros, cond], guidance 3.0, FlowMatchEulerDiscreteScheduler step. "
                        "Run with diffusers v0.32.2 because the official code gets the released FFN width only from "
                        "diffusers <= 0.32 (see ffn_formula). Weight names are the NextDiTCrossAttn state_dict names; in "
                        "the released checkpoint the same tensors are under the prefix 'model.dit.' (model.dit.model.layers.N...)."),
        "module": "blip3o.model.nextdit_crossattn.NextDiTCrossAttn",
        "config": {"NextDiTCrossAttnConfig": cfg, "_gradient_checkpointing": True,
                   "note": "_gradient_checkpointing left at its default True (as build_dit does); module in eval() so it has no effect"},
        "derived": {"head_dim": head_dim, "ffn_inner_dim": ffn, "time_caption_embed_width": min(cfg["dim"], 1024),
                    "ffn_formula": ("official lumina_nextdit2d.py passes inner_dim=4*dim to diffusers' LuminaFeedForward; "
                                    "diffusers v0.32.2 LuminaFeedForward does inner=int(2*inner/3), then ffn_dim_multiplier, "
                                    "then rounds up to multiple_of: int(2*256/3)=170 -> 192 here (4864 for dim 1792). "
                                    "With diffusers >= 0.33 the same code gives 4*dim rounded = 256 here (7168 for dim 1792) "
                                    "and, with _gradient_checkpointing=True, fails earlier in enable_gradient_checkpointing "
                                    "(TypeError: _set_gradient_checkpointing() got an unexpected keyword argument 'enable').")},
        "call": ("for k in step_indices: sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0); "
                 "sched.set_timesteps(30, sigmas=np.linspace(1.0, 1/30, 30)); t = sched.timesteps[k]; "
                 "v = dit(x=latents.repeat(2,1,1,1), timestep=t.unsqueeze(0).expand(2).to(torch.long), "
                 "z_latents=cat([zeros, cond])); u, c = v.chunk(2); guided = u + 3.0*(c-u); "
                 "prev = sched.step(guided, t, latents).prev_sample"),
        "model_calls": model_calls,
        "scheduler_config": dict(FLOW_CFG, note=("official code loads Alpha-VLLM/Lumina-Next-SFT-diffusers/scheduler; "
                                                 "that file was not readable here. shift=1.0 assumed: diffusers' "
                                                 "scripts/convert_lumina_to_diffusers.py builds that pipeline's scheduler as "
                                                 "FlowMatchEulerDiscreteScheduler() with defaults (shift 1.0)")),
        "rope_args": {"function": "diffusers.models.embeddings.get_2d_rotary_pos_embed_lumina",
                      "embed_dim": head_dim, "len_h": 384, "len_w": 384, "dtype": str(dit.freqs_cis.dtype)},
        "encoder_mask": "NextDiTCrossAttn.forward always passes torch.ones(B, Q) (float32) as encoder_mask",
        "seeds": {"weights": seed, "inputs": seed + 1},
        "versions": versions(args, legacy=True, blip3o=True),
        "tensors": describe(tensors, meanings),
    }
    write_case(args, case, tensors, meta)


UNET_CFG = dict(
    sample_size=16, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False, block_out_channels=(8, 16, 24), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=4, norm_eps=1e-5,
    cross_attention_dim=32, transformer_layers_per_block=(1, 2, 3), encoder_hid_dim=None,
    encoder_hid_dim_type=None, attention_head_dim=(1, 2, 3), num_attention_heads=None,
    dual_cross_attention=False, use_linear_projection=True, class_embed_type=None,
    addition_embed_type="text_time", addition_time_embed_dim=8, num_class_embeds=None,
    upcast_attention=None, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=32 + 6 * 8, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)


def case_unet_sdxl(args, case):
    torch = setup_torch()
    from diffusers import UNet2DConditionModel
    seed = 3001
    torch.manual_seed(seed)
    cfg = dict(UNET_CFG)
    unet = UNet2DConditionModel(**cfg).eval()
    randomize_(unet, seed)
    g = torch.Generator().manual_seed(seed + 1)
    B, L = 2, 8
    sample = torch.randn(B, 4, 16, 16, generator=g)
    t = torch.tensor([981.0])
    enc = torch.randn(B, L, cfg["cross_attention_dim"], generator=g)
    text_embeds = enc.mean(dim=1)
    Hpx = Wpx = 16 * 8
    time_ids = torch.tensor([[Hpx, Wpx, 0, 0, Hpx, Wpx]] * B, dtype=torch.float32)
    dbg, remove = capture({"dbg.time_embedding": unet.time_embedding, "dbg.add_embedding": unet.add_embedding,
                           "dbg.mid_block": unet.mid_block})
    with torch.no_grad():
        out = unet(sample, t, encoder_hidden_states=enc,
                   added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    remove()
    tensors = weights_of(unet)
    tensors.update({"in.sample": sample, "in.timestep": t, "in.encoder_hidden_states": enc,
                    "in.text_embeds": text_embeds, "in.time_ids": time_ids, "out.sample": out})
    tensors.update(dbg)
    fresh = UNet2DConditionModel(**cfg).eval()
    load_weights(fresh, tensors)
    with torch.no_grad():
        again = fresh(sample, t, encoder_hidden_states=enc,
                      added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    exact_check(again, out, case)
    meanings = {
        "in.sample": "UNet input latents [B, 4, 16, 16] (already scaled by the scheduler, i.e. what the UNet receives)",
        "in.timestep": "float32 timestep [1] (981 = first timestep of the SDXL Euler schedule with 50 steps); broadcast to the batch",
        "in.encoder_hidden_states": "condition tokens [B, L, cross_attention_dim] (BLIP3-o: the 64 x 1792 DiT features)",
        "in.text_embeds": "added_cond_kwargs['text_embeds'] = in.encoder_hidden_states.mean(dim=1) [B, cross_attention_dim]",
        "in.time_ids": "added_cond_kwargs['time_ids'] = [H, W, 0, 0, H, W] per row with H = W = 128 (= 8 * latent size) [B, 6]",
        "out.sample": "unet(...).sample [B, 4, 16, 16] (epsilon prediction)",
        "dbg.time_embedding": "unet.time_embedding output [B, 4*block_out_channels[0]] (before adding aug_emb)",
        "dbg.add_embedding": "unet.add_embedding output [B, 4*block_out_channels[0]] (text_time aug_emb)",
        "dbg.mid_block": "unet.mid_block output [B, 24, 4, 4]",
    }
    meta = {
        "description": ("diffusers UNet2DConditionModel with a tiny config mirroring the structure of the BLIP3-o / "
                        "Emu2-Gen decoder UNet (baaivision/Emu Emu2/emu/conf/diffusion_config/unet/config.json: "
                        "block_out_channels [320,640,1280], Down/CrossAttn/CrossAttn, transformer_layers_per_block [1,2,10], "
                        "attention_head_dim [5,10,20] (diffusers uses it as the NUMBER of heads since num_attention_heads "
                        "is null -> head dim 64 at every level), cross_attention_dim 1792, text_time with "
                        "addition_time_embed_dim 256, projection_class_embeddings_input_dim 3328 = 1792 + 6*256, "
                        "use_linear_projection true, layers_per_block 2, norm_num_groups 32). Tiny: channels "
                        "(8,16,24), heads (1,2,3) -> head dim 8 at every level, transformer depth (1,2,3), "
                        "norm_num_groups 4, cross dim 32, addition_time_embed_dim 8 -> 32 + 6*8 = 80."),
        "module": "diffusers.UNet2DConditionModel",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "call": ("unet(in.sample, in.timestep, encoder_hidden_states=in.encoder_hidden_states, added_cond_kwargs="
                 "{'text_embeds': in.text_embeds, 'time_ids': in.time_ids}).sample"),
        "seeds": {"weights": seed, "inputs": seed + 1},
        "versions": versions(args),
        "tensors": describe(tensors, meanings),
    }
    write_case(args, case, tensors, meta)


VAE_CFG = dict(in_channels=3, out_channels=3,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(8, 16, 32, 32), layers_per_block=2, act_fn="silu", latent_channels=4,
               norm_num_groups=4, sample_size=64, scaling_factor=0.13025, force_upcast=True)


def case_vae_sdxl(args, case):
    torch = setup_torch()
    from diffusers import AutoencoderKL
    seed = 4001
    torch.manual_seed(seed)
    cfg = dict(VAE_CFG)
    vae = AutoencoderKL(**cfg).eval()
    randomize_(vae, seed)
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    z = latents / vae.config.scaling_factor
    dbg, remove = capture({"dbg.post_quant_conv": vae.post_quant_conv, "dbg.decoder_mid_block": vae.decoder.mid_block})
    with torch.no_grad():
        sample = vae.decode(z).sample
    remove()
    keep = lambda k: k.startswith("decoder.") or k.startswith("post_quant_conv.")
    tensors = weights_of(vae, keep)
    tensors.update({"in.latents": latents, "in.z": z, "out.sample": sample})
    tensors.update(dbg)
    fresh = AutoencoderKL(**cfg).eval()
    missing, _ = load_weights(fresh, tensors, strict=False)
    assert all(not keep(k) for k in missing), missing
    with torch.no_grad():
        again = fresh.decode(z).sample
    exact_check(again, sample, case)
    meanings = {
        "in.latents": "latents as produced by the denoising loop [1, 4, 8, 8] (NOT yet divided by scaling_factor)",
        "in.z": "in.latents / scaling_factor (0.13025): this is what is passed to vae.decode",
        "out.sample": "vae.decode(in.z).sample [1, 3, 64, 64] (range roughly [-1, 1] for real weights)",
        "dbg.post_quant_conv": "post_quant_conv(in.z) [1, 4, 8, 8]",
        "dbg.decoder_mid_block": "decoder.mid_block output [1, 32, 8, 8]",
    }
    meta = {
        "description": ("diffusers AutoencoderKL, tiny SDXL-style config (4 latent channels, scaling_factor 0.13025, "
                        "force_upcast True, 4 levels like SDXL's [128,256,512,512] -> tiny (8,16,32,32), "
                        "layers_per_block 2, norm_num_groups 4 (SDXL: 32), mid-block attention (1 head, width = last "
                        "channels)). Only decode is exercised, so only decoder.* and post_quant_conv.* weights are "
                        "stored (encoder.* and quant_conv.* are not used by decode). force_upcast only matters in "
                        "pipelines running fp16; everything here is float32."),
        "module": "diffusers.AutoencoderKL",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "call": "vae.decode(in.latents / vae.config.scaling_factor).sample",
        "postprocess": "pipelines then do image = (sample / 2 + 0.5).clamp(0, 1) -> uint8 (not stored)",
        "seeds": {"weights": seed, "inputs": seed + 1},
        "versions": versions(args),
        "tensors": describe(tensors, meanings),
    }
    write_case(args, case, tensors, meta)


def case_schedulers(args, case):
    torch = setup_torch()
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler
    g = torch.Generator().manual_seed(5001)
    tensors, meanings, info = {}, {}, {}

    # --- flow matching (DiT sampler) ---
    for name, n, shift in [("flow30", 30, 1.0), ("flow4", 4, 1.0), ("flow30_shift3", 30, 3.0)]:
        s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        sig_in = np.linspace(1.0, 1 / n, n)
        s.set_timesteps(n, sigmas=sig_in)
        tensors[f"out.{name}.timesteps"] = s.timesteps.clone()
        tensors[f"out.{name}.timesteps_int64"] = s.timesteps.to(torch.long)
        tensors[f"out.{name}.sigmas"] = s.sigmas.clone()
        meanings[f"out.{name}.timesteps"] = f"timesteps (float32) after set_timesteps({n}, sigmas=np.linspace(1, 1/{n}, {n})), shift={shift}"
        meanings[f"out.{name}.timesteps_int64"] = "the same .to(torch.long): what the BLIP3o sampler gives the DiT"
        meanings[f"out.{name}.sigmas"] = f"sigmas (float32) [{n + 1}], last = 0"
        info[name] = {"config": {"num_train_timesteps": 1000, "shift": shift},
                      "call": f"set_timesteps({n}, sigmas=np.linspace(1.0, 1/{n}, {n}))"}
    info["flow30_shift3"]["note"] = "not used by BLIP3-o (shift 1.0 assumed); shows where shift enters: s' = shift*s/(1+(shift-1)*s)"

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    s.set_timesteps(30, sigmas=np.linspace(1.0, 1 / 30, 30))
    k = 5
    x = torch.randn(1, 32, 4, 4, generator=g)
    v = torch.randn(1, 32, 4, 4, generator=g)
    prev = s.step(v, s.timesteps[k], x).prev_sample
    tensors.update({"in.flow_step.sample": x, "in.flow_step.model_output": v,
                    "in.flow_step.timestep": s.timesteps[k].reshape(1), "out.flow_step.prev_sample": prev})
    meanings.update({"in.flow_step.sample": "x_t [1, 32, 4, 4]", "in.flow_step.model_output": "velocity [1, 32, 4, 4]",
                     "in.flow_step.timestep": f"flow30 timesteps[{k}] [1]",
                     "out.flow_step.prev_sample": f"step(model_output, timesteps[{k}], sample).prev_sample = sample + (sigmas[{k + 1}] - sigmas[{k}]) * model_output"})
    info["flow_step"] = {"config": FLOW_CFG, "call": f"fresh scheduler; set_timesteps(30, sigmas=np.linspace(1,1/30,30)); step(in.flow_step.model_output, timesteps[{k}], in.flow_step.sample)",
                         "step_index": k}

    # --- SDXL Euler (decoder sampler) ---
    for n in [50, 7]:
        name = f"euler{n}"
        s = EulerDiscreteScheduler.from_config(SDXL_EULER_CFG)
        s.set_timesteps(n)
        ts = s.timesteps.clone()
        tensors[f"out.{name}.timesteps"] = ts
        tensors[f"out.{name}.sigmas"] = s.sigmas.clone()
        tensors[f"out.{name}.init_noise_sigma"] = torch.tensor([float(s.init_noise_sigma)])
        factors = []
        for i in range(n):
            si = EulerDiscreteScheduler.from_config(SDXL_EULER_CFG)
            si.set_timesteps(n)
            factors.append(si.scale_model_input(torch.ones(1), ts[i]).item())
        tensors[f"out.{name}.scale_factors"] = torch.tensor(factors, dtype=torch.float32)
        meanings[f"out.{name}.timesteps"] = f"timesteps after set_timesteps({n}) [{n}] (dtype as diffusers returns it)"
        meanings[f"out.{name}.sigmas"] = f"sigmas [{n + 1}], last = 0"
        meanings[f"out.{name}.init_noise_sigma"] = "scheduler.init_noise_sigma (initial noise is randn * this)"
        meanings[f"out.{name}.scale_factors"] = "scale_model_input(ones, timesteps[i]) for each step i = 1/sqrt(sigma_i^2+1)"
        info[name] = {"call": f"EulerDiscreteScheduler.from_config(cfg).set_timesteps({n})",
                      "init_noise_sigma": float(s.init_noise_sigma), "timestep_dtype": str(ts.dtype)}

    s = EulerDiscreteScheduler.from_config(SDXL_EULER_CFG)
    s.set_timesteps(50)
    k = 10
    x = torch.randn(1, 4, 8, 8, generator=g) * 3.0
    eps = torch.randn(1, 4, 8, 8, generator=g)
    prev = s.step(eps, s.timesteps[k], x).prev_sample
    tensors.update({"in.euler_step.sample": x, "in.euler_step.model_output": eps,
                    "in.euler_step.timestep": s.timesteps[k].reshape(1).clone(), "out.euler_step.prev_sample": prev})
    meanings.update({"in.euler_step.sample": "x [1, 4, 8, 8]", "in.euler_step.model_output": "epsilon prediction [1, 4, 8, 8]",
                     "in.euler_step.timestep": f"euler50 timesteps[{k}] [1]",
                     "out.euler_step.prev_sample": f"step(eps, timesteps[{k}], x).prev_sample = x + (sigmas[{k + 1}] - sigmas[{k}]) * eps (epsilon, s_churn 0)"})
    info["euler_step"] = {"call": f"fresh scheduler; set_timesteps(50); step(in.euler_step.model_output, timesteps[{k}], in.euler_step.sample)",
                          "step_index": k}

    meta = {
        "description": "Scheduler tables and single steps: FlowMatchEulerDiscreteScheduler as the BLIP3-o DiT sampler "
                       "uses it, EulerDiscreteScheduler with the SDXL / Emu2-Gen decoder config.",
        "config": {"flow_match": dict(FLOW_CFG, note="Lumina-Next-SFT-diffusers scheduler; shift 1.0 assumed (see README)"),
                   "euler_sdxl": SDXL_EULER_CFG},
        "cases": info,
        "seeds": {"inputs": 5001},
        "versions": versions(args),
        "tensors": describe(tensors, meanings),
        "tables": {k: [round(float(x), 8) for x in v.flatten().tolist()] for k, v in tensors.items()
                   if k.startswith("out.") and v.numel() <= 64 and "_step." not in k},
    }
    write_case(args, case, tensors, meta)


WORKERS = {"dit_lumina": case_dit_lumina, "dit_lumina_gqa": case_dit_lumina, "dit_blip3o": case_dit_blip3o,
           "unet_sdxl": case_unet_sdxl, "vae_sdxl": case_vae_sdxl, "schedulers": case_schedulers}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        WORKERS[args.worker](args, args.worker)
    else:
        driver(args)


if __name__ == "__main__":
    main()
