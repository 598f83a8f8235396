"""ShapesCaptions: a procedurally drawn image-caption dataset written as WebDataset shards.

Every image is a small dark canvas with 1 to 3 coloured shapes, each placed in its own
cell of a 3x3 grid.  Each image gets 5 distinct captions built from several templates
(full listings, spatial relations, mixed forms) with synonyms, so that a caption pins
down its image up to a few look-alikes, and near misses differ in one attribute or one
relation.

Alongside each caption the generator stores the canonical *facts* it asserts
(``obj:red:circle``, ``size:red:circle:small``, ``cell:red:circle:0:0``,
``rel:red:circle:left_of:blue:star``, ``count:2``).  :func:`oracle_similarity` scores a
caption against an image by the fraction of those facts that hold for the image, and
:func:`oracle_rsum` turns that into the retrieval ceiling (rSum) of a test split.

Command line::

    python -m data_tools.shapes_captions --out data/shapes_captions
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
import time
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dbl_scale.shards import INDEX, write_json_atomic, write_shard

GENERATOR = "shapes_captions v1"
SPLITS = ("train", "val", "test")
CAPTIONS_PER_IMAGE = 5
MAX_WORDS = 28  # longer drafts are redrawn, so captions fit a 32-token text encoder

# Fixed tar header time so that identical arguments give byte-identical shards.

# --------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")
COLOURS = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 95, 245),
    "yellow": (240, 225, 40),
    "purple": (165, 60, 225),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "cyan": (40, 220, 230),
}
SIZES = ("small", "large")
# Shape diameter as a share of the canvas side: 64 px -> ~11 px and ~19 px.  A large
# shape still fits inside its grid cell (a third of the side), so shapes never overlap.
_SIZE_FRAC = {"small": 0.17, "large": 0.30}
# Relative object counts: 1, 2 or 3 shapes per image.
_COUNT_WEIGHTS = ((1, 0.2), (2, 0.4), (3, 0.4))
# The "dense" variant: always 3 shapes, each also solid or hollow (a fourth attribute), so
# that look-alikes differing in one attribute or relation are common within a batch.
# The "occluded" variant: the standard scenes, but in OCCLUDED_RATE of the images one shape
# (drawn at random) is covered by a square of bright noise, while the captions still describe
# every shape: the image is short of information its captions carry (modal imbalance). The
# covered shape's index is the json's "occluded" (absent when nothing is covered).
VARIANTS = ("standard", "dense", "occluded")
OCCLUDED_RATE = 0.5
STYLES = ("solid", "hollow")
_STYLE_WORDS = {"solid": ("solid", "filled"), "hollow": ("hollow", "outlined")}
_DENSE_MAX_WORDS = 40  # captions name three objects with four attributes each

_SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square",),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "hexagon": ("hexagon",),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_CELL_WORDS = {
    (0, 0): ("in the top left", "in the upper left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle", "at the top centre"),
    (0, 2): ("in the top right", "in the upper right corner", "at the top right"),
    (1, 0): ("on the left", "in the middle left", "at the left side"),
    (1, 1): ("in the centre", "in the middle", "at the center"),
    (1, 2): ("on the right", "in the middle right", "at the right side"),
    (2, 0): ("in the bottom left", "in the lower left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle", "at the bottom centre"),
    (2, 2): ("in the bottom right", "in the lower right corner", "at the bottom right"),
}
# Relation of object a to object b, keyed by (sign of row_a - row_b, sign of col_a - col_b).
_REL_FACTS = {
    (-1, 0): ("above",),
    (1, 0): ("below",),
    (0, -1): ("left_of",),
    (0, 1): ("right_of",),
    (-1, -1): ("above", "left_of"),
    (-1, 1): ("above", "right_of"),
    (1, -1): ("below", "left_of"),
    (1, 1): ("below", "right_of"),
}
_REL_WORDS = {
    (-1, 0): ("above", "over", "directly above"),
    (1, 0): ("below", "under", "beneath"),
    (0, -1): ("to the left of", "left of", "on the left of"),
    (0, 1): ("to the right of", "right of", "on the right of"),
    (-1, -1): ("above and to the left of", "up and to the left of", "to the upper left of"),
    (-1, 1): ("above and to the right of", "up and to the right of", "to the upper right of"),
    (1, -1): ("below and to the left of", "down and to the left of", "to the lower left of"),
    (1, 1): ("below and to the right of", "down and to the right of", "to the lower right of"),
}
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
_THING_WORDS = ("shapes", "objects", "figures")


# --------------------------------------------------------------------------- facts


def _oid(obj: dict) -> str:
    return f"{obj['colour']}:{obj['shape']}"


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _rel_key(a: dict, b: dict) -> tuple[int, int]:
    return (_sign(a["cell"][0] - b["cell"][0]), _sign(a["cell"][1] - b["cell"][1]))


def _rel_facts(a: dict, b: dict) -> list[str]:
    return [f"rel:{_oid(a)}:{r}:{_oid(b)}" for r in _REL_FACTS[_rel_key(a, b)]]


def image_facts(objects: Sequence[dict]) -> set[str]:
    """All canonical facts that hold for an image with these objects."""
    facts = {f"count:{len(objects)}"}
    for o in objects:
        oid = _oid(o)
        facts.add(f"obj:{oid}")
        facts.add(f"size:{oid}:{o['size']}")
        facts.add(f"cell:{oid}:{o['cell'][0]}:{o['cell'][1]}")
        if "style" in o:
            facts.add(f"style:{oid}:{o['style']}")
    for a in objects:
        for b in objects:
            if a is not b:
                facts.update(_rel_facts(a, b))
    return facts


# --------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Caption:
    """Collects words and the facts they assert."""

    def __init__(self) -> None:
        self.facts: set[str] = set()

    def noun(self, rng: random.Random, o: dict, size: bool, article: bool = True) -> str:
        """'a small red circle' (size optional); asserts obj (and size)."""
        oid = _oid(o)
        self.facts.add(f"obj:{oid}")
        words = []
        if size:
            self.facts.add(f"size:{oid}:{o['size']}")
            words.append(rng.choice(_SIZE_WORDS[o["size"]]))
        if "style" in o:  # the dense variant names every object's style
            self.facts.add(f"style:{oid}:{o['style']}")
            words.append(rng.choice(_STYLE_WORDS[o["style"]]))
        words.append(o["colour"])
        words.append(rng.choice(_SHAPE_WORDS[o["shape"]]))
        text = " ".join(words)
        return f"{_article(text)} {text}" if article else text

    def pos(self, rng: random.Random, o: dict) -> str:
        self.facts.add(f"cell:{_oid(o)}:{o['cell'][0]}:{o['cell'][1]}")
        return rng.choice(_CELL_WORDS[tuple(o["cell"])])

    def rel(self, rng: random.Random, a: dict, b: dict) -> str:
        """Phrase for 'a <rel> b'; asserts the relation facts."""
        self.facts.update(_rel_facts(a, b))
        return rng.choice(_REL_WORDS[_rel_key(a, b)])

    def count(self, rng: random.Random, n: int) -> str:
        self.facts.add(f"count:{n}")
        if n == 1:
            return rng.choice(
                ("one shape:", "a single object:", "there is one shape:", "only one object:")
            )
        num, thing = _NUMBER_WORDS[n], rng.choice(_THING_WORDS)
        return rng.choice((f"{num} {thing}:", f"there are {num} {thing}:", f"a picture with {num} {thing}:"))


def _join(parts: Sequence[str], rng: random.Random) -> str:
    if len(parts) == 1:
        return parts[0]
    sep = rng.choice((" and ", ", and ")) if len(parts) > 2 else " and "
    return ", ".join(parts[:-1]) + sep + parts[-1]


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", text.replace(" ,", ",")).strip().lower()
    return text


# Each template takes (rng, objects in random mention order) and returns (text, facts).


def _t_listing(rng: random.Random, objs: list[dict]):
    """(a) full listing: colour, size, shape and position of every object."""
    c = _Caption()
    prefix = c.count(rng, len(objs)) if rng.random() < 0.6 else ""
    lead = ""
    if rng.random() < 0.3:  # position first
        parts = [f"{c.pos(rng, o)} {c.noun(rng, o, size=True)}" for o in objs]
    else:
        parts = [f"{c.noun(rng, o, size=True)} {c.pos(rng, o)}" for o in objs]
        if not prefix:
            lead = rng.choice(("", "", "the image shows ", "a dark image with "))
    return f"{prefix} {lead}{_join(parts, rng)}", c.facts


def _t_no_size(rng: random.Random, objs: list[dict]):
    """Colour, shape and position of every object, no sizes."""
    c = _Caption()
    prefix = c.count(rng, len(objs)) if rng.random() < 0.5 else ""
    parts = [f"{c.noun(rng, o, size=False)} {c.pos(rng, o)}" for o in objs]
    return f"{prefix} {_join(parts, rng)}", c.facts


def _t_relation(rng: random.Random, objs: list[dict]):
    """(b) relation chain naming every object's size, colour and shape."""
    c = _Caption()
    a, b = objs[0], objs[1]
    text = f"{c.noun(rng, a, size=True)} {c.rel(rng, a, b)} {c.noun(rng, b, size=True)}"
    if len(objs) == 3:
        d = objs[2]
        form = rng.randrange(3)
        if form == 0:  # b relative to d
            text += f", which is {c.rel(rng, b, d)} {c.noun(rng, d, size=True)}"
        elif form == 1:  # d relative to a
            text += f", and {c.noun(rng, d, size=True)} {c.rel(rng, d, a)} the {a['colour']} {a['shape']}"
            c.facts.add(f"obj:{_oid(a)}")
        else:  # d relative to b
            text += f", with {c.noun(rng, d, size=True)} {c.rel(rng, d, b)} the {b['colour']} {b['shape']}"
    if rng.random() < 0.4:
        text = f"{c.count(rng, len(objs))} {text}"
    return text, c.facts


