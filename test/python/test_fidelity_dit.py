"""The DiT against the official BLIP3-o code: test/fidelity/fixtures/dit_blip3o (NextDiTCrossAttn of
JiuhaiChen/BLIP3o, branch main, on diffusers 0.32.2, tiny random weights; made by
test/fidelity/make_fixtures.py). Its weights go through the importer's name mapping (models/importer/dit.py),
RoPE channel permutation included; one official sampler step each at step 0 and step 10 must agree."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.dit import DiT
from models.importer.dit import dit_config, dit_tensors

FIXTURES = Path(__file__).resolve().parents[1] / "fidelity" / "fixtures"
# the official module's names, under the released checkpoint's prefix
PREFIX = "model.dit."


def fixture(name: str):
    return load_file(str(FIXTURES / f"{name}.safetensors")), json.loads((FIXTURES / f"{name}.json").read_text())


def imported_dit() -> DiT:
    tensors, _ = fixture("dit_blip3o")
    ckpt = {PREFIX + k[len("weights."):]: v.float() for k, v in tensors.items() if k.startswith("weights.")}
    cfg = dit_config({k: tuple(v.shape) for k, v in ckpt.items()}, PREFIX + "model.")
    cfg.grid = 4  # the fixture's input_size
    dit = DiT(cfg).eval()
    mapping = dit_tensors(cfg, PREFIX + "model.")
    state = {}
    for ours, (theirs, transform) in mapping.items():
        state[ours] = ckpt.pop(theirs) if transform is None else transform(ckpt.pop(theirs))
    dit.load_state_dict(state, strict=True)
    assert not ckpt, f"checkpoint tensors the mapping left out: {sorted(ckpt)}"
    return dit


def tokens(x: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, h * w, C], row-major (patch 1)."""
    return x.flatten(2).transpose(1, 2)


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / (want.max() - want.min()))


def test_config_from_shapes():
    """Layers, heads, KV heads and the released FFN width (diffusers <= 0.32's formula) come from the shapes."""
    _, meta = fixture("dit_blip3o")
    c = meta["config"]["NextDiTCrossAttnConfig"]
    dit = imported_dit()
    assert len(dit.layers) == c["n_layers"] and dit.layers[0].attn1.heads == c["n_heads"]
    assert dit.layers[0].attn1.kv_heads == c["n_kv_heads"]
    assert dit.layers[0].feed_forward.gate_proj.out_features == meta["derived"]["ffn_inner_dim"]


@pytest.mark.parametrize("step", [0, 10])
@pytest.mark.parametrize("scripted", [False, True])
def test_official_sampler_step(step, scripted, fidelity):
    """Velocity of the CFG pair [zeros, condition] at the official integer timestep, the guided velocity
    and the Euler step, against the official module: within 1e-5 of each output's range (float32)."""
    tensors, _ = fixture("dit_blip3o")
    dit = imported_dit()
    model = torch.jit.script(dit) if scripted else dit
    latents = tensors[f"in.latents_step{step}"]
    t = tensors[f"in.timestep_model_step{step}"]  # int64, as the official sampler passes it
    condition = tensors["in.z_latents"]
    with torch.no_grad():
        v = model(tokens(latents).repeat(2, 1, 1), t.float(), condition)
    want = tokens(tensors[f"out.model_output_step{step}"])
    fidelity(f"DiT{' (scripted)' if scripted else ''} vs the official NextDiTCrossAttn, CFG pair at sampler step {step}, "
             "max abs diff / range", relative(v, want), 1e-5)
    u, c = v.chunk(2)
    guided = u + 3.0 * (c - u)
    assert relative(guided, tokens(tensors[f"out.guided_step{step}"])) <= 1e-5
    sigmas = tensors["in.sigmas"]
    prev = tokens(latents) + (sigmas[step + 1] - sigmas[step]) * guided
    assert relative(prev, tokens(tensors[f"out.prev_latents_step{step}"])) <= 1e-5


def test_rope_permutation_is_needed():
    """The check above can fail: without the channel permutation the velocities differ."""
    tensors, _ = fixture("dit_blip3o")
    dit = imported_dit()
    with torch.no_grad():
        for layer in dit.layers:
            for attn in (layer.attn1, layer.attn2):
                # undo the permutation on q only: scores change
                attn.to_q.weight.copy_(attn.to_q.weight.flip(0))
        v = dit(tokens(tensors["in.latents_step0"]).repeat(2, 1, 1), tensors["in.timestep_model_step0"].float(),
                tensors["in.z_latents"])
    assert relative(v, tokens(tensors["out.model_output_step0"])) > 1e-3
