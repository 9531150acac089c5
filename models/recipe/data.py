"""Training batches drawn from the shapes world: images, the feature encoder's per-cell targets, and token
sequences in the bundle's own templates (so training sees exactly what the runtime will feed)."""
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import shapes
from ..presets import TEMPLATES
from ..tokenizer import Encoder, build_tokenizer

GRID = 8  # the feature grid: 8 x 8 cells of 8 x 8 pixels
CELL = shapes.SIZE // GRID
COLOR_IDS = {c: i + 1 for i, c in enumerate(shapes.COLORS)}  # 0 = no object
SHAPE_IDS = {s: i + 1 for i, s in enumerate(shapes.SHAPES)}
BG_IDS = {b: i for i, b in enumerate(shapes.BACKGROUNDS)}


def tokenizer(vocab: int, context: int) -> Encoder:
    return Encoder(build_tokenizer(vocab, context)[0])


def to_tensor(images: List[np.ndarray]) -> Tensor:
    """HWC uint8 images -> [N, 3, H, W] float in [-1, 1] (the decoder's pixel space)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def scenes(rng: np.random.Generator, n: int, kinds: Optional[List[str]] = None) -> List[shapes.Scene]:
    """n training scenes (never a held-out combination), kinds in turn."""
    kinds = kinds or list(shapes.KINDS)
    return [shapes.sample_scene(rng, kinds[int(rng.integers(len(kinds)))], False) for _ in range(n)]


def cell_targets(scene: shapes.Scene) -> Dict[str, np.ndarray]:
    """Per cell of the 8 x 8 grid: background, the colour and shape of the object covering most of the
    cell (0 = none), that object's bounding box / 64, and the covered fraction of each 4 x 4 quadrant."""
    covs = [shapes.coverage(o, 1) for o in scene.objects]
    per_cell = np.stack([c.reshape(GRID, CELL, GRID, CELL).sum(axis=(1, 3)) for c in covs])  # [k, 8, 8]
    owner = per_cell.argmax(0)
    has = per_cell.max(0) > 0
    color = np.zeros((GRID, GRID), np.int64)
    shape = np.zeros((GRID, GRID), np.int64)
    box = np.zeros((GRID, GRID, 4), np.float32)
    for k, o in enumerate(scene.objects):
        sel = has & (owner == k)
        color[sel], shape[sel] = COLOR_IDS[o.color], SHAPE_IDS[o.shape]
        box[sel] = np.asarray(o.box, np.float32) / shapes.SIZE
    union = np.clip(np.sum(covs, 0), 0, 1)
    quad = union.reshape(GRID * 2, CELL // 2, GRID * 2, CELL // 2).mean(axis=(1, 3))  # [16, 16]
    quad = quad.reshape(GRID, 2, GRID, 2).transpose(0, 2, 1, 3).reshape(GRID, GRID, 4)
    return {"bg": np.full((GRID, GRID), BG_IDS[scene.background], np.int64), "color": color, "shape": shape,
            "box": box, "quad": quad.astype(np.float32), "has": has}


def target_batch(batch: List[shapes.Scene]) -> Dict[str, Tensor]:
    ts = [cell_targets(s) for s in batch]
    return {k: torch.from_numpy(np.stack([t[k] for t in ts])).flatten(1, 2) for k in ts[0]}  # [N, 64, ...]


def generation_ids(tok: Encoder, caption: str) -> List[int]:
    return tok.encode(TEMPLATES["generation"].format(prompt=caption))


def understanding_prompt(tok: Encoder, image_tokens: int, question: str) -> List[int]:
    return tok.encode(TEMPLATES["understanding"].format(image="<|image_pad|>" * image_tokens, question=question))


def understanding_ids(tok: Encoder, image_tokens: int, question: str, answer: str) -> Tuple[List[int], int]:
    """Prompt + answer + <|im_end|>, and the prompt's length (the loss covers what follows it)."""
    prompt = understanding_prompt(tok, image_tokens, question)
    return prompt + tok.encode(answer + "<|im_end|>"), len(prompt)


# A second user turn after a generation: a question about the image just generated, from its prompt alone
FOLLOW_UP = "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def follow_up_prompt(tok: Encoder, caption: str, question: str) -> List[int]:
    return generation_ids(tok, caption) + tok.encode(FOLLOW_UP.format(question=question))


def follow_up_ids(tok: Encoder, caption: str, question: str, answer: str) -> Tuple[List[int], int]:
    """The generation prompt, then a question about the caption and its answer: the prompt's states must
    hold what the caption says (the query tokens read the same states)."""
    prompt = follow_up_prompt(tok, caption, question)
    return prompt + tok.encode(answer + "<|im_end|>"), len(prompt)


def by_length(ids: List[List[int]]) -> Dict[int, List[int]]:
    """Indices grouped by sequence length: the backbone's condition() takes unpadded equal-length rows."""
    groups: Dict[int, List[int]] = {}
    for i, row in enumerate(ids):
        groups.setdefault(len(row), []).append(i)
    return groups
