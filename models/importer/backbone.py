"""The backbone of a released BLIP3-o checkpoint (Qwen2.5-VL + the latent queries): its config.json ->
(BackboneConfig, VisionConfig), and, for each entry of models.backbone.Backbone's state_dict, the checkpoint
tensor that fills it (with a transform where the layouts differ).

Pure data and small functions; the generic importer streams the shards, validates shapes and writes the bundle.

config.json comes in two layouts (both read):
- transformers 4.51 (the release): Qwen2.5-VL's text fields flat at the top level (hidden_size,
  num_hidden_layers, rope_theta, rope_scaling {"type" or "rope_type": "mrope", "mrope_section": [...]}),
  vision_config nested; BLIP3-o's own fields (n_query, ...) at the top level.
- transformers 5.x: the text fields under text_config, the rope under text_config.rope_parameters
  {"rope_type": "default", "rope_theta", "mrope_section"}; tie_word_embeddings at the top level.
  Where text_config is present it wins over top-level copies (as transformers 5 reads it).

Tensor names: the release's (transformers 4.51) are `visual.*`, `model.embed_tokens.weight`, `model.layers.N.*`,
`model.norm.weight`, `lm_head.weight` (absent when tied) and `model.latent_queries` [1, Q, H]. transformers 5.x
still writes these legacy names with save_pretrained (its in-memory names are `model.visual.*` and
`model.language_model.*`; checked with 5.18). backbone_tensors returns the legacy names; given the
checkpoint's names (`available`), it returns whichever variant (legacy or 5.x in-memory) the checkpoint holds.
"""
from typing import Callable, Collection, Dict, List, Optional, Tuple

from torch import Tensor

from ..presets import BackboneConfig, VisionConfig

# the practical cap on prompt + generated tokens of the 4b / 8b presets (the checkpoints allow 128000)
CONTEXT_CAP = 32768
DEFAULT_MROPE_SECTION = (16, 24, 24)  # transformers' fallback when the config names none
DEFAULT_N_QUERY = 64

Transform = Optional[Callable[[Tensor], Tensor]]


def _text_fields(config: dict) -> dict:
    """The language model's fields: text_config (5.x) over the top level (4.51, flat)."""
    text = dict(config)
    text.pop("vision_config", None)
    nested = config.get("text_config")
    if isinstance(nested, dict):
        text.update(nested)
    return text


