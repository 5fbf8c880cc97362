"""Shapes: a synthetic image-caption set generated on the fly, deterministic by (seed, index).

64x64 RGB images on black with one or two flat-coloured objects (circle, square, triangle; six
saturated colours; small or large) and lower-case captions such as "a large red circle" or
"a small blue square to the left of a large yellow triangle". Two objects never overlap and the
stated relation holds strictly (a gap of at least 2 pixels along its axis, the other axis roughly
aligned so the relation is the obvious description).

Splits hold out attribute combinations to test zero-shot composition: split='train' never shows
a held-out combination (default: every green triangle), split='heldout' always shows one (as the
first object), split='all' ignores the hold-out.
"""
import itertools

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
DEFAULT_HOLDOUT = ("green triangle",)
SPLITS = ("train", "heldout", "all")
_SPLIT_STREAM = {"train": 0, "heldout": 1, "all": 2}
_SIZE_FRAC = {"small": 0.22, "large": 0.40}   # object side / image side
_WORDS = {**{s: "shape" for s in SHAPES}, **{c: "colour" for c in COLOURS}, **{s: "size" for s in SIZES}}


def _parse_holdout(holdout):
    """'green triangle' or ('green', 'triangle') or {'colour': 'green', ...} -> dict attr -> value."""
    out = []
    for spec in holdout:
        if isinstance(spec, dict):
            d = dict(spec)
        else:
            words = spec.split() if isinstance(spec, str) else list(spec)
            d = {}
            for w in words:
                if w not in _WORDS:
                    raise ValueError(f"unknown attribute {w!r} in holdout {spec!r}; known: {sorted(_WORDS)}")
                d[_WORDS[w]] = w
        if not d or set(d) - {"shape", "colour", "size"}:
            raise ValueError(f"bad holdout spec {spec!r}")
        out.append(d)
    return out


def _matches(obj, specs):
    return any(all(obj[k] == v for k, v in spec.items()) for spec in specs)


def describe_object(obj):
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def caption_of(objects, relation=None):
    if len(objects) == 1:
        return describe_object(objects[0])
    return f"{describe_object(objects[0])} {relation} {describe_object(objects[1])}"


def all_captions():
    """Every distinct caption Shapes can produce (36 single objects, 5,184 pairs), for tokenizers.

    Yields:
        str.
    """
    objs = [{"size": s, "colour": c, "shape": sh} for s in SIZES for c in COLOURS for sh in SHAPES]
    for o in objs:
        yield caption_of([o])
    for a, rel, b in itertools.product(objs, RELATIONS, objs):
        yield caption_of([a, b], rel)


def _draw(canvas, obj, x0, y0, d):
    """Fills a d x d bounding box at (x0, y0) with the object's shape (no anti-aliasing)."""
    ys, xs = np.mgrid[y0:y0 + d, x0:x0 + d]
    c = (d - 1) / 2
    if obj["shape"] == "square":
        mask = np.ones((d, d), bool)
    elif obj["shape"] == "circle":
        mask = (xs - x0 - c) ** 2 + (ys - y0 - c) ** 2 <= (d / 2) ** 2
    else:  # triangle, apex up: half-width grows linearly from the top row to d/2 at the base
        half = (ys - y0 + 1) / d * d / 2
        mask = np.abs(xs - x0 - c) <= half
    canvas[y0:y0 + d, x0:x0 + d][mask] = COLOURS[obj["colour"]]