def _t_mixed(rng: random.Random, objs: list[dict]):
    """(c) an anchored object with its position, the others placed relative to it."""
    c = _Caption()
    a, rest = objs[0], objs[1:]
    form = rng.randrange(3)
    if form == 0:  # "a big blue star in the centre with a small red circle above it"
        text = f"{c.noun(rng, a, size=True)} {c.pos(rng, a)}"
        rels = [f"{c.noun(rng, o, size=True)} {c.rel(rng, o, a)} it" for o in rest]
        text += rng.choice((" with ", ", and ")) + _join(rels, rng)
    elif form == 1 and len(rest) == 1:  # "a small red circle above a big blue star in the centre"
        (b,) = rest
        text = f"{c.noun(rng, b, size=True)} {c.rel(rng, b, a)} {c.noun(rng, a, size=True)} {c.pos(rng, a)}"
    else:  # relations for some objects, positions for the others
        text = f"{c.noun(rng, a, size=True)} {c.pos(rng, a)}"
        b = rest[0]
        text += f", {c.noun(rng, b, size=True)} {c.rel(rng, b, a)} it"
        for o in rest[1:]:
            text += f" and {c.noun(rng, o, size=True)} {c.pos(rng, o)}"
    return text, c.facts


def _t_single(rng: random.Random, objs: list[dict]):
    """Templates for an image holding a single shape."""
    (o,) = objs
    c = _Caption()
    form = rng.randrange(6)
    if form == 0:
        text = f"{c.count(rng, 1)} {c.noun(rng, o, size=True)} {c.pos(rng, o)}"
    elif form == 1:
        c.facts.add("count:1")
        text = f"a single {c.noun(rng, o, size=True, article=False)} {c.pos(rng, o)}"
    elif form == 2:
        c.facts.add("count:1")
        text = f"{c.pos(rng, o)} there is only {c.noun(rng, o, size=True)}"
    elif form == 3:
        c.facts.add("count:1")
        text = f"{c.noun(rng, o, size=True)} alone {c.pos(rng, o)}"
    elif form == 4:
        c.facts.add("count:1")
        text = f"{c.noun(rng, o, size=True)} alone on a dark background"
    else:
        c.facts.add("count:1")
        text = f"just {c.noun(rng, o, size=False)} {c.pos(rng, o)}"
    return text, c.facts


