"""Random access to the samples of local tar shards by image id: where each sample's image
and caption members sit (shard, byte offset, size), read once from the tar headers. Reading
a sample is then one `pread` per member; nothing of the split is held but the offsets (about
50 bytes per image).

AOQ's negatives and the evaluation report read samples this way; the training stream and
the embedding pass read shards in order (`data.read_samples`). A sample here is what
`read_samples` yields for the same shards: the same members, bytes and image id.
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .shards import IMAGE_KEYS, DataError, is_url, key_and_extension, sample_meta

log = logging.getLogger(__name__)


META_KEYS = ("json", "txt")


class ShardIndex:
    """Image id -> the sample's members in its shard. Samples without an image or without a
    caption member are left out (as `read_samples` leaves them out); a damaged shard is read up
    to the damage (logged). Only local files: a `pipe:` or `s3://` shard cannot be read at an
    offset (an error that says so)."""

    def __init__(self, urls: Iterable[str]):
        self.urls = [str(u) for u in urls]
        remote = [u for u in self.urls if is_url(u)]
        if remote:
            raise DataError(f"random access needs local shard files; {remote[0]} is a URL (copy the split "
                            "to a local or shared filesystem)")
        ids, where = [], []  # where: shard, then (offset, size) of image, json, txt (-1: absent)
        for s, url in enumerate(self.urls):
            for image_id, members in _samples(url):
                ids.append(image_id)
                where.append([s, *[v for key in ("image", *META_KEYS) for v in members.get(key, (-1, -1))]])
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.where = np.asarray(where, dtype=np.int64).reshape(-1, 7)[order]
        if len(self.ids) and (np.diff(self.ids) == 0).any():
            raise DataError(f"image id {int(self.ids[np.flatnonzero(np.diff(self.ids) == 0)[0]])} appears "
                            "twice in these shards: random access needs unique ids")
        self._files: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.where.nbytes

    def rows(self, image_ids) -> np.ndarray:
        """Positions of image ids in the index; KeyError for one it lacks."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids).clip(max=max(len(self.ids) - 1, 0))
        found = self.ids[pos] == ids if len(self.ids) else np.zeros(len(ids), bool)
        if not found.all():
            raise KeyError(f"image ids {ids[~found][:10].tolist()} are not in these shards")
        return pos

    def __contains__(self, image_id: int) -> bool:
        pos = np.searchsorted(self.ids, image_id)
        return bool(pos < len(self.ids) and self.ids[pos] == image_id)

    def sample(self, image_id: int, image: bool = True) -> dict:
        """The raw sample: {"jpg": image bytes, "json" / "txt": caption bytes, "__key__"}
        (without the image when `image` is False)."""
        s, *spans = self.where[self.rows([image_id])[0]].tolist()
        out = {"__key__": f"{Path(self.urls[s]).name}#{image_id}"}
        for key, (offset, size) in zip(("jpg", *META_KEYS), zip(spans[0::2], spans[1::2])):
            if offset >= 0 and (image or key != "jpg"):
                out[key] = self._read(s, offset, size)
        return out

    def image(self, image_id: int) -> bytes:
        s, offset, size = self.where[self.rows([image_id])[0], :3].tolist()
        return self._read(s, offset, size)

    def captions(self, image_id: int) -> list[str]:
        """The sample's captions, by the one caption rule of training (`data.sample_meta`)."""
        return sample_meta(self.sample(image_id, image=False))[1]

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self.urls[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DataError(f"{self.urls[shard]}: {size} bytes at {offset} expected, {len(data)} read "
                            "(the shard changed since it was indexed?)")
        return data

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __getstate__(self):  # a copy (another process) opens its own files
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _samples(url: str):
    """(image id, {"image" | "json" | "txt": (offset, size)}) of each usable sample of one tar,
    from its headers (members are grouped by key, as WebDataset groups them)."""
    try:
        tar = tarfile.open(url, mode="r:")
    except (OSError, tarfile.TarError) as exc:
        log.warning("skipping unreadable shard %s: %s", url, exc)
        return
    with tar, open(url, "rb") as raw:
        key, members = None, {}
        try:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = key_and_extension(info.name)
                if k != key:
                    yield from _usable(key, members, raw)
                    key, members = k, {}
                members[ext] = (info.offset_data, info.size)
        except tarfile.TarError as exc:
            log.warning("shard %s is damaged after sample %s: %s", url, key, exc)
        yield from _usable(key, members, raw)


def _usable(key: Optional[str], members: dict, raw) -> list:
    image = next((e for e in IMAGE_KEYS if e in members), None)
    if key is None or image is None or not any(m in members for m in META_KEYS):
        return []
    sample = {"__key__": key}
    for m in META_KEYS:
        if m in members:
            offset, size = members[m]
            raw.seek(offset)
            sample[m] = raw.read(size)
    try:
        image_id, _ = sample_meta(sample)
    except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("skipping sample %s: %s", key, exc)
        return []
    found = {"image": members[image]}
    found.update({m: members[m] for m in META_KEYS if m in members})
    return [(image_id, found)]
