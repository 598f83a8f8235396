"""Look at a shard set before training on it: `verify` (does every sample read?), `stats`
(what is in it), `preview` (an HTML contact sheet). Problems name the shard and the sample."""
from __future__ import annotations

import base64
import collections
import html
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from dbl_scale.shards import INDEX, good_captions, index_splits, key_and_extension, raw_captions


@dataclass
class Sample:
    shard: str
    key: str
    image: Optional[bytes]  # encoded image, or region features (.npy) when `features`
    meta: dict
    txt: Optional[str]
    features: bool = False

    @property
    def captions(self) -> list:
        return raw_captions(self.meta, self.txt)


def read_index(root: str) -> dict:
    path = Path(root) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a converted shard set (dbl-scale data convert ...)")
    return json.loads(path.read_text())


def samples(path: str) -> Iterator[Sample]:
    """The samples of one tar in order (members grouped by key, WebDataset's rule)."""
    current: Optional[dict] = None
    with tarfile.open(path, "r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, ext = key_and_extension(m.name)
            if current is None or current["key"] != key:
                if current is not None:
                    yield _sample(path, current)
                current = {"key": key}
            current[ext] = tf.extractfile(m).read()
    if current is not None:
        yield _sample(path, current)


def _sample(path: str, members: dict) -> Sample:
    image = next((members[k] for k in ("jpg", "jpeg", "png", "webp", "npy") if k in members), None)
    meta = json.loads(members["json"]) if "json" in members else {}
    txt = members["txt"].decode("utf-8") if "txt" in members else None
    return Sample(Path(path).name, members["key"], image, meta, txt, "npy" in members)


# ----------------------------------------------------------------------------- verify

@dataclass
class Report:
    samples: dict = field(default_factory=dict)  # split -> samples read
    errors: list = field(default_factory=list)  # "shard: sample: what"; any makes the set unusable
    warnings: list = field(default_factory=list)  # what the converter skipped (missing images ...)


def verify(root: str) -> Report:
    """Every tar reads, its sample count matches the index, every image decodes, every sample
    has a non-empty caption, image ids are unique."""
    index, report = read_index(root), Report()
    ids: dict = {}
    for split in index_splits(index):
        n = 0
        for shard in index[split]["shards"]:
            try:
                for s in samples(str(Path(root) / shard)):
                    n += 1
                    where = f"{shard}: {s.key}"
                    if s.image is None:
                        report.errors.append(f"{where}: no image")
                    else:
                        try:
                            if s.features:
                                f = np.load(io.BytesIO(s.image), allow_pickle=False)
                                if f.ndim != 2 or not np.isfinite(f).all():
                                    raise ValueError(f"shape {f.shape}, or values not finite")
                            else:
                                with Image.open(io.BytesIO(s.image)) as img:
                                    img.load()
                        except Exception as exc:
                            report.errors.append(f"{where}: {'features do' if s.features else 'image does'} "
                                                 f"not decode: {exc}")
                    if not good_captions(s.captions):
                        report.errors.append(f"{where}: no non-empty caption")
                    image_id = s.meta.get("image_id")
                    if image_id is not None:
                        if image_id in ids:
                            report.errors.append(f"{where}: image id {image_id} also in {ids[image_id]}")
                        ids[image_id] = where
            except (OSError, tarfile.TarError) as exc:
                report.errors.append(f"{shard}: unreadable tar: {exc}")
        report.samples[split] = n
        if n != index[split]["samples"]:
            report.errors.append(f"split '{split}': {n} samples in its shards, the index says "
                                 f"{index[split]['samples']}")
    report.warnings = [f"{p.get('split', '?')}: {p['sample']}: {p['problem']}" for p in index.get("problems", [])]
    return report


# ----------------------------------------------------------------------------- stats

def stats(root: str, png: Optional[str] = None) -> str:
    """Samples, captions per image, caption lengths (words) and image sizes per split, as text;
    the same histograms as a PNG when `png` is given."""
    index = read_index(root)
    per_split = {}
    for split in index_splits(index):
        caps, words, sides, aspect = collections.Counter(), [], [], []
        for shard in index[split]["shards"]:
            for s in samples(str(Path(root) / shard)):
                good = good_captions(s.captions)
                caps[len(good)] += 1
                words += [len(c.split()) for c in good]
                if s.image is not None and not s.features:
                    with Image.open(io.BytesIO(s.image)) as img:
                        sides.append(max(img.size))
                        aspect.append(img.size[0] / img.size[1])
        per_split[split] = {"images": sum(caps.values()), "captions": len(words), "captions_per_image": caps,
                            "words": words, "sides": sides, "aspect": aspect}
    lines = []
    for split, st in per_split.items():
        per_image = ", ".join(f"{k}: {v}" for k, v in sorted(st["captions_per_image"].items()))
        lines.append(f"{split}: {st['images']} images, {st['captions']} captions (captions per image: {per_image})")
        lines.append("  caption words: " + _summary(st["words"]))
        lines.append("  image longer side (px): " + _summary(st["sides"]))
        lines.append("  aspect ratio (w/h): " + _summary(st["aspect"], digits=2))
    if png:
        _plot(per_split, png)
        lines.append(f"histograms: {png}")
    return "\n".join(lines)


def _summary(values: list, digits: int = 0) -> str:
    if not values:
        return "none"
    v = sorted(values)
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
    f = f"{{:.{digits}f}}"
    return (f"min {f.format(v[0])}, median {f.format(q(0.5))}, 95% {f.format(q(0.95))}, max {f.format(v[-1])}")


def _plot(per_split: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for split, st in per_split.items():
        axes[0].hist(st["words"], bins=30, alpha=0.5, label=split)
        axes[1].hist(st["sides"], bins=30, alpha=0.5, label=split)
        ks = sorted(st["captions_per_image"])
        axes[2].bar([f"{k}" for k in ks], [st["captions_per_image"][k] for k in ks], alpha=0.5, label=split)
    for ax, title in zip(axes, ("caption length (words)", "image longer side (px)", "captions per image")):
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- preview

def preview(root: str, out: str, split: Optional[str] = None, n: int = 48, thumb: int = 160) -> int:
    """An HTML contact sheet of the first `n` samples of a split, images inlined; returns how
    many samples it shows."""
    index = read_index(root)
    split = split or index_splits(index)[0]
    if split not in index:
        raise KeyError(f"split '{split}' not in {Path(root) / INDEX}; splits there: {index_splits(index)}")
    cells = []
    for shard in index[split]["shards"]:
        for s in samples(str(Path(root) / shard)):
            if len(cells) == n:
                break
            caps = "".join(f"<li>{html.escape(str(c))}</li>" for c in s.captions)
            if s.features:  # region features: their shape instead of a picture
                shape = np.load(io.BytesIO(s.image), allow_pickle=False).shape
                picture, what = f"<div>region features {shape[0]} x {shape[1]}</div>", "features"
            else:
                with Image.open(io.BytesIO(s.image)) as img:
                    img = img.convert("RGB")
                    what = f"{img.size[0]}x{img.size[1]}"
                    img.thumbnail((thumb, thumb))
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=85)
                picture = f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'
            cells.append(f'<div class="c">{picture}<div class="k">{html.escape(s.key)} ({what}, '
                         f'{html.escape(s.shard)})</div><ol>{caps}</ol></div>')
        if len(cells) == n:
            break
    page = ("<!doctype html><meta charset='utf-8'><title>preview</title><style>"
            "body{font:13px sans-serif}.c{display:inline-block;vertical-align:top;width:340px;margin:6px}"
            ".k{color:#666}ol{margin:4px 0;padding-left:18px}</style>"
            f"<h3>{html.escape(str(root))}: split {html.escape(split)}, first {len(cells)} samples</h3>"
            + "".join(cells))
    Path(out).write_text(page, encoding="utf-8")
    return len(cells)
