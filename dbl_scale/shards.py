"""Shard sets: the index's name, the rules every reader and writer of shards shares (a tar
member's key, a sample's captions, string ids, what a URL is), and the atomic writes every
writer uses (a reader, or a resumed converter, sees a whole file or none). The converters in
`data_tools/` stand on this module, not the other way round."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from .errors import DataError  # noqa: F401  (shard readers raise it)

INDEX = "dbl_index.json"  # our own name: open_clip's `sizes.json` is a different file
TAR_MTIME = 1704067200  # fixed member times (2024-01-01): the same input gives byte-identical shards


def write_shard(path: str, samples: Iterable[dict]) -> None:
    """Write WebDataset samples (dicts of `__key__` and encoded members) to `path`, through a
    temporary file that is fsync'd and renamed only when complete."""
    import webdataset as wds  # heavy-ish: only writers need it

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            with wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as w:
                for sample in samples:
                    w.write(sample)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj: dict, durable: bool = True) -> None:
    """Write through a temporary file and rename. `durable=False` skips the fsync, for records
    that are only a shortcut (a converter's per-shard records: a lost one redoes its shard)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def string_id(key: str) -> int:
    """A string id as a non-negative int64 (60 bits of its SHA-1): the same on every machine,
    for the converters and for the training reader of shards without numeric ids."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:15], 16)


def raw_captions(meta, txt: Optional[str]) -> list:
    """A sample's captions as stored, empty or malformed ones included (so they can be counted):
    our `json["captions"]`, else the one caption of `.txt` or `json["caption"]` (img2dataset,
    open_clip). The one rule the training reader, the converter and the inspector share."""
    meta = meta if isinstance(meta, dict) else {}
    if isinstance(meta.get("captions"), list):
        return meta["captions"]
    return [txt] if txt is not None else [meta.get("caption")]


def good_captions(captions: list) -> list[str]:
    """The non-empty string captions, stripped."""
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def index_splits(index: dict) -> list[str]:
    """The splits an index lists: entries {"shards": [...], "samples": N}. Other entries describe
    the conversion (its source, image options, problems)."""
    return [k for k, v in index.items() if isinstance(v, dict) and isinstance(v.get("shards"), list)
            and "samples" in v]


def is_url(root: str) -> bool:
    return "://" in root or root.startswith("pipe:")


def is_shard_list(root: str) -> bool:
    """`data.root` names shards (a brace pattern, one tar, a URL) rather than a folder."""
    return is_url(root) or "{" in root or root.endswith(".tar")


def shard_url(url: str) -> str:
    """What WebDataset opens for a shard: `s3://` goes through the AWS CLI (WebDataset has no
    s3 opener of its own); every other URL, `pipe:` included, as it is."""
    return f"pipe:aws s3 cp {url} -" if url.startswith("s3://") else url


def key_and_extension(member: str) -> tuple[str, str]:
    """A tar member's sample key and extension, by WebDataset's rule: the key is the path up to
    the first dot of the file name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "npy")  # npy: pre-extracted region features


def sample_meta(sample: dict) -> tuple[int, list[str]]:
    """(image id, non-empty captions) of a raw sample: our `json` {"image_id", "captions"}, or one
    caption from `txt` / `json["caption"]` (img2dataset, open_clip). Without a numeric image id
    the key is hashed to one (stable across runs and machines)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    meta = meta if isinstance(meta, dict) else {}
    captions = good_captions(raw_captions(meta, sample["txt"].decode("utf-8") if "txt" in sample else None))
    image_id = meta.get("image_id")
    if not isinstance(image_id, int):
        key = str(image_id) if image_id is not None else sample["__key__"]
        image_id = string_id(key)
    return image_id, captions
