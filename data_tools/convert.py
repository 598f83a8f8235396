"""Converters: a user's images and captions -> training shards and their index.

Every source (a Karpathy JSON, a table, a folder, WebDataset tars) is read into `Item`s, one
per image with all its captions, grouped into splits; `write_shards` does the rest the same
way for all of them:
- one sample per image: `jpg` (resized so its longer side is at most `max_side`, aspect ratio
  kept; an image already small enough and already a JPEG is copied as it is), `json`
  `{"image_id", "captions", "source"}` with every caption (what training reads), and `txt`, the
  first caption alone (what open_clip's and clip-retrieval's WebDataset pipelines read);
- `{split}-NNNNN.tar` shards of `shard_size` samples, written by a pool of processes, each
  through a temporary file renamed when complete;
- resumable: `_convert/{split}-NNNNN.json` records a finished shard with a hash of what went
  into it (its items and the image options); a re-run keeps those shards and writes the rest;
- a missing or unreadable image, or an image left without a caption, is skipped, counted and
  listed in the index (`problems`); `strict` turns any of them into a `ConvertError`, and an
  empty caption (dropped) into one too;
- `dbl_index.json` last: a folder with an index is a complete shard set.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from dbl_scale.shards import (INDEX, good_captions, key_and_extension, raw_captions, shard_url, string_id,
                     write_json_atomic, write_shard)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CAPTIONS_PER_IMAGE = 5  # the COCO / Flickr30K protocol
STATE = "_convert"  # per-shard records of a conversion, for resuming


class ConvertError(RuntimeError):
    """The input cannot be converted as asked; the message names the file and the sample."""


@dataclass
class TarMember:
    """An image inside a tar file, read by offset (so a worker needs no index of the tar)."""
    path: str
    offset: int
    size: int


@dataclass
class FeatureRow:
    """One image's region features: a row of a (memory-mapped) `*_ims.npy`."""
    path: str
    row: int


@dataclass
class Item:
    """One image with all its captions. `name` says where it came from, in messages."""
    image_id: int
    captions: list[str]
    image: Union[str, bytes, TarMember, FeatureRow]  # a file path, bytes, a member of a local tar, features
    name: str
    empty_captions: int = 0  # empty captions dropped while reading the source


@dataclass
class Options:
    out: str
    shard_size: int = 1000
    max_side: int = 512  # 0 keeps every image's size
    quality: int = 90
    processes: int = 2
    strict: bool = False
    progress: bool = True
    source: dict = field(default_factory=dict)  # what was converted, recorded in the index


# ----------------------------------------------------------------------------- writing

def write_shards(splits: dict[str, list[Item]], opts: Options) -> dict:
    """Write every split's shards (resuming a conversion that stopped) and the index; returns it."""
    if opts.shard_size < 1:
        raise ConvertError(f"--shard-size must be >= 1, got {opts.shard_size}")
    _check_unique_ids(splits)
    out = Path(opts.out)
    (out / STATE).mkdir(parents=True, exist_ok=True)
    tasks, done = [], {}
    for split, items in splits.items():
        for n, start in enumerate(range(0, len(items), opts.shard_size)):
            name = f"{split}-{n:05d}.tar"
            chunk = items[start:start + opts.shard_size]
            plan = _plan_hash(chunk, opts)
            record = _finished(out, name, plan)
            if record is not None:
                done[name] = record
            else:
                tasks.append((str(out), name, chunk, opts.max_side, opts.quality, plan))
    total = sum(len(t[2]) for t in tasks)
    if done:
        print(f"resuming: {len(done)} shard(s) already written, {len(tasks)} to go", flush=True)
    bar = tqdm(total=total, unit="img", desc=f"converting into {out}", disable=not opts.progress)
    if opts.processes > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(opts.processes) as pool:
            for record in pool.map(_write_one, tasks):
                done[record["shard"]] = record
                bar.update(record["items"])
    else:
        for task in tasks:
            record = _write_one(task)
            done[record["shard"]] = record
            bar.update(record["items"])
    bar.close()
    _remove_stale(out, set(done))
    return _write_index(out, splits, done, opts)