def make_captions(
    rng: random.Random, objects: list[dict], k: int = CAPTIONS_PER_IMAGE, max_words: int = MAX_WORDS
):
    """k distinct captions (at most max_words words each) for an image and, for each,
    the sorted facts it asserts."""
    n = len(objects)
    if n == 1:
        plan = [_t_single] * k
    else:
        plan = [_t_listing, _t_relation, _t_mixed]
        extra = [_t_listing, _t_relation, _t_mixed, _t_no_size]
        plan += [rng.choice(extra) for _ in range(k - len(plan))]
        rng.shuffle(plan)
    captions: list[str] = []
    bare: set[str] = set()  # captions without the optional period, to keep them distinct
    facts: list[list[str]] = []
    for template in plan:
        for _ in range(100):
            order = list(objects)
            rng.shuffle(order)
            text, fset = template(rng, order)
            text = _clean(text)
            if text not in bare and len(text.split()) <= max_words:
                break
        else:  # pragma: no cover - the templates have far more than k variants
            raise RuntimeError(f"could not make {k} distinct captions for {objects}")
        bare.add(text)
        captions.append(text + "." if rng.random() < 0.2 else text)
        facts.append(sorted(fset))
    return captions, facts


# --------------------------------------------------------------------------- images


def make_objects(rng: random.Random, variant: str = "standard") -> list[dict]:
    """1-3 objects (dense: 3, each solid or hollow) in distinct grid cells with distinct
    (colour, shape) pairs."""
    dense = variant == "dense"
    n = 3 if dense else rng.choices([c for c, _ in _COUNT_WEIGHTS], weights=[w for _, w in _COUNT_WEIGHTS])[0]
    cells = rng.sample(range(9), n)
    seen: set[tuple[str, str]] = set()
    objects = []
    for cell in sorted(cells):
        while True:
            shape, colour = rng.choice(SHAPES), rng.choice(sorted(COLOURS))
            if (colour, shape) not in seen:
                break
        seen.add((colour, shape))
        objects.append(
            {"shape": shape, "colour": colour, "size": rng.choice(SIZES), "cell": [cell // 3, cell % 3]}
        )
        if dense:
            objects[-1]["style"] = rng.choice(STYLES)
    return objects


def _polygon(cx: float, cy: float, r: float, n: int, start: float, radii=None):
    pts = []
    for i in range(n):
        ang = start + 2 * np.pi * i / n
        rr = r if radii is None else radii[i % len(radii)]
        pts.append((cx + rr * np.cos(ang), cy + rr * np.sin(ang)))
    return pts


def _draw_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    """A hollow shape: the outline of `_draw_shape`'s solid one (1 px wide for small shapes,
    2 px for larger ones, so that a small hollow shape does not fill in)."""
    width = 1 if r < 8 else 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
        return
    h, t = r * 0.85, r * 0.36
    points = {
        "square": [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)],
        "triangle": [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)],
        "diamond": [(cx, cy - r), (cx + r * 0.72, cy), (cx, cy + r), (cx - r * 0.72, cy)],
        "star": _polygon(cx, cy, r, 10, -np.pi / 2, radii=(r, r * 0.45)),
        "cross": [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                  (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                  (cx - r, cy - t), (cx - t, cy - t)],
        "hexagon": _polygon(cx, cy, r, 6, 0.0),
    }[shape]
    draw.polygon(points, outline=colour, width=width)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.72, cy), (cx, cy + r), (cx - r * 0.72, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r, 10, -np.pi / 2, radii=(r, r * 0.45)), fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def render_image(objects: Sequence[dict], image_size: int, rng: random.Random, nrng: np.random.Generator,
                 occlude: Optional[int] = None):
    """Draw the objects on a dark, slightly noisy background; returns a PIL RGB image. `occlude`:
    the index of an object to cover with a square of noise (the occluded variant)."""
    s = image_size
    base = np.array([rng.randint(10, 40)] * 3, dtype=np.int16) + np.array(
        [rng.randint(-6, 6) for _ in range(3)], dtype=np.int16
    )
    noise = nrng.integers(-5, 6, size=(s, s, 1), dtype=np.int16)
    bg = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(img)
    cell = s / 3.0
    for o in objects:
        r = _SIZE_FRAC[o["size"]] * s / 2.0
        slack = max(0.0, cell / 2.0 - r - 1.0)  # keep a pixel of gap to the cell border
        jit = min(slack, 0.08 * s)
        cx = (o["cell"][1] + 0.5) * cell + rng.uniform(-jit, jit)
        cy = (o["cell"][0] + 0.5) * cell + rng.uniform(-jit, jit)
        fill = tuple(int(min(255, max(0, v + rng.randint(-12, 12)))) for v in COLOURS[o["colour"]])
        if o.get("style") == "hollow":
            _draw_outline(draw, o["shape"], cx, cy, r, fill)
        else:
            _draw_shape(draw, o["shape"], cx, cy, r, fill)
    if occlude is not None:  # the shape's whole grid cell under noise: nothing of it shows
        row, col = objects[occlude]["cell"]
        x0, y0 = int(col * cell), int(row * cell)
        x1, y1 = int((col + 1) * cell), int((row + 1) * cell)
        patch = nrng.integers(60, 256, size=(y1 - y0, x1 - x0, 3), dtype=np.uint8)
        img.paste(Image.fromarray(patch, "RGB"), (x0, y0))
    return img


