"""Retrieval metrics: the standard image-text protocol, computed by counting.

`retrieval_metrics` equals the published VSE evaluation code (VSE++ `evaluation.py`, which
ranks a query's candidates with `numpy.argsort(scores)[::-1]`) on the same similarity matrix,
ties included: an image query's rank is the best rank among its K captions, a caption query's
rank is that of its own image; R@K in percent, rSum = the six recalls added, medr =
floor(median 0-based rank) + 1, meanr = mean 0-based rank + 1.

A rank is the number of candidates that score strictly higher than the positive, so no row
is sorted, and rows are processed in chunks to bound memory. Where that count is not the
reference's answer, i.e. where a negative scores exactly as much as the (best) positive or
the query's scores hold a NaN, numpy's quicksort puts tied items in an order that depends on
the whole row (introsort is not stable, and the order is an implementation detail of numpy):
for just those queries the reference's own ordering is run, so the result is exact by
construction on any numpy version and CPU.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Union

import numpy as np
import torch


RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")  # what tables show
METRIC_KEYS = RECALL_KEYS + ("i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")
RECALL_HEADS = {"i2t_r1": "I2T R@1", "i2t_r5": "R@5", "i2t_r10": "R@10", "t2i_r1": "T2I R@1",
                "t2i_r5": "R@5", "t2i_r10": "R@10", "rsum": "rSum"}  # table column headers


class _Scores:
    """Read access to a similarity matrix as numpy blocks, in the dtype the reference would
    sort: numpy input as it is, torch input via `.numpy()` (bfloat16, which numpy lacks, as
    float32: exact, so ties stay ties). A CUDA tensor is copied to the host block by block."""

    def __init__(self, sims: Union[torch.Tensor, np.ndarray]):
        if isinstance(sims, torch.Tensor):
            self._t, self._a = sims.detach(), None
        else:
            self._t, self._a = None, np.asarray(sims)
        self.shape = tuple(self._t.shape if self._a is None else self._a.shape)

    def _np(self, t: torch.Tensor) -> np.ndarray:
        t = t.cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self._a[lo:hi] if self._a is not None else self._np(self._t[lo:hi])

    def take(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if self._a is not None:
            return self._a[rows, cols]
        dev = self._t.device
        return self._np(self._t[torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)])

    def cols(self, cols: np.ndarray) -> np.ndarray:
        """Columns as contiguous rows (len(cols) x N)."""
        if self._a is not None:
            return np.ascontiguousarray(self._a[:, cols].T)
        return np.ascontiguousarray(self._np(self._t[:, torch.as_tensor(cols, device=self._t.device)]).T)


def _row_counts(mask: np.ndarray) -> np.ndarray:
    return np.add.reduce(mask, axis=1, dtype=np.int32)


def _col_counts(mask: np.ndarray) -> np.ndarray:
    if mask.shape[0] <= 255:  # bytes cannot overflow: a plain byte add, no widening cast per element
        return np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.uint8)
    return np.add.reduce(mask, axis=0, dtype=np.int32)


def _reference_rank(scores: np.ndarray, is_positive) -> int:
    """The published code's rank: position of the first positive in argsort(scores)[::-1]."""
    order = np.argsort(scores)[::-1]
    return int(np.flatnonzero(is_positive(order))[0])


def _count_rows(m: _Scores, lo: int, hi: int, k: int, t2i_pos: np.ndarray, step: int):
    """Rows lo:hi, `step` rows at a time (all four comparisons while they are in cache, into
    one reused mask): image-query ranks by counting, which of them need the reference's tie
    order, and these rows' share of the caption queries' counts (above / at least the positive)."""
    n_cap = m.shape[1]
    mask = np.empty((min(step, hi - lo), n_cap), bool)
    i2t = np.empty(hi - lo, np.int64)
    tied = np.zeros(hi - lo, bool)
    cap_gt, cap_ge = np.zeros(n_cap, np.int64), np.zeros(n_cap, np.int64)
    cap_nan = np.zeros(n_cap, bool)
    for s in range(lo, hi, step):
        block = m.rows(s, min(s + step, hi))
        b, r, out = mask[:len(block)], np.arange(len(block)), slice(s - lo, s - lo + len(block))
        own = block[r[:, None], (s + r)[:, None] * k + np.arange(k)]  # rows x K positives
        best = own.max(axis=1)[:, None]
        i2t[out] = _row_counts(np.greater(block, best, out=b))
        tied[out] = _row_counts(np.equal(block, best, out=b)) > _row_counts(own == best)  # a negative ties
        cap_gt += _col_counts(np.greater(block, t2i_pos, out=b))
        cap_ge += _col_counts(np.greater_equal(block, t2i_pos, out=b))
        if block.dtype.kind == "f" and np.isnan(np.add.reduce(block, axis=None)):  # NaN (or inf - inf) here
            nan = np.isnan(block)  # argsort puts NaN last, i.e. first in [::-1]: let the reference rank those
            tied[out] |= nan.any(axis=1)
            cap_nan |= nan.any(axis=0)
    return i2t, tied, cap_gt, cap_ge, cap_nan


