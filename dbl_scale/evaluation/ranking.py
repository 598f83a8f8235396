"""Ranks of retrieval queries under one rule, counted tile by tile on the scores' device.

A query's rank (0-based) is the number of its negatives scoring at least as high as its best
relevant candidate: ties count against the query, and so does a NaN negative; NaN relevant
scores are ignored (all NaN: behind every negative). A query is "tied" when a negative scores
exactly its best relevant score (or NaN); where none does, the rank is the VSE++ code's.
Candidate j is relevant to query i when their groups are equal (with `exclude_self`, not i
itself). Scores come in tiles from a `TileSource` or `MatrixSource`; pass 1 finds each query's
best relevant score in the tiles holding relevant pairs, pass 2 counts every tile
(`count_tile`). Collective: every rank passes the same inputs, counts its own row blocks, and
all end with the same arrays."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .. import distributed

log = logging.getLogger(__name__)

# queries per tile by device type; a tile is rows x (5 * rows) scores
TILE_ROWS = {"cpu": 512, "cuda": 4096}
COMPILE_MIN_SCORES = 2 ** 28  # "auto" compiles count_tile where full tiles hold at least this many scores


@dataclass
class Ranks:
    """0-based ranks of the row queries (-1: no relevant candidate) and whether each tied; the
    same for the column queries when asked (`columns=True`), else None."""
    rows: np.ndarray
    rows_tied: np.ndarray
    cols: Optional[np.ndarray] = None
    cols_tied: Optional[np.ndarray] = None


class TileSource:
    """Tiles of the scores of `queries` (n x d) against `candidates` (m x d): tile (t, u) is
    queries block t times candidates block u, one `torch.mm` into a reused buffer, so a score
    has the same bits in both passes."""

    def __init__(self, queries: torch.Tensor, candidates: torch.Tensor, rows: int, cols: int):
        if queries.dim() != 2 or candidates.dim() != 2 or queries.shape[1] != candidates.shape[1]:
            raise ValueError(f"need n x d queries and m x d candidates, got {tuple(queries.shape)} and "
                             f"{tuple(candidates.shape)}")
        self.q, self.c = queries.float(), candidates.float().to(queries.device)
        self.shape, self.rows, self.cols = (len(queries), len(candidates)), rows, cols
        self.device, self.dtype = self.q.device, torch.float32
        self._buffers: dict = {}

    def tile(self, t: int, u: int) -> torch.Tensor:
        a = self.q[t * self.rows:(t + 1) * self.rows]
        bt = self.c[u * self.cols:(u + 1) * self.cols].t()
        shape = (a.shape[0], bt.shape[1])
        if shape not in self._buffers:
            self._buffers[shape] = torch.empty(shape, device=self.device)
        return torch.mm(a, bt, out=self._buffers[shape])

    def may_hold_nan(self) -> bool:
        """False when no score can be NaN: finite inputs whose products cannot overflow."""
        bound = 2.0 * self.q.shape[1] * _abs_max(self.q) * _abs_max(self.c)
        return not bound < float(np.finfo(np.float32).max)


class MatrixSource:
    """Tiles of a given n x m score matrix (torch or numpy; bfloat16 read as float32, exactly)."""

    def __init__(self, sims: Union[torch.Tensor, np.ndarray], rows: int, cols: int):
        sims = sims.detach() if isinstance(sims, torch.Tensor) else torch.from_numpy(np.asarray(sims))
        self.s = sims.float() if sims.dtype in (torch.bfloat16, torch.float16) else sims
        if not self.s.is_floating_point():
            self.s = self.s.double()
        self.shape, self.rows, self.cols = tuple(self.s.shape), rows, cols
        self.device, self.dtype = self.s.device, self.s.dtype

    def tile(self, t: int, u: int) -> torch.Tensor:
        return self.s[t * self.rows:(t + 1) * self.rows, u * self.cols:(u + 1) * self.cols]

    def may_hold_nan(self) -> bool:
        return True


def count_tile(s: torch.Tensor, row_thr: torch.Tensor, col_thr: Optional[torch.Tensor],
               row_groups: Optional[torch.Tensor], col_groups: Optional[torch.Tensor], nan: bool):
    """The rule on one tile: per row, and per column when `col_thr` is given, the negatives
    scoring >= the threshold and those scoring == it, packed as `at_least + (equal << 32)` in
    int64. Groups (int64, or None where every pair of the tile is a negative): a pair of one
    group is not a negative. `nan`: whether scores may be NaN (a NaN negative then counts as at
    least, and as equal)."""
    bad = torch.isnan(s) if nan else None
    negative = None if row_groups is None else row_groups[:, None] != col_groups[None, :]

    def tally(thr: torch.Tensor, dim: int) -> torch.Tensor:
        at_least, equal = s >= thr, s == thr
        if bad is not None:
            at_least, equal = at_least | bad, equal | bad
        if negative is not None:
            at_least, equal = at_least & negative, equal & negative
        if torch.compiler.is_compiling():  # fused: one pass, one int32 sum of both (a tile is < 2**16 wide)
            both = (at_least.int() + (equal.int() << 16)).sum(dim, dtype=torch.int32)
            return (both & 0xFFFF).long() + ((both >> 16).long() << 32)
        return at_least.sum(dim) + (equal.sum(dim) << 32)

    return tally(row_thr[:, None], 1), None if col_thr is None else tally(col_thr[None, :], 0)


def best_in_tile(s: torch.Tensor, row_groups: torch.Tensor, col_groups: torch.Tensor,
                 row_ids: Optional[torch.Tensor], col_ids: Optional[torch.Tensor]):
    """Per row and per column of one tile: the best relevant score (pairs of one group; with
    ids, not an item with itself), NaN scores ignored, -inf where none; and whether any pair
    is relevant."""
    relevant = row_groups[:, None] == col_groups[None, :]
    if row_ids is not None:
        relevant = relevant & (row_ids[:, None] != col_ids[None, :])
    kept = torch.where(relevant & ~torch.isnan(s), s, torch.full_like(s, -math.inf))
    return kept.amax(1), relevant.any(1), kept.amax(0), relevant.any(0)


def rank_tiles(source, row_groups: torch.Tensor, col_groups: torch.Tensor, columns: bool = False,
               exclude_self: bool = False, compile: Union[bool, str] = "auto", stats: Optional[dict] = None) -> Ranks:
    """Ranks of every row query among the columns (and of every column query among the rows
    with `columns`) under the module's rule. `row_groups` / `col_groups`: int64 group ids;
    `exclude_self`: rows and columns are the same items, and an item is not relevant to itself.
    `compile`: True, False or "auto" (where full tiles hold COMPILE_MIN_SCORES or more) to count
    with `torch.compile`; eager is the fallback wherever compiling fails. `stats`, when given,
    gets the seconds spent making tiles ("product_s", on the host's clock) and in all ("seconds")."""
    t_start, made = time.perf_counter(), 0.0

    def tile(t: int, u: int) -> torch.Tensor:
        nonlocal made
        t0 = time.perf_counter()
        s = source.tile(t, u)
        made += time.perf_counter() - t0
        return s

    n, m = source.shape
    R, C, dev = source.rows, source.cols, source.device
    if len(row_groups) != n or len(col_groups) != m:
        raise ValueError(f"{len(row_groups)} row groups and {len(col_groups)} column groups for {n} x {m} scores")
    if max(R, C) >= 2 ** 16:
        raise ValueError(f"tiles of {R} x {C}: count_tile counts a tile's lines in 16 bits")
    rg, cg = row_groups.to(dev), col_groups.to(dev)
    ids = torch.arange(max(n, m), device=dev) if exclude_self else None
    n_t, n_u = math.ceil(n / R), math.ceil(m / C)
    rank, world = distributed.rank(), distributed.world_size()
    mine = range(n_t * rank // world, n_t * (rank + 1) // world)
    mixed = _mixed_tiles(row_groups.cpu().numpy(), col_groups.cpu().numpy(), R, C)
    nan = source.may_hold_nan()
    full_rows = sum(1 for t in mine if (t + 1) * R <= n)
    compiled = _compiled_when(compile, full_rows * (m // C) * R * C)
    count, best = _Kernel(count_tile, compiled, (R, C)), _Kernel(best_in_tile, compiled, (R, C))

    # pass 1: the best relevant score of each query, from the tiles that hold relevant pairs
    row_best, col_best = (torch.full((size,), -math.inf, dtype=source.dtype, device=dev) for size in (n, m))
    row_has, col_has = (torch.zeros(size, dtype=torch.bool, device=dev) for size in (n, m))
    for t in mine:
        for u in sorted(mixed.get(t, ())):
            s = tile(t, u)
            r, c = slice(t * R, t * R + s.shape[0]), slice(u * C, u * C + s.shape[1])
            rb, rh, cb, ch = best(s, rg[r], cg[c], None if ids is None else ids[r], None if ids is None else ids[c])
            row_best[r], row_has[r] = torch.maximum(row_best[r], rb), row_has[r] | rh
            col_best[c], col_has[c] = torch.maximum(col_best[c], cb), col_has[c] | ch
    if columns:
        col_best = distributed.all_reduce_max(col_best)
        col_has = distributed.all_reduce_max(col_has.to(torch.uint8)) > 0

    # pass 2: every tile of my rows, both directions counted at once (packed counts, unpacked at the end)
    row_counts, col_counts = torch.zeros(n, dtype=torch.long, device=dev), torch.zeros(m, dtype=torch.long, device=dev)
    for t in mine:
        r = slice(t * R, min((t + 1) * R, n))
        for u in range(n_u):
            s = tile(t, u)
            c = slice(u * C, u * C + s.shape[1])
            groups = (rg[r], cg[c]) if u in mixed.get(t, ()) else (None, None)  # (an item is in its own group)
            rows_packed, cols_packed = count(s, row_best[r], col_best[c] if columns else None, *groups, nan)
            row_counts[r] += rows_packed
            if columns:
                col_counts[c] += cols_packed

    # ranks: each rank's own rows, summed into everyone's; columns summed over the ranks
    rows_mine = torch.zeros(n, dtype=torch.bool, device=dev)
    rows_mine[mine.start * R:mine.stop * R] = True
    row_rank = torch.where(rows_mine, torch.where(row_has, row_counts & 0xFFFFFFFF, -1), 0)
    row_tied = (rows_mine & row_has & (row_counts >> 32 > 0)).to(torch.uint8)
    out = Ranks(distributed.all_reduce_sum(row_rank).cpu().numpy(), (distributed.all_reduce_sum(row_tied) > 0).cpu().numpy())
    if columns:
        col_counts = distributed.all_reduce_sum(col_counts)
        out.cols = torch.where(col_has, col_counts & 0xFFFFFFFF, -1).cpu().numpy()
        out.cols_tied = (col_has & (col_counts >> 32 > 0)).cpu().numpy()
    if stats is not None:
        stats.update(product_s=made, seconds=time.perf_counter() - t_start)
    return out


def _mixed_tiles(row_groups: np.ndarray, col_groups: np.ndarray, rows: int, cols: int) -> dict[int, set]:
    """{row block: the column blocks sharing a group with it}: the tiles that may hold relevant pairs."""
    rp = np.unique(np.stack([row_groups, np.arange(len(row_groups)) // rows], 1), axis=0)
    cp = np.unique(np.stack([col_groups, np.arange(len(col_groups)) // cols], 1), axis=0)
    lo, hi = np.searchsorted(rp[:, 0], cp[:, 0], "left"), np.searchsorted(rp[:, 0], cp[:, 0], "right")
    per = hi - lo  # row blocks of each (group, column block)'s group
    first = np.repeat(lo, per) + np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
    out: dict[int, set] = {}
    for t, u in np.unique(np.stack([rp[first, 1], np.repeat(cp[:, 1], per)], 1), axis=0).tolist():
        out.setdefault(t, set()).add(u)
    return out


def _compiled_when(compile: Union[bool, str], full_scores: int) -> bool:
    if compile not in (True, False, "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if compile == "auto":
        return full_scores >= COMPILE_MIN_SCORES and os.environ.get("TORCHDYNAMO_DISABLE", "0") in ("", "0")
    return compile


_COMPILED: dict = {}  # function -> torch.compile of it, made once per process; False once compiling failed


class _Kernel:
    """A tile function, compiled for full tiles where asked for and where that works; eager for
    the others (short tiles at the edges) and wherever compiling fails."""

    def __init__(self, fn, compiled: bool, full: tuple):
        self.fn, self.compiled, self.full = fn, compiled, full

    def __call__(self, s, *args):
        fast = _COMPILED.get(self.fn) if self.compiled and tuple(s.shape) == self.full else False
        if fast is None:
            fast = _COMPILED[self.fn] = torch.compile(self.fn, dynamic=False, fullgraph=True)
        if fast:
            try:
                return fast(s, *args)
            except Exception as exc:  # noqa: BLE001 - no compiler, no triton, ...: eager always works
                log.warning("torch.compile of the evaluation's %s failed, running it eagerly: %s", self.fn.__name__,
                            (str(exc).splitlines() or [type(exc).__name__])[0][:200])
                _COMPILED[self.fn] = False
        return self.fn(s, *args)


def _abs_max(x: torch.Tensor) -> float:
    """max |x| in chunks (no |x| copy of the whole); inf when x holds a NaN or inf."""
    parts = [float(x[i:i + 65536].abs().max()) for i in range(0, x.shape[0], 65536)]
    return max(parts, default=0.0) if all(map(math.isfinite, parts)) else math.inf
