"""One evaluation of a model on a split, as training (validation, final test) and
`dbl-scale eval` both run it: embed on all ranks, score under a protocol, and optionally
write the reports a person looks at."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import distributed
from ..data import load_eval_split, read_thumbnails
from .embed import embed_split
from .metrics import protocol_metrics
from .report import log_reports

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    ranks: dict[str, np.ndarray]  # 0-based rank of every query: "i2t" (N), "t2i" (K*N)
    img: torch.Tensor  # N x d, image-id order
    txt: torch.Tensor  # K*N x d
    image_ids: torch.Tensor  # N
    captions_per_image: int  # K: 5 (the standard protocol) unless some image of the split has fewer


def evaluate(model, data_root: str | Path, split: str, image, tokenize, batch_size: int,
             protocol: str = "standard") -> Evaluation:
    """Retrieval metrics of `model` on a split, the same on every rank (collective: every rank
    embeds its share of the split). `protocol`: "standard" (all images) or "coco1k"."""
    was_training = model.training
    model.eval()
    try:
        pixels, ids, captions = load_eval_split(data_root, split, image,
                                                distributed.rank(), distributed.world_size())
        k = captions_per_image(captions)
        img, txt, all_ids = embed_split(model, pixels, captions, ids, tokenize, batch_size, k)
    finally:
        model.train(was_training)
    metrics, ranks = protocol_metrics(img, txt, protocol, k, return_ranks=True)
    return Evaluation(metrics, ranks, img, txt, all_ids, k)


def captions_per_image(captions: list[list[str]], standard: int = 5) -> int:
    """K for the whole split (collective): the standard 5, or the fewest captions any image of
    the split has (web data: often 1); then every image is scored with its first K."""
    fewest = -distributed.all_reduce_max_int(-min((len(c) for c in captions), default=standard))
    k = min(standard, fewest)
    if k < standard and distributed.is_main():
        log.warning("some evaluation images have only %d caption(s): every image is scored with its first %d "
                    "(the COCO / Flickr30K protocol has 5)", k, k)
    return k


def report(ev: Evaluation, tracker, out_dir: str | Path, data_root: str | Path, split: str,
           artifact_path: str = "reports") -> None:
    """The recall@K plot and the HTML page of sample queries with thumbnails, written to
    out_dir and logged to the tracker's run (call on rank 0)."""
    thumbs, caps = read_thumbnails(data_root, split, ev.image_ids, ev.captions_per_image)
    log_reports(tracker, out_dir, thumbs, caps, ev.img @ ev.txt.t(), ev.metrics, ev.ranks, split=split,
                artifact_path=artifact_path)
