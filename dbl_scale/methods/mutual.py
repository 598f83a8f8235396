"""Deep mutual learning: two branches trained together, each pulled towards the other's
score distribution."""
from __future__ import annotations

from ..losses import mutual_learning
from .base import Layout, Method, StepScores
from ..roles import TRAINED


class Mutual(Method):
    name = "mutual"

    def branch_layout(self):
        return Layout([TRAINED, TRAINED])

    def losses(self, outs, image_ids, step=0):
        scores = StepScores(outs, self.roles, self.mask_ids(image_ids))
        m = self.loss_cfg.mutual
        terms = []
        for k in (0, 1):
            branch_terms = {"loss/raw": self.triplet(scores[k], step),
                            "loss/mutual": mutual_learning(scores[k], scores[1 - k], m.smooth)}
            branch_terms["loss"] = branch_terms["loss/raw"] + m.weight * branch_terms["loss/mutual"]
            terms.append(branch_terms)
        return terms
