"""A small byte-level BPE tokenizer in Hugging Face format, for tiny bundles.

Same machinery as Qwen2.5's (its split regex, byte-level symbols, byte-level decoder) with a few hundred
merges learned here from the prompt templates and simple captions, so prompts stay short. Every byte has
its own symbol, so any Unicode text round-trips. No normalizer: Qwen's NFC would change non-NFC input.
"""
import json
import re
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

from .presets import TEMPLATES

# Order chosen so that the ids match the example manifest of the contract: the two stop tokens are
# 257 / 258 and [IMG] 259 / <|image_pad|> 263. Specials sit right after the 256 byte symbols.
SPECIAL_TOKENS = ["<|im_start|>", "<|endoftext|>", "<|im_end|>", "[IMG]", "[/IMG]", "<image>",
                  "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]

# Qwen2.5's pre-tokenizer pattern (Oniguruma / JS syntax: \p{L}, \p{N})
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Python's `re` has no \p{..}: close enough to learn merges from ASCII-ish training text
_PY_SPLIT = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\r\n\w]?[^\W\d_]+|\d| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink", "brown", "cyan"]
_SHAPES = ["circle", "square", "triangle", "star", "rectangle", "ellipse", "cross", "heart", "diamond"]
_WORDS = ("a an the of on in at with and small large big tiny left right top bottom center middle above below "
          "next to background image picture photo two three one shape shapes color colour what is this "
          "describe there are how many where which please generate based following caption assistant user "
          "system you helpful").split()


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes stand for themselves,
    the others are shifted to code points from 256 up (space becomes 'Ġ', newline 'Ċ')."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, shift = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def training_text() -> List[str]:
    # the prompt templates are the most frequent text of all
    texts = [TEMPLATES["generation"], TEMPLATES["understanding"], TEMPLATES["defaultQuestion"]]
    for i, color in enumerate(_COLORS):
        for j, shape in enumerate(_SHAPES):
            other = _COLORS[(i + j + 1) % len(_COLORS)]
            texts.append(f"a {color} {shape} on a {other} background")
            texts.append(f"What color is the {shape}? It is {color}.")
    texts.append(" ".join(_WORDS))
    return texts


def learn_merges(texts: List[str], count: int) -> List[Tuple[str, str]]:
    b2u = bytes_to_unicode()
    specials = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    words: Counter = Counter()
    for text in texts:
        for part in specials.split(text):
            for piece in _PY_SPLIT.findall(part):
                words[tuple(b2u[b] for b in piece.encode("utf-8"))] += 1
    merges: List[Tuple[str, str]] = []
    known = set(b2u.values())
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        # most frequent pair; ties broken by the pair itself so the result is deterministic
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        if merged not in known:  # two different splits of one string need only one merge
            merges.append(best)
            known.add(merged)
        words = Counter({_merge(w, best, merged): n for w, n in words.items()})
    return merges


def _merge(word: Tuple[str, ...], pair: Tuple[str, str], merged: str) -> Tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_tokenizer(vocab_size: int, context: int) -> Tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) with exactly vocab_size ids."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    merges = learn_merges(training_text(), vocab_size - len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if len(vocab) != vocab_size:
        raise ValueError(f"learned a vocabulary of {len(vocab)} ids, the model has {vocab_size}")
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in SPECIAL_TOKENS]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    config = {
        "add_bos_token": False, "add_prefix_space": False, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "clean_up_tokenization_spaces": False,
        "errors": "replace", "model_max_length": context, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>",)],
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    return tokenizer, config


def write_tokenizer(out_dir: Path, vocab_size: int, context: int) -> None:
    tokenizer, config = build_tokenizer(vocab_size, context)
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False, indent=1) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1) + "\n")
