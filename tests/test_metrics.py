"""The retrieval protocol (evaluation/metrics.py) and its tie rule: equal to the published VSE++
code wherever no negative ties a positive; ties, NaNs and collapsed models counted against the
query and reported."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dbl_scale.evaluation import (METRIC_KEYS, chance_metrics, embedding_metrics, format_evaluation,
                                  protocol_metrics, retrieval_metrics)
from vse_reference import has_ties, vse_metrics, vse_ranks


def scores(rng, n: int, k: int, dtype=np.float64) -> np.ndarray:
    """A half-decent model's scores, continuous (ties have probability 0)."""
    sims = rng.normal(size=(n, k * n))
    sims[np.arange(n).repeat(k), np.arange(k * n)] += 1.5
    return sims.astype(dtype)


@pytest.mark.parametrize("k", [5, 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("as_torch", [False, True])
def test_equals_vse_on_tie_free_scores(k, dtype, as_torch):
    rng = np.random.default_rng([k, dtype == np.float32])
    for n in (1, 7, 60, 600):  # 600 x 3000: several tiles of 512 x 2560
        sims = scores(rng, n, k, dtype)
        assert not has_ties(sims, k)
        got, ranks = retrieval_metrics(torch.from_numpy(sims) if as_torch else sims, k, return_ranks=True)
        assert list(got) == list(METRIC_KEYS)
        want = vse_metrics(sims, k)
        assert {key: got[key] for key in want} == want  # exactly, not approximately
        want_i2t, want_t2i = vse_ranks(sims, k)
        assert np.array_equal(ranks["i2t"], want_i2t) and np.array_equal(ranks["t2i"], want_t2i)
        assert got["i2t_tied"] == got["t2i_tied"] == 0


def test_embeddings_equal_the_matrix_and_vse():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(1500, 16, generator=g), dim=1)
    sims = (img @ txt.t()).numpy()
    assert not has_ties(sims, 5)
    for rows in (16, 64, 512):  # tiles of rows x 5 rows: several, short ones at the edges, or one
        got, ranks = embedding_metrics(img, txt, 5, return_ranks=True, rows=rows)
        assert got == retrieval_metrics(sims, 5)
        assert all(np.array_equal(a, b) for a, b in zip((ranks["i2t"], ranks["t2i"]), vse_ranks(sims, 5)))


def test_ties_count_against_the_query():
    """Where a negative ties the best positive, it counts: the rank is the pessimistic one, never
    what a sort happened to give; the query is counted as tied."""
    rng = np.random.default_rng(0)
    sims = np.round(scores(rng, 40, 5), 1)  # many ties
    assert has_ties(sims, 5)
    m, ranks = retrieval_metrics(sims, 5, return_ranks=True)
    n = 40
    own = np.arange(5 * n)[None, :] // 5 == np.arange(n)[:, None]
    best = np.where(own, sims, -np.inf).max(1)
    pos = sims[np.arange(5 * n) // 5, np.arange(5 * n)]
    assert np.array_equal(ranks["i2t"], ((sims >= best[:, None]) & ~own).sum(1))
    assert np.array_equal(ranks["t2i"], ((sims >= pos[None, :]) & ~own).sum(0))
    assert m["i2t_tied"] == ((sims == best[:, None]) & ~own).any(1).sum() > 0
    assert m["t2i_tied"] == ((sims == pos[None, :]) & ~own).any(0).sum() > 0
    vse_i2t, vse_t2i = vse_ranks(sims, 5)  # the sort's answer is never worse than the rule's
    assert (ranks["i2t"] >= vse_i2t).all() and (ranks["t2i"] >= vse_t2i).all()
    assert (ranks["t2i"] > vse_t2i).any()  # ... and here sometimes better: the rule matters


@pytest.mark.parametrize("compile", [False, True])
def test_a_collapsed_model_scores_at_or_below_chance(compile):
    """All embeddings equal: every score ties, so every query ranks behind all its negatives."""
    n, k = 64, 5
    img, txt = torch.ones(n, 8), torch.ones(k * n, 8)
    for m in (embedding_metrics(img, txt, k, rows=16, compile=compile), retrieval_metrics(img @ txt.t(), k)):
        chance = chance_metrics(n, k)
        assert all(m[key] <= chance[key] for key in chance)
        assert m["i2t_r10"] == m["t2i_r10"] == 0.0 and m["t2i_medr"] == n
        assert m["i2t_tied"] == n and m["t2i_tied"] == k * n


def test_duplicated_captions_are_counted_as_ties():
    """Image 0's first caption repeated as image 1's first: image 1's query ties a negative
    (and so does image 0's where that caption is its best), and so do those captions' queries."""
    g = torch.Generator().manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(5, 0) + 0.5 * torch.randn(150, 16, generator=g), dim=1)
    clean = embedding_metrics(img, txt, 5)
    assert clean["i2t_tied"] == clean["t2i_tied"] == 0
    txt[5] = txt[0]  # image 1's first caption = image 0's first caption
    m, ranks = embedding_metrics(img, txt, 5, return_ranks=True)
    sims = (img @ txt.t()).numpy()
    best1 = sims[1, 5:10].max()
    ties_1 = sims[1, 5] == best1  # image 1's best caption is the duplicate: it ties caption 0
    assert m["t2i_tied"] == 0  # columns 0 and 5 are equal, but their images differ: no tie in a column
    assert m["i2t_tied"] == int(ties_1) + int(sims[0, 0] == sims[0, :5].max())
    assert ranks["i2t"][1] == ((sims[1] >= best1).sum() - (sims[1, 5:10] >= best1).sum())


def test_nan_scores_count_against_the_query():
    sims = scores(np.random.default_rng(2), 10, 2)
    sims[3, 0] = np.nan  # a NaN negative of image 3 and of caption 0
    sims[4, 8:10] = np.nan  # both positives of image 4 NaN (and of captions 8, 9)
    m, ranks = retrieval_metrics(sims, 2, return_ranks=True)
    clean = np.nan_to_num(sims, nan=-np.inf)
    want_i2t, want_t2i = vse_ranks(clean, 2)
    assert ranks["i2t"][3] == want_i2t[3] + 1  # the NaN negative counts
    assert ranks["i2t"][4] == 18 and ranks["t2i"][8] == ranks["t2i"][9] == 9  # all NaN: behind every negative
    assert ranks["t2i"][0] == want_t2i[0] + 1
    others = [i for i in range(10) if i not in (3, 4)]
    assert np.array_equal(ranks["i2t"][others], want_i2t[others])


def test_ranks_output():
    sims = np.full((3, 6), 0.0)
    sims[0, 1] = 1.0  # image 0: its 2nd caption first
    sims[1, 0] = 2.0  # image 1: caption 0 (of image 0) beats its own
    sims[1, 2] = 1.0
    sims[2, 5] = 3.0
    sims[2, 0] = -1.0
    m, ranks = retrieval_metrics(sims, captions_per_image=2, return_ranks=True)
    assert ranks["i2t"].tolist() == [0, 1, 0]
    assert ranks["t2i"][1] == 0 and ranks["t2i"][5] == 0  # unique winners
    assert ranks["t2i"][0] == 1  # caption 0: image 1 scores 2.0, its own image 0.0, image 2 -1.0
    assert ranks["t2i"][3] == 2  # caption 3: all three images score 0.0, a tie counted against it
    assert m["i2t_r1"] == pytest.approx(200 / 3) and m["t2i_tied"] == 2  # captions 3 and 4 tie
    assert retrieval_metrics(sims, captions_per_image=2) == m


def test_perfect_and_torch_input():
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


def test_coco1k_is_the_mean_of_five_folds():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)
    txt = img.repeat_interleave(5, dim=0).clone()  # every caption = its image: perfect retrieval
    txt[:5000] = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)  # fold 0 random
    fold0 = retrieval_metrics(img[:1000] @ txt[:5000].t())
    m = protocol_metrics(img, txt, "coco1k")
    assert m["rsum"] == pytest.approx((fold0["rsum"] + 4 * 600) / 5)
    assert fold0["rsum"] < 100
    assert m["i2t_tied"] == fold0["i2t_tied"]  # the perfect folds have no tie: tied counts add up
    with pytest.raises(ValueError, match="5000 COCO test images"):
        protocol_metrics(img[:100], txt[:500], "coco1k")


def test_the_printed_evaluation_shows_the_ties():
    m = retrieval_metrics(np.ones((4, 20)))
    text = format_evaluation("model", {**m, "i2i_queries": 114, "i2i_r1": 1.0, "i2i_r5": 2.0, "i2i_r10": 3.0})
    assert "queries tied with a negative (counted against them): I2T 4, T2I 20" in text
    assert "(114 image queries)" in text
