"""One evaluation of a model on a split, as training (validation, final test) and
`dbl-scale eval` both run it: stream and embed on all ranks, score in tiles under a protocol,
and optionally write the reports a person looks at. Nothing here holds the decoded split or
the N x K*N score matrix."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from .. import distributed
from ..data import split_shards
from ..shard_index import ShardIndex
from .embed import embed_split
from .metrics import protocol_metrics
from .single_modal import image_groups, single_modal_metrics
from .report import EmbeddingScores, log_reports

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    ranks: dict[str, np.ndarray]  # 0-based rank of every query: "i2t" (N), "t2i" (K*N); "t2t", "i2i" (-1: no query)
    img: torch.Tensor  # N x d, image-id order
    txt: torch.Tensor  # K*N x d
    image_ids: torch.Tensor  # N
    captions_per_image: int  # K: 5 (the standard protocol) unless some image of the split has fewer


def evaluate(model, data_root: str | Path, split: str, image, tokenize, batch_size: int,
             protocol: str = "standard", single_modal: bool = True,
             image_relevance: Optional[str] = None) -> Evaluation:
    """Retrieval metrics of `model` on a split, the same on every rank (collective: every rank
    embeds its share of the split, then scores its share of the queries). `protocol`:
    "standard" (all images) or "coco1k". `single_modal`: also text-to-text and, when
    `image_relevance` names a key the split's json has, image-to-image retrieval, on the whole
    split whatever the protocol (`single_modal.py`)."""
    was_training = model.training
    model.eval()
    try:
        img, txt, ids, k, keys = embed_split(model, data_root, split, image, tokenize, batch_size,
                                             image_relevance=image_relevance if single_modal else None)
    finally:
        model.train(was_training)
    dev = distributed.device()
    metrics, ranks = protocol_metrics(img.to(dev), txt.to(dev), protocol, k, return_ranks=True)
    if single_modal:
        groups = image_groups(keys) if keys is not None and any(key is not None for key in keys) else None
        extra, extra_ranks = single_modal_metrics(img.to(dev), txt.to(dev), k, groups)
        metrics, ranks = {**metrics, **extra}, {**ranks, **extra_ranks}
    return Evaluation(metrics, ranks, img, txt, ids, k)


def report(ev: Evaluation, tracker, out_dir: str | Path, data_root: str | Path, split: str,
           artifact_path: str = "reports", name: Optional[str] = None) -> None:
    """The recall@K plot and the HTML page of sample queries with thumbnails, written to
    out_dir and logged to the tracker's run (call on rank 0); `name` heads their titles. Scores
    are made only for the queries the page shows, and only their images and captions are read
    (by random access)."""
    index = ShardIndex(split_shards(data_root, split)[0])
    ids = ev.image_ids.tolist()
    log_reports(tracker, out_dir, _Thumbnails(index, ids), _Captions(index, ids, ev.captions_per_image),
                EmbeddingScores(ev.img, ev.txt), ev.metrics, ev.ranks, split=split, artifact_path=artifact_path,
                name=name)


class _Thumbnails:
    """Image row -> a small PIL image, read from the shards when asked (region features, which
    have no picture, show as grey)."""

    def __init__(self, index: ShardIndex, ids: list[int], size: int = 96):
        self.index, self.ids, self.size = index, ids, size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, row: int) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.index.image(self.ids[row]))) as im:
                return im.convert("RGB").resize((self.size, self.size))
        except Exception:  # noqa: BLE001 - not a picture (precomp regions) or unreadable: a placeholder
            return Image.new("RGB", (self.size, self.size), (200, 200, 200))


class _Captions:
    """Caption c (caption c % K of image row c // K) -> its text, read from the shards when asked."""

    def __init__(self, index: ShardIndex, ids: list[int], k: int):
        self.index, self.ids, self.k = index, ids, k
        self._read: dict[int, list[str]] = {}  # image row -> its captions (a page shows a few)

    def __len__(self) -> int:
        return len(self.ids) * self.k

    def __getitem__(self, c: int) -> str:
        row = c // self.k
        if row not in self._read:
            self._read[row] = self.index.captions(self.ids[row])
        return self._read[row][c % self.k]
