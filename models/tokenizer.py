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

import numpy as np

from . import shapes
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

_FILLER = ("an in with and big tiny middle image picture photo one colour this which please there here these "
           "those pink brown cyan star rectangle ellipse cross heart diamond line dot dots it's they have has "
           "not no yes can see show draw make give me some many much more less than then from by for into "
           "over under near far between inside outside corner edge side front back up down light dark bright "
           "number count object objects thing things scene").split()


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
    """The text the tiny models see: the prompt templates (the most frequent of all), then captions,
    questions and answers of the shapes world, so that each of its words is one token."""
    texts = [TEMPLATES["generation"], TEMPLATES["understanding"], TEMPLATES["defaultQuestion"]] * 50
    rng = np.random.default_rng(0)
    for i in range(600):
        scene = shapes.sample_scene(rng, shapes.KINDS[i % 3], None)
        texts.append(scene.caption)
        texts += [f"{q} {a}" for q, a in scene.qa]
    # rarer words fill the rest of the vocabulary
    texts.append(" ".join(_FILLER) + " " + " ".join(w.capitalize() for w in _FILLER))
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


class Encoder:
    """Text -> ids with a tokenizer.json written above, for training (the runtime uses Hugging Face's
    tokenizers; for the ASCII text of the shapes world both split and merge alike, which a test checks)."""

    def __init__(self, tokenizer: dict):
        self.vocab = dict(tokenizer["model"]["vocab"])
        self.vocab.update({a["content"]: a["id"] for a in tokenizer["added_tokens"]})
        self.ranks = {tuple(m.split(" ")): i for i, m in enumerate(tokenizer["model"]["merges"])}
        self.specials = re.compile("(" + "|".join(re.escape(a["content"]) for a in tokenizer["added_tokens"]) + ")")
        self.b2u = bytes_to_unicode()
        self.u2b = {u: b for b, u in self.b2u.items()}
        self.tokens = {i: t for t, i in self.vocab.items()}
        self.cache: Dict[str, List[int]] = {}

    def _piece(self, piece: str) -> List[int]:
        if piece not in self.cache:
            word = [self.b2u[b] for b in piece.encode("utf-8")]
            while len(word) > 1:
                pairs = [(self.ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(word, word[1:]))]
                rank, i = min(pairs)
                if rank == 1 << 30:
                    break
                word[i:i + 2] = [word[i] + word[i + 1]]
            self.cache[piece] = [self.vocab[w] for w in word]
        return self.cache[piece]

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for part in self.specials.split(text):
            if part in self.vocab and self.specials.fullmatch(part):
                ids.append(self.vocab[part])
            else:
                for piece in _PY_SPLIT.findall(part):
                    ids += self._piece(piece)
        return ids

    def decode(self, ids: List[int]) -> str:
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            out += t.encode("utf-8") if self.specials.fullmatch(t) else bytes(self.u2b[c] for c in t)
        return out.decode("utf-8", errors="replace")
