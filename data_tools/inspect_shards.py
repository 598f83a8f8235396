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

from dbl_scale.shards import INDEX, DataError, good_captions, index_splits, key_and_extension, raw_captions


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
    """The index of a shard set; a DataError that says what `root` is instead and what to do."""
    folder, path = Path(root), Path(root) / INDEX
    if not folder.exists():
        raise DataError(f"no folder {root}: give a shard set's folder (one holding {INDEX}, written by dbl-scale "
                        f"data build or dbl-scale data convert)")
    if not folder.is_dir():
        raise DataError(f"{root} is a file, not a folder: give the folder that holds {INDEX} and the .tar shards")
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir())
        held = f"it holds {', '.join(found[:5])}{', ...' if len(found) > 5 else ''}" if found else "it is empty"
        raise DataError(f"{root} is not a shard set ({held}; no {INDEX}): write one with dbl-scale data build --out "
                        f"{root} (ShapesCaptions) or dbl-scale data convert ... --out {root}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} does not read as JSON ({exc}): rewrite the shard set, or restore the file") from exc


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
    problems: list = field(default_factory=list)  # (severity, "shard: sample: what"); any makes the set unusable
    warnings: list = field(default_factory=list)  # what the converter skipped (missing images ...)

    @property
    def errors(self) -> list:
        """The problems, the gravest first (an unreadable tar before the counts it upsets)."""
        return [text for _, text in sorted(self.problems, key=lambda p: p[0])]


# severities, gravest first
UNREADABLE, BAD_SAMPLE, COUNT, DUPLICATE = range(4)


def verify(root: str) -> Report:
    """Every tar reads, its sample count matches the index, every image decodes, every sample
    has a non-empty caption, image ids are unique within each split (each split may number
    its images from 0)."""
    index, report = read_index(root), Report()
    for split in index_splits(index):
        n, ids = 0, {}
        for shard in index[split]["shards"]:
            try:
                for s in samples(str(Path(root) / shard)):
                    n += 1
                    where = f"{shard}: {s.key}"
                    problem = _sample_problem(s)
                    if problem:
                        report.problems.append((BAD_SAMPLE, f"{where}: {problem}"))
                    image_id = s.meta.get("image_id")
                    if image_id is not None:
                        if image_id in ids:
                            report.problems.append((DUPLICATE, f"{where}: image id {image_id} also in {ids[image_id]} "
                                                               f"(split '{split}')"))
                        ids[image_id] = where
            except (OSError, tarfile.TarError) as exc:
                report.problems.append((UNREADABLE, f"{shard}: unreadable tar (after {n} samples of split '{split}'): "
                                                    f"{exc}; convert it again"))
        report.samples[split] = n
        if n != index[split]["samples"]:
            report.problems.append((COUNT, f"split '{split}': {n} samples in its shards, the index says "
                                           f"{index[split]['samples']}"))
    report.warnings = [f"{p.get('split', '?')}: {p['sample']}: {p['problem']}" for p in index.get("problems", [])]
    return report


def _sample_problem(s: Sample) -> Optional[str]:
    """What is wrong with one sample (no image, an image or features that do not decode, no
    caption), or None."""
    if s.image is None:
        return "no image"
    try:
        if s.features:
            f = np.load(io.BytesIO(s.image), allow_pickle=False)
            if f.ndim != 2 or not np.isfinite(f).all():
                raise ValueError(f"shape {f.shape}, or values not finite")
        else:
            with Image.open(io.BytesIO(s.image)) as img:
                img.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the sample's problem
        return f"{'features do' if s.features else 'image does'} not decode: {exc}"
    if not good_captions(s.captions):
        return "no non-empty caption"
    return None


# ----------------------------------------------------------------------------- stats

def stats(root: str, png: Optional[str] = None) -> str:
    """Samples, captions per image, caption lengths (words) and image sizes per split, as text;
    the same histograms as a PNG when `png` is given."""
    index = read_index(root)
    per_split = {}
    for split in index_splits(index):
        caps, words, sides, aspect = collections.Counter(), [], [], []
        for s in _split_samples(root, index, split):
            good = good_captions(s.captions)
            caps[len(good)] += 1
            words += [len(c.split()) for c in good]
            size = _image_size(s)
            if size:
                sides.append(max(size))
                aspect.append(size[0] / size[1])
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
    if split not in index_splits(index):
        raise DataError(f"split '{split}' not in {Path(root) / INDEX}; splits there: {', '.join(index_splits(index))}")
    cells = []
    for s in _split_samples(root, index, split):
        if len(cells) == n:
            break
        caps = "".join(f"<li>{html.escape(str(c))}</li>" for c in s.captions)
        try:
            picture, what = _picture(s, thumb)
        except Exception as exc:  # noqa: BLE001 - a sample that does not decode is shown as such
            picture, what = f"<div>does not decode: {html.escape(str(exc))}</div>", "broken"
        cells.append(f'<div class="c">{picture}<div class="k">{html.escape(s.key)} ({what}, '
                     f'{html.escape(s.shard)})</div><ol>{caps}</ol></div>')
    page = ("<!doctype html><meta charset='utf-8'><title>preview</title><style>"
            "body{font:13px sans-serif}.c{display:inline-block;vertical-align:top;width:340px;margin:6px}"
            ".k{color:#666}ol{margin:4px 0;padding-left:18px}</style>"
            f"<h3>{html.escape(str(root))}: split {html.escape(split)}, first {len(cells)} samples</h3>"
            + "".join(cells))
    Path(out).write_text(page, encoding="utf-8")
    return len(cells)


def _split_samples(root: str, index: dict, split: str) -> Iterator[Sample]:
    """The samples of a split in shard order; a shard that does not read is one DataError."""
    for shard in index[split]["shards"]:
        try:
            yield from samples(str(Path(root) / shard))
        except (OSError, tarfile.TarError) as exc:
            raise DataError(f"{shard} of {root} does not read ({exc}): dbl-scale data verify {root} lists every "
                            "problem") from exc


def _image_size(s: Sample) -> Optional[tuple]:
    if s.image is None or s.features:
        return None
    try:
        with Image.open(io.BytesIO(s.image)) as img:
            return img.size
    except Exception:  # noqa: BLE001 - `verify` reports it; statistics skip it
        return None


def _picture(s: Sample, thumb: int) -> tuple[str, str]:
    """A sample's thumbnail as inline HTML, and what it is (its size, or its features' shape)."""
    if s.image is None:
        return "<div>no image</div>", "no image"
    if s.features:  # region features: their shape instead of a picture
        shape = np.load(io.BytesIO(s.image), allow_pickle=False).shape
        return f"<div>region features {shape[0]} x {shape[1]}</div>", "features"
    with Image.open(io.BytesIO(s.image)) as img:
        img = img.convert("RGB")
        what = f"{img.size[0]}x{img.size[1]}"
        img.thumbnail((thumb, thumb))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">', what
