"""The backbone against transformers' Qwen2_5_VLForConditionalGeneration (the model BLIP3-o's backbone is).

A tiny random Qwen2.5-VL (GQA, q/k/v biases, M-RoPE sections scaled to the head, a 4-layer vision tower
with window attention and one full-attention layer), every parameter re-randomised so that norms and biases
matter, plus BLIP3-o's `model.latent_queries`, saved with save_pretrained (the released layout) and loaded
into models.backbone.Backbone through models/importer/backbone.py. Then, float32 on CPU, tied and untied
embeddings: text logits, the image features, the M-RoPE positions, image + text logits, the DiT's condition,
32 greedy tokens through the static KV cache, and TorchScript == eager.

Pixels: transformers gets the pixel_values / image_grid_thw of its image processor without resizing (the
image is already a multiple of 28 px, as the runtime's smart_resize makes it); ours the same image as
[1, 3, H, W] normalised with the CLIP mean / std. Where the processor cannot run (its PIL backend needs
Pillow), the patches are laid out by hand as its patchify documents: merge groups row-major, row-major
inside a group, each patch (channel, frame, row, col) with the image repeated for both frames (equal to the
processor's output where it runs: checked with Pillow installed).
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from models.backbone import Backbone, rope_mrope, rope_positions  # noqa: E402
from models.importer.backbone import backbone_configs, backbone_tensors  # noqa: E402
from models.layers import rope_1d  # noqa: E402
from models.presets import CLIP_MEAN, CLIP_STD, BackboneConfig, VisionConfig, get_preset  # noqa: E402

VOCAB, HIDDEN, N_QUERY = 300, 64, 64  # 64: the released count of latent queries
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END, IMG = 290, 291, 292, 293, 295
# 168 x 140 px: 12 x 10 patches of 14, 6 x 5 merged tokens; windows of 4 x 4 merged tokens (112 px) leave
# partial windows at the bottom (2 rows) and the right (1 column)
IMAGE_H, IMAGE_W = 168, 140
# more shapes for the vision tower: whole windows only (8 x 4 merged), wide with a partial column (3 x 9)
IMAGE_SIZES = [(IMAGE_H, IMAGE_W), (224, 112), (84, 252)]
NEW_TOKENS = 32
TOL = 1e-4  # of the compared quantity's range


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / (want.max() - want.min()))


def hf_config(tied: bool):
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=0, eos_token_id=1, pad_token_id=0),
        vision_config=dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=HIDDEN,
                           fullatt_block_indexes=[2]),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tied)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (transformers initialises norms to 1 and biases to 0, which would hide a
    norm or bias left out); the layers' weights large next to the embeddings, so that greedy decoding
    wanders over many tokens instead of repeating the last one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_((0.05 if "embed_tokens" in name else 0.2) * noise)


def load_ours(folder: Path) -> Backbone:
    """The generic importer's job in small: config -> dataclasses, every state_dict entry from its tensor."""
    config = json.loads((folder / "config.json").read_text())
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    cfg, vision = backbone_configs(config)
    assert tensors["model.embed_tokens.weight"].shape[0] == cfg.vocab
    model = Backbone(cfg, vision).eval()
    mapping = backbone_tensors(config, available=tensors.keys())
    assert set(mapping) == set(model.state_dict())
    state = {k: tensors[src] if t is None else t(tensors[src]) for k, (src, t) in mapping.items()}
    model.load_state_dict(state, strict=True)
    unused = set(tensors) - {src for src, _ in mapping.values()}
    assert not unused, f"checkpoint tensors the mapping left out: {sorted(unused)}"
    return model


