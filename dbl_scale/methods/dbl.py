"""Deep Boosting Learning: a target boosted against an anchor, where the anchor is an EMA of
the target (`momentum`), earlier branches trained alongside (`online`, K branches), or a
finished run kept frozen (`offline`, the target starting from it)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..losses import boost_absolute, boost_diagnostics, boost_relative
from .base import Layout, Method, StepScores
from ..roles import EMA, FROZEN, TARGET, TRAINED


def momentum_at(step: int, total: int, m0: float) -> float:
    """Cosine schedule of the EMA momentum, from m0 at step 0 up to 1 at the last step."""
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / max(1, total)) + 1.0) / 2.0


def init_left(m0: float, total: int) -> float:
    """The share of the anchor's starting weights (the random init) left after `total` steps:
    the product of the momenta the EMA applies, after steps 1..total."""
    momenta = np.array([momentum_at(t, total, m0) for t in range(1, total + 1)])
    return float(np.exp(np.log(momenta).sum()))


def m0_for_init_left(left: float, total: int) -> float:
    """The m0 whose schedule leaves `left` of the random init in the anchor after `total` steps
    (bisection: the share grows with m0)."""
    lo, hi = 0.0, 1.0 - 1e-12
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if init_left(mid, total) < left else (lo, mid)
    return (lo + hi) / 2


class DBL(Method):
    name = "dbl"

    def __init__(self, cfg):
        super().__init__(cfg)
        d = self.loss_cfg.dbl
        self.m0 = m0_for_init_left(d.momentum_init_left, cfg.train.steps) if d.momentum_init_left else d.momentum

    def check(self):
        if self.loss_cfg.dbl.scenario == "offline":
            self.require(self.loss_cfg.dbl.anchor, "loss.dbl.anchor", "the run folder of a trained anchor in the "
                         "offline scenario (it holds config.yaml and model.pt)")

    def branch_layout(self):
        d = self.loss_cfg.dbl
        if d.scenario == "momentum":
            return Layout([EMA, TRAINED])
        if d.scenario == "offline":  # the target starts as the frozen anchor
            return Layout([FROZEN, TRAINED], frozen_source=d.anchor, target_starts_from_frozen=True)
        return Layout([TRAINED] * d.branches)  # online: branch k boosted against branches n < k

    def momentum(self, step):
        return momentum_at(step, self.cfg.train.steps, self.m0)

    def boost(self, target, anchor) -> torch.Tensor:
        """The boost in its own form at every step: max or sum by `loss.dbl.reduction`, never
        the raw triplet's warm-up (with anchor ~ target every negative violates by
        margin*beta, and a summed boost would swamp the first steps)."""
        d, margin = self.loss_cfg.dbl, self.loss_cfg.margin
        max_violation = d.reduction == "max"
        if d.boost == "relative":
            return boost_relative(target, anchor, margin, d.beta, max_violation=max_violation, soft_adapt=d.soft_adapt)
        return boost_absolute(target, anchor, margin, d.beta, d.gamma, max_violation=max_violation,
                              soft_adapt=d.soft_adapt)

    def losses(self, outs, image_ids, step=0):
        roles = self.roles
        scores = StepScores(outs, roles, self.mask_ids(image_ids))
        terms = [None] * len(outs)
        for k, role in enumerate(roles):
            if role != TRAINED:
                continue
            branch_terms = {"loss/raw": self.triplet(scores[k], step)}
            branch_terms["loss"] = branch_terms["loss/raw"]
            if k > 0:  # boosted against the mean over the branches before it
                branch_terms["loss/boost"] = torch.stack([self.boost(scores[k], scores[n]) for n in range(k)]).mean()
                branch_terms["loss"] = branch_terms["loss"] + self.loss_cfg.dbl.alpha * branch_terms["loss/boost"]
            terms[k] = branch_terms
        terms[TARGET].update(self.diagnostics(scores, len(outs) - 1))
        return terms

    def diagnostics(self, scores: StepScores, k: int) -> dict[str, torch.Tensor]:
        """Why the boost helps or not, for the target against the branch before it: the share
        of queries it is active on, the mean target and anchor gaps at its negative, and how
        often that negative is the target's hardest (each rank its share of the global mean)."""
        sums = boost_diagnostics(scores[k], scores[k - 1], self.loss_cfg.margin, self.loss_cfg.dbl.beta)
        queries = 2 * scores[k].i2t.shape[1]  # both directions of the global batch
        return {f"dbl/{name}": value / queries for name, value in sums.items()}
