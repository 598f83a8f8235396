"""The published VSE++ evaluation's ranking, written as it is: per query, `argsort(scores)[::-1]`
and the place of the first positive. The tests compare the tiled kernel with it on matrices
where no negative ties a positive (there, the two rules agree)."""
from __future__ import annotations

import numpy as np


def vse_ranks(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the N image queries (rows) and the K*N caption queries (columns)."""
    n = sims.shape[0]
    i2t = np.array([min(np.where(np.argsort(sims[i])[::-1] == c)[0][0] for c in range(k * i, k * i + k))
                    for i in range(n)])
    t2i = np.array([np.where(np.argsort(sims[:, c])[::-1] == c // k)[0][0] for c in range(k * n)])
    return i2t, t2i


def vse_metrics(sims: np.ndarray, k: int) -> dict:
    """R@1/5/10, medr and meanr both ways and rSum, with the published code's arithmetic."""
    out = {}
    for name, r in zip(("i2t", "t2i"), vse_ranks(sims, k)):
        for kk in (1, 5, 10):
            out[f"{name}_r{kk}"] = 100.0 * len(np.where(r < kk)[0]) / len(r)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{kk}"] for d in ("i2t", "t2i") for kk in (1, 5, 10))
    return out


def has_ties(sims: np.ndarray, k: int) -> bool:
    """Whether some negative scores exactly a query's best positive (either direction)."""
    n = sims.shape[0]
    pos = sims[np.arange(k * n) // k, np.arange(k * n)]
    best = sims.reshape(n, n, k)[np.arange(n), np.arange(n)].max(1)
    own_caps = np.arange(k * n)[None, :] // k == np.arange(n)[:, None]
    return bool(((sims == best[:, None]) & ~own_caps).any() or ((sims == pos[None, :]) & ~own_caps).any())
