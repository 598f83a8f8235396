"""Matching losses (docs/methods.md), on one score matrix or on negatives gathered from all ranks.

Every loss reads a `Scores`: the rows of a score matrix this process owns, both directions
(`Scores.square(S)` for one process, `Scores.local` for a rank's B queries against the W*B
gathered candidates). A loss is a sum over its queries (soft losses divide by the global
count), so the ranks' values add up to the single-process value and `backward(W * loss)`
under gradient averaging gives the single-process gradients. Pure functions: nothing here
starts a collective; a loss that spans the global batch takes its reduction as an argument."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F


@dataclass
class Scores:
    """Local query blocks of a score matrix.

    i2t[q, c]: local image q against candidate caption c; t2i[q, c]: local caption q against
    candidate image c. `positive[q]` is the candidate column of query q's own pair.
    `neg_i2t` / `neg_t2i` mark the candidates that count as negatives.
    """
    i2t: torch.Tensor
    t2i: torch.Tensor
    positive: torch.Tensor
    neg_i2t: torch.Tensor
    neg_t2i: torch.Tensor

    @staticmethod
    def square(scores: torch.Tensor, image_ids: Optional[torch.Tensor] = None) -> "Scores":
        n = scores.shape[0]
        if scores.dim() != 2 or scores.shape[1] != n:
            raise ValueError(f"expected a square score matrix, got shape {tuple(scores.shape)}")
        positive = torch.arange(n, device=scores.device)
        neg = _negatives(positive, n, image_ids, image_ids)
        return Scores(scores, scores.t(), positive, neg, neg.t())

    @staticmethod
    def local(img, txt, all_img, all_txt, offset: int, image_ids=None, all_ids=None) -> "Scores":
        b, n = img.shape[0], all_img.shape[0]
        positive = torch.arange(offset, offset + b, device=img.device)
        neg = _negatives(positive, n, image_ids, all_ids)
        return Scores(img @ all_txt.t(), txt @ all_img.t(), positive, neg, neg)

    def positives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's positive score, (B, 1), for the i2t and t2i blocks."""
        col = self.positive[:, None]
        return self.i2t.gather(1, col), self.t2i.gather(1, col)

    def detach(self) -> "Scores":
        return Scores(self.i2t.detach(), self.t2i.detach(), self.positive, self.neg_i2t, self.neg_t2i)


def _negatives(positive, n, ids, all_ids) -> torch.Tensor:
    if ids is None:
        neg = torch.ones(positive.shape[0], n, dtype=torch.bool, device=positive.device)
        neg[torch.arange(positive.shape[0], device=positive.device), positive] = False
        return neg
    return ids[:, None] != all_ids[None, :]


ScoresLike = Union[torch.Tensor, Scores]


def _as_scores(scores: ScoresLike, image_ids: Optional[torch.Tensor]) -> Scores:
    if isinstance(scores, Scores):
        if image_ids is not None:
            raise ValueError("image_ids is given with a Scores object, whose negatives are already set")
        return scores
    return Scores.square(scores, image_ids)


def _take(x: torch.Tensor, cols: Optional[torch.Tensor]) -> torch.Tensor:
    return x if cols is None else x.gather(1, cols)