def _write_one(task) -> dict:
    """One shard: encode its items, write the tar, then the record that it is finished."""
    out, name, items, max_side, quality, plan = task
    samples, problems = [], []
    for item in items:
        captions = [c.strip() for c in item.captions if isinstance(c, str) and c.strip()]
        dropped = item.empty_captions + len(item.captions) - len(captions)
        if dropped:
            problems.append({"sample": item.name, "problem": f"{dropped} empty caption(s) dropped"})
        if not captions:
            problems.append({"sample": item.name, "problem": "no caption: image skipped", "skipped": True})
            continue
        if isinstance(item.image, FeatureRow):
            buf = io.BytesIO()
            np.save(buf, np.asarray(np.load(item.image.path, mmap_mode="r")[item.image.row]), allow_pickle=False)
            meta = {"image_id": item.image_id, "captions": captions, "source": item.name}
            samples.append({"__key__": f"{item.image_id:012d}", "npy": buf.getvalue(),
                            "json": json.dumps(meta).encode(), "txt": captions[0].encode()})
            continue
        try:
            jpg = encode_image(item.image, max_side, quality)
        except FileNotFoundError:
            problems.append({"sample": item.name, "problem": f"missing image {item.image}", "skipped": True})
            continue
        except Exception as exc:  # PIL raises several types for a broken file
            problems.append({"sample": item.name, "problem": f"unreadable image: {exc}", "skipped": True})
            continue
        meta = {"image_id": item.image_id, "captions": captions, "source": item.name}
        # json: every caption (what training reads); txt: the first, for pipelines that read one (open_clip)
        samples.append({"__key__": f"{item.image_id:012d}", "jpg": jpg, "json": json.dumps(meta).encode(),
                        "txt": captions[0].encode()})
    write_shard(os.path.join(out, name), samples)
    record = {"shard": name, "plan": plan, "items": len(items), "samples": len(samples),
              "captions": sum(len(json.loads(s["json"])["captions"]) for s in samples), "problems": problems}
    write_json_atomic(os.path.join(out, STATE, name[:-len(".tar")] + ".json"), record, durable=False)
    return record


def encode_image(image: Union[str, bytes, TarMember], max_side: int, quality: int) -> bytes:
    """The image as JPEG bytes, its longer side at most `max_side` (aspect ratio kept). A JPEG
    that needs no resizing is copied byte for byte (after a full decode, so a broken one fails)."""
    if isinstance(image, TarMember):
        with open(image.path, "rb") as f:
            f.seek(image.offset)
            data = f.read(image.size)
    elif isinstance(image, bytes):
        data = image
    else:
        with open(image, "rb") as f:
            data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        if max_side and max(img.size) > max_side:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale, much faster
            scale = max_side / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.convert("RGB").resize(size, Image.BICUBIC)
        elif fmt == "JPEG" and img.mode == "RGB":
            img.load()
            return data
        else:
            img = img.convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def _plan_hash(items: list[Item], opts: Options) -> str:
    h = hashlib.sha1(json.dumps([opts.max_side, opts.quality]).encode())
    for it in items:
        if isinstance(it.image, str):
            image = it.image
        elif isinstance(it.image, TarMember):
            image = [it.image.path, it.image.offset, it.image.size]
        elif isinstance(it.image, FeatureRow):
            image = [it.image.path, it.image.row]
        else:
            image = hashlib.sha1(it.image).hexdigest()
        h.update(json.dumps([it.image_id, it.captions, image, it.empty_captions]).encode())
    return h.hexdigest()


def _finished(out: Path, name: str, plan: str) -> Optional[dict]:
    record_path = out / STATE / (name[:-len(".tar")] + ".json")
    if not (out / name).exists() or not record_path.exists():
        return None
    try:
        record = json.loads(record_path.read_text())
    except ValueError:
        return None
    return record if record.get("plan") == plan else None


def _remove_stale(out: Path, names: set[str]) -> None:
    """Shards (and their records) of an earlier conversion that this one does not list."""
    pattern = re.compile(r"^[\w.-]+-\d{5}\.tar$")
    for path in out.iterdir():
        if pattern.match(path.name) and path.name not in names:
            path.unlink()
            (out / STATE / (path.name[:-len(".tar")] + ".json")).unlink(missing_ok=True)


