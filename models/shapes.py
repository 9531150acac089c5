"""The shapes world of shared/SHAPES.md: scenes, their rendering, the caption grammar, questions and
answers, the held-out combinations and the automatic judge. The tiny model is trained and judged on it.

    bash models/run-python.sh -m models.shapes --serve   # JSON lines on stdin -> JSON lines on stdout

Serve protocol (one JSON object per line each way; a failure answers {"error": "..."}):
    {"op": "prompts", "n": N, "seed": S, "kinds"?: [...], "unseen"?: bool|null}
        -> {"prompts": [{"caption", "kind", "unseen", "relation"}]}   fresh random captions; a pair is
           phrased with each of the four relations equally often ("relation": the phrasing; null unless a pair)
    {"op": "scenes", "n": N, "seed": S}
        -> {"scenes": [{"caption", "kind", "unseen", "pixels": base64 HWC uint8, "qa": [[q, a], ...]}]}
    {"op": "judge", "caption": C, "pixels": base64 HWC uint8 (64 x 64)}
        -> {"pass": bool, "kind", "unseen", "objects": [...], "background", "why"}
    {"op": "canonical", "caption": C} -> {"caption": canonical form, or null when C is not in the grammar}
"""
import argparse
import base64
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import jsonlines

SIZE = 64
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("to the left of", "to the right of", "above", "below")
NUMBERS = {2: "two", 3: "three"}
KINDS = ("single", "pair", "count")
HELD_OUT = {("purple", "triangle"), ("orange", "circle")}
CENTERS = (11, 32, 53)
SUPERSAMPLE = 4  # anti-aliasing: coverage from 4 x 4 sub-pixel samples (1: hard edges)


@dataclass
class Obj:
    color: str
    shape: str
    extent: int
    cx: float  # centre of the bounding box, pixels (the canvas spans 0..64)
    cy: float

    @property
    def box(self) -> Tuple[float, float, float, float]:
        h = self.extent / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclass
class Scene:
    kind: str
    background: str
    objects: List[Obj]
    caption: str  # the caption the scene was made from (canonical form, unless sampled with phrased=True)
    size: str = ""  # single: small / large
    position: str = ""  # single
    relation: str = ""  # pair: relation of objects[0] to objects[1]
    qa: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def unseen(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT for o in self.objects)


# ---------------------------------------------------------------- captions


def single_caption(size: str, color: str, shape: str, position: str, background: str) -> str:
    return f"a {size} {color} {shape} at the {position} on a {background} background"


def pair_caption(a: Tuple[str, str], relation: str, b: Tuple[str, str], background: str) -> str:
    return f"a {a[0]} {a[1]} {relation} a {b[0]} {b[1]} on a {background} background"


def count_caption(n: int, color: str, shape: str, background: str) -> str:
    return f"{NUMBERS[n]} {color} {shape}s on a {background} background"


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_B = "|".join(BACKGROUNDS)
_SINGLE = re.compile(rf"a (small|large) ({_C}) ({_S}) at the ({'|'.join(POSITIONS)}) on a ({_B}) background")
_PAIR = re.compile(rf"a ({_C}) ({_S}) ({'|'.join(RELATIONS)}) a ({_C}) ({_S}) on a ({_B}) background")
_COUNT = re.compile(rf"(two|three) ({_C}) ({_S})s on a ({_B}) background")


def parse(caption: str) -> Optional[dict]:
    """The stated content of a caption of the grammar, or None when it is not one."""
    m = _SINGLE.fullmatch(caption)
    if m:
        return {"kind": "single", "size": m[1], "objects": [(m[2], m[3])], "position": m[4], "background": m[5]}
    m = _PAIR.fullmatch(caption)
    if m:
        return {"kind": "pair", "objects": [(m[1], m[2]), (m[4], m[5])], "relation": m[3], "background": m[6]}
    m = _COUNT.fullmatch(caption)
    if m:
        n = 2 if m[1] == "two" else 3
        return {"kind": "count", "objects": [(m[2], m[3])] * n, "background": m[4]}
    return None


def canonical(caption: str) -> Optional[str]:
    """One caption per scene: a pair is said with `to the left of` or `above` (B right of A = A left of
    B), the way describe() answers. None when the caption is not in the grammar."""
    p = parse(caption)
    if p is None:
        return None
    if p["kind"] == "pair" and p["relation"] in ("to the right of", "below"):
        flipped = "to the left of" if p["relation"] == "to the right of" else "above"
        return pair_caption(p["objects"][1], flipped, p["objects"][0], p["background"])
    return caption


