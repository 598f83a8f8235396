"""DBL as the method computes it: the boost keeps its own form whatever the raw triplet's
warm-up does, the momentum m0 derived from the init share it leaves, the diagnostics against
plain loops, and the anchor's distance to the target."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbl_scale.branches import relative_distance
from dbl_scale.config import load_config
from dbl_scale.losses import Scores, boost_diagnostics, boost_relative, hinge_triplet
from dbl_scale.methods import build_method
from dbl_scale.methods.dbl import init_left, m0_for_init_left, momentum_at
from dbl_scale.models import Embeddings

IDS = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6, 7, 7])


def _embeddings(seed: int, n: int = 10, d: int = 6) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    return Embeddings(F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
                      F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


@pytest.mark.parametrize("reduction", ["max", "sum"])
def test_the_boost_keeps_its_own_form_during_the_warm_up(reduction):
    """While the raw triplet sums over negatives (VSE-infinity's warm-up), the boost stays in
    the form `loss.dbl.reduction` asks for; after the warm-up the raw triplet takes the max."""
    method = build_method(load_config(None, ["loss.method=dbl", "loss.sum_warmup_steps=100",
                                             f"loss.dbl.reduction={reduction}"]))
    anchor, target = _embeddings(1), _embeddings(2)
    s_t, s_a = Scores.square(target.img @ target.txt.t(), IDS), Scores.square(anchor.img @ anchor.txt.t(), IDS)
    want_boost = boost_relative(s_t, s_a, 0.2, 1.0, max_violation=reduction == "max")
    for step, raw_max in ((0, False), (99, False), (100, True)):
        terms = method.losses([anchor, target], IDS, step)[1]
        assert terms["loss/boost"].item() == pytest.approx(want_boost.item(), rel=1e-12)
        assert terms["loss/raw"].item() == pytest.approx(hinge_triplet(s_t, 0.2, raw_max).item(), rel=1e-12)
    assert want_boost.item() != pytest.approx(boost_relative(s_t, s_a, 0.2, 1.0, max_violation=reduction != "max").item())


def test_momentum_schedule_and_the_init_share_it_leaves():
    assert momentum_at(0, 600, 0.99) == pytest.approx(0.99) and momentum_at(600, 600, 0.99) == pytest.approx(1.0)
    # an EMA of a scalar anchor starting at 1 towards a target held at 0 keeps the init share
    for m0, steps, want in ((0.99, 600, 0.05), (0.9995, 600, 0.86)):
        a = 1.0
        for t in range(1, steps + 1):
            a = momentum_at(t, steps, m0) * a
        assert init_left(m0, steps) == pytest.approx(a, rel=1e-9)
        assert a == pytest.approx(want, abs=0.005)  # the shares quoted in docs/methods.md
    for left, steps in ((0.2, 600), (0.5, 600), (0.8, 1800)):
        assert init_left(m0_for_init_left(left, steps), steps) == pytest.approx(left, rel=1e-6)
    method = build_method(load_config(None, ["loss.method=dbl", "loss.dbl.momentum_init_left=0.5",
                                             "train.steps=600"]))
    assert method.momentum(0) == pytest.approx(m0_for_init_left(0.5, 600))
    assert method.step_metrics(0)["momentum"] == pytest.approx(method.m0)


def test_boost_diagnostics_match_loops():
    anchor, target = _embeddings(3), _embeddings(4)
    t, a = target.img @ target.txt.t(), anchor.img @ anchor.txt.t()
    got = boost_diagnostics(Scores.square(t, IDS), Scores.square(a, IDS), margin=0.2, beta=0.25)
    n = len(IDS)
    want = {"active": 0.0, "target_gap": 0.0, "anchor_gap": 0.0, "same_negative": 0.0}
    for s_t, s_a in ((t, a), (t.t(), a.t())):  # rows: image queries; then caption queries
        for q in range(n):
            negs = [j for j in range(n) if IDS[j] != IDS[q]]
            j = max(negs, key=lambda c: (s_t[q, c] - s_a[q, c]).item())
            hardest = max(negs, key=lambda c: s_t[q, c].item())
            t_gap, a_gap = (s_t[q, q] - s_t[q, j]).item(), (s_a[q, q] - s_a[q, j]).item()
            want["active"] += float(0.05 + a_gap - t_gap > 0)
            want["target_gap"] += t_gap
            want["anchor_gap"] += a_gap
            want["same_negative"] += float(j == hardest)
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert 0 < want["active"] < 2 * n and 0 < want["same_negative"] < 2 * n  # neither all nor none


def test_dbl_logs_its_diagnostics_as_shares_of_the_global_batch():
    method = build_method(load_config(None, ["loss.method=dbl"]))
    anchor, target = _embeddings(5), _embeddings(6)
    terms = method.losses([anchor, target], IDS)[1]
    for key in ("dbl/active", "dbl/same_negative"):
        assert 0.0 <= terms[key].item() <= 1.0
    same = method.losses([target, target], IDS)[1]  # anchor == target: every query violates by the margin
    assert same["dbl/active"].item() == 1.0
    assert same["dbl/target_gap"].item() == pytest.approx(same["dbl/anchor_gap"].item())


def test_relative_distance():
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()]).double()  # noqa: E731
    assert relative_distance(a, b) == pytest.approx(((flat(a) - flat(b)).norm() / flat(b).norm()).item())
    assert relative_distance(b, b) == 0.0