class Shapes(torch.utils.data.Dataset):
    """The synthetic Shapes set: flat-colour circles, squares and triangles on black, one or two per image,
    with captions; items are (image float tensor (3, S, S) in [0, 1], caption str), drawn
    deterministically from (seed, split, index).

    Args:
        length: number of items.
        seed: the set's seed.
        image_size: S, pixels per side (>= 16).
        split: 'train' (no held-out object), 'heldout' (the first object held out) or 'all'.
        holdout: object descriptions held out of 'train' (default: green triangles).
        p_two: probability of a two-object scene.
    """

    def __init__(self, length=10000, seed=0, image_size=64, split="all", holdout=DEFAULT_HOLDOUT, p_two=0.5):
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if not 0 <= p_two <= 1:
            raise ValueError(f"p_two must be in [0, 1], got {p_two}")
        self.length, self.seed, self.image_size, self.split, self.p_two = length, seed, image_size, split, p_two
        self.holdout = _parse_holdout(holdout) if holdout else []
        every = [{"shape": sh, "colour": c, "size": s} for sh in SHAPES for c in COLOURS for s in SIZES]
        held = [o for o in every if _matches(o, self.holdout)]
        free = [o for o in every if not _matches(o, self.holdout)]
        if split == "heldout" and not held:
            raise ValueError("split='heldout' needs a non-empty holdout")
        if split == "train" and not free:
            raise ValueError("the holdout covers every object: nothing left for split='train'")
        self._first = {"train": free, "heldout": held, "all": every}[split]
        self._second = {"train": free, "heldout": every, "all": every}[split]

    def __len__(self):
        return self.length

    def _rng(self, index):
        return np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])

    def describe(self, index):
        """The scene of an item, without drawing it.

        Args:
            index: item index.
        Returns:
            dict(objects=[{shape, colour, size, box=(x0, y0, d)}], relation, caption).
        """
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for Shapes of length {self.length}")
        rng = self._rng(index)
        S = self.image_size
        objs = [dict(self._first[rng.integers(len(self._first))])]
        relation = None
        if rng.random() < self.p_two:
            objs.append(dict(self._second[rng.integers(len(self._second))]))
            relation = RELATIONS[rng.integers(len(RELATIONS))]
        sides = [max(3, round(_SIZE_FRAC[o["size"]] * S)) for o in objs]
        if relation is None:
            d = sides[0]
            objs[0]["box"] = (int(rng.integers(0, S - d + 1)), int(rng.integers(0, S - d + 1)), d)
        else:
            self._place_pair(rng, objs, sides, relation)
        return {"objects": objs, "relation": relation, "caption": caption_of(objs, relation)}

    def _place_pair(self, rng, objs, sides, relation):
        """Constructive placement: along the relation's axis the 'first' object (lower coordinate)
        and the second are separated by a gap >= 2; across it both centre near one shared line."""
        S = self.image_size
        # order along the axis: which object has the smaller coordinate
        first_low = relation in ("to the left of", "above")
        lo, hi = (0, 1) if first_low else (1, 0)
        gap = int(rng.integers(2, S - sides[0] - sides[1] + 1))
        start = int(rng.integers(0, S - sides[0] - sides[1] - gap + 1))
        along = {lo: start, hi: start + sides[lo] + gap}
        big = max(sides)
        centre = rng.uniform(big / 2, S - big / 2)
        across = {}
        for i in (0, 1):
            jitter = rng.uniform(-0.15, 0.15) * big
            across[i] = int(np.clip(round(centre + jitter - sides[i] / 2), 0, S - sides[i]))
        horizontal = relation in ("to the left of", "to the right of")
        for i in (0, 1):
            x, y = (along[i], across[i]) if horizontal else (across[i], along[i])
            objs[i]["box"] = (x, y, sides[i])

    def render(self, scene):
        """Draws a scene.

        Args:
            scene: a dict from describe.
        Returns:
            (3, S, S) float tensor in [0, 1].
        """
        canvas = np.zeros((self.image_size, self.image_size, 3), np.uint8)
        for obj in scene["objects"]:
            _draw(canvas, obj, *obj["box"])
        return torch.from_numpy(canvas).permute(2, 0, 1).float().div_(255)

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor):
            index = int(index)
        if index < 0:
            index += self.length
        scene = self.describe(index)
        return self.render(scene), scene["caption"]

    def captions(self):
        """The captions of every item in order, without rendering images.

        Yields:
            str.
        """
        for i in range(self.length):
            yield self.describe(i)["caption"]
