"""Export a BLIP3-o bundle (contract section 1): four TorchScript components, the tokenizer, manifest.json.

    bash models/run-python.sh -m models.export --preset tiny --out /tmp/blip3o-tiny-random [--seed 0]
        [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--tokenizer DIR | --stand-in-tokenizer]
        [--backbone-layers N] ...

Weights are a seeded random initialisation here; models/recipe exports its trained ones through export().
The bundle is written into a temporary sibling directory and renamed into place, so a failed export
leaves nothing.
"""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from .backbone import Backbone
from .dit import DiT
from .layers import per_sample_linears
from .presets import CLIP_MEAN, CLIP_STD, TEMPLATES, Preset, get_preset
from .tokenizer import SPECIAL_TOKENS, write_tokenizer
from .unet import UNet
from .vae import build_vae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPONENT_FILES = {"backbone": "backbone.pt", "dit": "dit.pt", "decoder": "decoder.pt", "vae": "vae.pt",
                   "tokenizer": "tokenizer.json", "tokenizerConfig": "tokenizer_config.json"}
# BLIP3-o's tokens added to Qwen2.5's vocabulary, at these ids
BLIP3O_ADDED = {"[IMG]": 151665, "[/IMG]": 151666, "<image>": 151667}

SAMPLER = {
    "dit": {"steps": 30, "cfg": 3.0, "shift": 1.0},
    # SDXL's EulerDiscreteScheduler configuration
    "decoder": {"steps": 50, "cfg": 3.0, "numTrainTimesteps": 1000, "betaStart": 0.00085, "betaEnd": 0.012,
                "betaSchedule": "scaled_linear", "timestepSpacing": "leading", "stepsOffset": 1,
                "predictionType": "epsilon"},
    "negativeSeed": 0,
}


def build_modules(preset: Preset, seed: int) -> Dict[str, nn.Module]:
    """The four components in eval mode, randomly initialised from `seed` (PyTorch's default inits)."""
    torch.manual_seed(seed)
    modules = {"backbone": Backbone(preset.backbone, preset.vision), "dit": DiT(preset.dit),
               "decoder": UNet(preset.unet), "vae": build_vae(preset.vae)}
    with torch.no_grad():
        for block in modules["dit"].layers:
            # trained Lumina gates are far from their zero init; open them so the condition matters
            block.gate.normal_(0.0, 1.0)
    return {k: m.eval() for k, m in modules.items()}


# The components a runtime batches: per-sample linear layers, so a sample's bytes never depend on the rest of
# its call (the manifest says so: batchInvariant).
BATCHED = ("dit", "decoder")


def script_module(name: str, module: nn.Module) -> torch.jit.ScriptModule:
    if name in BATCHED:
        per_sample_linears(module)
    if name == "vae" and hasattr(module, "encoder"):  # the bundle only decodes: leave the encoder (training only) out of the file
        del module.encoder, module.quant_conv
    return torch.jit.script(module)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hashes(bundle: Path) -> Dict[str, dict]:
    """The manifest's `files`: the components hashed side by side (hashlib releases the GIL), as a
    real-size bundle is several files of gigabytes."""
    with ThreadPoolExecutor(len(COMPONENT_FILES)) as pool:
        digests = dict(zip(COMPONENT_FILES, pool.map(lambda f: sha256(bundle / f), COMPONENT_FILES.values())))
    return {k: {"path": f, "sha256": digests[k]} for k, f in COMPONENT_FILES.items()}


def copy_tokenizer(src: Path, out: Path) -> None:
    """Copy a real Qwen2.5 tokenizer, adding BLIP3-o's [IMG] [/IMG] <image> where missing."""
    tok = json.loads((src / "tokenizer.json").read_text())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    have = {a["content"]: a["id"] for a in tok["added_tokens"]}
    taken = set(have.values()) | set(tok["model"]["vocab"].values())
    for content, id in BLIP3O_ADDED.items():
        if content in have:
            continue
        if id in taken:
            raise ValueError(f"{src}: cannot add {content} as id {id}: the id is taken")
        entry = {"id": id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
        tok["added_tokens"].append(entry)
        cfg.setdefault("added_tokens_decoder", {})[str(id)] = {k: v for k, v in entry.items() if k != "id"}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")


def token_ids(bundle: Path) -> Dict[str, int]:
    tok = json.loads((bundle / "tokenizer.json").read_text())
    ids = dict(tok["model"]["vocab"])
    ids.update({a["content"]: a["id"] for a in tok["added_tokens"]})
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}")
    return ids


