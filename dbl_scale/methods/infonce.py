"""InfoNCE / CLIP: symmetric cross-entropy with a learnable, clamped temperature."""
from __future__ import annotations

from ..losses import info_nce
from .base import Layout, Method, StepScores


class InfoNCE(Method):
    name = "infonce"

    def branch_layout(self):
        return Layout(logit_temperature=self.loss_cfg.infonce.temperature)

    def losses(self, outs, image_ids, step=0):
        scores = StepScores(outs, self.roles, self.mask_ids(image_ids))
        loss = info_nce(scores[0], outs[0].logit_scale)
        return [{"loss/infonce": loss, "loss": loss}]
