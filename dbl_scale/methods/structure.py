"""Structure-aware distillation (rebalanced retrieval), following the authors' code: the
student's intra-modal relations follow a frozen teacher's mixed relation (learnable mix
lambda, clamped learnable temperature tau2), each teacher relation is held to the mix (the
terms that train lambda and tau2), and representation-level InfoNCE runs from each student
embedding to the teacher's feature of that modality, projected into the joint space."""
from __future__ import annotations

from .. import distributed
from ..config import ConfigError
from ..losses import info_nce, structure_terms
from ..models import StructureHead
from .base import Method, StepScores, gathered_scores


class Structure(Method):
    name = "structure"
    roles = ["frozen", "trained"]  # the teacher's towers give the per-modality features

    def check(self):
        sc = self.lc.structure
        self.require(sc.teacher or (sc.teacher_vision and sc.teacher_text), "loss.structure.teacher",
                     "the run folder of a trained teacher (config.yaml, model.pt), or both "
                     "'loss.structure.teacher_vision' and 'loss.structure.teacher_text' (local HF folders)")
        if not sc.temperature_min <= sc.temperature <= sc.temperature_max:
            raise ConfigError("config keys 'loss.structure.temperature_min' <= 'loss.structure.temperature' <= "
                              f"'loss.structure.temperature_max': got {sc.temperature_min}, {sc.temperature}, "
                              f"{sc.temperature_max}")

    def frozen_source(self):
        return self.lc.structure.teacher

    def teacher_folders(self):
        sc = self.lc.structure
        return None if sc.teacher else (sc.teacher_vision, sc.teacher_text)

    def heads(self, teacher_dims=None):
        sc, dim = self.lc.structure, self.cfg.model.embed_dim
        return {"structure": StructureHead(dim, teacher_dims or (dim, dim), sc.init_lambda, sc.temperature,
                                           (sc.temperature_min, sc.temperature_max), sc.repr_temperature)}

    def forward_inputs(self, outs):
        return {"teacher": outs[0]}  # the head projects the teacher's features inside the target's forward

    def losses(self, outs, image_ids, step=0):
        ids = self.mask_ids(image_ids)
        scores = StepScores(outs, self.roles, ids)
        sc, teacher, student, h = self.lc.structure, outs[0], outs[1], outs[1].heads
        offset = distributed.rank() * student.img.shape[0]
        sd, consistency = structure_terms(student.img, student.txt, teacher.img, teacher.txt, h["lam"], h["tau"],
                                          sc.mode, distributed.gather, offset)

        def representation(student_emb, teacher_emb):  # student queries against all projected teacher features
            return info_nce(gathered_scores(student_emb, teacher_emb, ids, all_ids=scores.all_ids), h["repr_scale"],
                            one_way=True)

        t = {"loss/raw": self.raw(scores[1], step), "loss/structure": sd, "loss/consistency": consistency,
             "loss/repr_image": representation(student.img, h["teacher_img"]),
             "loss/repr_text": representation(student.txt, h["teacher_txt"])}
        t["loss"] = (t["loss/raw"] + sc.weight * sd + sc.consistency_weight * consistency
                     + sc.repr_weight_image * t["loss/repr_image"] + sc.repr_weight_text * t["loss/repr_text"])
        return [None, t]
