"""A released BLIP3-o checkpoint directory, as downloaded from the hub, into a bundle.

    checkpoint/config.json                      model_type blip3o_qwen_inference (Qwen2.5-VL + queries + DiT)
    checkpoint/model.safetensors.index.json     + its shards (or one model.safetensors)
    checkpoint/tokenizer.json, tokenizer_config.json
    checkpoint/diffusion-decoder/{unet,vae}/    config.json + diffusion_pytorch_model[.bf16].safetensors
    checkpoint/diffusion-decoder/scheduler/scheduler_config.json

Everything is checked before anything is built (configs, every safetensors header, the index's paths, every
tensor's presence, shape and dtype); then the components are built one at a time, each from its tensors
alone, scripted, written and dropped, so that the import holds one component at a time. The bundle is
written into a temporary directory beside --out and renamed at the end: a failed import leaves nothing.
"""
import contextlib
import json
import resource
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ..backbone import Backbone
from ..dit import DiT
from ..export import DTYPES, export
from ..presets import TEMPLATES, Preset
from ..unet import UNet
from ..vae import AutoencoderKL
from .backbone import backbone_configs, backbone_tensors
from .decoder import decoder_sampler, unet_config, vae_config, unet_tensors, vae_tensors
from .dit import dit_config, dit_tensors
from .shards import FLOATS, CheckpointError, Shards

# config.json's architectures / model_type of the releases this importer reads
ARCHITECTURES = ("blip3oQwenForInferenceLM",)
MODEL_TYPES = ("blip3o_qwen_inference",)
DIFFUSERS_STEMS = ("diffusion_pytorch_model", "diffusion_pytorch_model.bf16", "diffusion_pytorch_model.fp16")
# the official sampler (BLIP3O.md): 30 Euler steps at CFG 3 over sigmas linspace(1, 1/30, 30), shift 1,
# the DiT given sigma * 1000 truncated
DIT_SAMPLER = {"steps": 30, "cfg": 3.0, "shift": 1.0, "eta": 0.0, "integerTimesteps": True}
# the official negative condition: generate_image(text=[""]) (blip3o_qwen_inference.py, branch main): the empty
# string, no template, then [IMG] (id 151665) and the queries
NEGATIVE = "[IMG]"

Progress = Callable[[dict], None]


class AnonymousPeak:
    """The process's peak anonymous memory while in the block (RssAnon of /proc/self/status, sampled every
    20 ms; None where there is no /proc): what an import needs of RAM beside the page cache, which maps the
    checkpoint's files and can drop them again."""

    def __init__(self):
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while True:
            value = self.now()
            if value is not None:
                self.peak = max(self.peak or 0, value)
            if self._stop.wait(0.02):
                return

    def __enter__(self) -> "AnonymousPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def check_architecture(config: dict, path: Path) -> None:
    archs = config.get("architectures") or []
    if config.get("model_type") not in MODEL_TYPES and not any(a in ARCHITECTURES for a in archs):
        found = ", ".join(map(str, archs)) or str(config.get("model_type"))
        raise CheckpointError(f"{path}: unknown architecture {found} (this importer reads "
                              f"{', '.join(ARCHITECTURES)} / model_type {', '.join(MODEL_TYPES)})")


@contextlib.contextmanager
def no_init():
    """Modules built without their random initialisation: their parameters are allocated (untouched, so
    not resident) and replaced by the checkpoint's tensors."""
    names = ["uniform_", "normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_"]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


