"""Structure-aware distillation (rebalanced retrieval): the student's intra-modal relations
follow a frozen teacher's (learnable mix lambda, temperature tau2), plus representation-level
InfoNCE from each student embedding, projected, to the teacher's feature of that modality."""
from __future__ import annotations

from .. import distributed
from ..losses import info_nce, structure_distillation
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

    def frozen_source(self):
        return self.lc.structure.teacher

    def teacher_folders(self):
        sc = self.lc.structure
        return None if sc.teacher else (sc.teacher_vision, sc.teacher_text)

    def heads(self, teacher_dims=None):
        sc, dim = self.lc.structure, self.cfg.model.embed_dim
        return {"structure": StructureHead(dim, teacher_dims or (dim, dim), sc.init_lambda, sc.temperature)}

    def losses(self, outs, image_ids, step=0):
        ids = self.mask_ids(image_ids)
        scores = StepScores(outs, self.roles, ids)
        sc, teacher, student, h = self.lc.structure, outs[0], outs[1], outs[1].heads
        rep_scale = 1.0 / sc.repr_temperature
        offset = distributed.rank() * student.img.shape[0]
        t = {"loss/raw": self.raw(scores[1], step),
             "loss/structure": structure_distillation(student.img, student.txt, teacher.img, teacher.txt, h["lam"],
                                                      h["tau"], sc.mode, distributed.gather, offset),
             "loss/repr_image": info_nce(gathered_scores(h["proj_img"], teacher.img, ids, all_ids=scores.all_ids),
                                         rep_scale),
             "loss/repr_text": info_nce(gathered_scores(h["proj_txt"], teacher.txt, ids, all_ids=scores.all_ids),
                                        rep_scale)}
        t["loss"] = (t["loss/raw"] + sc.weight * t["loss/structure"] + sc.repr_weight_image * t["loss/repr_image"]
                     + sc.repr_weight_text * t["loss/repr_text"])
        return [None, t]
