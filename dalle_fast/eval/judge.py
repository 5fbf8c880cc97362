"""A judge of flat-colour Shapes images: finds the objects, their colour, shape, size and position, and
scores an image against what its caption asked for.

The Shapes set (dalle_fast.data.shapes) draws circles, squares and apex-up triangles of six saturated
colours on black. The analyser here reads such pictures back: it binarises each channel (an object
pixel of a saturated colour has every channel near 0 or 1), groups pixels of one colour class into
8-connected components (label propagation with max-pooling, batched over images and colours), drops
specks, and per object measures the bounding box, the fill ratio of the box, the lit share of its
four corner patches and the overlap (IoU) with each shape's template stretched over the box. The
shape is the best-overlapping template (a square fills its box, a circle leaves the four corners
empty, a triangle leaves the top corners and half its box empty); the size is the box side against
the two sizes Shapes draws (22% and 40% of the image side). Generated images are judged with the
same rules; blurred or dithered pixels that fall between colours are ignored rather than guessed.
"""
import dataclasses
import itertools
import re
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..data.shapes import _SIZE_FRAC, COLOURS, RELATIONS, SHAPES, SIZES

# colour class of a pixel from its binarised (R, G, B): 1..6 as in COLOURS, 0 = black or not a colour
_COLOUR_NAMES = list(COLOURS)
_CODE_OF = {tuple(int(v > 127) for v in rgb): i + 1 for i, rgb in enumerate(COLOURS.values())}
_SIZE_SPLIT = (_SIZE_FRAC["small"] * _SIZE_FRAC["large"]) ** 0.5   # geometric midpoint of the two sides
_CAPTION_OBJECT = r"an? (\w+) (\w+) (\w+)"
_CAPTION_RE = re.compile(rf"^{_CAPTION_OBJECT}(?: ({'|'.join(RELATIONS)}) {_CAPTION_OBJECT})?$")


@dataclasses.dataclass
class DetectedObject:
    """One object found in an image. box = (x0, y0, width, height) in pixels; centre = (x, y)."""
    colour: str
    shape: str
    size: str
    box: tuple
    centre: tuple
    area: int
    fill: float                 # lit pixels / box area: square 1, circle ~0.79, triangle ~0.5
    corners: tuple              # lit share of the (top-left, top-right, bottom-left, bottom-right) patches
    shape_scores: dict          # IoU with each shape's template over the box


@dataclasses.dataclass
class ObjectSpec:
    size: str
    colour: str
    shape: str


@dataclasses.dataclass
class Spec:
    """What a caption asks for: one or two objects and, for two, the relation of the first to the second."""
    objects: List[ObjectSpec]
    relation: Optional[str] = None


@dataclasses.dataclass
class Verdict:
    """How one image meets its spec. Attribute fields are the share of asked objects with that attribute
    right (after matching asked to found objects); relation is None for one-object prompts."""
    colour: float
    shape: float
    size: float
    relation: Optional[bool]
    count: bool                 # exactly as many objects found as asked
    ok: bool                    # everything right
    objects: List[DetectedObject]
    per_object: List[dict]      # per asked object: {"size": asked size, "colour": bool, "shape": bool, "size_ok": bool}


def parse_caption(caption):
    """A Shapes caption ('a small red circle above a large blue square') -> Spec. ValueError otherwise."""
    if isinstance(caption, Spec):
        return caption
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str or a Spec, got {type(caption).__name__}")
    m = _CAPTION_RE.match(caption.strip().lower())
    if not m:
        raise ValueError(f"caption {caption!r} is not a Shapes caption ('a <size> <colour> <shape>"
                         f"[ <relation> a <size> <colour> <shape>]')")
    g = m.groups()
    objs = [ObjectSpec(*g[0:3])] + ([ObjectSpec(*g[4:7])] if g[3] else [])
    for o in objs:
        if o.size not in SIZES or o.colour not in COLOURS or o.shape not in SHAPES:
            raise ValueError(f"caption {caption!r}: unknown size, colour or shape in {o}")
    return Spec(objs, g[3])