class Component:
    """One component of the bundle: how to build its module, and which checkpoint tensor fills each of its
    parameters."""

    def __init__(self, name: str, build: Callable[[], nn.Module], mapping: Dict, shards: Shards):
        self.name, self.build, self.mapping, self.shards = name, build, mapping, shards

    def check(self) -> None:
        """Every tensor present, of a float dtype, and of the shape its parameter has (after its transform,
        which for the shape-changing ones is checked on a meta tensor)."""
        with torch.device("meta"):
            module = self.build()
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        # buffers come from the config (the UNet's time ids), not from the checkpoint
        left = set(expected) - set(self.mapping) - {n for n, _ in module.named_buffers()}
        if left:
            raise AssertionError(f"{self.name}: the mapping misses {sorted(left)[:5]}")
        where = self.shards.directory
        for ours, (theirs, transform) in self.mapping.items():
            info = self.shards.tensors.get(theirs)
            if info is None:
                raise CheckpointError(f"{where}: no tensor {theirs} (the {self.name} needs it)")
            if info.dtype not in FLOATS:
                raise CheckpointError(f"{where}: tensor {theirs} is {info.dtype}, expected BF16, F16 or F32")
            shape = info.shape
            if transform is not None:
                shape = tuple(transform(torch.empty(info.shape, device="meta")).shape)
            if shape != expected[ours]:
                raise CheckpointError(f"{where}: tensor {theirs} has shape {list(info.shape)}, the {self.name} "
                                      f"needs {list(expected[ours])} (a checkpoint of another size or a damaged file)")

    def load(self, dtype: torch.dtype, progress: Progress) -> nn.Module:
        with no_init():
            module = self.build()
        state, cache = {}, {}
        total = len(self.mapping)
        for i, (ours, (theirs, transform)) in enumerate(self.mapping.items()):
            t = cache.get(theirs)
            if t is None:  # tied weights share one tensor
                t = self.shards.get(theirs).to(torch.float32 if transform is not None else dtype)
                if transform is not None:
                    t = transform(t).to(dtype)
                cache[theirs] = t
            state[ours] = t
            if (i + 1) % 50 == 0 or i + 1 == total:
                progress({"stage": self.name, "tensors": i + 1, "total": total})
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        missing = [n for n in missing if n not in dict(module.named_buffers())]
        if missing or unexpected:
            raise AssertionError(f"{self.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.shards.close()
        return module.eval()


def plan(checkpoint: Path):
    """Reads and checks the checkpoint: (preset, components, sampler, source), nothing loaded yet."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: not a directory")
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint}: not a BLIP3-o checkpoint directory (no config.json)")
    config = read_json(checkpoint / "config.json", "the model's configuration")
    check_architecture(config, checkpoint / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint}: no {name} (the checkpoint's tokenizer)")
    decoder_dir = checkpoint / "diffusion-decoder"
    unet_json = read_json(decoder_dir / "unet" / "config.json", "the diffusion decoder's UNet")
    vae_json = read_json(decoder_dir / "vae" / "config.json", "the diffusion decoder's VAE")
    scheduler_json = read_json(decoder_dir / "scheduler" / "scheduler_config.json", "the decoder's scheduler")

    model = Shards(checkpoint, ("model",))
    unet_shards = Shards(decoder_dir / "unet", DIFFUSERS_STEMS)
    vae_shards = Shards(decoder_dir / "vae", DIFFUSERS_STEMS)
    try:
        backbone_cfg, vision_cfg = backbone_configs(config)
        rows = model.tensors.get("model.embed_tokens.weight")
        if rows is not None:  # the released embeddings have 151668 rows, not the base model's vocabulary
            backbone_cfg.vocab = rows.shape[0]
        dit_cfg = dit_config(model.shapes())
        if dit_cfg.caption_dim != backbone_cfg.hidden:
            raise CheckpointError(f"{checkpoint}: the DiT reads states of width {dit_cfg.caption_dim}, the backbone "
                                  f"has {backbone_cfg.hidden}")
        vae_cfg = vae_config(vae_json)
        factor = vae_cfg.factor
        sample = unet_json.get("sample_size", 128)
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        image = (sample[0] * factor, sample[1] * factor)
        unet_cfg = unet_config(unet_json, image)
        if unet_cfg.cross_dim != dit_cfg.channels:
            raise CheckpointError(f"{decoder_dir / 'unet'}: cross_attention_dim {unet_cfg.cross_dim}, but the DiT "
                                  f"makes features of width {dit_cfg.channels}")
        sampler = {"dit": dict(DIT_SAMPLER), "decoder": decoder_sampler(scheduler_json), "negativeSeed": 0}
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{checkpoint}: {e}") from None
    preset = Preset(name=str(config.get("model_type")), image=image, backbone=backbone_cfg, vision=vision_cfg,
                    dit=dit_cfg, unet=unet_cfg, vae=vae_cfg)
    components = {
        "backbone": Component("backbone", lambda: Backbone(backbone_cfg, vision_cfg),
                              backbone_tensors(config, list(model.tensors)), model),
        "dit": Component("dit", lambda: DiT(dit_cfg), dit_tensors(dit_cfg), model),
        "decoder": Component("decoder", lambda: UNet(unet_cfg), unet_tensors(unet_cfg), unet_shards),
        "vae": Component("vae", lambda: AutoencoderKL(vae_cfg), vae_tensors(vae_cfg, names=list(vae_shards.tensors)),
                         vae_shards),
    }
    for c in components.values():
        c.check()
    source = {"checkpoint": checkpoint.resolve().name, "modelType": config.get("model_type"),
              "architectures": config.get("architectures"),
              "bytes": model.nbytes + unet_shards.nbytes + vae_shards.nbytes}
    return preset, components, sampler, source


def import_checkpoint(checkpoint: Path, out: Path, dtype: str = "bfloat16", name: Optional[str] = None,
                      progress: Progress = lambda event: None) -> dict:
    """Writes the bundle of `checkpoint` to `out` (which must not exist); returns a summary."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype} (one of {', '.join(DTYPES)})")
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out}: already exists (the importer writes a new bundle directory)")
    start = time.time()
    progress({"stage": "check"})
    preset, components, sampler, source = plan(Path(checkpoint))
    target = DTYPES[dtype]
    modules = {key: (lambda c=c: c.load(target, progress)) for key, c in components.items()}
    templates = dict(TEMPLATES, negative=NEGATIVE)
    source = dict(source, importedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), dtype=dtype)
    with AnonymousPeak() as anonymous:
        manifest = export(preset, out, dtype=dtype, tokenizer=Path(checkpoint), modules=modules,
                          name=name or f"blip3o-{source['checkpoint']}", sampler=sampler, templates=templates,
                          source=source, on_written=lambda key: progress({"stage": key, "written": True}))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # mapped checkpoint pages included
    return {"bundle": str(out), "seconds": time.time() - start, "peakRssBytes": peak,
            "peakAnonymousBytes": anonymous.peak,
            "checkpointBytes": source["bytes"], "bundleBytes": sum(f.stat().st_size for f in out.iterdir()),
            "name": manifest["name"]}