def _rope(text: dict) -> Tuple[float, Tuple[int, ...]]:
    """(rope_theta, mrope_section) from rope_parameters (5.x) or rope_scaling + rope_theta (4.51)."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"unsupported rope type {kind!r} (Qwen2.5-VL uses mrope / default)")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    section = tuple(int(n) for n in rope.get("mrope_section", DEFAULT_MROPE_SECTION))
    return float(theta), section


def _tied(config: dict) -> bool:
    """transformers 5's rule: the top-level flag, or text_config's where the top level leaves it false."""
    nested = config.get("text_config")
    nested_tied = bool(nested.get("tie_word_embeddings", False)) if isinstance(nested, dict) else False
    return bool(config.get("tie_word_embeddings", False)) or nested_tied


def backbone_configs(config: dict) -> Tuple[BackboneConfig, VisionConfig]:
    """A checkpoint's config.json (dict) -> the backbone's and the vision tower's dataclasses.

    vocab is config's vocab_size (the released checkpoints: 151668, their resized embedding); the importer
    checks it against the embedding's row count. context: max_position_embeddings capped at 32768. The image
    processor's min / max pixels are not in config.json (preprocessor_config.json): VisionConfig's defaults
    (Qwen2.5-VL's evaluation settings) stay.
    """
    text = _text_fields(config)
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise ValueError("config.json has no vision_config: not a Qwen2.5-VL checkpoint")
    for key, act in (("hidden_act", text.get("hidden_act", "silu")),
                     ("vision hidden_act", vision.get("hidden_act", "silu"))):
        if act != "silu":
            raise ValueError(f"unsupported {key} {act!r} (Qwen2.5-VL: silu)")
    if text.get("use_sliding_window", False):
        raise ValueError("use_sliding_window: sliding-window attention layers are not supported")

    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    if hidden % heads or ("head_dim" in text and text["head_dim"] not in (None, hidden // heads)):
        raise ValueError(f"head_dim must be hidden_size / num_attention_heads ({hidden} / {heads})")
    theta, section = _rope(text)
    if 2 * sum(section) != hidden // heads:
        raise ValueError(f"mrope_section {list(section)} does not cover head_dim / 2 = {hidden // heads // 2}")
    backbone = BackboneConfig(
        vocab=int(text["vocab_size"]), hidden=hidden, layers=int(text["num_hidden_layers"]), heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads), ffn=int(text["intermediate_size"]),
        context=min(int(text.get("max_position_embeddings", CONTEXT_CAP)), CONTEXT_CAP), tied=_tied(config),
        query_tokens=int(config.get("n_query", DEFAULT_N_QUERY)), rope_theta=theta,
        eps=float(text.get("rms_norm_eps", 1e-6)), mrope_section=section)

    width, vheads = int(vision["hidden_size"]), int(vision.get("num_heads", vision.get("num_attention_heads", 16)))
    patch = int(vision.get("patch_size", vision.get("spatial_patch_size", 14)))
    merge = int(vision.get("spatial_merge_size", 2))
    layers = int(vision["depth"])
    out = int(vision.get("out_hidden_size", hidden))
    if out != hidden:
        raise ValueError(f"vision out_hidden_size {out} != the language model's hidden_size {hidden}")
    if width % vheads:
        raise ValueError(f"vision hidden_size {width} is not a multiple of num_heads {vheads}")
    if int(vision.get("in_channels", vision.get("in_chans", 3))) != 3:
        raise ValueError("the vision tower must take 3 channels")
    # transformers: windows of window_size // merge // patch merged tokens in every layer not listed in
    # fullatt_block_indexes
    window = int(vision.get("window_size", 112)) // merge // patch
    full = tuple(sorted(int(i) for i in vision.get("fullatt_block_indexes", ())))
    if window < 1 and any(i not in full for i in range(layers)):
        raise ValueError(f"window_size {vision.get('window_size')} is under one merged token ({patch * merge} px)")
    vrope = vision.get("rope_parameters") or {}
    visual = VisionConfig(
        width=width, layers=layers, heads=vheads, ffn=int(vision["intermediate_size"]), patch=patch, merge=merge,
        window=max(window, 0), full_attention_layers=full,
        rope_theta=float(vrope.get("rope_theta", vision.get("rope_theta", 10000.0))),
        eps=1e-6,  # transformers hard-codes the vision tower's RMSNorm eps
        rope_float32=True)
    return backbone, visual


def _sum_frames(w: Tensor) -> Tensor:
    """Conv3d kernel [D, 3, T, p, p] -> Conv2d kernel [D, 3, p, p]: a still image is T identical frames,
    so the 3-D convolution is the 2-D one with the temporal slices summed. Summed in float32 and returned in
    float32 (the sum of two bfloat16 values is exact there; the bundle's cast rounds once)."""
    if w.dim() != 5:
        raise ValueError(f"visual.patch_embed.proj.weight: expected a Conv3d kernel [D, 3, T, p, p], "
                         f"got {list(w.shape)}")
    return w.float().sum(2)


def _queries(w: Tensor) -> Tensor:
    """model.latent_queries [1, Q, H] -> [Q, H]."""
    if w.dim() == 3 and w.shape[0] == 1:
        return w[0]
    raise ValueError(f"model.latent_queries: expected [1, Q, H], got {list(w.shape)}")


def checkpoint_name_variants(name: str) -> List[str]:
    """A legacy (release / save_pretrained) tensor name and the names transformers 5 uses in memory for
    the same tensor, in order of preference."""
    if name.startswith("visual."):
        return [name, "model." + name]
    if name == "model.latent_queries":
        return [name, "model.language_model.latent_queries"]
    if name.startswith("model."):
        return [name, "model.language_model." + name[len("model."):]]
    return [name]


def backbone_tensors(config: dict, available: Optional[Collection[str]] = None) -> Dict[str, Tuple[str, Transform]]:
    """For every name of Backbone(*backbone_configs(config)).state_dict(): (checkpoint tensor name, transform
    or None). Tied embeddings: lm_head.weight (the same parameter as embed_tokens.weight) comes from
    model.embed_tokens.weight. available: the checkpoint's tensor names (e.g. an index's weight_map); when
    given, each name is the first variant of checkpoint_name_variants() present (the legacy one otherwise)."""
    backbone, vision = backbone_configs(config)
    m: Dict[str, Tuple[str, Transform]] = {"embed_tokens.weight": ("model.embed_tokens.weight", None)}
    for i in range(backbone.layers):
        p = f"layers.{i}."
        names = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"]
        names += [f"self_attn.{x}_proj.{k}" for x in "qkv" for k in ("weight", "bias")]
        names += [f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        m.update({p + n: ("model." + p + n, None) for n in names})
    m["norm.weight"] = ("model.norm.weight", None)
    m["lm_head.weight"] = ("model.embed_tokens.weight" if backbone.tied else "lm_head.weight", None)
    m["visual.patch_embed.weight"] = ("visual.patch_embed.proj.weight", _sum_frames)
    for i in range(vision.layers):
        p = f"visual.blocks.{i}."
        names = ["norm1.weight", "norm2.weight"]
        names += [f"attn.{x}.{k}" for x in ("qkv", "proj") for k in ("weight", "bias")]
        names += [f"mlp.{x}_proj.{k}" for x in ("gate", "up", "down") for k in ("weight", "bias")]
        m.update({p + n: (p + n, None) for n in names})
    for n in ["ln_q.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]:
        m["visual.merger." + n] = ("visual.merger." + n, None)
    m["queries"] = ("model.latent_queries", _queries)
    if available is not None:
        have = set(available)
        m = {k: (next((v for v in checkpoint_name_variants(src) if v in have), src), t) for k, (src, t) in m.items()}
    return m