def image_inputs(height: int = IMAGE_H, width: int = IMAGE_W):
    """(ours: pixels [1, 3, H, W]; transformers: pixel_values [N, 3*2*14*14], image_grid_thw [[1, gh, gw]])."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(image).permute(2, 0, 1)[None].float() * (1 / 255) - mean) / std
    # the processor's layout, by hand
    gh, gw, p, m = height // 14, width // 14, 14, 2
    x = pixels[0].reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # gh/m gw/m m m C p p
    by_hand = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, 2, -1, -1).reshape(gh * gw, 3 * 2 * p * p)
    grid = torch.tensor([[1, gh, gw]])
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        out = Qwen2VLImageProcessorPil(do_resize=False)(images=image, return_tensors="pt")
    except ImportError:  # no Pillow: the layout by hand stands
        return pixels, by_hand, grid
    assert torch.equal(out["image_grid_thw"], grid)
    torch.testing.assert_close(out["pixel_values"].float(), by_hand, rtol=0, atol=1e-5)
    return pixels, out["pixel_values"].float(), grid


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def pair(request, tmp_path_factory):
    tied = request.param
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(tied)).eval()
    randomise(hf, 1)
    folder = tmp_path_factory.mktemp("tied" if tied else "untied")
    hf.save_pretrained(str(folder))
    # BLIP3-o's additions: the learnable queries in the checkpoint, n_query in config.json
    (shard,) = folder.glob("*.safetensors")
    tensors = load_file(str(shard))
    queries = torch.randn(1, N_QUERY, HIDDEN, generator=torch.Generator().manual_seed(2))
    tensors["model.latent_queries"] = queries
    from safetensors.torch import save_file
    save_file(tensors, str(shard), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["n_query"] = N_QUERY
    (folder / "config.json").write_text(json.dumps(config))
    ours = load_ours(folder)
    return {"hf": hf, "ours": ours, "queries": queries, "folder": folder, "tied": tied, "saved": sorted(tensors),
            "name": "tied embeddings" if tied else "untied embeddings"}


def text_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(2, 280, (1, n), generator=torch.Generator().manual_seed(seed))


def image_prompt(height: int = IMAGE_H, width: int = IMAGE_W):
    """ids [1, L]: text, <|vision_start|>, one pad per merged image token, <|vision_end|>, text."""
    rows, cols = height // 28, width // 28
    ids = torch.cat([text_ids(5, 3), torch.tensor([[VISION_START] + [IMAGE_PAD] * (rows * cols) + [VISION_END]]),
                     text_ids(6, 4)], 1)
    return ids, (rows, cols)


def our_image_embeds(ours: Backbone, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """What the runtime does: embed the ids, put encode_image's tokens where the pads are (row-major)."""
    embeds = ours.embed(ids).clone()
    embeds[0, ids[0] == IMAGE_PAD] = ours.encode_image(pixels)
    return embeds


# ---- the checkpoint

def test_saved_tensor_names(pair):
    """transformers 5's save_pretrained writes the legacy names (those of the release), lm_head only untied."""
    saved = pair["saved"]
    assert "model.embed_tokens.weight" in saved and "model.layers.0.self_attn.q_proj.bias" in saved
    assert "model.norm.weight" in saved and "visual.patch_embed.proj.weight" in saved
    assert "visual.merger.mlp.0.weight" in saved and "model.latent_queries" in saved
    assert ("lm_head.weight" in saved) == (not pair["tied"])
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in saved)


def test_in_memory_names_resolve(pair):
    """transformers 5's in-memory names (model.language_model.*, model.visual.*) map the same tensors."""
    hf = pair["hf"]
    config = json.loads((pair["folder"] / "config.json").read_text())
    state = hf.state_dict()
    state["model.language_model.latent_queries"] = pair["queries"]
    mapping = backbone_tensors(config, available=state.keys())
    ours = pair["ours"].state_dict()
    for k, (src, t) in mapping.items():
        assert src in state, src
        assert torch.equal(state[src] if t is None else t(state[src]), ours[k]), k


