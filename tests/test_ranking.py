"""The tiled kernel (evaluation/ranking.py): tiles of a product rank as the matrix those tiles
make (ties, NaNs, overflow, short edge tiles), the compiled counting equals the eager one bit for
bit, groups and self-exclusion follow the rule, and two ranks end with one process's ranks."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from dbl_scale.evaluation.ranking import MatrixSource, TileSource, best_in_tile, count_tile, rank_tiles

from conftest import REPO, torchrun

sys.path.insert(0, str(REPO / "tests" / "workers"))
from tiled_ranks import embeddings as worker_embeddings, image_groups, rank_all  # noqa: E402


def _embeddings(kind: str, n: int, k: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "float":
        return (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
                torch.nn.functional.normalize(torch.randn(k * n, d, generator=g), dim=1))
    img = torch.randint(-2, 3, (n, d), generator=g).float()  # exact integer scores: many ties
    txt = torch.randint(-2, 3, (k * n, d), generator=g).float()
    if kind == "nan":
        img[n // 3, 0], txt[k * n // 2, 1] = float("nan"), float("nan")
    if kind == "overflow":  # finite embeddings whose products overflow: inf scores, and NaN where inf - inf
        img[n // 4, :2], txt[k * n // 3, :2] = torch.tensor([3e30, -3e30]), torch.tensor([3e30, 3e30])
    return img, txt


def _cross(source, k: int, compile=False):
    n, m = source.shape
    return rank_tiles(source, torch.arange(n), torch.arange(m) // k, columns=True, compile=compile)


def _tiles_matrix(source: TileSource) -> torch.Tensor:
    n_t, n_u = -(-source.shape[0] // source.rows), -(-source.shape[1] // source.cols)
    return torch.cat([torch.cat([source.tile(t, u).clone() for u in range(n_u)], 1) for t in range(n_t)])


def _rule(sims: np.ndarray, rel: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule written per query (rows): negatives >= the best non-NaN relevant score, NaN
    negatives counted; -1 without a relevant candidate."""
    ranks, tied = np.full(len(sims), -1), np.zeros(len(sims), bool)
    for i, s in enumerate(sims):
        if not rel[i].any():
            continue
        kept = s[rel[i] & ~np.isnan(s)]
        best = kept.max() if len(kept) else -np.inf
        ranks[i] = np.count_nonzero(neg[i] & ((s >= best) | np.isnan(s)))
        tied[i] = np.count_nonzero(neg[i] & ((s == best) | np.isnan(s))) > 0
    return ranks, tied


@pytest.mark.parametrize("kind", ["float", "ties", "nan", "overflow"])
@pytest.mark.parametrize("n,k,rows", [(300, 5, 64), (257, 2, 256), (50, 1, 16), (40, 3, 512)])
def test_tiles_rank_as_their_matrix_and_as_the_rule(kind, n, k, rows):
    img, txt = _embeddings(kind, n, k, 8, seed=n + k)
    source = TileSource(img, txt, rows, k * rows)
    got = _cross(source, k)
    matrix = _tiles_matrix(source)
    want = _cross(MatrixSource(matrix, 512, 2560), k)
    for a, b in ((got.rows, want.rows), (got.rows_tied, want.rows_tied), (got.cols, want.cols),
                 (got.cols_tied, want.cols_tied)):
        assert np.array_equal(a, b)
    s = matrix.numpy()
    own = np.arange(k * n)[None, :] // k == np.arange(n)[:, None]
    assert all(np.array_equal(a, b) for a, b in zip((got.rows, got.rows_tied), _rule(s, own, ~own)))
    assert all(np.array_equal(a, b) for a, b in zip((got.cols, got.cols_tied), _rule(s.T, own.T, ~own.T)))
    if kind != "float":
        assert got.rows_tied.any() and got.cols_tied.any()
        assert torch.equal(torch.nan_to_num(matrix, 7.0), torch.nan_to_num(img @ txt.t(), 7.0))  # exact scores


