"""Each loss against a plain reference written as loops over queries (docs/methods.md), and the
local-block form (what one rank computes) against the square matrix."""
from __future__ import annotations

import math

import pytest
import torch

from dbl_scale.losses import (OfflineScores, Scores, aoq_quintuplet, boost_absolute, boost_relative,
                              distillation, diversity_contrastive, hinge_triplet, info_nce, mutual_learning,
                              sinkhorn, structure_distillation, structure_terms)


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


def _offline_for(s):
    """Offline scores indexed by the global pair index, so blocks and the square matrix agree."""
    full = _offline(10, 25)
    return OfflineScores(*(x[s.positive] for x in (full.i_tneg, full.ineg_t, full.ineg_tneg, full.itneg_tineg)))


@pytest.mark.parametrize("ids", IDS)
def test_local_blocks_add_up_to_the_square_matrix(ids):
    """What each of W ranks computes (local queries x all candidates) sums to the full loss."""
    g = torch.Generator().manual_seed(8)
    img = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    # an anchor of its own (not a transform of the target: its scores must differ from the target's)
    a_img = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    a_txt = torch.nn.functional.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    full = Scores.square(img @ txt.t(), ids)
    full_a = Scores.square(a_img @ a_txt.t(), ids)
    for loss in (lambda s, a: hinge_triplet(s), lambda s, a: boost_relative(s, a),
                 lambda s, a: boost_absolute(s, a), lambda s, a: hinge_triplet(s, max_violation=False),
                 lambda s, a: boost_relative(s, a, soft_adapt=True), lambda s, a: info_nce(s, 10.0),
                 lambda s, a: distillation(s, a, 0.3), lambda s, a: mutual_learning(s, a),
                 lambda s, a: diversity_contrastive(s, 0.1, 2.0),
                 lambda s, a: aoq_quintuplet(s, _offline_for(s))):
        parts = 0.0
        for r in range(2):
            sl = slice(5 * r, 5 * r + 5)
            local_ids = None if ids is None else ids[sl]
            s = Scores.local(img[sl], txt[sl], img, txt, 5 * r, local_ids, ids)
            a = Scores.local(a_img[sl], a_txt[sl], a_img, a_txt, 5 * r, local_ids, ids)
            parts = parts + loss(s, a)
        assert parts.item() == pytest.approx(loss(full, full_a).item(), rel=1e-12)


# ----------------------------------------------------------------------------- soft adaptation

def m_sup(m0, x, e):
    return 2 * m0 / (1 + math.exp((2 / m0) * (x - e))) - m0


def m_inf(m0, x, e):
    return 2 * m0 / (1 + math.exp(-(2 / m0) * (x + e))) - m0


def test_soft_margins_shrink_to_zero_at_the_bound():
    assert m_sup(0.2, 2.0, 2.0) == pytest.approx(0.0) and m_sup(0.2, -5.0, 2.0) == pytest.approx(0.2, abs=1e-6)
    assert m_inf(0.2, -1.0, 1.0) == pytest.approx(0.0) and m_inf(0.2, 5.0, 1.0) == pytest.approx(0.2, abs=1e-6)


@pytest.mark.parametrize("ids", IDS)
def test_boost_relative_soft_adaptation_matches_loops(ids):
    St, Sa = _cos(10, seed=9).numpy(), _cos(10, seed=10).numpy()
    n, m = 10, 0.2
    want = 0.0
    for i in range(n):
        c = [max(0.0, m_sup(m, St[i, i] - St[i, j], 2) + (Sa[i, i] - Sa[i, j]) - (St[i, i] - St[i, j]))
             for j in range(n) if _neg(i, j, ids)]
        want += max(c)
    for j in range(n):
        c = [max(0.0, m_sup(m, St[j, j] - St[i, j], 2) + (Sa[j, j] - Sa[i, j]) - (St[j, j] - St[i, j]))
             for i in range(n) if _neg(i, j, ids)]
        want += max(c)
    got = boost_relative(torch.from_numpy(St), torch.from_numpy(Sa), image_ids=ids, soft_adapt=True)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("ids", IDS)
def test_boost_absolute_soft_adaptation_matches_loops(ids):
    St, Sa = _cos(10, seed=11).numpy(), _cos(10, seed=12).numpy()
    n, g1, g2 = 10, 0.1, 0.1
    want = 2 * sum(max(0.0, m_sup(g1, St[i, i], 1) + Sa[i, i] - St[i, i]) for i in range(n))
    for i in range(n):
        want += max(max(0.0, m_inf(g2, St[i, j], 1) + St[i, j] - Sa[i, j]) for j in range(n) if _neg(i, j, ids))
    for j in range(n):
        want += max(max(0.0, m_inf(g2, St[i, j], 1) + St[i, j] - Sa[i, j]) for i in range(n) if _neg(i, j, ids))
    got = boost_absolute(torch.from_numpy(St), torch.from_numpy(Sa), image_ids=ids, soft_adapt=True)
    assert got.item() == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------- soft losses

