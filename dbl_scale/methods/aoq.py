"""AOQ, the adaptive offline quintuplet loss: every pair also meets offline hard negatives
mined from the whole training split (`mining.OfflineHardNegatives`), and the in-batch hinge
terms are weighted by how hard the offline negatives are."""
from __future__ import annotations

from typing import Optional

from ..losses import OfflineScores, aoq_quintuplet
from ..mining import OfflineHardNegatives
from ..preprocess import image_transform
from .base import Method, gathered_scores


class AOQ(Method):
    name = "aoq"
    offline: Optional[OfflineHardNegatives] = None

    def start(self, target, tokenize, steps_per_epoch, rank, workdir):
        cfg = self.cfg
        self.offline = OfflineHardNegatives(cfg.loss.aoq, cfg.data, image_transform(cfg), cfg.eval.batch_size,
                                            cfg.train.seed, target, tokenize, rank, workdir)
        self.steps_per_epoch = steps_per_epoch

    def prepare(self, batch, consumed, target):
        every = self.steps_per_epoch * self.loss_cfg.aoq.refresh_epochs
        if consumed and every and consumed % every == 0:
            self.offline.refresh(target, consumed)
        return self.offline.extend(batch)

    def state_dict(self):
        return {"aoq": self.offline.state_dict()}

    def rank_state_dict(self):
        return {"generator": self.offline.generator.get_state()}

    def load_state_dict(self, state, rank_state):
        self.offline.load_state_dict(state["aoq"], rank_state["generator"])

    def losses(self, outs, image_ids, step=0):
        """The branch embedded 3B images [I, I-, I_{T-}] and 3B captions [T, T-, T_{I-}] (the
        pairs, then their offline negatives, as `OfflineHardNegatives.extend` lays them out)."""
        a, out = self.loss_cfg.aoq, outs[0]
        img, ineg, itneg = out.img.chunk(3)
        txt, tneg, tineg = out.txt.chunk(3)
        offline = OfflineScores((img * tneg).sum(1), (ineg * txt).sum(1), (ineg * tneg).sum(1),
                                (itneg * tineg).sum(1))
        loss = aoq_quintuplet(gathered_scores(img, txt, self.mask_ids(image_ids)), offline, a.m_on, a.m_off, a.a,
                              a.b, a.clamp_weights, offline_weight=a.offline_weight)
        return [{"loss/aoq": loss, "loss": loss}]