def _as_float_images(images):
    if isinstance(images, (list, tuple)):
        images = torch.stack([torch.as_tensor(im) for im in images])
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a tensor (B, 3, H, W) or a list of (3, H, W), got {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
    if images.shape[-1] != images.shape[-2] or images.shape[-1] < 16:
        raise ValueError(f"images must be square and at least 16 pixels a side, got {tuple(images.shape[-2:])}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images.detach().float().cpu().clamp(0, 1)


def _components(classes):
    """8-connected components of equal nonzero class: (B, H, W) class map -> (B, H, W) labels (0 = none).

    Every pixel starts with its own 1-based flat index as label and repeatedly takes the largest label
    among its same-class 8-neighbours; since a label is always the index of a pixel of the same
    component, each round also jumps to the label that pixel holds (pointer jumping), so the rounds
    grow with the log of a component's diameter rather than with it."""
    B, H, W = classes.shape
    idx = torch.arange(1, H * W + 1, dtype=torch.int32).view(1, H, W).expand(B, H, W)
    labels = torch.where(classes > 0, idx, torch.zeros((), dtype=torch.int32))
    out = torch.zeros_like(labels)
    present = torch.bincount(classes.flatten(), minlength=len(_COLOUR_NAMES) + 1)
    for c in torch.nonzero(present[1:])[:, 0].add(1).tolist():
        mask = classes == c
        which = mask.flatten(1).any(1).nonzero()[:, 0]    # only the images holding this colour
        mask = mask[which]
        lab = torch.where(mask, labels[which], 0)
        while True:
            new = torch.where(mask, _max3x3(lab), 0).flatten(1)
            jumped = torch.gather(new, 1, (new - 1).clamp(min=0).long())
            new = torch.where(new > 0, torch.maximum(new, jumped), 0).view_as(lab)
            if torch.equal(new, lab):
                break
            lab = new
        out[which] += lab
    return out


def _max3x3(x):
    """Max over each pixel's 3x3 neighbourhood of a (B, H, W) map of values >= 0 (zero outside)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])      # (B, H + 2, W)
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _templates(h, w):
    """Boolean (h, w) masks of each shape stretched over an h x w box, sampled at pixel centres."""
    v = (torch.arange(h, dtype=torch.float32) + 0.5).view(-1, 1) / h
    u = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, -1) / w
    return {"circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
            "square": torch.ones(h, w, dtype=torch.bool),
            "triangle": (u - 0.5).abs() <= v / 2 + 0.5 / max(h, w)}


def _describe(mask, colour, S):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    y0, y1, x0, x1 = ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()
    h, w = y1 - y0 + 1, x1 - x0 + 1
    crop = mask[y0:y1 + 1, x0:x1 + 1]
    area = int(crop.sum())
    scores = {}
    for name, t in _templates(h, w).items():
        scores[name] = (crop & t).sum().item() / max(1, (crop | t).sum().item())
    shape = max(scores, key=scores.get)
    p = max(1, round(min(h, w) / 5))
    patches = (crop[:p, :p], crop[:p, -p:], crop[-p:, :p], crop[-p:, -p:])
    corners = tuple(round(c.float().mean().item(), 3) for c in patches)
    side = max(h, w) / S
    return DetectedObject(colour=colour, shape=shape, size="small" if side < _SIZE_SPLIT else "large",
                          box=(x0, y0, w, h), centre=(xs.float().mean().item(), ys.float().mean().item()),
                          area=area, fill=area / (h * w), corners=corners, shape_scores=scores)


def analyse(images, min_area_frac=0.25):
    """The objects in each image of a batch.

    Args:
        images: (B, 3, S, S) or (3, S, S) tensor, uint8 in [0, 255] or float in [0, 1] (or a list of (3, S, S)),
            S >= 16, RGB on a black background as Shapes draws them.
        min_area_frac: components smaller than this fraction of a small triangle's area are specks, dropped.
    Returns:
        a list (one per image) of lists of DetectedObject, largest first.
    """
    x = _as_float_images(images)
    B, _, S, _ = x.shape
    bits = (x > 0.5).long()
    code = bits[:, 0] * 4 + bits[:, 1] * 2 + bits[:, 2]
    lut = torch.zeros(8, dtype=torch.long)
    for rgb, c in _CODE_OF.items():
        lut[rgb[0] * 4 + rgb[1] * 2 + rgb[2]] = c
    classes = lut[code]
    labels = _components(classes)
    small_side = max(3, round(_SIZE_FRAC["small"] * S))
    min_area = max(4, min_area_frac * small_side ** 2 / 2)
    result = []
    for b in range(B):
        objs = []
        lab, cls = labels[b], classes[b]
        counts = torch.bincount(lab.flatten().long(), minlength=S * S + 1)
        counts[0] = 0
        for i in torch.nonzero(counts >= min_area)[:, 0].tolist():
            mask = lab == i
            colour = _COLOUR_NAMES[int(cls[mask][0]) - 1]
            objs.append(_describe(mask, colour, S))
        objs.sort(key=lambda o: -o.area)
        result.append(objs)
    return result


def relation_holds(a, b, relation):
    """Whether object a stands in `relation` to object b: their centres differ in the right direction
    along the relation's axis, and by more along it than across it."""
    dx, dy = b.centre[0] - a.centre[0], b.centre[1] - a.centre[1]
    along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > 0 and along >= abs(across)


def _matchings(spec, found):
    """Every assignment of the asked objects to distinct found ones (None when too few) that gets the
    most attributes right, colour first (the way a person reads which object is meant). Two found
    objects that fit the spec equally well give two matchings: either may be the one meant."""
    def points(o, s):
        return 4 * (o.colour == s.colour) + 2 * (o.shape == s.shape) + (o.size == s.size)
    best, best_pts = [], -1
    k = min(len(found), len(spec.objects))
    for chosen in itertools.permutations(range(len(found)), k):
        pts = sum(points(found[j], spec.objects[i]) for i, j in enumerate(chosen))
        m = [found[j] for j in chosen] + [None] * (len(spec.objects) - k)
        if pts > best_pts:
            best, best_pts = [m], pts
        elif pts == best_pts:
            best.append(m)
    return best


def judge(images, captions_or_specs, objects=None):
    """Scores each image against what its caption asked for.

    Args:
        images: as for analyse(), B images.
        captions_or_specs: B Shapes captions (str) or Spec objects, one per image.
        objects: analyse(images) when already computed.
    Returns:
        a list of B Verdict.
    """
    specs = [parse_caption(c) for c in ([captions_or_specs] if isinstance(captions_or_specs, (str, Spec))
                                        else captions_or_specs)]
    found = objects if objects is not None else analyse(images)
    if len(found) != len(specs):
        raise ValueError(f"{len(found)} images but {len(specs)} captions/specs")
    out = []
    for spec, objs in zip(specs, found):
        matchings = _matchings(spec, objs)
        m, n = matchings[0], len(spec.objects)
        per = [{"size": s.size, "colour": o is not None and o.colour == s.colour,
                "shape": o is not None and o.shape == s.shape, "size_ok": o is not None and o.size == s.size}
               for o, s in zip(m, spec.objects)]
        col, shp, siz = (sum(p[k] for p in per) / n for k in ("colour", "shape", "size_ok"))
        rel = None
        if spec.relation is not None:
            rel = any(a is not None and b is not None and relation_holds(a, b, spec.relation) for a, b in matchings)
        count = len(objs) == n
        ok = count and col == shp == siz == 1 and rel is not False
        out.append(Verdict(colour=col, shape=shp, size=siz, relation=rel, count=count, ok=ok, objects=objs,
                           per_object=per))
    return out