def _log_softmax(xs):
    top = max(xs)
    lse = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - lse for x in xs]


def _directions(S, ids):
    """Per query: (its scores over the candidates it may see, index of its positive among them)."""
    n = len(S)
    out = []
    for i in range(n):  # image query i over captions j
        cand = [j for j in range(n) if j == i or _neg(i, j, ids)]
        out.append(("i2t", i, cand, cand.index(i)))
    for j in range(n):
        cand = [i for i in range(n) if i == j or _neg(i, j, ids)]
        out.append(("t2i", j, cand, cand.index(j)))
    return out


def _row(S, kind, q, cand):
    return [S[q, c] for c in cand] if kind == "i2t" else [S[c, q] for c in cand]


@pytest.mark.parametrize("ids", IDS)
def test_info_nce_matches_loops(ids):
    S = _cos(10, seed=13).numpy()
    scale = 14.3
    want = 0.0
    for kind, q, cand, pos in _directions(S, ids):
        want += -_log_softmax([scale * x for x in _row(S, kind, q, cand)])[pos]
    want /= 2 * 10
    got = info_nce(torch.from_numpy(S), torch.tensor([scale], dtype=torch.float64), image_ids=ids)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("ids", IDS)
def test_one_way_info_nce_is_the_row_queries_alone(ids):
    S = _cos(10, seed=16).numpy()
    scale = 9.0
    want = sum(-_log_softmax([scale * x for x in _row(S, kind, q, cand)])[pos]
               for kind, q, cand, pos in _directions(S, ids) if kind == "i2t") / 10
    got = info_nce(torch.from_numpy(S), scale, image_ids=ids, one_way=True)
    assert got.item() == pytest.approx(want, rel=1e-12)


def _ref_kl(S, T, temp, ids):
    total = 0.0
    for kind, q, cand, _ in _directions(S, ids):
        ls = _log_softmax([x / temp for x in _row(S, kind, q, cand)])
        lt = _log_softmax([x / temp for x in _row(T, kind, q, cand)])
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return total / len(S)


@pytest.mark.parametrize("ids", IDS)
def test_distillation_and_mutual_learning_match_loops(ids):
    S, T = _cos(10, seed=14), _cos(10, seed=15)
    got = distillation(S, T, temperature=0.2, image_ids=ids)
    assert got.item() == pytest.approx(_ref_kl(S.numpy(), T.numpy(), 0.2, ids), rel=1e-10)
    got = mutual_learning(S, T, smooth=10.0, image_ids=ids)
    assert got.item() == pytest.approx(_ref_kl(S.numpy(), T.numpy(), 0.1, ids), rel=1e-10)
    assert distillation(S, S, 0.2, image_ids=ids).item() == pytest.approx(0.0, abs=1e-12)


def test_teacher_and_peer_get_no_gradient():
    S, T = _cos(6, seed=16).requires_grad_(True), _cos(6, seed=17).requires_grad_(True)
    (mutual_learning(S, T) + distillation(S, T, 0.5)).backward()
    assert S.grad.abs().sum() > 0 and T.grad is None


# ----------------------------------------------------------------------------- AOQ, CODER, structure

def _offline(n, seed):
    g = torch.Generator().manual_seed(seed)
    return OfflineScores(*(torch.rand(n, generator=g, dtype=torch.float64) * 1.6 - 0.8 for _ in range(4)))


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("clamp", [True, False])
def test_aoq_quintuplet_matches_loops(ids, clamp):
    S = _cos(10, seed=18).numpy()
    off = _offline(10, 19)
    m_on, m_off, a, b = 0.2, 0.0, 0.3, 1.5
    want = 0.0
    for i in range(10):
        sp = S[i, i]
        hard_t = max(S[i, j] for j in range(10) if _neg(i, j, ids))
        hard_i = max(S[j, i] for j in range(10) if _neg(j, i, ids))
        w_c = b - (off.i_tneg[i].item() - hard_t) / a
        w_i = b - (off.ineg_t[i].item() - hard_i) / a
        if clamp:
            w_c, w_i = max(w_c, 0.0), max(w_i, 0.0)
        want += w_c * max(0.0, m_on + hard_t - sp) + w_i * max(0.0, m_on + hard_i - sp)
        for x in (off.i_tneg, off.ineg_t, off.ineg_tneg, off.itneg_tineg):
            want += max(0.0, m_off + x[i].item() - sp)
    got = aoq_quintuplet(torch.from_numpy(S), off, clamp_weights=clamp, image_ids=ids)
    assert got.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("ids", IDS)
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_diversity_contrastive_matches_loops(ids, beta):
    S = _cos(10, seed=20).numpy()
    g = torch.Generator().manual_seed(21)
    q_i2t = torch.rand(10, 7, generator=g, dtype=torch.float64) * 2 - 1
    q_t2i = torch.rand(10, 7, generator=g, dtype=torch.float64) * 2 - 1
    tau = 0.1
    want = 0.0
    for kind, q, cand, pos in _directions(S, ids):
        row = _row(S, kind, q, cand)
        negs = [x for k, x in enumerate(row) if k != pos] + (q_i2t if kind == "i2t" else q_t2i)[q].tolist()
        soft = [math.exp(v) for v in _log_softmax([beta * x for x in negs])]
        w = [len(negs) * p for p in soft]
        denom = math.exp(row[pos] / tau) + sum(wk * math.exp(x / tau) for wk, x in zip(w, negs))
        want += -math.log(math.exp(row[pos] / tau) / denom)
    want /= 20
    got = diversity_contrastive(torch.from_numpy(S), tau, beta, q_i2t, q_t2i, image_ids=ids)
    assert got.item() == pytest.approx(want, rel=1e-10)
    if beta == 0.0:  # no queue, no weighting: plain InfoNCE
        plain = diversity_contrastive(torch.from_numpy(S), tau, 0.0, image_ids=ids)
        assert plain.item() == pytest.approx(info_nce(torch.from_numpy(S), 1 / tau, image_ids=ids).item(), rel=1e-10)