def is_unseen(caption: str) -> bool:
    p = parse(caption)
    return p is not None and any(o in HELD_OUT for o in p["objects"])


# ---------------------------------------------------------------- sampling scenes


def _object_kind(rng: np.random.Generator, unseen: Optional[bool]) -> Tuple[str, str]:
    """A (colour, shape): any, seen only (unseen False) or held-out only (unseen True)."""
    while True:
        c = (list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if unseen is None or (c in HELD_OUT) == unseen:
            return c


def _fits(o: Obj) -> bool:
    x0, y0, x1, y1 = o.box
    return x0 >= 0 and y0 >= 0 and x1 <= SIZE and y1 <= SIZE


def _gap(a: Obj, b: Obj) -> float:
    """Separation of two bounding boxes: the larger of the x and y gaps (negative when they overlap)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)


def sample_single(rng: np.random.Generator, unseen: Optional[bool] = False) -> Scene:
    color, shape = _object_kind(rng, unseen)
    size = ("small", "large")[rng.integers(2)]
    extent = int(rng.integers(12, 17) if size == "small" else rng.integers(24, 31))
    cell = int(rng.integers(9))
    half = extent / 2
    cx = float(np.clip(CENTERS[cell % 3] + rng.integers(-3, 4), half, SIZE - half))
    cy = float(np.clip(CENTERS[cell // 3] + rng.integers(-3, 4), half, SIZE - half))
    bg = list(BACKGROUNDS)[rng.integers(3)]
    position = POSITIONS[cell]
    s = Scene("single", bg, [Obj(color, shape, extent, cx, cy)], single_caption(size, color, shape, position, bg),
              size=size, position=position)
    s.qa = [("what color is the background?", bg), ("what shape is it?", shape),
            (f"what color is the {shape}?", color), (f"where is the {shape}?", position),
            (f"is the {shape} large or small?", size)]
    return s


def sample_pair(rng: np.random.Generator, unseen: Optional[bool] = False, phrased: bool = False) -> Scene:
    """Two shapes, 8 px or more apart along the relation's axis and offset less along the other axis, so
    that the relation is the scene's one natural description. The relation is drawn uniformly from the
    four; the caption is its canonical form (`to the left of` / `above`), or with phrased=True the pair as
    drawn, "objects[0] relation objects[1]", so that each of the four phrasings comes a quarter of the
    time (the eval's prompts). Both draw the same numbers: the same rng gives the same scene either way."""
    while True:
        if unseen:  # at least one held-out object, first or second
            a, b = _object_kind(rng, None), _object_kind(rng, True)
            if rng.integers(2):
                a, b = b, a
        else:
            a, b = _object_kind(rng, unseen), _object_kind(rng, unseen)
        relation = RELATIONS[rng.integers(4)]
        ea, eb = int(rng.integers(14, 21)), int(rng.integers(14, 21))
        along = (ea + eb) / 2 + 8 + rng.uniform(0, 20)  # centre distance on the relation's axis
        across = rng.uniform(-12, 12)
        c0 = rng.uniform(0, SIZE)
        c1 = rng.uniform(0, SIZE)
        sign = -1 if relation in ("to the left of", "above") else 1  # a's coordinate minus b's
        pa, pb = c0 + sign * along / 2, c0 - sign * along / 2
        qa, qb = c1 + across / 2, c1 - across / 2
        if relation in ("to the left of", "to the right of"):
            oa, ob = Obj(a[0], a[1], ea, pa, qa), Obj(b[0], b[1], eb, pb, qb)
        else:
            oa, ob = Obj(a[0], a[1], ea, qa, pa), Obj(b[0], b[1], eb, qb, pb)
        if _fits(oa) and _fits(ob):
            break
    bg = list(BACKGROUNDS)[rng.integers(3)]
    caption = pair_caption(a, relation, b, bg)
    s = Scene("pair", bg, [oa, ob], caption if phrased else canonical(caption), relation=relation)
    s.qa = [("what color is the background?", bg)]
    if a[1] != b[1]:
        s.qa += [(f"what color is the {a[1]}?", a[0]), (f"what color is the {b[1]}?", b[0])]
    return s


def sample_count(rng: np.random.Generator, unseen: Optional[bool] = False) -> Scene:
    color, shape = _object_kind(rng, unseen)
    n = int(rng.integers(2, 4))
    while True:
        objs: List[Obj] = []
        for _ in range(n):
            e = int(rng.integers(12, 17))
            objs.append(Obj(color, shape, e, rng.uniform(e / 2, SIZE - e / 2), rng.uniform(e / 2, SIZE - e / 2)))
        if all(_gap(p, q) >= 4 for i, p in enumerate(objs) for q in objs[i + 1:]):
            break
    bg = list(BACKGROUNDS)[rng.integers(3)]
    s = Scene("count", bg, objs, count_caption(n, color, shape, bg))
    s.qa = [("what color is the background?", bg), (f"how many {shape}s are there?", NUMBERS[n])]
    return s


SAMPLERS = {"single": sample_single, "pair": sample_pair, "count": sample_count}


def sample_scene(rng: np.random.Generator, kind: Optional[str] = None, unseen: Optional[bool] = False,
                 phrased: bool = False) -> Scene:
    """A random scene. unseen False: training scenes (no held-out combination); True: at least one held-out
    object; None: either. phrased: a pair's caption in any of the four phrasings (sample_pair)."""
    kind = kind or KINDS[rng.integers(len(KINDS))]
    if kind == "pair":
        return sample_pair(rng, unseen, phrased)
    return SAMPLERS[kind](rng, unseen)


# ---------------------------------------------------------------- rendering

def coverage(o: Obj, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """[64, 64] float32 fraction of each pixel inside the shape (sampled at n x n points per pixel)."""
    n = supersample
    sub = (np.arange(SIZE * n) + 0.5) / n  # sub-pixel sample centres
    x = sub[None, :]
    y = sub[:, None]
    x0, y0, x1, y1 = o.box
    if o.shape == "circle":
        inside = (x - o.cx) ** 2 + (y - o.cy) ** 2 <= (o.extent / 2) ** 2
    elif o.shape == "square":
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    else:  # apex up at (cx, y0), base along y1, as wide as tall
        t = (y - y0) / o.extent
        inside = (y >= y0) & (y <= y1) & (np.abs(x - o.cx) <= t * o.extent / 2)
    return inside.reshape(SIZE, n, SIZE, n).mean(axis=(1, 3)).astype(np.float32)


def render(scene: Scene, antialias: bool = True) -> np.ndarray:
    """HWC uint8 image of a scene. Hard edges (antialias False) are what the decoder learns to draw: every
    such render passes the judge, where anti-aliased small yellow shapes on black can read as orange."""
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        a = coverage(o, SUPERSAMPLE if antialias else 1)[:, :, None]
        img = img * (1 - a) + np.asarray(COLORS[o.color], np.float32) * a
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the judge


def _components(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, as [k, 2] arrays of (row, col)."""
    seen = np.zeros_like(mask, bool)
    out = []
    H, W = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, pixels = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < H and 0 <= cc < W and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pixels))
    return out


def _nearest(rgb: np.ndarray, table: Dict[str, Tuple[int, int, int]]) -> Tuple[str, float]:
    names = list(table)
    d = [float(np.linalg.norm(rgb - np.asarray(table[n], np.float64))) for n in names]
    i = int(np.argmin(d))
    return names[i], d[i]


def measure(pixels: np.ndarray) -> dict:
    """What the judge sees in an HWC uint8 image: the background and the objects (colour, shape, size,
    position, centroid, fill)."""
    img = pixels.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    mode = Counter(map(tuple, border)).most_common(1)[0][0]
    bg_name, _ = _nearest(np.asarray(mode, np.float64), BACKGROUNDS)
    bg = np.asarray(BACKGROUNDS[bg_name], np.float64)
    dist = np.linalg.norm(img - bg, axis=2)
    objects = []
    for comp in _components(dist > 60):
        if len(comp) < 20:
            continue
        mean = img[comp[:, 0], comp[:, 1]].mean(0)
        color, d = _nearest(mean, COLORS)
        if d > 80:
            objects.append({"color": None, "shape": None, "size": None, "position": None, "centroid": None})
            continue
        grown = np.zeros(dist.shape, bool)
        grown[comp[:, 0], comp[:, 1]] = True
        g = grown.copy()  # grown by one pixel (8-neighbourhood)
        g[1:] |= grown[:-1]
        g[:-1] |= grown[1:]
        g2 = g.copy()
        g2[:, 1:] |= g[:, :-1]
        g2[:, :-1] |= g[:, 1:]
        ref = np.linalg.norm(np.asarray(COLORS[color], np.float64) - bg)
        cov = np.where(g2, np.clip(dist / ref, 0, 1), 0.0)
        area = cov.sum()
        width, height = cov.max(0).sum(), cov.max(1).sum()
        fill = area / (width * height)
        shape = "square" if fill > 0.88 else "circle" if fill >= 0.62 else "triangle"
        ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
        cx, cy = float((cov * xs).sum() / area), float((cov * ys).sum() / area)
        col = min(int(cx // (SIZE / 3)), 2)
        row = min(int(cy // (SIZE / 3)), 2)
        objects.append({"color": color, "shape": shape, "size": "small" if max(width, height) < 21 else "large",
                        "position": POSITIONS[row * 3 + col], "centroid": [cx, cy], "fill": round(float(fill), 3),
                        "extent": round(float(max(width, height)), 1)})
    return {"background": bg_name, "objects": objects}


def judge(caption: str, pixels: np.ndarray) -> dict:
    """Whether an image shows exactly what a caption of the grammar states (SHAPES.md, "The judge")."""
    p = parse(caption)
    if p is None:
        raise ValueError(f"not a caption of the shapes grammar: {caption!r}")
    seen = measure(pixels)
    objs = seen["objects"]
    out = {"kind": p["kind"], "unseen": is_unseen(caption), "background": seen["background"], "objects": objs}
    why = ""
    if seen["background"] != p["background"]:
        why = f"background {seen['background']}"
    elif len(objs) != len(p["objects"]):
        why = f"{len(objs)} objects"
    elif p["kind"] == "single":
        o, (color, shape) = objs[0], p["objects"][0]
        wrong = [k for k, v in (("color", color), ("shape", shape), ("size", p["size"]), ("position", p["position"]))
                 if o[k] != v]
        why = ", ".join(f"{k} {o[k]}" for k in wrong)
    elif p["kind"] == "count":
        color, shape = p["objects"][0]
        wrong = [o for o in objs if (o["color"], o["shape"]) != (color, shape)]
        why = ", ".join(f"a {o['color']} {o['shape']}" for o in wrong)
    else:
        why = "objects or relation"
        for a, b in ((objs[0], objs[1]), (objs[1], objs[0])):
            if (a["color"], a["shape"]) == p["objects"][0] and (b["color"], b["shape"]) == p["objects"][1]:
                (ax, ay), (bx, by) = a["centroid"], b["centroid"]
                ok = {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by, "below": ay > by}
                if ok[p["relation"]]:
                    why = ""
                    break
    out["pass"] = why == ""
    out["why"] = why
    return out


# ---------------------------------------------------------------- serve


def _pixels(b64: str) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(b64), np.uint8)
    if raw.size != SIZE * SIZE * 3:
        raise ValueError(f"expected {SIZE}x{SIZE} RGB pixels ({SIZE * SIZE * 3} bytes), got {raw.size} bytes")
    return raw.reshape(SIZE, SIZE, 3)


def _prompts(n: int, seed: int, kinds: Optional[List[str]], unseen: Optional[bool]) -> List[dict]:
    """Generation prompts: the captions of fresh scenes, a pair phrased with any of the four relations
    (a quarter each), not only the canonical two."""
    rng = np.random.default_rng(seed)
    kinds = kinds or list(KINDS)
    out = []
    for i in range(n):
        s = sample_scene(rng, kinds[i % len(kinds)], unseen, phrased=True)
        out.append({"caption": s.caption, "kind": s.kind, "unseen": s.unseen,
                    "relation": s.relation if s.kind == "pair" else None})
    return out


def answer(req: dict) -> dict:
    op = req["op"]
    if op == "prompts":
        return {"prompts": _prompts(int(req["n"]), int(req["seed"]), req.get("kinds"), req.get("unseen", None))}
    if op == "scenes":
        rng = np.random.default_rng(int(req["seed"]))
        scenes = [sample_scene(rng, KINDS[i % 3], None) for i in range(int(req["n"]))]
        return {"scenes": [{"caption": s.caption, "kind": s.kind, "unseen": s.unseen, "qa": s.qa,
                            "pixels": base64.b64encode(render(s).tobytes()).decode("ascii")} for s in scenes]}
    if op == "judge":
        return judge(req["caption"], _pixels(req["pixels"]))
    if op == "canonical":
        return {"caption": canonical(req["caption"])}
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m models.shapes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--serve", action="store_true", help="answer JSON requests on stdin")
    ap.add_argument("--check", type=int, metavar="N", help="judge N fresh renders per kind (should all pass)")
    a = ap.parse_args()
    if a.serve:
        return jsonlines.serve(answer)
    rng = np.random.default_rng(0)
    for kind in KINDS:
        scenes = [sample_scene(rng, kind, None) for _ in range(a.check or 100)]
        passed = sum(judge(s.caption, render(s))["pass"] for s in scenes)
        print(f"{kind}: {passed}/{len(scenes)} renders pass the judge")


if __name__ == "__main__":
    main()
