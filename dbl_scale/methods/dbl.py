"""Deep Boosting Learning: a target boosted against an anchor, where the anchor is an EMA of
the target (`momentum`), earlier branches trained alongside (`online`, K branches), or a
finished run kept frozen (`offline`, the target starting from it)."""
from __future__ import annotations

import math

import torch

from ..losses import boost_absolute, boost_relative
from .base import Method, StepScores


def momentum_at(step: int, total: int, m0: float) -> float:
    """Cosine schedule of the EMA momentum, from m0 at step 0 up to 1 at the last step."""
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / max(1, total)) + 1.0) / 2.0


class DBL(Method):
    name = "dbl"

    @property
    def roles(self):
        scenario = self.lc.dbl.scenario
        if scenario == "momentum":
            return ["ema", "trained"]
        if scenario == "offline":
            return ["frozen", "trained"]
        return ["trained"] * self.lc.dbl.branches  # online: branch k boosted against branches n < k

    def check(self):
        if self.lc.dbl.scenario == "offline":
            self.require(self.lc.dbl.anchor, "loss.dbl.anchor", "the run folder of a trained anchor in the offline "
                         "scenario (it holds config.yaml and model.pt)")

    def frozen_source(self):
        return self.lc.dbl.anchor

    @property
    def target_starts_from_frozen(self):
        return self.lc.dbl.scenario == "offline"

    def momentum(self, step):
        return momentum_at(step, self.cfg.train.steps, self.lc.dbl.momentum)

    def boost(self, target, anchor, step: int) -> torch.Tensor:
        d, margin = self.lc.dbl, self.lc.margin
        if d.boost == "relative":
            return boost_relative(target, anchor, margin, d.beta, max_violation=self.max_violation(step),
                                  soft_adapt=d.soft_adapt)
        return boost_absolute(target, anchor, margin, d.beta, d.gamma, max_violation=self.max_violation(step),
                              soft_adapt=d.soft_adapt)

    def losses(self, outs, image_ids, step=0):
        roles = self.roles
        scores = StepScores(outs, roles, self.mask_ids(image_ids))
        terms = [None] * len(outs)
        for k, role in enumerate(roles):
            if role != "trained":
                continue
            t = {"loss/raw": self.raw(scores[k], step)}
            t["loss"] = t["loss/raw"]
            if k > 0:  # boosted against the mean over the branches before it
                t["loss/boost"] = torch.stack([self.boost(scores[k], scores[n], step) for n in range(k)]).mean()
                t["loss"] = t["loss"] + self.lc.dbl.alpha * t["loss/boost"]
            terms[k] = t
        return terms