@pytest.mark.parametrize("kind", ["ties", "nan", "float"])
def test_compiled_counting_equals_eager(kind):
    """torch.compile of count_tile gives the eager counts exactly: cross-modal with NaNs and
    ties, and single-modal (rows only, groups and the query itself left out)."""
    img, txt = _embeddings(kind, 96, 5, 8, seed=9)
    source = TileSource(img, txt, 16, 80)
    eager, compiled = _cross(source, 5, compile=False), _cross(source, 5, compile=True)
    for name in ("rows", "rows_tied", "cols", "cols_tied"):
        assert np.array_equal(getattr(eager, name), getattr(compiled, name)), name
    if kind == "ties":
        groups = torch.arange(480) // 5
        one = [rank_tiles(TileSource(txt, txt, 16, 80), groups, groups, exclude_self=True, compile=c) for c in
               (False, True)]
        assert np.array_equal(one[0].rows, one[1].rows) and np.array_equal(one[0].rows_tied, one[1].rows_tied)


def test_count_tile_packs_at_least_and_equal():
    s = torch.tensor([[1.0, 2.0, float("nan"), 2.0], [0.0, 0.0, 0.0, 5.0]])
    rows, cols = count_tile(s, torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0, 9.0, 2.0]), None, None, nan=True)
    low, high = 0xFFFFFFFF, 32
    assert (rows & low).tolist() == [3, 4] and (rows >> high).tolist() == [3, 3]  # NaN: at least and equal
    assert (cols & low).tolist() == [1, 2, 1, 2] and (cols >> high).tolist() == [1, 1, 1, 1]
    groups = torch.tensor([0, 1]), torch.tensor([5, 0, 6, 1])  # (0, 1) and (1, 3) are one group's pairs
    rows, _ = count_tile(s, torch.tensor([2.0, 0.0]), None, *groups, nan=False)
    assert (rows & low).tolist() == [1, 3] and (rows >> high).tolist() == [1, 3]  # NaN not counted: nan=False


def test_groups_and_self_follow_the_rule():
    """Single-modal relevance: groups spread over tiles, items without a relevant one (-1), a
    query whose relevant scores are all NaN (behind every negative), NaN negatives, ties."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randint(-2, 3, (70, 5), generator=g).float()
    emb[5, 1] = float("nan")
    groups = (np.arange(70) * 11) % 23
    groups[[0, 1]] = [100, 101]
    s = (emb @ emb.t()).numpy()
    same = groups[:, None] == groups[None, :]
    self_ = np.eye(70, dtype=bool)
    for rows in (3, 16, 512):
        r = rank_tiles(TileSource(emb, emb, rows, 5 * rows), torch.as_tensor(groups), torch.as_tensor(groups),
                       exclude_self=True, compile=False)
        want = _rule(s, same & ~self_, ~same)
        assert np.array_equal(r.rows, want[0]) and np.array_equal(r.rows_tied, want[1])
    assert r.rows[0] == r.rows[1] == -1 and r.rows[5] == np.count_nonzero(~same[5])
    assert len(set(r.rows.tolist())) > 5


@pytest.mark.launch
def test_two_ranks_score_their_own_rows_and_agree(tmp_path):
    """Two ranks each count their blocks of rows and merge: both end with one process's ranks."""
    torchrun([str(REPO / "tests" / "workers" / "tiled_ranks.py"), str(tmp_path / "ranks.npz")], nproc=2, timeout=300)
    got = np.load(tmp_path / "ranks.npz")
    want = rank_all(*worker_embeddings())
    for r in range(2):
        for name, value in want.items():
            assert np.array_equal(got[f"{name}{r}"], value), (name, r)
    assert want["i2t_tied"].any() and want["t2i_tied"].any()
    assert (want["t2t"] >= 0).all() and 0 < (want["i2i"] >= 0).sum() < len(want["i2i"])
    assert len(np.unique(image_groups())) > 10


def test_best_in_tile_ignores_nan_and_the_item_itself():
    s = torch.tensor([[9.0, 1.0, float("nan")], [2.0, 9.0, 3.0]])
    groups, ids = torch.tensor([0, 0]), torch.tensor([0, 1])
    rb, rh, cb, ch = best_in_tile(s, groups, torch.tensor([0, 0, 0]), ids, torch.tensor([0, 1, 2]))
    assert rb.tolist() == [1.0, 3.0] and rh.tolist() == [True, True]  # the diagonal (self) and NaN left out
    assert cb.tolist() == [2.0, 1.0, 3.0] and ch.tolist() == [True, True, True]
    rb, rh, _, _ = best_in_tile(s, groups, torch.tensor([1, 1, 1]), None, None)
    assert rb.tolist() == [-math.inf, -math.inf] and rh.tolist() == [False, False]  # no relevant pair
