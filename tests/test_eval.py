"""retrieval_metrics against the published protocol written the naive way (argsort per query)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dbl_scale.evaluation import METRIC_KEYS, chance_metrics, retrieval_metrics


def naive_ranks(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The VSE++ evaluation code's logic: `argsort(d)[::-1]` per query, find the positive's place."""
    n = sims.shape[0]
    i2t = np.zeros(n)
    for i in range(n):
        inds = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(inds == c)[0][0] for c in range(k * i, k * i + k))
    t2i = np.zeros(k * n)
    for c in range(k * n):
        inds = np.argsort(sims[:, c])[::-1]
        t2i[c] = np.where(inds == c // k)[0][0]
    return i2t, t2i


def naive_metrics(sims: np.ndarray, k: int) -> dict:
    out = {}
    for name, r in zip(("i2t", "t2i"), naive_ranks(sims, k)):
        for kk in (1, 5, 10):
            out[f"{name}_r{kk}"] = 100.0 * len(np.where(r < kk)[0]) / len(r)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = (out["i2t_r1"] + out["i2t_r5"] + out["i2t_r10"]
                   + out["t2i_r1"] + out["t2i_r5"] + out["t2i_r10"])
    return out


def scores(rng, n: int, k: int, ties: str, dtype) -> np.ndarray:
    """A half-decent model's scores; `ties` makes many of them equal."""
    sims = rng.normal(size=(n, k * n))
    sims[np.arange(n).repeat(k), np.arange(k * n)] += 1.5
    if ties == "round1":
        sims = np.round(sims, 1)
    elif ties == "integer":
        sims = np.round(sims)
    elif ties == "binary":
        sims = (sims > 1.0).astype(float)
    return sims.astype(dtype)


def assert_same(sims, ref: np.ndarray, k: int, chunk: int = 1024) -> None:
    got, ranks = retrieval_metrics(sims, captions_per_image=k, chunk=chunk, return_ranks=True)
    assert list(got) == list(METRIC_KEYS)
    assert got == naive_metrics(ref, k)  # exactly, not approximately
    want_i2t, want_t2i = naive_ranks(ref, k)
    np.testing.assert_array_equal(ranks["i2t"], want_i2t)
    np.testing.assert_array_equal(ranks["t2i"], want_t2i)


@pytest.mark.parametrize("k", [5, 1])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_matches_naive_argsort_on_random_scores(k, chunk):
    rng = np.random.default_rng(k)
    sims = scores(rng, 60, k, "none", np.float64)
    assert_same(sims, sims, k, chunk)
    assert 0 < retrieval_metrics(sims, captions_per_image=k)["rsum"] < 600


@pytest.mark.parametrize("k", [5, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ties", ["round1", "integer", "binary"])
@pytest.mark.parametrize("as_torch", [False, True])
def test_matches_naive_argsort_on_tied_scores(k, dtype, ties, as_torch):
    """Ties resolved as numpy's (unstable) argsort of the input's dtype places them, on many matrices."""
    rng = np.random.default_rng([k, ties == "integer", ties == "binary", dtype == np.float32])
    for trial in range(8):
        sims = scores(rng, int(rng.integers(2, 40)), k, ties, dtype)
        assert_same(torch.from_numpy(sims) if as_torch else sims, sims, k, chunk=int(rng.integers(1, 12)))


def test_ties_change_ranks_so_the_test_above_bites():
    """On tied scores, counting strictly-greater scores alone is not the reference's answer."""
    rng = np.random.default_rng(0)
    sims = scores(rng, 40, 5, "round1", np.float64)
    want_i2t, want_t2i = naive_ranks(sims, 5)
    pos = sims[np.arange(200) // 5, np.arange(200)]
    optimistic = (sims > pos).sum(axis=0)
    pessimistic = (sims >= pos).sum(axis=0) - 1
    assert (want_t2i != optimistic).any() and (want_t2i != pessimistic).any()


def test_integer_bfloat16_and_nan_scores():
    rng = np.random.default_rng(5)
    ints = rng.integers(-3, 4, size=(30, 150))
    assert_same(ints, ints, 5, chunk=4)
    bf16 = torch.from_numpy(scores(rng, 30, 5, "round1", np.float32)).to(torch.bfloat16)
    assert_same(bf16, bf16.float().numpy(), 5, chunk=9)  # numpy has no bfloat16: sorted as float32
    nan = scores(rng, 30, 5, "round1", np.float64)
    nan[rng.random(nan.shape) < 0.03] = np.nan  # argsort puts NaN last, so first in [::-1]
    assert_same(nan, nan, 5, chunk=8)


def test_ranks_output():
    sims = np.full((3, 6), 0.0)
    sims[0, 1] = 1.0  # image 0: its 2nd caption first
    sims[1, 0] = 2.0  # image 1: caption 0 (of image 0) beats its own
    sims[1, 2] = 1.0
    sims[2, 5] = 3.0
    sims[2, 0] = -1.0
    m, ranks = retrieval_metrics(sims, captions_per_image=2, return_ranks=True)
    assert ranks["i2t"].shape == (3,) and ranks["t2i"].shape == (6,)
    assert ranks["i2t"][0] == 0 and ranks["i2t"][1] == 1 and ranks["i2t"][2] == 0
    assert ranks["t2i"][1] == 0 and ranks["t2i"][5] == 0  # unique winners
    assert ranks["t2i"][0] == 1  # caption 0: image 1 scores 2.0, its own image 0.0, image 2 -1.0
    assert m["i2t_r1"] == pytest.approx(200 / 3)
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


def test_bench_eval_tiny(capsys):
    import argparse

    from dbl_scale.cli.bench.eval import add_parser as add_bench_eval_parser, bench_eval, format_bench_eval

    r = bench_eval(n_images=40, k=5, dim=16, repeats=1, naive_images=10, chunk=8)
    assert r["naive_agrees"] and r["naive_extrapolated"] and r["naive_queries"] == [10, 50]
    assert r["product_s"] > 0 and r["metrics_s"] > 0 and r["naive_s"] > r["product_s"]
    assert r["ratio_metrics_to_product"] > 0 and r["speedup_vs_naive"] > 0
    assert r["product_peak_mib"] == pytest.approx(40 * 200 * 4 / 2 ** 20, rel=0.01)  # the sims matrix
    text = format_bench_eval(r)
    assert "(b)/(a)" in text and "(c)/(b)" in text and "extrapolated linearly" in text

    parser = argparse.ArgumentParser()
    add_bench_eval_parser(parser.add_subparsers(dest="bench_command"))
    args = parser.parse_args(["eval", "--images", "12", "--dim", "8", "--repeats", "1", "--naive-images", "0",
                              "--quiet"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "12 images x 60 captions" in out and "all queries timed" in out


def test_coco1k_is_the_mean_of_five_folds():
    import torch

    from dbl_scale.evaluation import protocol_metrics
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)
    txt = img.repeat_interleave(5, dim=0).clone()  # every caption = its image: perfect retrieval
    txt[:5000] = torch.nn.functional.normalize(torch.randn(5000, 16, generator=g), dim=1)  # fold 0 random
    fold0 = retrieval_metrics(img[:1000] @ txt[:5000].t())["rsum"]
    m = protocol_metrics(img, txt, "coco1k")
    assert m["rsum"] == pytest.approx((fold0 + 4 * 600) / 5)
    assert fold0 < 100
    with pytest.raises(ValueError, match="5000 COCO test images"):
        protocol_metrics(img[:100], txt[:500], "coco1k")
