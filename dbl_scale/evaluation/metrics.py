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

`embedding_metrics` computes the same from the embeddings without the matrix: the scores are
made tile by tile (`TileScores`: images in blocks of R, captions in blocks of K*R, always on
the same boundaries, so a score has the same bits whenever and wherever it is computed), and
each rank counts its own blocks of image rows, both directions in one pass over the product.
Its results equal `retrieval_metrics` on the matrix those tiles make, ties and NaNs included
(a BLAS may round a product of another shape differently in the last bit, so "the matrix" is
the tiles', not one big `img @ txt.T`). The few queries whose positive ties with a negative
need their whole row or column for numpy's order: those lines are made again a stack at a
time (`_tied_ranks`: in operands that give each query its own tile's bits), and each tied
block is put in argsort's order once (`tie_order`: by argpartition where that gives
argsort's order, 7x cheaper on a long line).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch

from .. import distributed
from .counting import TileCounter

log = logging.getLogger(__name__)


RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")  # what tables show
METRIC_KEYS = RECALL_KEYS + ("i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")
SINGLE_MODAL_KEYS = ("t2t_r1", "t2t_r5", "t2t_r10", "i2i_r1", "i2i_r5", "i2i_r10")  # single_modal.py's
SINGLE_MODAL_HEADS = {"t2t_r1": "T2T R@1", "t2t_r5": "R@5", "t2t_r10": "R@10",
                      "i2i_r1": "I2I R@1", "i2i_r5": "R@5", "i2i_r10": "R@10"}
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
    metrics = metrics_of_ranks(i2t, t2i)
    if return_ranks:
        return metrics, {"i2t": i2t, "t2i": t2i}
    return metrics


def metrics_of_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """The protocol's metrics from 0-based ranks, with the published code's arithmetic (so even
    the last bit agrees)."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_medr"] = float(np.floor(np.median(ranks)) + 1)
        out[f"{name}_meanr"] = float(ranks.mean() + 1)
    out["rsum"] = (out["i2t_r1"] + out["i2t_r5"] + out["i2t_r10"]
                   + out["t2i_r1"] + out["t2i_r5"] + out["t2i_r10"])
    return {key: out[key] for key in METRIC_KEYS}


# ----------------------------------------------------------------------------- from embeddings, in tiles

TILE_ROWS = 512  # images per tile: a tile is R x K*R scores (5 MB at K = 5); on a 2-core Xeon a one-thread
# product of this shape runs 12% faster than of 256 x 1280 (179 against 160 GFLOP/s at d = 128)


class TileScores:
    """The N x K*N scores of image and caption embeddings, computed on demand tile by tile: tile
    (t, u) = images [t*R, (t+1)*R) against captions [u*K*R, (u+1)*K*R), so tile (t, t) holds
    image block t's own captions. The same tile is always the same product, so every score
    has one value whoever asks. Rows and columns read as numpy float32 (`row`, `col`, and
    `s[i]`, `s[:, c]`, `s[i, c]` as on a matrix)."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor, captions_per_image: int, rows: int = TILE_ROWS):
        if img.dim() != 2 or txt.dim() != 2 or txt.shape[0] != captions_per_image * img.shape[0]:
            raise ValueError(f"need N x d images and {captions_per_image}*N x d captions, got "
                             f"{tuple(img.shape)} and {tuple(txt.shape)}")
        self.img, self.txt = img.float(), txt.float().to(img.device)
        self.k, self.rows, self.cols = captions_per_image, rows, captions_per_image * rows
        self.shape = (img.shape[0], txt.shape[0])
        self.tiles = math.ceil(img.shape[0] / rows)
        # the operands of every tile, as views made once (a tile is then one call)
        self.img_blocks = [self.img[t * rows:(t + 1) * rows] for t in range(self.tiles)]
        self.txt_blocks = [self.txt[u * self.cols:(u + 1) * self.cols].t() for u in range(self.tiles)]

    def tile(self, t: int, u: int, out: Optional[dict] = None) -> torch.Tensor:
        """Tile (t, u); `out`: a dict of reusable buffers by shape (a fresh 5 MB output per tile
        costs the CPU page faults; the product into a buffer is the same call, the same bits)."""
        return self.product(self.img_blocks[t], self.txt_blocks[u], out)

    @staticmethod
    def product(a: torch.Tensor, bt: torch.Tensor, out: Optional[dict] = None) -> torch.Tensor:
        """The one product every score comes from: a (rows x d) @ bt (d x cols, a transposed
        view of cols x d)."""
        if out is None:
            return a @ bt
        shape = (a.shape[0], bt.shape[1])
        if shape not in out:
            out[shape] = torch.empty(shape, dtype=a.dtype, device=a.device)
        return torch.mm(a, bt, out=out[shape])

    def row(self, i: int) -> np.ndarray:
        t, r = divmod(int(i), self.rows)
        return torch.cat([self.tile(t, u)[r] for u in range(self.tiles)]).cpu().numpy()

    def col(self, c: int) -> np.ndarray:
        u, j = divmod(int(c), self.cols)
        return torch.cat([self.tile(t, u)[:, j] for t in range(self.tiles)]).cpu().numpy()

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, c = key
            return self.col(c) if isinstance(i, slice) else self.row(i)[c]
        return self.row(key)


def embedding_ranks(img: torch.Tensor, txt: torch.Tensor, captions_per_image: int = 5,
                    rows: int = TILE_ROWS, stats: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of every image query (N) and caption query (K*N) from the embeddings, as
    `retrieval_metrics` ranks them on the tiles' matrix. Collective when the process group is
    up: every rank must pass the same embeddings; each counts its own blocks of image rows and
    the results are merged, the same on every rank. Memory: a few tiles per thread, and
    O(K*N) counts. On a GPU the tiles are made and counted there. `stats`, when given, gets
    the seconds of each pass and how many queries were re-scored for a tie."""
    grid, k = TileScores(img, txt, captions_per_image, rows), captions_per_image
    n, n_cap = grid.shape
    dev = grid.img.device
    lo, hi = _shard(grid.tiles)
    mine = range(lo, hi)
    # pass 1: the diagonal tiles give every image's best positive and every caption's positive
    best = torch.full((n,), float("nan"), device=dev)
    pos = torch.full((n_cap,), float("nan"), device=dev)
    own_at_best = torch.zeros(n, dtype=torch.long, device=dev)
    for t in mine:
        d = grid.tile(t, t)
        r = torch.arange(d.shape[0], device=dev)
        own = d[r[:, None], r[:, None] * k + torch.arange(k, device=dev)]  # rows x K positives
        best[t * rows:t * rows + d.shape[0]] = _nan_max(own)
        own_at_best[t * rows:t * rows + d.shape[0]] = (own == best[t * rows:t * rows + d.shape[0], None]).sum(1)
        pos[t * grid.cols:t * grid.cols + own.numel()] = own.reshape(-1)
    pos = _merge_blocks(pos, lo * grid.cols, min(hi * grid.cols, n_cap))
    # pass 2: every tile of my rows once, both directions counted in it
    t0 = time.perf_counter()
    count = _count_on_cpu if dev.type == "cpu" else _count_on_device
    finite = _scores_finite(grid)
    i2t, eq, tied, cap_gt, cap_ge, cap_nan = count(grid, mine, best, pos, not finite)
    t1 = time.perf_counter()
    tied = (tied | (eq > own_at_best.cpu())).numpy()  # ... or a negative ties with the best positive
    i2t, eq, best, pos = i2t.numpy(), eq.numpy(), best.cpu().numpy(), pos.cpu().numpy()
    cap_gt = distributed.all_reduce_sum(cap_gt.to(distributed.device())).cpu().numpy()
    cap_ge = distributed.all_reduce_sum(cap_ge.to(distributed.device())).cpu().numpy()
    cap_nan = distributed.all_reduce_max(cap_nan.to(torch.uint8).to(distributed.device())).cpu().numpy() > 0
    # queries whose positive is tied with a negative (or whose scores hold a NaN): the reference's
    # own order, on their whole row or column of the tiles' matrix; each re-made row or column
    # must give the counts pass 2 gave and the positives' bits
    rows_tied = np.flatnonzero(tied)
    tie_stats: dict = {}
    i2t[rows_tied] = _tied_ranks(grid, rows_tied, "row", pos, best[rows_tied], i2t[rows_tied], eq[rows_tied], finite,
                                 tie_stats)
    t2i = cap_gt.copy()
    resolve = np.flatnonzero((cap_ge - cap_gt > 1) | cap_nan)
    mine_cols = resolve[(resolve // grid.cols >= lo) & (resolve // grid.cols < hi)]  # by caption block
    t2i[mine_cols] = _tied_ranks(grid, mine_cols, "col", pos, pos[mine_cols], cap_gt[mine_cols],
                                 cap_ge[mine_cols] - cap_gt[mine_cols], finite, tie_stats)
    if stats is not None:
        stats.update(count_s=t1 - t0, rescore_s=time.perf_counter() - t1, rows_rescored=len(rows_tied),
                     cols_rescored=len(mine_cols), **tie_stats)
    i2t = _merge_rows(i2t, lo * rows, min(hi * rows, n))
    t2i_fixed = _merge_values(mine_cols, t2i[mine_cols])
    t2i[t2i_fixed[0]] = t2i_fixed[1]
    return i2t, t2i


def embedding_metrics(img: torch.Tensor, txt: torch.Tensor, captions_per_image: int = 5,
                      return_ranks: bool = False, rows: int = TILE_ROWS):
    """`retrieval_metrics` of the embeddings' scores, without the N x K*N matrix (collective)."""
    i2t, t2i = embedding_ranks(img, txt, captions_per_image, rows)
    metrics = metrics_of_ranks(i2t, t2i)
    return (metrics, {"i2t": i2t, "t2i": t2i}) if return_ranks else metrics


def _nan_max(x: torch.Tensor) -> torch.Tensor:
    """Row maxima where a NaN wins (as numpy's max), so a NaN positive sends its row to the reference."""
    m = x.max(dim=1).values
    return torch.where(torch.isnan(x).any(dim=1), torch.full_like(m, float("nan")), m)


def _shard(n_tiles: int) -> tuple[int, int]:
    rank, world = distributed.rank(), distributed.world_size()
    return n_tiles * rank // world, n_tiles * (rank + 1) // world


RESCORE_BYTES = 512 * 2 ** 20  # the whole rows / columns of one stack of tied queries, held at once


def _tied_ranks(grid: TileScores, queries: np.ndarray, kind: str, pos: np.ndarray, threshold: np.ndarray,
                above: np.ndarray, equal: np.ndarray, finite: bool = False, stats: Optional[dict] = None) -> np.ndarray:
    """The reference's rank of each query (image rows for "row", captions for "col") from its
    whole row or column of the tiles' matrix, re-made for a few queries at a time.

    The queries go in stacks, and a stack's lines come from one operand holding their
    embeddings, multiplied by every block of the other side (a strip of tiles, shared among
    the threads). An element of a product depends on its row and column of the operands, the
    shape and the place, never on the other rows (which is also why a one-thread product
    equals a many-thread one). So by default (`_stacks`) the operand has the query's block's
    shape, with each query at its own place: at most one query per place in a stack, and the
    most queries at one place set the number of stacks. Where this BLAS's products do not
    depend on the place, a query may sit at any place ("any place"); where they do not depend
    on the operand's height (or width) either, the operand is the stack's queries alone
    ("compact"), and a stack costs m / R of a strip. `_stack_layout` tries both on random
    operands once per call. A stack of m queries also costs m tie orders (`_tie_rank`).

    Each re-made line is checked: pass 2's counts above and equal to the query's `threshold`
    (its best positive, or its positive) and the positives' bits (`pos`); a query that fails,
    on a BLAS that broke the rule, is ranked from its own block's strip. `finite`: the scores
    are known to hold no NaN (`_scores_finite`), so no line is searched for one. `stats`, when
    given, gets the number of stacks and their layout."""
    if not len(queries):
        return np.zeros(0, np.int64)
    k, out = grid.k, {}
    block, n_other = (grid.rows, grid.shape[1]) if kind == "row" else (grid.cols, grid.shape[0])
    expected = {q: (t, a, e) for q, t, a, e in zip(queries.tolist(), threshold, above.tolist(), equal.tolist())}
    limit = max(1, RESCORE_BYTES // (4 * n_other))
    chunks = [queries[i:i + limit] for i in range(0, len(queries), limit)]  # the compact stacks
    layout = _stack_layout(grid, kind, {len(c) for c in chunks})
    if layout == "compact":
        stacks = [dict(enumerate(c.tolist())) for c in chunks]
    else:
        stacks = _stacks(queries, block, grid.shape[kind == "col"], limit, layout == "any place")
    if stats is not None:
        stats.update({f"{kind}_stacks": len(stacks), f"{kind}_layout": layout})
    buffer = torch.empty((max(map(len, stacks)), n_other))  # one for every stack: its pages are touched once
    for stack in stacks:
        qs = [stack[p] for p in sorted(stack)]
        lines = _stack_scores(grid, np.array(qs), np.array(sorted(stack)), kind, buffer[:len(qs)], layout == "compact")

        def rank(i: int) -> Optional[int]:
            s, q = lines[i], qs[i]
            t, n_above, n_equal = expected[q]
            # the positives' places in s, and the captions whose positive scores pass 1 kept
            own, captions = (np.arange(q * k, (q + 1) * k),) * 2 if kind == "row" else (np.array([q // k]), [q])
            if (np.count_nonzero(s > t) == n_above and np.count_nonzero(s == t) == n_equal
                    and _same_bits(s[own], pos[captions])):
                return _tie_rank(s, n_above, n_equal, own, finite)
            return None

        ranks = in_threads(rank, list(range(len(qs))), grid.img.device)
        out.update((q, r) for q, r in zip(qs, ranks) if r is not None)
    del buffer, lines
    missed = np.array([q for q in queries.tolist() if q not in out], dtype=np.int64)
    if len(missed):
        log.warning("%d re-made %ss did not match their tiles: ranking them from their blocks' strips", len(missed), kind)
        out.update(zip(missed.tolist(), _strip_ranks(grid, missed, kind).tolist()))
    return np.array([out[int(q)] for q in queries], dtype=np.int64)


def _tie_rank(s: np.ndarray, above: int, equal: int, own: np.ndarray, finite: bool = False) -> int:
    """`_reference_rank` of a line whose best positive has `above` scores above it and `equal`
    scores equal to it (itself included). Without a NaN, argsort's top `above` are those above,
    and the first positive in `[::-1]` order lies in the next `equal`, the tied ones: only
    those are searched, in the order `tie_order` gives. With a NaN, `_reference_rank` itself
    (`finite`: the caller knows there is none)."""
    if not finite and not np.isfinite(np.add.reduce(s, dtype=np.float64)) and np.isnan(s).any():  # a sum is finite without NaN / inf
        return _reference_rank(s, lambda order: np.isin(order, own))
    return above + int(np.flatnonzero(np.isin(tie_order(s, above, equal), own))[0])


def tie_order(s: np.ndarray, above: int, equal: int) -> np.ndarray:
    """The `equal` indices of a NaN-free line tied at the score with `above` scores above it, in
    the order `np.argsort(s)[::-1]` lists them.

    argsort sorts the whole line (9 ms at 500,000 scores here). Where numpy's argsort and
    argpartition are x86-simd-sort's (numpy >= 2 on AVX2 / AVX-512 CPUs), both run one
    quicksort: the same pivots, the same partitions, the same small-range networks, argpartition
    following only the range that holds its k-th place. Equal scores always land on one side of
    a partition, so the range holding the tied block is partitioned and sorted exactly as
    argsort does it, and `argpartition(s, k)` with k in the block gives argsort's tied block
    (1 ms). The one difference, argsort returning early on a sorted line, is kept by sorting
    those. Whether this numpy is such a pair is checked once per process
    (`partition_keeps_tie_order`); where it is not, argsort itself."""
    n = len(s)
    lo, hi = n - above - equal, n - above
    if partition_keeps_tie_order() and not _is_sorted(s):
        order = np.argpartition(s, hi - 1)
    else:
        order = np.argsort(s)
    return order[lo:hi][::-1]


def _is_sorted(s: np.ndarray) -> bool:
    head = s[:64]
    return not (head[1:] < head[:-1]).any() and not (s[1:] < s[:-1]).any()


@functools.lru_cache(maxsize=None)
def partition_keeps_tie_order() -> bool:
    """Whether `np.argpartition` gives `np.argsort`'s order of tied scores on this numpy and CPU
    (see `tie_order`), tried on lines full of ties: a few sizes around the small-range network
    (256) and above, few and many distinct values, every tied block of some of them. About
    50 ms, once."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 255, 256, 257, 1000, 4099, 70001):
        for levels in (2, 5, 300, 4 * n):
            s = (rng.integers(0, levels, n) / levels).astype(np.float32)
            if _is_sorted(s):
                continue
            values = np.unique(s)
            for v in values[np.linspace(0, len(values) - 1, min(len(values), 7)).astype(int)]:
                above, equal = int(np.count_nonzero(s > v)), int(np.count_nonzero(s == v))
                lo, hi = n - above - equal, n - above
                if not np.array_equal(np.argpartition(s, hi - 1)[lo:hi], np.argsort(s)[lo:hi]):
                    log.info("np.argpartition orders ties unlike np.argsort here: tied lines are argsorted")
                    return False
    return True


def _stacks(queries: np.ndarray, block: int, total: int, limit: int, any_place: bool = False) -> list[dict]:
    """The queries in stacks {place in the operand: query}: in a stack, all from blocks of one size
    (the last block may be short), at most `limit`, no two at one place; first fit, in order. A
    query's place is its own place in its block, or with `any_place` the next free one."""
    stacks: dict[int, list[dict]] = {}
    for q in queries.tolist():
        size = min(block, total - q // block * block)
        for stack in stacks.setdefault(size, []):
            place = len(stack) if any_place else q % block
            if place not in stack and len(stack) < min(limit, size):
                stack[place] = q
                break
        else:
            stacks[size].append({0 if any_place else q % block: q})
    return [s for group in stacks.values() for s in group]


@contextlib.contextmanager
def _one_thread():
    """torch at one thread in this thread, as the tiles' products run (a decorator, too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@_one_thread()
def _stack_layout(grid: TileScores, kind: str, heights: set) -> str:
    """How a stack's operand may hold its queries on this BLAS, tried on random operands with
    one-thread products, as the tiles are made. A GEMM kernel's instructions depend on the
    shapes and places, not on the values, so random values show any dependence on them.
    - "own places" unless a line (a row for kind "row", a column for "col") gets the same bits
      at every place of a block-shaped operand (full or short blocks, against the other
      side's full and short blocks; every place moved by a random permutation);
    - then "any place", unless a line also gets the same bits in an operand of each of
      `heights` lines as in block-shaped ones;
    - then "compact": the operand is the stack's queries alone."""
    dev, d = grid.img.device, grid.img.shape[1]
    g = torch.Generator().manual_seed(0)
    mine = grid.img_blocks if kind == "row" else [bt.t() for bt in grid.txt_blocks]  # queries' side, lines x d
    other = [bt.t() for bt in grid.txt_blocks] if kind == "row" else grid.img_blocks
    blocks = sorted({mine[0].shape[0], mine[-1].shape[0]})
    widths = sorted({other[0].shape[0], other[-1].shape[0]})

    def lines(op: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # op's lines against y, as the tiles make them
        return grid.product(op, y.t()) if kind == "row" else grid.product(y, op.t()).t()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))

    def random(n: int) -> torch.Tensor:
        return torch.randn(n, d, generator=g).to(dev)

    for h in blocks:
        for w in widths:
            op, y, p = random(h), random(w), torch.randperm(h, generator=g).to(dev)
            if not same(lines(op[p], y), lines(op, y)[p]):
                log.info("this BLAS's %ss depend on their place in a product: tied queries keep their places", kind)
                return "own places"
    for m in sorted(heights):
        c = random(m)
        for w in widths:
            y = random(w)
            whole = lines(c, y)
            for h in blocks:
                for j in range(0, m, h):
                    op = random(h)
                    op[:min(h, m - j)] = c[j:j + h]
                    if not same(lines(op, y)[:min(h, m - j)], whole[j:j + h]):
                        log.info("this BLAS's %ss depend on the operand's shape: tied queries keep their blocks' shape", kind)
                        return "any place"
    return "compact"


def _stack_scores(grid: TileScores, qs: np.ndarray, places: np.ndarray, kind: str, out: torch.Tensor,
                  compact: bool = False) -> np.ndarray:
    """The whole rows (kind "row": image queries, len x K*N) or columns ("col": caption queries,
    len x N) of queries `qs`, each at its place in one operand of its block's shape (`compact`:
    in an operand of the queries alone), into `out` (a CPU float32 tensor of that size); the
    strip's tiles are shared among the threads."""
    dev = grid.img.device
    at = torch.as_tensor(places, device=dev)
    x = grid.img if kind == "row" else grid.txt
    block = grid.rows if kind == "row" else grid.cols
    height = len(qs) if compact else min(block, x.shape[0] - qs[0] // block * block)
    op = x.new_zeros(height, x.shape[1])
    op[at] = x[torch.as_tensor(qs, device=dev)]
    pick = slice(None) if compact else at
    if kind == "row":
        operands = [(op, bt) for bt in grid.txt_blocks]
        width, take = grid.cols, (lambda tile: tile[pick])
    else:
        operands = [(a, op.t()) for a in grid.img_blocks]
        width, take = grid.rows, (lambda tile: tile[:, pick].t())
    threads = max(1, torch.get_num_threads()) if dev.type == "cpu" else 1

    def make(w: int) -> None:
        buffers: dict = {}
        for u in range(w, len(operands), threads):
            piece = take(grid.product(*operands[u], buffers))
            out[:, u * width:u * width + piece.shape[1]] = piece.cpu()

    in_threads(make, list(range(threads)), dev)
    return out.numpy()


def _same_bits(a, b) -> bool:
    return bool(np.array_equal(np.asarray(a, np.float32).view(np.int32), np.asarray(b, np.float32).view(np.int32)))


def _strip_ranks(grid: TileScores, queries: np.ndarray, kind: str) -> np.ndarray:
    """The reference's rank of each query from its whole row or column, made from its own
    block's strip of tiles (each block's strip once for all of its queries)."""
    k, out = grid.k, {}
    block = grid.rows if kind == "row" else grid.cols
    groups = [queries[queries // block == b] for b in np.unique(queries // block)]

    def strip(group: np.ndarray) -> dict:
        b, buffers = int(group[0] // block), {}
        if kind == "row":
            parts = [grid.tile(b, u, buffers)[torch.as_tensor(group - b * grid.rows)].cpu() for u in range(grid.tiles)]
            scores = torch.cat(parts, dim=1).numpy()
            return {int(q): _reference_rank(x, lambda order, q=int(q): order // k == q) for q, x in zip(group, scores)}
        parts = [grid.tile(t, b, buffers)[:, torch.as_tensor(group - b * grid.cols)].cpu() for t in range(grid.tiles)]
        scores = torch.cat(parts, dim=0).t().contiguous().numpy()
        return {int(q): _reference_rank(x, lambda order, img=int(q) // k: order == img) for q, x in zip(group, scores)}

    for found in in_threads(strip, groups, grid.img.device):
        out.update(found)
    return np.array([out[int(q)] for q in queries], dtype=np.int64)


def in_threads(fn, jobs: list, dev: torch.device) -> list:
    """[fn(job) for job in jobs]: on the CPU in torch's number of threads, each running one-thread
    products; on a GPU in order. A list, not a generator: torch's thread count is put back
    before this returns, whoever stops reading early."""
    before = torch.get_num_threads()
    threads = max(1, min(before, len(jobs)))
    if dev.type != "cpu" or threads == 1:
        return [fn(job) for job in jobs]
    # OpenMP's thread count belongs to each thread: a pool thread sets its own
    with _one_thread(), ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(fn, jobs))


def _scores_finite(grid: TileScores) -> bool:
    """Whether no score can be NaN: finite embeddings whose products and sums stay below float32's
    largest value (|score| <= d * max|image| * max|caption|, with room for rounding), as unit
    embeddings always do. Then pass 2 does not look for NaNs."""
    def largest(x: torch.Tensor) -> float:  # in chunks: no |x| copy of the whole; NaN or inf gives inf
        parts = [float(x[lo:lo + 65536].abs().max()) for lo in range(0, x.shape[0], 65536)]
        return max(parts, default=0.0) if all(map(math.isfinite, parts)) else math.inf

    return 2.0 * grid.img.shape[1] * largest(grid.img) * largest(grid.txt) < float(np.finfo(np.float32).max)


def _count_on_cpu(grid: TileScores, mine: range, best: torch.Tensor, pos: torch.Tensor, check_nan: bool) -> tuple:
    """Pass 2 on the CPU: torch's threads each take every T-th of my row blocks, make each tile
    with a one-thread product (the same bits as a many-thread one: the BLAS splits rows and
    columns, not the sums) and count it in one pass (`counting.TileCounter`). Row counts go
    straight into the shared arrays (a block's rows are one thread's); column counts into the
    thread's own arrays, added up at the end."""
    n, n_cap = grid.shape
    threads = max(1, min(torch.get_num_threads(), len(mine)))
    best_np, pos_np = best.numpy(), pos.numpy()
    row_gt, row_eq, row_nan = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.uint8)
    cols = [(np.zeros(n_cap, np.int32), np.zeros(n_cap, np.int32), np.zeros(n_cap, np.uint8)) for _ in range(threads)]

    def work(w: int) -> None:
        col_gt, col_ge, col_nan = cols[w]
        counter = TileCounter(best_np, pos_np, row_gt, row_eq, col_gt, col_ge, *((row_nan, col_nan) if check_nan else ()))
        buffers: dict = {}
        for t in list(mine)[w::threads]:
            for u in range(grid.tiles):
                counter.add(grid.tile(t, u, buffers), t * grid.rows, u * grid.cols)

    in_threads(work, list(range(threads)), grid.img.device)
    cap_gt = torch.from_numpy(sum(c[0].astype(np.int64) for c in cols))
    cap_ge = torch.from_numpy(sum(c[1].astype(np.int64) for c in cols))
    cap_nan = torch.from_numpy(np.logical_or.reduce([c[2] > 0 for c in cols]))
    return (torch.from_numpy(row_gt), torch.from_numpy(row_eq), torch.from_numpy(row_nan > 0), cap_gt, cap_ge,
            cap_nan)


def _count_on_device(grid: TileScores, mine: range, best: torch.Tensor, pos: torch.Tensor, check_nan: bool) -> tuple:
    """Pass 2 on a GPU: the tiles made and counted there, in order; only the counts come back."""
    n, n_cap = grid.shape
    dev = grid.img.device
    i2t, eq = torch.zeros(n, dtype=torch.long, device=dev), torch.zeros(n, dtype=torch.long, device=dev)
    tied = torch.zeros(n, dtype=torch.bool, device=dev)
    cap_gt, cap_ge = torch.zeros(n_cap, dtype=torch.long, device=dev), torch.zeros(n_cap, dtype=torch.long, device=dev)
    cap_nan = torch.zeros(n_cap, dtype=torch.bool, device=dev)
    for t in mine:
        r = slice(t * grid.rows, min((t + 1) * grid.rows, n))
        bb = best[r, None]
        for u in range(grid.tiles):
            c = slice(u * grid.cols, min((u + 1) * grid.cols, n_cap))
            s, pp = grid.tile(t, u), pos[None, c]
            i2t[r] += (s > bb).sum(1)
            eq[r] += (s == bb).sum(1)
            cap_gt[c] += (s > pp).sum(0)
            cap_ge[c] += (s >= pp).sum(0)
            if check_nan:
                nan = torch.isnan(s)
                tied[r] |= nan.any(1)
                cap_nan[c] |= nan.any(0)
    return i2t.cpu(), eq.cpu(), tied.cpu(), cap_gt.cpu(), cap_ge.cpu(), cap_nan.cpu()


def _merge_blocks(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Every rank's [lo, hi) slice of x, put together (the same on every rank)."""
    if distributed.world_size() == 1:
        return x
    parts = [None] * distributed.world_size()
    torch.distributed.all_gather_object(parts, (lo, hi, x[lo:hi].cpu()))
    out = x.clone()
    for a, b, block in parts:
        out[a:b] = block.to(x.device)
    return out


def _merge_rows(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return _merge_blocks(torch.from_numpy(x), lo, hi).numpy()


def _merge_values(idx: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (indices, values), concatenated."""
    if distributed.world_size() == 1:
        return idx, values
    parts = [None] * distributed.world_size()
    torch.distributed.all_gather_object(parts, (idx, values))
    return (np.concatenate([p[0] for p in parts]).astype(np.int64),
            np.concatenate([p[1] for p in parts]).astype(np.int64))


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
    heads = {**RECALL_HEADS, **SINGLE_MODAL_HEADS}
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(f"{heads.get(k, k):>9}" for k in keys)]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[k]:9.1f}" if k in m else f"{'-':>9}" for k in keys))
    return "\n".join(lines)


def format_evaluation(name: str, metrics: dict[str, float]) -> str:
    """One evaluation as text: the cross-modal recalls, then the single-modal ones it has."""
    text = format_table({name: metrics})
    single = [k for k in SINGLE_MODAL_KEYS if k in metrics]
    if single:
        queries = f" ({metrics['i2i_queries']:.0f} image queries)" if "i2i_queries" in metrics else ""
        text += "\n" + format_table({name: metrics}, single) + queries
    return text


def protocol_metrics(img: torch.Tensor, txt: torch.Tensor, protocol: str = "standard", k: int = 5,
                     return_ranks: bool = False):
    """Metrics of embeddings under a protocol: `standard` (all images, e.g. Flickr30K 1K test,
    COCO 5K), or `coco1k` (COCO 1K: the mean of the metrics of 5 folds of 1000 images).
    Collective (`embedding_metrics`): every rank passes the same embeddings."""
    if protocol == "standard":
        return embedding_metrics(img, txt, k, return_ranks=return_ranks)
    if protocol != "coco1k":
        raise ValueError(f"protocol must be 'standard' or 'coco1k', got {protocol!r}")
    n = img.shape[0]
    if n != 5000:
        raise ValueError(f"coco1k needs the 5000 COCO test images (5 folds of 1000), got {n}")
    folds = [embedding_metrics(img[f * 1000:(f + 1) * 1000], txt[f * 1000 * k:(f + 1) * 1000 * k], k,
                               return_ranks=True) for f in range(5)]
    metrics = {key: float(np.mean([m[key] for m, _ in folds])) for key in METRIC_KEYS}
    if not return_ranks:
        return metrics
    ranks = {d: np.concatenate([r[d] for _, r in folds]) for d in ("i2t", "t2i")}
    return metrics, ranks
