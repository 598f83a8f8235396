"""Conventional distillation from a frozen teacher (a finished run): the hinge triplet plus
the KL divergence of the softened score distributions, both directions."""
from __future__ import annotations

from ..losses import distillation
from .base import Layout, Method, StepScores
from ..roles import FROZEN, TRAINED


class Distill(Method):
    name = "distill"
    def check(self):
        self.require(self.loss_cfg.distill.teacher, "loss.distill.teacher",
                     "the run folder of a trained teacher (it holds config.yaml and model.pt)")

    def branch_layout(self):
        return Layout([FROZEN, TRAINED], frozen_source=self.loss_cfg.distill.teacher)

    def losses(self, outs, image_ids, step=0):
        scores = StepScores(outs, self.roles, self.mask_ids(image_ids))
        d = self.loss_cfg.distill
        terms = {"loss/raw": self.triplet(scores[1], step),
                 "loss/distill": distillation(scores[1], scores[0], d.temperature)}
        terms["loss"] = terms["loss/raw"] + d.weight * terms["loss/distill"]
        return [None, terms]
