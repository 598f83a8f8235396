"""Each loss against a plain reference written as loops over queries (LOSSES.md), and the
local-block form (what one rank computes) against the square matrix."""
from __future__ import annotations

import pytest
import torch

from dbl_scale.losses import Scores, boost_absolute, boost_relative, hinge_triplet


def _neg(i, j, ids):
    return i != j if ids is None else int(ids[i]) != int(ids[j])


def ref_hinge(S, margin, max_violation, ids=None):
    n = len(S)
    total = 0.0
    for i in range(n):  # image queries: row i
        costs = [max(0.0, margin + S[i, j] - S[i, i]) for j in range(n) if _neg(i, j, ids)]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    for j in range(n):  # caption queries: column j
        costs = [max(0.0, margin + S[i, j] - S[j, j]) for i in range(n) if _neg(i, j, ids)]
        total += (max(costs) if max_violation else sum(costs)) if costs else 0.0
    return total


def ref_relative(St, Sa, margin, beta, max_violation, ids=None):
    n, m = len(St), margin * beta
    total = 0.0
    for i in range(n):
        c = [max(0.0, m + (Sa[i, i] - Sa[i, j]) - (St[i, i] - St[i, j])) for j in range(n) if _neg(i, j, ids)]
        total += (max(c) if max_violation else sum(c)) if c else 0.0
    for j in range(n):
        c = [max(0.0, m + (Sa[j, j] - Sa[i, j]) - (St[j, j] - St[i, j])) for i in range(n) if _neg(i, j, ids)]
        total += (max(c) if max_violation else sum(c)) if c else 0.0
    return total


def ref_absolute(St, Sa, margin, beta, gamma, max_violation, ids=None):
    n = len(St)
    g1, g2 = gamma * margin * beta, (1 - gamma) * margin * beta
    total = 2 * sum(max(0.0, g1 + Sa[i, i] - St[i, i]) for i in range(n))
    for i in range(n):
        c = [max(0.0, g2 + St[i, j] - Sa[i, j]) for j in range(n) if _neg(i, j, ids)]
        total += (max(c) if max_violation else sum(c)) if c else 0.0
    for j in range(n):
        c = [max(0.0, g2 + St[i, j] - Sa[i, j]) for i in range(n) if _neg(i, j, ids)]
        total += (max(c) if max_violation else sum(c)) if c else 0.0
    return total


def _cos(n, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a @ b.t()


IDS = [None, torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])]


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("max_violation", [True, False])
def test_hinge_triplet_matches_loops(ids, max_violation):
    S = _cos(10, seed=1)
    got = hinge_triplet(S, 0.2, max_violation, image_ids=ids)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_hinge(S.numpy(), 0.2, max_violation, ids), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_boost_relative_matches_loops(ids, max_violation, beta):
    St, Sa = _cos(10, seed=2), _cos(10, seed=3)
    got = boost_relative(St, Sa, 0.2, beta, image_ids=ids, max_violation=max_violation)
    want = ref_relative(St.numpy(), Sa.numpy(), 0.2, beta, max_violation, ids)
    assert want > 0
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 0.3])
def test_boost_absolute_matches_loops(ids, max_violation, gamma):
    St, Sa = _cos(10, seed=4), _cos(10, seed=5)
    got = boost_absolute(St, Sa, 0.2, 1.0, gamma, image_ids=ids, max_violation=max_violation)
    want = ref_absolute(St.numpy(), Sa.numpy(), 0.2, 1.0, gamma, max_violation, ids)
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_anchor_gets_no_gradient():
    St = _cos(6, seed=6).requires_grad_(True)
    Sa = _cos(6, seed=7).requires_grad_(True)
    boost_relative(St, Sa).backward()
    assert St.grad is not None and St.grad.abs().sum() > 0
    assert Sa.grad is None


def test_masking_removes_same_image_negatives():
    # two captions of one image score high against each other's image: with ids masked, no loss
    S = torch.tensor([[0.9, 0.9], [0.9, 0.9]], dtype=torch.float64)
    assert hinge_triplet(S, 0.2).item() == pytest.approx(0.8)
    assert hinge_triplet(S, 0.2, image_ids=torch.tensor([7, 7])).item() == 0.0


@pytest.mark.parametrize("ids", IDS)
def test_local_blocks_add_up_to_the_square_matrix(ids):
    """What each of W ranks computes (local queries x all candidates) sums to the full loss."""
    g = torch.Generator().manual_seed(8)
    img = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    a_img, a_txt = img.flip(1), txt.flip(1)
    full = Scores.square(img @ txt.t(), ids)
    full_a = Scores.square(a_img @ a_txt.t(), ids)
    for loss in (lambda s, a: hinge_triplet(s), lambda s, a: boost_relative(s, a),
                 lambda s, a: boost_absolute(s, a), lambda s, a: hinge_triplet(s, max_violation=False)):
        parts = 0.0
        for r in range(2):
            sl = slice(5 * r, 5 * r + 5)
            local_ids = None if ids is None else ids[sl]
            s = Scores.local(img[sl], txt[sl], img, txt, 5 * r, local_ids, ids)
            a = Scores.local(a_img[sl], a_txt[sl], a_img, a_txt, 5 * r, local_ids, ids)
            parts = parts + loss(s, a)
        assert parts.item() == pytest.approx(loss(full, full_a).item(), rel=1e-12)
