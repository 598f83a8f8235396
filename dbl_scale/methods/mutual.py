"""Deep mutual learning: two branches trained together, each pulled towards the other's
score distribution."""
from __future__ import annotations

from ..losses import mutual_learning
from .base import Method, StepScores


class Mutual(Method):
    name = "mutual"
    roles = ["trained", "trained"]

    def losses(self, outs, image_ids, step=0):
        scores = StepScores(outs, self.roles, self.mask_ids(image_ids))
        m = self.lc.mutual
        terms = []
        for k in (0, 1):
            t = {"loss/raw": self.raw(scores[k], step), "loss/mutual": mutual_learning(scores[k], scores[1 - k], m.smooth)}
            t["loss"] = t["loss/raw"] + m.weight * t["loss/mutual"]
            terms.append(t)
        return terms