def test_sinkhorn_balances_prototypes():
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(64, 8, generator=g) * 0.2 + torch.linspace(0, 0.3, 8)  # prototype 7 favoured
    q = sinkhorn(logits, epsilon=0.05, iterations=20)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 8.0), atol=0.05, rtol=0)  # 64 rows / 8 prototypes
    assert torch.bincount(q.argmax(1), minlength=8).max() < 20  # not everyone on the favoured prototype


@pytest.mark.parametrize("mode", ["per_modality", "pair_mean"])
def test_structure_distillation_matches_loops(mode):
    g = torch.Generator().manual_seed(23)
    norm = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    img, txt = norm(torch.randn(6, 5, generator=g, dtype=torch.float64)), norm(torch.randn(6, 5, generator=g, dtype=torch.float64))
    t_img, t_txt = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    lam, tau = 0.3, 0.07
    ti, tt = norm(t_img), norm(t_txt)
    students = [img, txt] if mode == "per_modality" else [norm(img + txt)]
    want = 0.0
    for f in students:
        for i in range(6):
            for j in range(6):
                if i != j:
                    r_t = (lam * (tt[i] @ tt[j]) + (1 - lam) * (ti[i] @ ti[j])) / tau
                    want += abs((f[i] @ f[j]) / tau - r_t).item()
    want /= 6 * 5
    got = structure_distillation(img, txt, t_img, t_txt, lam, tau, mode=mode)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_structure_distillation_trains_lambda_and_tau():
    g = torch.Generator().manual_seed(24)
    img, txt, ti, tt = (torch.randn(5, 4, generator=g) for _ in range(4))
    lam = torch.tensor([0.5], requires_grad=True)
    log_tau = torch.tensor([math.log(0.07)], requires_grad=True)
    structure_distillation(img, txt, ti, tt, lam, log_tau.exp()).backward()
    assert lam.grad.abs().item() > 0 and log_tau.grad.abs().item() > 0


def test_structure_consistency_matches_loops_and_trains_only_lambda_and_tau():
    """Each teacher relation against the mixed one, mean over i != j; the teacher features
    are constants, so only lambda and tau get a gradient (and the summed terms leave lambda's
    at zero: |R_I - R_T| + |R_T' - R_T| = |R_I - R_T'| / tau whatever lambda is)."""
    g = torch.Generator().manual_seed(25)
    norm = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    img, txt = (norm(torch.randn(6, 5, generator=g, dtype=torch.float64)) for _ in range(2))
    t_img = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t_txt = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.07], dtype=torch.float64, requires_grad=True)
    ti, tt = norm(t_img.detach()), norm(t_txt.detach())
    want = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:
                r_i, r_t = (ti[i] @ ti[j]).item() / 0.07, (tt[i] @ tt[j]).item() / 0.07
                mix = 0.3 * r_t + 0.7 * r_i
                want += abs(r_i - mix) + abs(r_t - mix)
    want /= 6 * 5
    sd, consistency = structure_terms(img, txt, t_img, t_txt, lam, tau)
    assert consistency.item() == pytest.approx(want, rel=1e-10)
    assert sd.item() == pytest.approx(structure_distillation(img, txt, t_img, t_txt, lam, tau).item(), rel=1e-12)
    consistency.backward()
    assert t_img.grad is None and t_txt.grad is None  # the teacher is a constant
    assert lam.grad.abs().item() < 1e-12 and tau.grad.item() < 0  # raising tau lowers it: hence the clamp