def _write_index(out: Path, splits: dict[str, list[Item]], done: dict, opts: Options) -> dict:
    index: dict = {"format": "dbl_scale shards v1", "source": opts.source,
                   "image": {"max_side": opts.max_side, "quality": opts.quality}, "shard_size": opts.shard_size}
    problems = []
    for split in splits:
        records = [done[n] for n in sorted(done) if n.rsplit("-", 1)[0] == split]
        shards = [r["shard"] for r in records if r["samples"]]
        index[split] = {"shards": shards, "samples": sum(r["samples"] for r in records),
                        "captions": sum(r["captions"] for r in records),
                        "skipped": sum(1 for r in records for p in r["problems"] if p.get("skipped"))}
        problems += [dict(p, split=split) for r in records for p in r["problems"]]
    index["problems"] = problems
    if problems:
        shown = "\n".join(f"  {p['split']}: {p['sample']}: {p['problem']}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more (all in {out / INDEX})" if len(problems) > 10 else ""
        print(f"{len(problems)} problem(s):\n{shown}{more}", flush=True)
        if opts.strict:
            raise ConvertError(f"{len(problems)} problem(s) in the input (--strict); the shards are written "
                               f"but {out / INDEX} is not; first: {problems[0]['sample']}: {problems[0]['problem']}")
    write_json_atomic(str(out / INDEX), index)
    return index


def _check_unique_ids(splits: dict[str, list[Item]]) -> None:
    seen: dict[int, str] = {}
    for items in splits.values():
        for it in items:
            if it.image_id in seen:
                raise ConvertError(f"duplicate image id {it.image_id}: {seen[it.image_id]} and {it.name}")
            seen[it.image_id] = it.name


def split_of(key: str, val_frac: float, test_frac: float) -> str:
    """A split drawn from the image's key: deterministic, the same on every machine and re-run."""
    u = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / 16 ** 12
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def _check_fracs(val_frac: float, test_frac: float) -> None:
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ConvertError(f"--val-frac {val_frac} and --test-frac {test_frac}: each in [0, 1), their sum below 1")


# ----------------------------------------------------------------------------- sources

def karpathy(json_path: str, images: str, restval: str = "train") -> dict[str, list[Item]]:
    """COCO or Flickr30K in the Karpathy split file (`dataset_coco.json`, `dataset_flickr30k.json`):
    `cocoid` (else `imgid`) is the image id, the file's splits are kept, the first 5 captions of
    each image are kept (the standard protocol). `restval` (COCO's extra 30K): "train" adds it
    to train, "keep" keeps it as its own split, "drop" leaves it out."""
    if restval not in ("train", "keep", "drop"):
        raise ConvertError(f"--restval {restval!r}: expected train, keep or drop")
    try:
        data = json.loads(Path(json_path).read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{json_path}: cannot read the Karpathy JSON: {exc}") from exc
    if "images" not in data:
        raise ConvertError(f"{json_path}: no 'images' list; is this a Karpathy split file (dataset_coco.json)?")
    splits: dict[str, list[Item]] = {}
    for n, img in enumerate(data["images"]):
        image_id = img.get("cocoid", img.get("imgid"))
        if image_id is None or "filename" not in img or "split" not in img:
            raise ConvertError(f"{json_path}: images[{n}] lacks cocoid/imgid, filename or split")
        split = img["split"]
        if split == "restval":
            if restval == "drop":
                continue
            split = "train" if restval == "train" else "restval"
        path = Path(images) / img.get("filepath", "") / img["filename"]
        raw = [s.get("raw", " ".join(s.get("tokens", []))) for s in img.get("sentences", [])]
        kept = raw[:CAPTIONS_PER_IMAGE]
        splits.setdefault(split, []).append(Item(int(image_id), kept, str(path), f"{img['filename']} (id {image_id})"))
    return splits


def table(file: str, image_col: str, caption_col: str, images_root: str = "", split_col: Optional[str] = None,
          val_frac: float = 0.0, test_frac: float = 0.0) -> dict[str, list[Item]]:
    """A CSV, TSV, JSONL or Parquet table of (image, caption) rows. Rows are grouped by image
    (in the order images first appear); splits come from `split_col`, or are drawn by image
    (never by row) with `val_frac` / `test_frac`."""
    _check_fracs(val_frac, test_frac)
    rows, columns = _read_table(file)
    for col in (image_col, caption_col, split_col):
        if col and col not in columns:
            raise ConvertError(f"{file}: no column '{col}'; its columns: {', '.join(columns)}")
    groups: dict[str, Item] = {}
    split_by_image: dict[str, str] = {}
    for n, row in enumerate(rows):
        image = str(row[image_col])
        caption = row[caption_col]
        item = groups.get(image)
        if item is None:
            item = groups[image] = Item(len(groups), [], str(Path(images_root) / image), image)
        if isinstance(caption, str) and caption.strip():
            item.captions.append(caption)
        else:
            item.empty_captions += 1
        if split_col:
            split = str(row[split_col])
            if split_by_image.setdefault(image, split) != split:
                raise ConvertError(f"{file}: row {n + 1}: image {image} is in split '{split}' here and in "
                                   f"'{split_by_image[image]}' on an earlier row")
    splits: dict[str, list[Item]] = {}
    for image, item in groups.items():
        split = split_by_image[image] if split_col else split_of(image, val_frac, test_frac)
        splits.setdefault(split, []).append(item)
    return splits


def _read_table(file: str) -> tuple[list[dict], list[str]]:
    suffix = Path(file).suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(file, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                return list(reader), list(reader.fieldnames or [])
        if suffix in (".jsonl", ".json"):
            rows = []
            with open(file, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as exc:
                            raise ConvertError(f"{file}: line {n} is not JSON: {exc}") from exc
            return rows, sorted({k for r in rows for k in r})
        if suffix == ".parquet":
            import pyarrow.parquet as pq  # comes with mlflow

            t = pq.read_table(file)
            return t.to_pylist(), list(t.column_names)
    except OSError as exc:
        raise ConvertError(f"{file}: {exc}") from exc
    raise ConvertError(f"{file}: unknown table type '{suffix}'; expected .csv, .tsv, .jsonl or .parquet")


def folder(images: str, val_frac: float = 0.0, test_frac: float = 0.0) -> dict[str, list[Item]]:
    """A folder tree of images, each with a sidecar `.txt` of the same stem holding its captions,
    one per line. Ids follow the sorted relative paths; splits are drawn by image."""
    _check_fracs(val_frac, test_frac)
    root = Path(images)
    if not root.is_dir():
        raise ConvertError(f"{images} is not a folder")
    splits: dict[str, list[Item]] = {}
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ConvertError(f"{images}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for n, path in enumerate(paths):
        rel = str(path.relative_to(root))
        sidecar = path.with_suffix(".txt")
        lines = sidecar.read_text(encoding="utf-8").splitlines() if sidecar.exists() else []
        captions = [line for line in lines if line.strip()]
        item = Item(n, captions, str(path), rel)  # blank lines separate captions: not empty captions
        if not sidecar.exists():
            item.name = f"{rel} (no {sidecar.name})"
        splits.setdefault(split_of(rel, val_frac, test_frac), []).append(item)
    return splits


def wds(shards: str, val_frac: float = 0.0, test_frac: float = 0.0) -> dict[str, list[Item]]:
    """Existing WebDataset or img2dataset tars. Captions: `json["captions"]`, else `.txt` or
    `json["caption"]` (`raw_captions`, as training reads them); samples with the same
    `json["image_id"]` are grouped into one image (else each key is an image); string ids map
    to integer ids. Local tars are read by offset
    in the workers; other URLs (`pipe:`, `s3://`) are held in memory, so convert those in parts."""
    from braceexpand import braceexpand

    _check_fracs(val_frac, test_frac)
    groups: dict[str, Item] = {}
    for url in braceexpand(shards):
        for key, image, meta, txt in _tar_samples(url):
            if image is None:
                continue
            meta = meta if isinstance(meta, dict) else {}
            group = str(meta.get("image_id", key))
            captions = raw_captions(meta, txt)
            good = good_captions(captions)
            item = groups.get(group)
            if item is None:
                raw_id = meta.get("image_id")
                image_id = raw_id if isinstance(raw_id, int) else string_id(group)
                item = groups[group] = Item(image_id, [], image, f"{url}:{key}")
            item.captions += good
            item.empty_captions += len(captions) - len(good)
    if not groups:
        raise ConvertError(f"{shards}: no samples with an image (.jpg, .jpeg, .png, .webp)")
    splits: dict[str, list[Item]] = {}
    for group, item in groups.items():
        splits.setdefault(split_of(group, val_frac, test_frac), []).append(item)
    return splits


PRECOMP_SPLITS = {"train": "train", "dev": "val", "test": "test", "testall": "testall"}


def precomp(folder: str) -> dict[str, list[Item]]:
    """SCAN / VSE-infinity precomputed region features (`{split}_ims.npy`: one row of R x D
    features per image, or 5 identical rows per image as some test files have, and
    `{split}_caps.txt`: 5 captions per image, in order). `dev` becomes `val`, `testall`
    (COCO 5K) stays. Image ids count up over the splits in that order."""
    root = Path(folder)
    splits: dict[str, list[Item]] = {}
    next_id = 0
    for src, split in PRECOMP_SPLITS.items():
        ims, caps = root / f"{src}_ims.npy", root / f"{src}_caps.txt"
        if not ims.exists() and not caps.exists():
            continue
        for path in (ims, caps):
            if not path.exists():
                raise ConvertError(f"{path} not found (its partner {ims.name if path == caps else caps.name} is there)")
        features = np.load(ims, mmap_mode="r")
        lines = caps.read_text(encoding="utf-8").splitlines()
        if len(lines) % CAPTIONS_PER_IMAGE:
            raise ConvertError(f"{caps}: {len(lines)} lines, not {CAPTIONS_PER_IMAGE} captions per image")
        n = len(lines) // CAPTIONS_PER_IMAGE
        if features.ndim != 3 or features.shape[0] not in (n, CAPTIONS_PER_IMAGE * n):
            raise ConvertError(f"{ims}: shape {features.shape}; expected ({n} or {CAPTIONS_PER_IMAGE * n}, regions, "
                               f"dim) for the {n} images of {caps.name}")
        div = features.shape[0] // n
        splits[split] = [Item(next_id + i, lines[CAPTIONS_PER_IMAGE * i:CAPTIONS_PER_IMAGE * (i + 1)],
                              FeatureRow(str(ims), i * div), f"{ims.name} row {i * div}") for i in range(n)]
        next_id += n
    if not splits:
        raise ConvertError(f"{folder}: no {{train,dev,test,testall}}_ims.npy with _caps.txt")
    return splits


def _tar_samples(url: str) -> Iterator[tuple[str, object, dict, Optional[str]]]:
    """(key, image, json, txt) per sample of one tar: the image as a TarMember for a local file,
    as bytes otherwise."""
    local = "://" not in url and not url.startswith("pipe:")
    if local and not Path(url).exists():
        raise ConvertError(f"{url}: no such file")
    samples: dict[str, dict] = {}
    order: list[str] = []
    try:
        if local:
            tf = tarfile.open(url, "r:")
        else:
            from webdataset.gopen import gopen

            tf = tarfile.open(fileobj=gopen(shard_url(url)), mode="r|")
        with tf:
            for m in tf:
                if not m.isfile() or "." not in Path(m.name).name:
                    continue
                key, ext = key_and_extension(m.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if ext in ("jpg", "jpeg", "png", "webp"):
                    samples[key]["image"] = (TarMember(url, m.offset_data, m.size) if local
                                             else tf.extractfile(m).read())
                elif ext == "json":
                    samples[key]["json"] = json.loads(tf.extractfile(m).read() or b"{}")
                elif ext == "txt":
                    samples[key]["txt"] = tf.extractfile(m).read().decode("utf-8")
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise ConvertError(f"{url}: unreadable tar: {exc}") from exc
    for key in order:
        s = samples[key]
        yield key, s.get("image"), s.get("json", {}), s.get("txt")