def _ranks(sims: Union[torch.Tensor, np.ndarray], k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of every image query (N) and caption query (K*N).

    The rows are split among torch's number of CPU threads (numpy releases the GIL), each
    working `chunk` rows at a time, so extra memory is O(threads x chunk x K*N)."""
    m = _Scores(sims)
    if len(m.shape) != 2 or m.shape[1] != k * m.shape[0]:
        raise ValueError(f"sims must be N images x {k}*N captions, got {m.shape}")
    n_img, n_cap = m.shape
    chunk = max(1, int(chunk))
    caps = np.arange(n_cap)
    t2i_pos = m.take(caps // k, caps)  # each caption's score with its own image
    workers = max(1, min(torch.get_num_threads(), math.ceil(n_img / chunk)))
    bounds = np.linspace(0, n_img, workers + 1).round().astype(int)
    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(lambda lo, hi: _count_rows(m, lo, hi, k, t2i_pos, chunk), bounds[:-1], bounds[1:]))
    i2t = np.concatenate([p[0] for p in parts])
    i2t_resolve = np.flatnonzero(np.concatenate([p[1] for p in parts]))
    t2i = sum(p[2] for p in parts)  # images scoring above the positive
    t2i_ge = sum(p[3] for p in parts)  # ... or equal to it (the positive itself included)
    t2i_resolve = np.flatnonzero((t2i_ge - t2i > 1) | np.logical_or.reduce([p[4] for p in parts]))

    for i in i2t_resolve:  # rare: only queries whose positive is tied with a negative
        i2t[i] = _reference_rank(m.rows(i, i + 1)[0], lambda order, i=i: order // k == i)
    for lo in range(0, len(t2i_resolve), chunk):
        idx = t2i_resolve[lo:lo + chunk]
        for c, col in zip(idx, m.cols(idx)):
            t2i[c] = _reference_rank(col, lambda order, img=c // k: order == img)
    return i2t, t2i


def retrieval_metrics(sims: Union[torch.Tensor, np.ndarray], captions_per_image: int = 5,
                      chunk: int = 32, return_ranks: bool = False):
    """Metrics of an (N images x K*N captions) similarity matrix; caption c shows image c // K.

    Equal to the published evaluation code on the same matrix, ties included (numpy's
    `argsort(scores)[::-1]` order, run on just the queries whose positive is tied). Extra
    memory is O(threads x chunk x K*N), threads = torch's CPU thread count. With
    `return_ranks`, also returns the 0-based ranks {"i2t": N ints, "t2i": K*N ints}.
    """
    i2t, t2i = _ranks(sims, captions_per_image, chunk)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):  # the published code's arithmetic, so even the last bit agrees
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(ranks.mean() + 1)
    out["rsum"] = (out["i2t_r1"] + out["i2t_r5"] + out["i2t_r10"]
                   + out["t2i_r1"] + out["t2i_r5"] + out["t2i_r10"])
    metrics = {key: out[key] for key in METRIC_KEYS}
    if return_ranks:
        return metrics, {"i2t": i2t, "t2i": t2i}
    return metrics


def chance_metrics(n_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected recalls of a random ranking (what the demo prints as chance level)."""
    n_cap = n_images * captions_per_image
    out = {}
    for k in (1, 5, 10):
        # P(at least one of the image's K captions in the top k of n_cap), exactly
        miss = math.comb(n_cap - captions_per_image, k) / math.comb(n_cap, k)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def format_table(rows: dict[str, dict[str, float]], keys=RECALL_KEYS) -> str:
    """Rows of metrics as an aligned text table."""
    heads = RECALL_HEADS
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(f"{heads.get(k, k):>9}" for k in keys)]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[k]:9.1f}" if k in m else f"{'-':>9}" for k in keys))
    return "\n".join(lines)


def protocol_metrics(img: torch.Tensor, txt: torch.Tensor, protocol: str = "standard", k: int = 5,
                     return_ranks: bool = False):
    """Metrics of embeddings under a protocol: `standard` (all images, e.g. Flickr30K 1K test,
    COCO 5K), or `coco1k` (COCO 1K: the mean of the metrics of 5 folds of 1000 images)."""
    if protocol == "standard":
        return retrieval_metrics(img @ txt.t(), captions_per_image=k, return_ranks=return_ranks)
    if protocol != "coco1k":
        raise ValueError(f"protocol must be 'standard' or 'coco1k', got {protocol!r}")
    n = img.shape[0]
    if n != 5000:
        raise ValueError(f"coco1k needs the 5000 COCO test images (5 folds of 1000), got {n}")
    folds = [retrieval_metrics(img[f * 1000:(f + 1) * 1000] @ txt[f * 1000 * k:(f + 1) * 1000 * k].t(),
                               captions_per_image=k, return_ranks=True) for f in range(5)]
    metrics = {key: float(np.mean([m[key] for m, _ in folds])) for key in METRIC_KEYS}
    if not return_ranks:
        return metrics
    ranks = {d: np.concatenate([r[d] for _, r in folds]) for d in ("i2t", "t2i")}
    return metrics, ranks
