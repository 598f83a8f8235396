"""The VSE++ hinge triplet (VSE0 with the sum over negatives; VSE-infinity's warm-up)."""
from __future__ import annotations

from .base import Method, StepScores


class Triplet(Method):
    name = "triplet"

    def losses(self, outs, image_ids, step=0):
        scores = StepScores(outs, self.roles, self.mask_ids(image_ids))
        raw = self.triplet(scores[0], step)
        return [{"loss/raw": raw, "loss": raw}]
