"""The image-text retrieval protocol: R@1/5/10 both ways, rSum, medr, meanr.

Image i's captions are K*i .. K*i + K-1. An image query's rank is that of its best caption
among all captions, a caption query's rank that of its image among all images, under
`ranking`'s rule (ties count against the query); `i2t_tied` / `t2i_tied` count the queries
where a tie decided. R@K is the share of queries with rank < K, in percent; rSum adds the six
recalls; medr = floor(median 0-based rank) + 1; meanr = mean 0-based rank + 1, as in VSE++.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

from .ranking import TILE_ROWS, MatrixSource, TileSource, rank_tiles

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")  # what tables show
METRIC_KEYS = RECALL_KEYS + ("i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr", "i2t_tied", "t2i_tied")
SINGLE_MODAL_KEYS = ("t2t_r1", "t2t_r5", "t2t_r10", "i2i_r1", "i2i_r5", "i2i_r10")  # single_modal.py's


def retrieval_metrics(sims: Union[torch.Tensor, np.ndarray], captions_per_image: int = 5,
                      return_ranks: bool = False):
    """Metrics of an N images x K*N captions score matrix (caption c shows image c // K); with
    `return_ranks`, also the 0-based ranks {"i2t": N, "t2i": K*N}."""
    n = sims.shape[0]
    if len(sims.shape) != 2 or sims.shape[1] != captions_per_image * n:
        raise ValueError(f"sims must be N images x {captions_per_image}*N captions, got {tuple(sims.shape)}")
    rows = _rows(torch.device("cpu"), captions_per_image)
    return _cross_modal(MatrixSource(sims, rows, captions_per_image * rows), captions_per_image, "auto",
                        return_ranks, None)


def embedding_metrics(img: torch.Tensor, txt: torch.Tensor, captions_per_image: int = 5,
                      return_ranks: bool = False, rows: Optional[int] = None,
                      compile: Union[bool, str] = "auto", stats: Optional[dict] = None):
    """`retrieval_metrics` of img @ txt.T, made and counted tile by tile on the embeddings'
    device, never the whole matrix. Collective: every rank passes the same embeddings.
    `stats`: as `ranking.rank_tiles` fills it."""
    if img.dim() != 2 or txt.dim() != 2 or txt.shape[0] != captions_per_image * img.shape[0]:
        raise ValueError(f"need N x d images and {captions_per_image}*N x d captions, got {tuple(img.shape)} "
                         f"and {tuple(txt.shape)}")
    rows = rows or _rows(img.device, captions_per_image)
    return _cross_modal(TileSource(img, txt, rows, captions_per_image * rows), captions_per_image, compile,
                        return_ranks, stats)


def _rows(device: torch.device, k: int) -> int:
    return TILE_ROWS.get(device.type, TILE_ROWS["cuda"])


def _cross_modal(source, k: int, compile, return_ranks: bool, stats: Optional[dict]):
    n, n_cap = source.shape
    r = rank_tiles(source, torch.arange(n), torch.arange(n_cap) // k, columns=True, compile=compile, stats=stats)
    metrics = metrics_of_ranks(r.rows, r.cols, r.rows_tied, r.cols_tied)
    return (metrics, {"i2t": r.rows, "t2i": r.cols}) if return_ranks else metrics


def metrics_of_ranks(i2t: np.ndarray, t2i: np.ndarray, i2t_tied: Optional[np.ndarray] = None,
                     t2i_tied: Optional[np.ndarray] = None) -> dict[str, float]:
    """The protocol's metrics from 0-based ranks (VSE++'s arithmetic), and the tied queries' counts."""
    out: dict[str, float] = {}
    for name, ranks, tied in (("i2t", i2t, i2t_tied), ("t2i", t2i, t2i_tied)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(ranks.mean() + 1)
        out[f"{name}_tied"] = int(np.count_nonzero(tied)) if tied is not None else 0
    out["rsum"] = (out["i2t_r1"] + out["i2t_r5"] + out["i2t_r10"]
                   + out["t2i_r1"] + out["t2i_r5"] + out["t2i_r10"])
    return {key: out[key] for key in METRIC_KEYS}


def protocol_metrics(img: torch.Tensor, txt: torch.Tensor, protocol: str = "standard", k: int = 5,
                     return_ranks: bool = False):
    """Metrics under a protocol: `standard` (all images: Flickr30K 1K test, COCO 5K) or
    `coco1k` (the mean over 5 folds of 1000 COCO test images; tied counts are summed).
    Collective, as `embedding_metrics`."""
    if protocol == "standard":
        return embedding_metrics(img, txt, k, return_ranks=return_ranks)
    if protocol != "coco1k":
        raise ValueError(f"protocol must be 'standard' or 'coco1k', got {protocol!r}")
    if img.shape[0] != 5000:
        raise ValueError(f"coco1k needs the 5000 COCO test images (5 folds of 1000), got {img.shape[0]}")
    folds = [embedding_metrics(img[f * 1000:(f + 1) * 1000], txt[f * 1000 * k:(f + 1) * 1000 * k], k,
                               return_ranks=True) for f in range(5)]
    metrics = {key: (sum if key.endswith("_tied") else np.mean)([m[key] for m, _ in folds]) for key in METRIC_KEYS}
    metrics = {key: float(v) if not key.endswith("_tied") else int(v) for key, v in metrics.items()}
    if not return_ranks:
        return metrics
    return metrics, {d: np.concatenate([r[d] for _, r in folds]) for d in ("i2t", "t2i")}


def chance_metrics(n_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected recalls of a random ranking (what the demo prints as chance level)."""
    n_cap = n_images * captions_per_image
    out = {}
    for k in (1, 5, 10):
        miss = math.comb(n_cap - captions_per_image, k) / math.comb(n_cap, k)  # no own caption in the top k
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out