# --------------------------------------------------------------------------- shards


def _split_rngs(seed: int, split: str) -> tuple[random.Random, np.random.Generator]:
    # String seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
    rng = random.Random(f"{GENERATOR}:{seed}:{split}")
    nrng = np.random.default_rng(rng.getrandbits(64))
    return rng, nrng


def _iter_samples(split: str, n: int, image_size: int, seed: int, jpeg_quality: int, variant: str = "standard"):
    rng, nrng = _split_rngs(seed, split)
    max_words = _DENSE_MAX_WORDS if variant == "dense" else MAX_WORDS
    for image_id in range(n):
        objects = make_objects(rng, variant)
        captions, facts = make_captions(rng, objects, max_words=max_words)
        occlude = None
        if variant == "occluded" and rng.random() < OCCLUDED_RATE:
            occlude = rng.randrange(len(objects))
        img = render_image(objects, image_size, rng, nrng, occlude)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
        meta = {"image_id": image_id, "captions": captions, "objects": objects, "caption_facts": facts}
        if occlude is not None:
            meta["occluded"] = occlude
        yield {
            "__key__": f"{split}{image_id:07d}",
            "jpg": buf.getvalue(),
            "json": json.dumps(meta, separators=(",", ":")).encode("utf-8"),
            "txt": captions[0].encode("utf-8"),  # for WebDataset pipelines that read one caption (open_clip)
        }


