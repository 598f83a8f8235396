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
from .base import Layout, Method, StepScores, gathered_scores
from ..roles import FROZEN, TRAINED


class Structure(Method):
    name = "structure"
    def check(self):
        settings = self.loss_cfg.structure
        self.require(settings.teacher or (settings.teacher_vision and settings.teacher_text),
                     "loss.structure.teacher", "the run folder of a trained teacher (config.yaml, model.pt), or both "
                     "'loss.structure.teacher_vision' and 'loss.structure.teacher_text' (local HF folders)")
        if not settings.temperature_min <= settings.temperature <= settings.temperature_max:
            raise ConfigError("config keys 'loss.structure.temperature_min' <= 'loss.structure.temperature' <= "
                              f"'loss.structure.temperature_max': got {settings.temperature_min}, "
                              f"{settings.temperature}, {settings.temperature_max}")

    def branch_layout(self):  # the teacher's towers (or frozen HF encoders) give the per-modality features
        settings = self.loss_cfg.structure
        folders = None if settings.teacher else (settings.teacher_vision, settings.teacher_text)
        return Layout([FROZEN, TRAINED], frozen_source=settings.teacher, teacher_folders=folders)

    def heads(self, teacher_dims=None):
        settings, dim = self.loss_cfg.structure, self.cfg.model.embed_dim
        return {"structure": StructureHead(dim, teacher_dims or (dim, dim), settings.init_lambda,
                                           settings.temperature, (settings.temperature_min, settings.temperature_max),
                                           settings.repr_temperature)}

    def forward_inputs(self, outs):
        return {"teacher": outs[0]}  # the head projects the teacher's features inside the target's forward

    def losses(self, outs, image_ids, step=0):
        ids = self.mask_ids(image_ids)
        scores = StepScores(outs, self.roles, ids)
        settings, teacher, student, heads = self.loss_cfg.structure, outs[0], outs[1], outs[1].heads
        offset = distributed.rank() * student.img.shape[0]
        sd, consistency = structure_terms(student.img, student.txt, teacher.img, teacher.txt, heads["lam"],
                                          heads["tau"], settings.mode, distributed.gather, offset)

        def representation(student_emb, teacher_emb):  # student queries against all projected teacher features
            return info_nce(gathered_scores(student_emb, teacher_emb, ids, all_ids=scores.all_ids),
                            heads["repr_scale"], one_way=True)

        terms = {"loss/raw": self.triplet(scores[1], step), "loss/structure": sd, "loss/consistency": consistency,
                 "loss/repr_image": representation(student.img, heads["teacher_img"]),
                 "loss/repr_text": representation(student.txt, heads["teacher_txt"])}
        terms["loss"] = (terms["loss/raw"] + settings.weight * sd + settings.consistency_weight * consistency
                         + settings.repr_weight_image * terms["loss/repr_image"]
                         + settings.repr_weight_text * terms["loss/repr_text"])
        return [None, terms]
