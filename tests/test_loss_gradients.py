"""Values AND gradients of every loss against references written as plain loops in float64
torch, straight from the equations in docs/methods.md, independent of dbl_scale.losses. The
references put every stop-gradient where the equations say, so a loss that drops one (or
adds one) fails here: a detached positive, an anchor that receives gradient, AOQ weights
without gradient, DCL weights with gradient, a soft margin that is not under stop-gradient.
Also `torch.autograd.gradcheck` on small inputs, and no gradient ever reaches an anchor,
teacher or peer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbl_scale.losses import (OfflineScores, Scores, aoq_quintuplet, boost_absolute, boost_relative, distillation,
                              diversity_contrastive, hinge_triplet, info_nce, mutual_learning)

N, D = 7, 5
IDS = [None, torch.tensor([0, 1, 1, 2, 3, 3, 4])]


def _unit(seed: int, rows: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, D, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)


def _leaves(seed: int):
    """Target and anchor embeddings, all leaves that require grad (the anchor must get none)."""
    return _unit(seed), _unit(seed + 1), _unit(seed + 2), _unit(seed + 3)


def _negs(q: int, ids) -> list[int]:
    return [j for j in range(N) if j != q and (ids is None or int(ids[j]) != int(ids[q]))]


def _queries(S: torch.Tensor, ids):
    """(row of query scores over all candidates, query index) for image queries, then captions."""
    return [(S[i], i) for i in range(N)] + [(S[:, j], j) for j in range(N)]


def _reduce(costs: list[torch.Tensor], max_violation: bool) -> torch.Tensor:
    stacked = torch.stack(costs)
    return stacked.max() if max_violation else stacked.sum()


def ref_hinge(S, margin, max_violation, ids):
    total = S.new_zeros(())
    for row, q in _queries(S, ids):
        costs = [(margin + row[j] - row[q]).clamp(min=0) for j in _negs(q, ids)]
        total = total + _reduce(costs, max_violation)
    return total


def ref_boost_relative(S, A, margin, beta, max_violation, soft, ids):
    A = A.detach()
    m = margin * beta
    total = S.new_zeros(())
    for (row, q), (a_row, _) in zip(_queries(S, ids), _queries(A, ids)):
        costs = []
        for j in _negs(q, ids):
            gap = row[q] - row[j]
            m_ij = -m * torch.tanh((gap.detach() - 2.0) / m) if soft else m
            costs.append((m_ij + (a_row[q] - a_row[j]) - gap).clamp(min=0))
        total = total + _reduce(costs, max_violation)
    return total


def ref_boost_absolute(S, A, margin, beta, gamma, max_violation, soft, ids):
    A = A.detach()
    m_pos, m_neg = gamma * margin * beta, (1 - gamma) * margin * beta
    total = S.new_zeros(())
    for (row, q), (a_row, _) in zip(_queries(S, ids), _queries(A, ids)):
        mp = -m_pos * torch.tanh((row[q].detach() - 1.0) / m_pos) if soft else m_pos
        total = total + (mp + a_row[q] - row[q]).clamp(min=0)
        costs = []
        for j in _negs(q, ids):
            mn = m_neg * torch.tanh((row[j].detach() + 1.0) / m_neg) if soft else m_neg
            costs.append((mn + row[j] - a_row[j]).clamp(min=0))
        total = total + _reduce(costs, max_violation)
    return total


def _softmax_over(row, q, ids, scale):
    cand = [q] + _negs(q, ids)
    return torch.log_softmax(torch.stack([scale * row[c] for c in cand]), dim=0)


def ref_info_nce(S, scale, ids):
    return sum(-_softmax_over(row, q, ids, scale)[0] for row, q in _queries(S, ids)) / (2 * N)


def ref_distillation(S, T, temperature, ids):
    T = T.detach()
    total = S.new_zeros(())
    for (row, q), (t_row, _) in zip(_queries(S, ids), _queries(T, ids)):
        log_s, log_t = _softmax_over(row, q, ids, 1 / temperature), _softmax_over(t_row, q, ids, 1 / temperature)
        total = total + (log_t.exp() * (log_t - log_s)).sum()
    return total / N


def ref_aoq(S, off, m_on, m_off, a, b, clamp, ids):
    """AOQ: the weights keep their gradient (as the authors')."""
    total = S.new_zeros(())
    for i in range(N):
        pos = S[i, i]
        hard_t = torch.stack([S[i, j] for j in _negs(i, ids)]).max()  # S(I, T_on-)
        hard_i = torch.stack([S[j, i] for j in _negs(i, ids)]).max()  # S(I_on-, T)
        w_c = b - (off["i_tneg"][i] - hard_t) / a
        w_i = b - (off["ineg_t"][i] - hard_i) / a
        if clamp:
            w_c, w_i = w_c.clamp(min=0), w_i.clamp(min=0)
        total = total + w_c * (m_on + hard_t - pos).clamp(min=0) + w_i * (m_on + hard_i - pos).clamp(min=0)
        for key in ("i_tneg", "ineg_t", "ineg_tneg", "itneg_tineg"):
            total = total + (m_off + off[key][i] - pos).clamp(min=0)
    return total


def ref_dcl(S, temperature, beta, ids):
    """DCL: w_k = K_neg * softmax_k(beta * s_k) under stop-gradient."""
    total = S.new_zeros(())
    for row, q in _queries(S, ids):
        negs = _negs(q, ids)
        s_neg = torch.stack([row[j] for j in negs])
        w = (len(negs) * torch.softmax(beta * s_neg, dim=0)).detach()
        denom = torch.exp(row[q] / temperature) + (w * torch.exp(s_neg / temperature)).sum()
        total = total - torch.log(torch.exp(row[q] / temperature) / denom)
    return total / (2 * N)


def _grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _compare(ours, ref, leaves):
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-12)
    for got, want in zip(_grads(ours, leaves), _grads(ref, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


CASES = {
    "triplet max": (lambda s, a, ids: hinge_triplet(s, 0.2, True), lambda S, A, ids: ref_hinge(S, 0.2, True, ids)),
    "triplet sum": (lambda s, a, ids: hinge_triplet(s, 0.2, False), lambda S, A, ids: ref_hinge(S, 0.2, False, ids)),
    "relative max": (lambda s, a, ids: boost_relative(s, a, 0.2, 1.0),
                     lambda S, A, ids: ref_boost_relative(S, A, 0.2, 1.0, True, False, ids)),
    "relative sum": (lambda s, a, ids: boost_relative(s, a, 0.2, 1.5, max_violation=False),
                     lambda S, A, ids: ref_boost_relative(S, A, 0.2, 1.5, False, False, ids)),
    "relative soft": (lambda s, a, ids: boost_relative(s, a, 0.2, 1.0, soft_adapt=True),
                      lambda S, A, ids: ref_boost_relative(S, A, 0.2, 1.0, True, True, ids)),
    "absolute max": (lambda s, a, ids: boost_absolute(s, a, 0.2, 1.0, 0.5),
                     lambda S, A, ids: ref_boost_absolute(S, A, 0.2, 1.0, 0.5, True, False, ids)),
    "absolute sum soft": (lambda s, a, ids: boost_absolute(s, a, 0.3, 1.0, 0.3, max_violation=False, soft_adapt=True),
                          lambda S, A, ids: ref_boost_absolute(S, A, 0.3, 1.0, 0.3, False, True, ids)),
    "infonce": (lambda s, a, ids: info_nce(s, 12.0), lambda S, A, ids: ref_info_nce(S, 12.0, ids)),
    "distillation": (lambda s, a, ids: distillation(s, a, 0.2), lambda S, A, ids: ref_distillation(S, A, 0.2, ids)),
    "mutual": (lambda s, a, ids: mutual_learning(s, a, 10.0), lambda S, A, ids: ref_distillation(S, A, 0.1, ids)),
    "dcl": (lambda s, a, ids: diversity_contrastive(s, 0.1, 2.0), lambda S, A, ids: ref_dcl(S, 0.1, 2.0, ids)),
}


@pytest.mark.parametrize("ids", IDS, ids=["no-mask", "same-image-mask"])
@pytest.mark.parametrize("case", list(CASES))
def test_value_and_gradient_match_the_reference(case, ids):
    img, txt, a_img, a_txt = _leaves(11)
    ours_fn, ref_fn = CASES[case]
    S, A = img @ txt.t(), a_img @ a_txt.t()
    ours = ours_fn(Scores.square(S, ids), Scores.square(A, ids), ids)
    _compare(ours, ref_fn(S, A, ids), [img, txt, a_img, a_txt])
    # the anchor / teacher / peer gets no gradient at all, and the target does
    g_img, g_txt, g_a_img, g_a_txt = _grads(ours_fn(Scores.square(img @ txt.t(), ids),
                                                    Scores.square(a_img @ a_txt.t(), ids), ids),
                                            [img, txt, a_img, a_txt])
    assert g_a_img.abs().sum() == 0 and g_a_txt.abs().sum() == 0
    assert g_img.abs().sum() > 0 and g_txt.abs().sum() > 0


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("ids", IDS, ids=["no-mask", "same-image-mask"])
def test_aoq_value_and_gradient_including_its_weights(clamp, ids):
    img, txt, _, _ = _leaves(21)
    extra = {k: _unit(30 + n) for n, k in enumerate(("tneg", "ineg", "tineg", "itneg"))}
    S = img @ txt.t()
    off = {"i_tneg": (img * extra["tneg"]).sum(1), "ineg_t": (extra["ineg"] * txt).sum(1),
           "ineg_tneg": (extra["ineg"] * extra["tneg"]).sum(1), "itneg_tineg": (extra["itneg"] * extra["tineg"]).sum(1)}
    ours = aoq_quintuplet(Scores.square(S, ids), OfflineScores(**off), 0.2, 0.05, 0.3, 1.5, clamp)
    ref = ref_aoq(S, off, 0.2, 0.05, 0.3, 1.5, clamp, ids)
    leaves = [img, txt, *extra.values()]
    _compare(ours, ref, leaves)
    # the weights carry gradient: the offline negative T- gets some through w_c even where its
    # own hinge [m_off + S(I,T-) - S+]+ is inactive
    assert _grads(ours, [extra["tneg"]])[0].abs().sum() > 0


def test_learnable_logit_scale_gets_the_reference_gradient():
    img, txt, _, _ = _leaves(41)
    log_scale = torch.tensor([2.3], dtype=torch.float64, requires_grad=True)
    S = img @ txt.t()
    ours = info_nce(Scores.square(S), log_scale.exp())
    _compare(ours, ref_info_nce(S, log_scale.exp()[0], None), [img, txt, log_scale])


@pytest.mark.parametrize("case", ["triplet sum", "triplet max", "relative sum", "relative max", "absolute max",
                                  "infonce", "distillation", "mutual"])
def test_gradcheck(case):
    """Finite differences against autograd on small random inputs (away from ties). Only where
    the loss has no stop-gradient inside (DCL's weights and the soft margins have one: finite
    differences would see through it); those are checked against the references above."""
    ours_fn, _ = CASES[case]
    _, _, a_img, a_txt = _leaves(51)
    A = (a_img @ a_txt.t()).detach()

    def f(img, txt):
        return ours_fn(Scores.square(img @ txt.t()), Scores.square(A), None)
    assert torch.autograd.gradcheck(f, (_unit(61), _unit(62)), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("step,raw_max", [(0, False), (3, True)], ids=["warm-up", "after"])
def test_dbl_online_composes_the_terms_of_the_equations(step, raw_max):
    """DBL online with K = 3 branches, alpha = 0.7, beta = 1.5, as the method builds it: branch 0
    gets L_raw; branch k gets L_raw(S_k) + alpha * mean over n < k of L_boost(S_k, sg(S_n)).
    L_raw sums over negatives during the warm-up (`loss.sum_warmup_steps`) and takes the max
    after; the boost takes the max throughout. Values and gradients into every branch's
    embeddings against the loop references (no gradient into earlier branches)."""
    from dbl_scale.config import load_config
    from dbl_scale.methods import build_method
    from dbl_scale.models import Embeddings

    ids = IDS[1]
    method = build_method(load_config(None, ["loss.method=dbl", "loss.dbl.scenario=online", "loss.dbl.branches=3",
                                             "loss.dbl.alpha=0.7", "loss.dbl.beta=1.5", "loss.sum_warmup_steps=3"]))
    leaves = [_unit(s) for s in range(20, 26)]  # image and text embeddings of branches 0, 1, 2
    outs = [Embeddings(leaves[2 * k], leaves[2 * k + 1]) for k in range(3)]
    S = [e.img @ e.txt.t() for e in outs]
    terms = method.losses(outs, ids, step)
    for k in range(3):
        want = ref_hinge(S[k], 0.2, raw_max, ids)
        if k:
            boosts = [ref_boost_relative(S[k], S[n], 0.2, 1.5, True, False, ids) for n in range(k)]
            want = want + 0.7 * torch.stack(boosts).mean()
        _compare(terms[k]["loss"], want, leaves)