def test_config_layouts(pair):
    """config.json as transformers 5 writes it (text_config, rope_parameters) and flat as 4.51 wrote the
    release (rope_scaling type mrope) give the same dataclasses."""
    config = json.loads((pair["folder"] / "config.json").read_text())
    assert "text_config" in config
    new = backbone_configs(config)
    flat = {k: v for k, v in config.items() if k != "text_config"}
    text = dict(config["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("tie_word_embeddings", None)
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["vision_config"] = {k: v for k, v in config["vision_config"].items() if k != "rope_parameters"}
    assert backbone_configs(flat) == new
    b, v = new
    assert (b.vocab, b.hidden, b.layers, b.heads, b.kv_heads, b.ffn) == (VOCAB, HIDDEN, 3, 4, 2, 128)
    assert b.tied == pair["tied"]
    assert (b.query_tokens, b.rope_theta, b.eps, b.mrope_section) == (N_QUERY, 1e6, 1e-6, (2, 3, 3))
    assert (v.width, v.layers, v.heads, v.ffn, v.patch, v.merge, v.window, v.full_attention_layers) == \
        (32, 4, 2, 64, 14, 2, 4, (2,))
    assert v.rope_float32 and v.eps == 1e-6


def released_config(size: str) -> dict:
    """config.json of BLIP3-o 4B / 8B as transformers 4.51 writes it (Qwen2.5-VL-3B / -7B's values, the
    embedding resized to 151668 rows, BLIP3-o's n_query)."""
    text = {"4b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, tie_word_embeddings=True),
            "8b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False)}[size]
    return dict(model_type="blip3o_qwen_inference", architectures=["blip3oQwenForInferenceLM"], hidden_act="silu",
                max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768,
                use_sliding_window=False, vocab_size=151668, n_query=64,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   in_chans=3, out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                                   spatial_patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                                   tokens_per_second=2, temporal_patch_size=2),
                **text)


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_presets_are_the_released_architecture(size):
    """The 4b / 8b presets are what the importer reads from the release's config.json (vocab aside: the
    presets keep the base model's, the checkpoint has 151668 rows)."""
    b, v = backbone_configs(released_config(size))
    preset = get_preset(size)
    assert b.vocab == 151668
    assert b == BackboneConfig(**{**preset.backbone.__dict__, "vocab": 151668})
    assert v == VisionConfig(**preset.vision.__dict__)


# ---- the computation

def test_text_logits(pair, fidelity):
    hf, ours = pair["hf"], pair["ours"]
    ids = text_ids(20, 5)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        got = ours(ids)
    fidelity(f"backbone ({pair['name']}): text logits vs transformers, max abs diff / range", relative(got, want), TOL)


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_features(pair, size):
    """encode_image == transformers' merged image tokens, same order (Conv3d as the summed Conv2d, 2-D RoPE,
    partial windows, the full-attention layer, the merger)."""
    hf, ours = pair["hf"], pair["ours"]
    pixels, pixel_values, grid = image_inputs(*size)
    with torch.no_grad():
        want = torch.cat(hf.model.get_image_features(pixel_values, grid).pooler_output)
        got = ours.encode_image(pixels)
    assert got.shape == want.shape == ((size[0] // 28) * (size[1] // 28), HIDDEN)
    assert relative(got, want) <= TOL


def test_rope_positions_are_get_rope_index(pair):
    hf = pair["hf"]
    ids, grid = image_prompt()
    ids = torch.cat([ids, torch.tensor([[VISION_START, IMAGE_PAD, IMAGE_PAD, VISION_END, 7]])], 1)  # a 2nd image, 1 x 2
    want, delta = hf.model.get_rope_index(ids, (ids == IMAGE_PAD).int(), torch.tensor([[1, 12, 10], [1, 2, 4]]))
    got, got_delta = rope_positions(ids[0].tolist(), IMAGE_PAD, [grid, (1, 2)])
    assert torch.equal(got, want[:, 0]) and got_delta == int(delta)
    # an image first and last in the prompt (no text before, none after: delta from the image's extent)
    for edge in ([IMAGE_PAD] * 6 + [5, 6], [5, VISION_START] + [IMAGE_PAD] * 6):
        edge_ids = torch.tensor([edge])
        want, delta = hf.model.get_rope_index(edge_ids, (edge_ids == IMAGE_PAD).int(), torch.tensor([[1, 6, 4]]))
        got, got_delta = rope_positions(edge, IMAGE_PAD, [(3, 2)])
        assert torch.equal(got, want[:, 0]) and got_delta == int(delta)
    plain, zero = rope_positions(ids[0].tolist(), IMAGE_PAD, [grid, (1, 2)], mrope=False)
    assert torch.equal(plain, torch.arange(ids.shape[1]).expand(3, -1)) and zero == 0
    text, zero = rope_positions([5, 6, 7], IMAGE_PAD, [])
    assert torch.equal(text, torch.arange(3).expand(3, -1)) and zero == 0


@pytest.mark.parametrize("size", IMAGE_SIZES[::2], ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_text_logits(pair, size, fidelity):
    hf, ours = pair["hf"], pair["ours"]
    ids, grid = image_prompt(*size)
    pixels, pixel_values, thw = image_inputs(*size)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixel_values, image_grid_thw=thw,
                  mm_token_type_ids=(ids == IMAGE_PAD).int()).logits
        positions, _ = rope_positions(ids[0].tolist(), IMAGE_PAD, [grid])
        got = ours.logits_mrope(our_image_embeds(ours, ids, pixels), positions)
    fidelity(f"backbone ({pair['name']}): image {size[0]}x{size[1]} + text logits (M-RoPE) vs transformers, max abs diff / range",
             relative(got, want), TOL)
    # and M-RoPE matters here: 1-D positions give other logits
    with torch.no_grad():
        plain = ours.logits_mrope(our_image_embeds(ours, ids, pixels), torch.arange(ids.shape[1]).expand(3, -1))
    assert relative(plain, want) > 100 * TOL


def test_condition(pair, fidelity):
    """condition(ids ending in [IMG]) == transformers' final-normed last hidden states at the queries of
    inputs_embeds = [embeds, latent queries] with no position ids (BLIP3-o's generate_image)."""
    hf, ours, queries = pair["hf"], pair["ours"], pair["queries"]
    ids = torch.cat([text_ids(11, 6), torch.tensor([[IMG]])], 1)
    hf.model.rope_deltas = None  # no stale image prompt state: plain positions, as a fresh model has
    with torch.no_grad():
        x = torch.cat([hf.get_input_embeddings()(ids), queries], 1)
        want = hf.model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long)).last_hidden_state
        got = ours.condition(ids)
    assert got.shape == (1, N_QUERY, HIDDEN)
    fidelity(f"backbone ({pair['name']}): the {N_QUERY} query states conditioning the DiT vs transformers, max abs diff / range",
             relative(got, want[:, -N_QUERY:]), TOL)


def greedy_hf(hf, **inputs):
    out = hf.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(tokens)) >= 8, f"a degenerate reference sequence tests little: {tokens}"
    return tokens


def greedy_text(bb, ids: torch.Tensor):
    L = ids.shape[1]
    cache = bb.new_cache(1, L + NEW_TOKENS)
    logits, out = bb.prefill(bb.embed(ids), cache), []
    for i in range(NEW_TOKENS):
        out.append(int(logits.argmax(-1)))
        logits = bb.decode(torch.tensor([[out[-1]]]), torch.tensor([L + i]), cache)
    return out


def greedy_image(bb, embeds: torch.Tensor, positions: torch.Tensor, delta: int):
    L = embeds.shape[1]
    cache = bb.new_cache(1, L + NEW_TOKENS)
    logits, out = bb.prefill_mrope(embeds, positions, cache), []
    for i in range(NEW_TOKENS):
        out.append(int(logits.argmax(-1)))
        logits = bb.decode_mrope(torch.tensor([[out[-1]]]), torch.tensor([L + i]), torch.tensor([L + i + delta]), cache)
    return out


def differing(a, b) -> int:
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def test_greedy_text(pair, fidelity):
    hf, ours = pair["hf"], pair["ours"]
    ids = text_ids(9, 8)
    with torch.no_grad():
        got, want = greedy_text(ours, ids), greedy_hf(hf, input_ids=ids, attention_mask=torch.ones_like(ids))
    fidelity(f"backbone ({pair['name']}): {NEW_TOKENS} greedy tokens after a text prompt, tokens differing from transformers' generate",
             differing(got, want), 0)


def test_greedy_image_text(pair, fidelity):
    hf, ours = pair["hf"], pair["ours"]
    ids, grid = image_prompt()
    pixels, pixel_values, thw = image_inputs()
    with torch.no_grad():
        want = greedy_hf(hf, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                         image_grid_thw=thw, mm_token_type_ids=(ids == IMAGE_PAD).int())
        positions, delta = rope_positions(ids[0].tolist(), IMAGE_PAD, [grid])
        assert delta < 0
        got = greedy_image(ours, our_image_embeds(ours, ids, pixels), positions, delta)
    fidelity(f"backbone ({pair['name']}): {NEW_TOKENS} greedy tokens after an image + text prompt, tokens differing from transformers' generate",
             differing(got, want), 0)


def test_scripted_matches_eager(pair):
    ours = pair["ours"]
    scripted = torch.jit.script(copy.deepcopy(ours))
    ids, grid = image_prompt()
    pixels, _, _ = image_inputs()
    positions, delta = rope_positions(ids[0].tolist(), IMAGE_PAD, [grid])
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    with torch.no_grad():
        close(scripted.encode_image(pixels), ours.encode_image(pixels))
        close(scripted.condition(ids), ours.condition(ids))
        embeds = our_image_embeds(ours, ids, pixels)
        assert greedy_image(scripted, embeds, positions, delta) == greedy_image(ours, embeds, positions, delta)
        assert greedy_text(scripted, ids) == greedy_text(ours, ids)
        L = ids.shape[1]
        ce, cs = ours.new_cache(1, L + 2), scripted.new_cache(1, L + 2)
        close(scripted.prefill_mrope(embeds, positions, cs), ours.prefill_mrope(embeds, positions, ce))
        step = (torch.tensor([[7]]), torch.tensor([L]), torch.tensor([L + delta]))
        close(scripted.decode_mrope(*step, cs), ours.decode_mrope(*step, ce))
        close(cs, ce)


# ---- M-RoPE reduces to the 1-D path

def test_mrope_with_equal_axes_is_rope_1d():
    positions = torch.tensor([0, 3, 17, 1000])
    for sections in ([16, 24, 24], []):
        cos, sin = rope_mrope(positions.expand(3, -1), 128, 1e6, sections)
        want_cos, want_sin = rope_1d(positions, 128, 1e6)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_tiny_mrope_methods_are_the_1d_ones():
    """The tiny preset (no mrope_section): prefill_mrope / decode_mrope with rope_positions' positions give
    prefill / decode's bytes, image prompts included."""
    from models.export import build_modules
    bb = build_modules(get_preset("tiny"), seed=0)["backbone"]
    assert bb.mrope_section == []
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(9))
    positions, delta = rope_positions(ids[0].tolist(), 500, [], mrope=False)
    with torch.no_grad():
        c1, c2 = bb.new_cache(1, 12), bb.new_cache(1, 12)
        assert torch.equal(bb.prefill_mrope(bb.embed(ids), positions, c1), bb.prefill(bb.embed(ids), c2))
        step = torch.tensor([[3]])
        assert torch.equal(bb.decode_mrope(step, torch.tensor([10]), torch.tensor([10 + delta]), c1),
                           bb.decode(step, torch.tensor([10]), c2))
        assert torch.equal(c1, c2)
