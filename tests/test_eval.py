"""retrieval_metrics against the published protocol written the naive way (argsort per query)."""
from __future__ import annotations

import numpy as np
import pytest

from dbl_scale.eval import chance_metrics, retrieval_metrics


def naive_metrics(sims: np.ndarray, k: int) -> dict:
    """The VSE++ evaluation code's logic: sort every query's scores, find the positive's place."""
    n = sims.shape[0]
    i2t = np.zeros(n)
    for i in range(n):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == c)[0][0] for c in range(k * i, k * i + k))
    t2i = np.zeros(k * n)
    for c in range(k * n):
        order = np.argsort(sims[:, c])[::-1]
        t2i[c] = np.where(order == c // k)[0][0]
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for kk in (1, 5, 10):
            out[f"{name}_r{kk}"] = 100.0 * np.mean(r < kk)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{kk}"] for d in ("i2t", "t2i") for kk in (1, 5, 10))
    return out


@pytest.mark.parametrize("k", [5, 1])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_matches_naive_argsort_on_random_scores(k, chunk):
    rng = np.random.default_rng(k)
    n = 60
    sims = rng.normal(size=(n, k * n))
    sims[np.arange(n).repeat(k), np.arange(k * n)] += 1.5  # make it a half-decent model
    got = retrieval_metrics(sims, captions_per_image=k, chunk=chunk)
    want = naive_metrics(sims, k)
    assert set(got) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
                        "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["rsum"] < 600


def test_perfect_and_torch_input():
    import torch
    sims = torch.eye(4).repeat_interleave(5, dim=1)
    m = retrieval_metrics(sims)
    assert m["rsum"] == 600 and m["i2t_medr"] == 1 and m["t2i_meanr"] == 1


def test_shape_is_checked():
    with pytest.raises(ValueError, match="N images x 5"):
        retrieval_metrics(np.zeros((3, 14)))


def test_chance_level_matches_random_rankings():
    n = 100
    rng = np.random.default_rng(0)
    rsums = [retrieval_metrics(rng.normal(size=(n, 5 * n)))["rsum"] for _ in range(20)]
    assert np.mean(rsums) == pytest.approx(chance_metrics(n)["rsum"], rel=0.15)
