"""Conventional distillation from a frozen teacher (a finished run): the hinge triplet plus
the KL divergence of the softened score distributions, both directions."""
from __future__ import annotations

from ..losses import distillation
from .base import Method, StepScores


class Distill(Method):
    name = "distill"
    roles = ["frozen", "trained"]

    def check(self):
        self.require(self.lc.distill.teacher, "loss.distill.teacher",
                     "the run folder of a trained teacher (it holds config.yaml and model.pt)")

    def frozen_source(self):
        return self.lc.distill.teacher

    def losses(self, outs, image_ids, step=0):
        scores = StepScores(outs, self.roles, self.mask_ids(image_ids))
        d = self.lc.distill
        t = {"loss/raw": self.raw(scores[1], step), "loss/distill": distillation(scores[1], scores[0], d.temperature)}
        t["loss"] = t["loss/raw"] + d.weight * t["loss/distill"]
        return [None, t]