def manifest(preset: Preset, dtype: str, bundle: Path, name: Optional[str] = None,
             sampler: Optional[dict] = None, templates: Optional[dict] = None, source: Optional[dict] = None) -> dict:
    ids = token_ids(bundle)
    if max(ids.values()) >= preset.backbone.vocab:
        raise ValueError(f"tokenizer id {max(ids.values())} is outside the model's vocabulary of {preset.backbone.vocab}")
    b, v, c, h, w = preset.backbone, preset.vision, preset.latent[0], preset.latent[1], preset.latent[2]
    return {
        "format": "blip3o-bundle", "formatVersion": 1, "name": name or f"blip3o-{preset.name}-random",
        "preset": preset.name, "dtype": dtype,
        "files": hashes(bundle),
        "image": {"width": preset.image[1], "height": preset.image[0]},
        "backbone": {"hidden": b.hidden, "layers": b.layers, "heads": b.heads, "kvHeads": b.kv_heads,
                     "headDim": b.head_dim, "vocab": b.vocab, "context": b.context, "queryTokens": b.query_tokens},
        "vision": {"patch": v.patch, "merge": v.merge, "minPixels": v.min_pixels, "maxPixels": v.max_pixels,
                   "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "clip": {"tokens": preset.dit.tokens, "width": preset.dit.channels},
        "latent": {"channels": c, "height": h, "width": w},
        "vae": {"scalingFactor": preset.vae.scaling_factor, **({"forceUpcast": True} if preset.vae.force_upcast else {})},
        "tokens": {"img": ids["[IMG]"], "imagePad": ids["<|image_pad|>"],
                   "stop": sorted([ids["<|endoftext|>"], ids["<|im_end|>"]])},
        "templates": dict(templates or TEMPLATES),
        "sampler": sampler or SAMPLER,
        "batchInvariant": True,
        "architecture": preset.to_dict(),
        **({"source": source} if source else {}),
    }


def export(preset: Preset, out: Path, seed: int = 0, dtype: str = "float32", device: str = "cpu",
           tokenizer: Path = None, modules: Optional[Dict[str, Union[nn.Module, Callable[[], nn.Module]]]] = None,
           name: Optional[str] = None, sampler: Optional[dict] = None, stand_in_tokenizer: bool = False,
           templates: Optional[dict] = None, source: Optional[dict] = None,
           on_written: Callable[[str], None] = lambda key: None) -> dict:
    """Writes a bundle of `modules` (default: randomly initialised from `seed`, on `device`). A module may
    be given as a function that builds it: it is then built, written and dropped before the next one
    (the importer's way of holding one component at a time).
    stand_in_tokenizer: a real-size bundle gets the tiny model's tokenizer, for timing random weights.
    templates, source: the manifest's prompt templates (default TEMPLATES) and where the weights came from."""
    if preset.name != "tiny" and tokenizer is None and not stand_in_tokenizer:
        raise ValueError(f"preset {preset.name} needs --tokenizer DIR (a Qwen2.5 tokenizer.json + tokenizer_config.json) "
                         "or, for timing random weights, --stand-in-tokenizer")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if modules is None:
            # built where they run: initialising billions of weights is much faster on a GPU
            with torch.device(device) if device != "cpu" else contextlib.nullcontext():
                modules = build_modules(preset, seed)
        for key in list(modules):
            module = modules[key] if isinstance(modules[key], nn.Module) else modules[key]()
            module = module.to(device=device, dtype=DTYPES[dtype])
            script_module(key, module).save(str(tmp / COMPONENT_FILES[key]))
            del module
            on_written(key)
        if tokenizer is None:
            # the tiny model's: as many ids as merges learned from the shapes world allow
            write_tokenizer(tmp, min(preset.backbone.vocab, get_preset("tiny").backbone.vocab), preset.backbone.context)
        else:
            copy_tokenizer(tokenizer, tmp)
        m = manifest(preset, dtype, tmp, name, sampler, templates, source)
        (tmp / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        tmp.chmod(0o755)
        if out.exists():  # swap: the old bundle disappears only once the new one is complete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return m


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=["tiny", "4b", "8b"])
    ap.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    tok = ap.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, help="Qwen2.5 tokenizer directory (4b / 8b need it or the next)")
    tok.add_argument("--stand-in-tokenizer", action="store_true",
                     help="4b / 8b: the tiny model's tokenizer instead, for timing random weights")
    ap.add_argument("--backbone-layers", type=int)
    ap.add_argument("--vision-layers", type=int)
    ap.add_argument("--dit-layers", type=int)
    ap.add_argument("--unet-depth", type=lambda s: tuple(int(x) for x in s.split(",")),
                    help="transformer depth per UNet level, e.g. 0,1,1")
    ap.add_argument("--unet-layers-per-block", type=int)
    a = ap.parse_args(argv)
    preset = get_preset(a.preset, a.backbone_layers, a.vision_layers, a.dit_layers, a.unet_depth,
                        a.unet_layers_per_block)
    start = time.time()
    try:
        export(preset, a.out, a.seed, a.dtype, a.device, a.tokenizer, stand_in_tokenizer=a.stand_in_tokenizer)
    except ValueError as e:
        ap.error(str(e))
    size = sum(f.stat().st_size for f in a.out.iterdir())
    print(f"wrote {a.out} ({size / 1e6:.2f} MB) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        # TorchScript writes each class's constants in set order, which follows the per-process string hash
        # seed: fix it, so that the same arguments give byte-identical files (and sha256s) on every run
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "models.export"] + sys.argv[1:])
    main()