def _violations(cost_at, neg: torch.Tensor, max_violation: bool, key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over queries of a non-negative cost over each query's negatives: the hardest one
    (max_violation) or all of them. `cost_at(cols)` is the cost at columns `cols` (B x 1), or
    everywhere (B x N) for None. The hardest negative is found without gradient, from `key`
    (any score the cost grows with) or from the cost itself, and only its B costs are then
    computed with gradient: the same value and gradient as a max over the full cost matrix,
    for a fraction of its time and memory."""
    if not max_violation:
        return cost_at(None).masked_fill(~neg, 0.0).sum()
    with torch.no_grad():
        key = cost_at(None) if key is None else key
        cols = key.masked_fill(~neg, float("-inf")).argmax(dim=1, keepdim=True)
        valid = neg.gather(1, cols)  # False for a query without any negative
    return cost_at(cols).masked_fill(~valid, 0.0).sum()


def hinge_triplet(scores: ScoresLike, margin: float = 0.2, max_violation: bool = True,
                  image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """VSE++ hinge triplet, summed over queries in both directions (VSE0 when not max_violation)."""
    s = _as_scores(scores, image_ids)
    total = 0.0
    for q, _, neg, pos, _ in _directions(s):
        total = total + _violations(lambda c: (margin + _take(q, c) - pos).clamp(min=0), neg, max_violation,
                                    key=q.detach())
    return total


def soft_margin_upper(m0: float, x: torch.Tensor, bound: float) -> torch.Tensor:
    """m_sup(x) = 2 m0 / (1 + exp((2/m0)(x - bound))) - m0 = -m0 tanh((x - bound)/m0): the margin m0
    shrinks smoothly to 0 as x (under stop-gradient) nears its upper bound."""
    return -m0 * torch.tanh((x.detach() - bound) / m0)


def soft_margin_lower(m0: float, x: torch.Tensor, bound: float) -> torch.Tensor:
    """m_inf(x) = 2 m0 / (1 + exp(-(2/m0)(x + bound))) - m0 = m0 tanh((x + bound)/m0): the margin m0
    shrinks smoothly to 0 as x (under stop-gradient) nears -bound."""
    return m0 * torch.tanh((x.detach() + bound) / m0)


def boost_relative(scores: ScoresLike, anchor_scores: ScoresLike, margin: float = 0.2,
                   beta: float = 1.0, image_ids: Optional[torch.Tensor] = None,
                   max_violation: bool = True, soft_adapt: bool = False) -> torch.Tensor:
    """DBL relative boosting: the target's positive-negative gap must beat the anchor's by
    margin*beta. `c = [margin*beta + (a_pos - a_neg) - (t_pos - t_neg)]+`, both directions.
    `soft_adapt`: the margin follows m_sup of the target's gap (bound 2, cosine scores)."""
    t, a = _as_scores(scores, image_ids), _as_scores(anchor_scores, image_ids).detach()
    m = margin * beta
    total = 0.0
    for t_q, a_q, neg, t_pos, a_pos in _directions(t, a):
        def cost_at(cols, t_q=t_q, a_q=a_q, t_pos=t_pos, a_pos=a_pos):
            gap = t_pos - _take(t_q, cols)
            margin_ij = soft_margin_upper(m, gap, 2.0) if soft_adapt else m
            return (margin_ij + (a_pos - _take(a_q, cols)) - gap).clamp(min=0)
        if soft_adapt:  # the cost itself, built in place: two B x N buffers instead of seven
            with torch.no_grad():
                gap = t_pos.detach() - t_q.detach()
                key = gap.sub(2.0).div_(m).tanh_().mul_(-m).sub_(gap).sub_(a_q).add_(a_pos)
        else:
            key = (t_q - a_q).detach()  # the cost grows with t_neg - a_neg
        total = total + _violations(cost_at, neg, max_violation, key)
    return total


def boost_absolute(scores: ScoresLike, anchor_scores: ScoresLike, margin: float = 0.2,
                   beta: float = 1.0, gamma: float = 0.5, image_ids: Optional[torch.Tensor] = None,
                   max_violation: bool = True, soft_adapt: bool = False) -> torch.Tensor:
    """DBL absolute boosting: positives must score gamma*margin*beta above the anchor's, each
    negative (1-gamma)*margin*beta below the anchor's. The positive term is counted once per
    direction, which is the `2 * sum_i` of docs/methods.md. `soft_adapt`: positive margins follow
    m_sup (bound 1) of the target's positive score, negative margins m_inf (bound 1) of the
    target's negative score."""
    t, a = _as_scores(scores, image_ids), _as_scores(anchor_scores, image_ids).detach()
    m_pos, m_neg = gamma * margin * beta, (1.0 - gamma) * margin * beta
    total = 0.0
    for t_q, a_q, neg, t_pos, a_pos in _directions(t, a):
        mp = soft_margin_upper(m_pos, t_pos, 1.0) if soft_adapt else m_pos
        total = total + (mp + a_pos - t_pos).clamp(min=0).sum()

        def cost_at(cols, t_q=t_q, a_q=a_q):
            t_neg = _take(t_q, cols)
            mn = soft_margin_lower(m_neg, t_neg, 1.0) if soft_adapt else m_neg
            return (mn + t_neg - _take(a_q, cols)).clamp(min=0)
        if soft_adapt:  # the cost itself, built in place
            with torch.no_grad():
                key = t_q.detach().add(1.0).div_(m_neg).tanh_().mul_(m_neg).add_(t_q.detach()).sub_(a_q)
        else:
            key = (t_q - a_q).detach()  # the cost grows with t_neg - a_neg
        total = total + _violations(cost_at, neg, max_violation, key)
    return total


def _directions(t: Scores, a: Optional[Scores] = None) -> list[tuple]:
    """Both directions of a score set, image to text then text to image, each as (the target's
    query x candidate scores, the anchor's (or None), the negatives mask, the target's
    positives, the anchor's (or None)): the loop every hinge loss runs."""
    return [(t.i2t, a.i2t if a is not None else None, t.neg_i2t, t.positives()[0],
             a.positives()[0] if a is not None else None),
            (t.t2i, a.t2i if a is not None else None, t.neg_t2i, t.positives()[1],
             a.positives()[1] if a is not None else None)]


@torch.no_grad()
def boost_diagnostics(scores: ScoresLike, anchor_scores: ScoresLike, margin: float = 0.2, beta: float = 1.0,
                      image_ids: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """What the relative boost does on these queries, both directions, as sums over queries
    (divide by the global number of queries for means): for each query the boost's chosen
    negative j (the argmax of S^t_ij - S^a_ij), then
      active         1 if its cost [margin*beta + (a_pos - a_j) - (t_pos - t_j)]+ is > 0
      target_gap     t_pos - t_j, the target's positive-negative gap there
      anchor_gap     a_pos - a_j, the anchor's
      same_negative  1 if j is also the target's hardest negative (the raw triplet's choice)
    Queries without a negative count 0 everywhere."""
    t, a = _as_scores(scores, image_ids), _as_scores(anchor_scores, image_ids)
    out = {k: t.i2t.new_zeros(()) for k in ("active", "target_gap", "anchor_gap", "same_negative")}
    for t_q, a_q, neg, t_pos, a_pos in _directions(t, a):
        cols = (t_q - a_q).masked_fill(~neg, float("-inf")).argmax(dim=1, keepdim=True)
        hardest = t_q.masked_fill(~neg, float("-inf")).argmax(dim=1, keepdim=True)
        valid = neg.gather(1, cols).squeeze(1)
        t_gap = (t_pos - t_q.gather(1, cols)).squeeze(1)
        a_gap = (a_pos - a_q.gather(1, cols)).squeeze(1)
        out["active"] += ((margin * beta + a_gap - t_gap > 0) & valid).sum()
        out["target_gap"] += t_gap.masked_fill(~valid, 0.0).sum()
        out["anchor_gap"] += a_gap.masked_fill(~valid, 0.0).sum()
        out["same_negative"] += ((cols == hardest).squeeze(1) & valid).sum()
    return out


# ----------------------------------------------------------------------------- soft losses
# Averaged over queries: a rank's value is its queries' sum divided by the global number of
# queries (= the number of candidates), so the ranks' values add up to the global mean.

def _candidates(q: torch.Tensor, neg: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Negatives plus each query's own positive: what a softmax over candidates ranges over."""
    keep = neg.clone()
    keep[torch.arange(q.shape[0], device=q.device), positive] = True
    return keep


def _cross_entropy_sum(logits: torch.Tensor, keep: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    logits = logits.masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, positive[:, None]).squeeze(1)).sum()


def info_nce(scores: ScoresLike, logit_scale, image_ids: Optional[torch.Tensor] = None,
             one_way: bool = False) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: `0.5 * [CE(scale * S, diag) + CE(scale * S^T, diag)]`, mean over
    queries. `logit_scale` = 1/temperature, a tensor (learnable, clamped by the model) or float.
    `one_way`: the row queries only, `CE(scale * S, diag)` (e.g. students against teachers)."""
    s = _as_scores(scores, image_ids)
    n = s.i2t.shape[1]
    blocks = ((s.i2t, s.neg_i2t),) if one_way else ((s.i2t, s.neg_i2t), (s.t2i, s.neg_t2i))
    total = 0.0
    for q, neg in blocks:
        total = total + _cross_entropy_sum(logit_scale * q, _candidates(q, neg, s.positive), s.positive)
    return total / (len(blocks) * n)


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over queries of KL(softmax(teacher) || softmax(student)) over the kept candidates."""
    log_p_s = torch.log_softmax(student.masked_fill(~keep, float("-inf")), dim=1)
    log_p_t = torch.log_softmax(teacher.masked_fill(~keep, float("-inf")), dim=1)
    terms = log_p_t.exp() * (log_p_t - log_p_s)
    return terms.masked_fill(~keep, 0.0).sum()


def distillation(scores: ScoresLike, teacher_scores: ScoresLike, temperature: float = 0.1,
                 image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Conventional distillation from a frozen teacher: KL(softmax(S_teacher/T) || softmax(S/T))
    per query, mean over queries, image->text plus text->image."""
    s, t = _as_scores(scores, image_ids), _as_scores(teacher_scores, image_ids).detach()
    n = s.i2t.shape[1]
    total = 0.0
    for q, tq, neg in ((s.i2t, t.i2t, s.neg_i2t), (s.t2i, t.t2i, s.neg_t2i)):
        total = total + _kl_sum(q / temperature, tq / temperature, _candidates(q, neg, s.positive))
    return total / n


def mutual_learning(scores: ScoresLike, peer_scores: ScoresLike, smooth: float = 10.0,
                    image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deep mutual learning: KL(softmax(smooth * sg(S_peer)) || softmax(smooth * S)) per row,
    mean over queries, both directions. Each branch gets this towards every peer."""
    return distillation(scores, peer_scores, 1.0 / smooth, image_ids=image_ids)


# ----------------------------------------------------------------------------- AOQ

@dataclass
class OfflineScores:
    """AOQ: per local pair (I, T), the scores of its offline hard negatives (loader-delivered).

    i_tneg = S(I, T-), ineg_t = S(I-, T), ineg_tneg = S(I-, T-), itneg_tineg = S(I_{T-}, T_{I-}).
    """
    i_tneg: torch.Tensor
    ineg_t: torch.Tensor
    ineg_tneg: torch.Tensor
    itneg_tineg: torch.Tensor


def _hardest(q: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Each query's hardest in-batch negative score (a very low finite value when it has none)."""
    low = torch.finfo(q.dtype).min / 4
    return q.masked_fill(~neg, low).max(dim=1).values


def aoq_quintuplet(scores: ScoresLike, offline: OfflineScores, m_on: float = 0.2, m_off: float = 0.0,
                   a: float = 0.3, b: float = 1.5, clamp_weights: bool = True,
                   image_ids: Optional[torch.Tensor] = None, offline_weight: float = 1.0) -> torch.Tensor:
    """Adaptive offline quintuplet loss, summed over pairs. The online hinge terms are weighted by
    how much harder the offline negative is than the in-batch one:
    `w_c = b - (S(I,T-) - S(I,T_on-)) / a`, `w_i = b - (S(I-,T) - S(I_on-,T)) / a`, with gradient
    (as the authors), clamped at 0 unless `clamp_weights=False` (the authors' form).
    `offline_weight` scales what the offline negatives bring: the four offline terms, and the
    weights' departure from 1; at 0 the loss is the hinge triplet (its null test), at 1 (the
    default) the authors' loss, computed exactly as written above."""
    s = _as_scores(scores, image_ids)
    if offline_weight == 0:  # nothing of the offline negatives: the hinge triplet, hardest negatives
        return hinge_triplet(s, m_on, max_violation=True)
    pos = s.positives()[0].squeeze(1)  # S(I, T) of each local pair
    hard_t, hard_i = _hardest(s.i2t, s.neg_i2t), _hardest(s.t2i, s.neg_t2i)  # S(I,T_on-), S(I_on-,T)
    online_t, online_i = (m_on + hard_t - pos).clamp(min=0), (m_on + hard_i - pos).clamp(min=0)
    w_c = b - (offline.i_tneg - hard_t) / a
    w_i = b - (offline.ineg_t - hard_i) / a
    if clamp_weights:
        w_c, w_i = w_c.clamp(min=0), w_i.clamp(min=0)
    if offline_weight != 1:
        w_c, w_i = 1 + offline_weight * (w_c - 1), 1 + offline_weight * (w_i - 1)
    total = (w_c * online_t).sum() + (w_i * online_i).sum()
    for neg in (offline.i_tneg, offline.ineg_t, offline.ineg_tneg, offline.itneg_tineg):
        term = (m_off + neg - pos).clamp(min=0).sum()
        total = total + (term if offline_weight == 1 else offline_weight * term)
    return total


# ----------------------------------------------------------------------------- CODER

def diversity_contrastive(scores: ScoresLike, temperature: float = 0.07, beta: float = 1.0,
                          queue_i2t: Optional[torch.Tensor] = None, queue_t2i: Optional[torch.Tensor] = None,
                          image_ids: Optional[torch.Tensor] = None,
                          queue_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CODER's diversity-sensitive contrastive loss (our reading of the paper), mean over queries:
    `-log(e^{s+/t} / (e^{s+/t} + sum_k w_k e^{s_k/t}))`, `w_k = K_neg * softmax_k(beta * s_k)` under
    stop-gradient, over the in-batch negatives plus the other modality's momentum queue
    (`queue_i2t`: local images x caption queue; `queue_t2i`: local captions x image queue;
    `queue_keep`: local queries x queue, False for entries of the query's own image).
    beta = 0 gives plain InfoNCE at a fixed temperature over the same negatives and queues."""
    s = _as_scores(scores, image_ids)
    n = s.i2t.shape[1]
    total = 0.0
    for q, neg, queue in ((s.i2t, s.neg_i2t, queue_i2t), (s.t2i, s.neg_t2i, queue_t2i)):
        pos = q.gather(1, s.positive[:, None])
        negs, valid = q, neg
        if queue is not None:
            negs = torch.cat([q, queue], dim=1)
            keep = queue_keep if queue_keep is not None else torch.ones_like(queue, dtype=torch.bool)
            valid = torch.cat([neg, keep], dim=1)
        weighted = negs / temperature
        if beta != 0:  # beta = 0: every weight is 1, left out rather than computed as log(K) - log(K)
            with torch.no_grad():
                k_neg = valid.sum(dim=1, keepdim=True).to(q.dtype)
                log_w = torch.log(k_neg) + torch.log_softmax((beta * negs).masked_fill(~valid, float("-inf")), dim=1)
            weighted = weighted + log_w
        logits = torch.cat([pos / temperature, weighted.masked_fill(~valid, float("-inf"))], 1)
        total = total + (torch.logsumexp(logits, dim=1) - pos.squeeze(1) / temperature).sum()
    return total / (2 * n)


def _no_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    return x


@torch.no_grad()
def sinkhorn(logits: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             all_reduce: Callable[[torch.Tensor, str], torch.Tensor] = _no_reduce) -> torch.Tensor:
    """Balanced soft assignment of this rank's rows to C prototypes (Sinkhorn-Knopp, as SwAV),
    with the sums over rows taken across all ranks through `all_reduce(x, "sum" | "max")`:
    every prototype gets an equal share of the global batch. Returns (B x C) assignments
    whose rows sum to 1."""
    q = logits.float() / epsilon
    q = torch.exp(q - all_reduce(q.max(), "max"))
    n_rows = all_reduce(torch.tensor(float(q.shape[0]), device=q.device), "sum")
    n_protos = q.shape[1]
    q = q / all_reduce(q.sum(), "sum")
    for _ in range(iterations):
        q = q / all_reduce(q.sum(dim=0, keepdim=True), "sum") / n_protos  # prototypes equal
        q = q / q.sum(dim=1, keepdim=True) / n_rows  # each row a distribution
    return (q * n_rows).to(logits.dtype)


# ----------------------------------------------------------------------------- structure-aware distillation

def _own_rows(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    return x


def structure_terms(img: torch.Tensor, txt: torch.Tensor, teacher_img: torch.Tensor, teacher_txt: torch.Tensor,
                    lam, tau, mode: str = "per_modality",
                    gather: Callable[[torch.Tensor, bool], torch.Tensor] = _own_rows,
                    offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Structure-aware distillation's two relation losses over the (gathered) batch, each a mean
    of absolute differences over the off-diagonal pairs i != j:

    `L_sd = mean |R_S - R_T|`, the student's relation against the teacher's mixed relation
    `R_T = lam * R_text + (1 - lam) * R_image`, where `R_text = T^T^T/tau` and `R_image =
    I^I^T/tau` of the L2-normalised teacher features and `R_S = F F^T / tau`.
    `per_modality`: F is each modality's embeddings in turn (two terms, added); `pair_mean`: F
    is the normalised mean of each pair's embeddings.

    `L_consistency = mean |R_image - R_T| + mean |R_text - R_T|`: each teacher relation against
    the mix. The teacher features are constants, so it trains lam and tau only.

    Takes this rank's rows (at row `offset` of the global batch); the columns are
    `gather(rows, with_grad)`, all ranks' rows (one process: the rows themselves)."""
    t_img = F.normalize(teacher_img.detach(), dim=-1)
    t_txt = F.normalize(teacher_txt.detach(), dim=-1)
    all_t_img, all_t_txt = gather(t_img, False), gather(t_txt, False)
    r_image, r_text = (t_img @ all_t_img.t()) / tau, (t_txt @ all_t_txt.t()) / tau
    r_t = lam * r_text + (1 - lam) * r_image
    b, n = img.shape[0], all_t_img.shape[0]
    off_diag = torch.ones(b, n, dtype=torch.bool, device=img.device)
    off_diag[torch.arange(b, device=img.device), torch.arange(offset, offset + b, device=img.device)] = False
    if mode == "per_modality":
        students = (img, txt)
    elif mode == "pair_mean":
        students = (F.normalize(img + txt, dim=-1),)
    else:
        raise ValueError(f"mode must be 'per_modality' or 'pair_mean', got {mode!r}")

    def mean_abs(x: torch.Tensor) -> torch.Tensor:
        return x.abs().masked_fill(~off_diag, 0.0).sum() / (n * (n - 1))

    sd = sum(mean_abs(f @ gather(f, True).t() / tau - r_t) for f in students)
    return sd, mean_abs(r_image - r_t) + mean_abs(r_text - r_t)


def structure_distillation(img: torch.Tensor, txt: torch.Tensor, teacher_img: torch.Tensor,
                           teacher_txt: torch.Tensor, lam, tau, mode: str = "per_modality",
                           gather: Callable[[torch.Tensor, bool], torch.Tensor] = _own_rows,
                           offset: int = 0) -> torch.Tensor:
    """`L_sd` of `structure_terms`."""
    return structure_terms(img, txt, teacher_img, teacher_txt, lam, tau, mode, gather, offset)[0]