_SHARD_RE = re.compile(r"^(train|val|test)-\d{5}\.tar$")


def build_shapes_captions(
    out_dir: str,
    n_train: int = 4000,
    n_val: int = 250,
    n_test: int = 500,
    image_size: int = 64,
    shard_size: int = 500,
    seed: int = 0,
    jpeg_quality: int = 90,
    variant: str = "standard",
) -> dict:
    """Write ShapesCaptions shards and the index into out_dir; returns the index (dbl_index.json) as a dict.
    `variant`: "standard" (1-3 shapes), "dense" (3 shapes, each solid or hollow) or "occluded"
    (standard, with one shape covered by noise in OCCLUDED_RATE of the images).

    Shards are named ``{split}-{index:05d}.tar``; each is written under a temporary name
    and renamed when complete.  Shards of an earlier build that the new one does not
    list are removed.  Same arguments give byte-identical shards.
    """
    if image_size < 24:
        raise ValueError(f"image_size must be at least 24, got {image_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(counts.values()) < 0:
        raise ValueError(f"sample counts must be >= 0, got {counts}")
    os.makedirs(out_dir, exist_ok=True)
    sizes: dict = {}
    written: set[str] = set()
    bar = tqdm(total=sum(counts.values()), desc="ShapesCaptions", unit="img", leave=False,
               disable=not sys.stderr.isatty())  # a terminal only: logs stay clean
    for split in SPLITS:
        n = counts[split]
        samples = _iter_samples(split, n, image_size, seed, jpeg_quality, variant)
        shards = []
        for index, start in enumerate(range(0, n, shard_size)):
            name = f"{split}-{index:05d}.tar"
            count = min(shard_size, n - start)
            write_shard(os.path.join(out_dir, name), (next(samples) for _ in range(count)))
            bar.update(count)
            shards.append(name)
        written.update(shards)
        sizes[split] = {"shards": shards, "samples": n, "captions_per_image": CAPTIONS_PER_IMAGE}
    bar.close()
    sizes.update(
        {
            "image_size": int(image_size),
            "seed": int(seed),
            "generator": GENERATOR,
            "variant": variant,
            "shard_size": int(shard_size),
            "jpeg_quality": int(jpeg_quality),
        }
    )
    for name in os.listdir(out_dir):
        if _SHARD_RE.match(name) and name not in written:
            os.remove(os.path.join(out_dir, name))
    write_json_atomic(os.path.join(out_dir, INDEX), sizes)
    return sizes


def build_if_missing(out_dir: str, **kwargs) -> dict:
    """Return out_dir/dbl_index.json if it records the requested n_train/n_val/n_test,
    image_size and seed (and its shards exist); otherwise build and return the new one."""
    defaults = {"n_train": 4000, "n_val": 250, "n_test": 500, "image_size": 64, "seed": 0}
    want = {k: kwargs.get(k, v) for k, v in defaults.items()}
    path = os.path.join(out_dir, INDEX)
    try:
        with open(path) as f:
            sizes = json.load(f)
        ok = (
            sizes.get("generator") == GENERATOR
            and sizes.get("image_size") == want["image_size"]
            and sizes.get("seed") == want["seed"]
            and sizes.get("variant", "standard") == kwargs.get("variant", "standard")
            and all(sizes[s]["samples"] == want[f"n_{s}"] for s in SPLITS)
            and all(os.path.isfile(os.path.join(out_dir, n)) for s in SPLITS for n in sizes[s]["shards"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if ok:
        return sizes
    return build_shapes_captions(out_dir, **kwargs)


# --------------------------------------------------------------------------- oracle


def oracle_similarity(images_json: Sequence[dict], captions_facts: Sequence[Sequence[str]]) -> np.ndarray:
    """(n_images, n_captions) float32: share of each caption's facts that hold for each image."""
    vocab: dict[str, int] = {}
    for facts in captions_facts:
        for f in facts:
            vocab.setdefault(f, len(vocab))
    cap = np.zeros((len(captions_facts), max(1, len(vocab))), dtype=np.float32)
    for j, facts in enumerate(captions_facts):
        cap[j, [vocab[f] for f in facts]] = 1.0
    img = np.zeros((len(images_json), cap.shape[1]), dtype=np.float32)
    for i, meta in enumerate(images_json):
        idx = [vocab[f] for f in image_facts(meta["objects"]) if f in vocab]
        img[i, idx] = 1.0
    n_facts = np.maximum(cap.sum(axis=1), 1.0)
    return ((img @ cap.T) / n_facts[None, :]).astype(np.float32)


def oracle_rsum(test_jsons: Sequence[dict], seed: int = 0) -> float:
    """rSum of the fact oracle on a split (images in order, 5 captions each, in order), scored
    by the evaluation's own protocol (`retrieval_metrics`); a tiny seeded jitter breaks the
    oracle's many exact ties at random rather than by position."""
    from dbl_scale.evaluation.metrics import retrieval_metrics  # the tools stand on the library

    caps = [facts for meta in test_jsons for facts in meta["caption_facts"]]
    per = {len(m["caption_facts"]) for m in test_jsons}
    if len(per) != 1:
        raise ValueError(f"every image needs the same number of captions, got {sorted(per)}")
    sim = oracle_similarity(test_jsons, caps).astype(np.float64)
    sim += np.random.default_rng(seed).uniform(0.0, 1e-6, size=sim.shape)
    return float(retrieval_metrics(sim, captions_per_image=per.pop())["rsum"])


def read_split_jsons(out_dir: str, split: str) -> list[dict]:
    """The json records of one split, in image_id order (reads the shards with tarfile)."""
    import tarfile

    with open(os.path.join(out_dir, INDEX)) as f:
        sizes = json.load(f)
    metas = []
    for name in sizes[split]["shards"]:
        with tarfile.open(os.path.join(out_dir, name)) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    metas.append(json.loads(tf.extractfile(m).read()))
    metas.sort(key=lambda m: m["image_id"])
    return metas


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser, default_out: str | None = None) -> None:
    """The build options, shared by this module's command line and `dbl-scale data build`."""
    p.add_argument("--out", required=default_out is None, default=default_out,
                   help="output folder for the shards and their index, dbl_index.json")
    p.add_argument("--train", type=int, default=4000, help="training images")
    p.add_argument("--val", type=int, default=250, help="validation images")
    p.add_argument("--test", type=int, default=500, help="test images (5 captions each)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=500, help="images per shard")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the images")
    # argparse formats help with %: the rate's percent sign is written %%
    p.add_argument("--variant", choices=VARIANTS, default="standard",
                   help="dense: always 3 shapes, each also solid or hollow (harder negatives); occluded: one shape "
                        f"covered by noise in {round(OCCLUDED_RATE * 100)}%% of the images, the captions unchanged")
    p.add_argument("--oracle", action="store_true", help="also print the fact-oracle rSum of the test split")


def run(a: argparse.Namespace) -> int:
    """Build with the options of `add_arguments` and print what was written."""
    t0 = time.perf_counter()
    sizes = build_shapes_captions(
        a.out,
        n_train=a.train,
        n_val=a.val,
        n_test=a.test,
        image_size=a.image_size,
        shard_size=a.shard_size,
        seed=a.seed,
        jpeg_quality=a.jpeg_quality,
        variant=a.variant,
    )
    dt = time.perf_counter() - t0
    parts = [f"{s}={sizes[s]['samples']} ({len(sizes[s]['shards'])} shards)" for s in SPLITS]
    line = f"shapes_captions: {' '.join(parts)} image_size={a.image_size} seed={a.seed} in {dt:.1f}s -> {a.out}"
    if a.oracle and sizes["test"]["samples"]:
        line += f"; oracle test rSum={oracle_rsum(read_split_jsons(a.out, 'test'), seed=a.seed):.1f}"
    print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.shapes_captions", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
