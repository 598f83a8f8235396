"""Methods: which branches a method has, and the loss each trained branch gets (LOSSES.md).

Branches are listed anchor first; the last branch is the target, the model a run keeps,
evaluates and exports. A branch's role is
  "trained"  its own DeepSpeed engine and optimizer;
  "ema"      the momentum anchor: an exponential moving average of the target, no gradient;
  "frozen"   a trained checkpoint (offline DBL anchor, distillation teacher), no gradient.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .config import Config, LossConfig
from .losses import (OfflineScores, Scores, aoq_quintuplet, boost_absolute, boost_relative, distillation,
                     diversity_contrastive, hinge_triplet, info_nce, mutual_learning, sinkhorn,
                     structure_distillation)
from .models import ConceptBank, Embeddings, StructureHead


def branch_roles(lc: LossConfig) -> list[str]:
    if lc.method in ("triplet", "infonce", "aoq"):
        return ["trained"]
    if lc.method == "dbl":
        if lc.dbl.scenario == "momentum":
            return ["ema", "trained"]
        if lc.dbl.scenario == "offline":
            return ["frozen", "trained"]
        return ["trained"] * lc.dbl.branches  # online: branch k boosted against branches n < k
    if lc.method == "distill":
        return ["frozen", "trained"]
    if lc.method == "mutual":
        return ["trained", "trained"]
    if lc.method == "structure":
        return ["frozen", "trained"]  # the teacher's towers give the per-modality features
    if lc.method == "coder":
        return ["ema", "trained"]  # momentum key encoders, query encoders
    raise ValueError(f"unknown method {lc.method!r}")


def frozen_checkpoint(lc: LossConfig) -> Optional[str]:
    """The run folder a method's frozen branch is loaded from."""
    return {"dbl": lc.dbl.anchor, "distill": lc.distill.teacher, "structure": lc.structure.teacher}.get(lc.method)


def method_heads(cfg: Config, teacher_dims: Optional[tuple[int, int]] = None) -> dict:
    """The extra modules a method trains inside the target branch."""
    lc, dim = cfg.loss, cfg.model.embed_dim
    if lc.method == "structure":
        return {"structure": StructureHead(dim, teacher_dims or (dim, dim), lc.structure.init_lambda,
                                           lc.structure.temperature)}
    if lc.method == "coder":
        init = None
        if lc.coder.concept_file:
            path = Path(lc.coder.concept_file)
            init = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        return {"concepts": ConceptBank(dim, lc.coder.concepts, lc.coder.concept_temperature, init)}
    return {}


class KeyQueues:
    """CODER's dictionaries: a FIFO of key embeddings per modality, filled after every step
    with the keys of all ranks, so it is identical on every rank (and saved with checkpoints)."""

    def __init__(self, size: int, dim: int, device=None, dtype=torch.float32):
        self.img = torch.zeros(size, dim, device=device, dtype=dtype)
        self.txt = torch.zeros(size, dim, device=device, dtype=dtype)
        self.filled, self.ptr = 0, 0

    def stage(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        """Keep this step's gathered keys; `commit` enqueues them once backward no longer needs
        the queue as it was (the loss's queue scores keep a view of it for the gradient)."""
        self._staged = (img.detach(), txt.detach())

    def commit(self) -> None:
        staged, self._staged = getattr(self, "_staged", None), None
        if staged is not None:
            self.push(*staged)

    @torch.no_grad()
    def push(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        size = self.img.shape[0]
        if size == 0:
            return
        img, txt = img[-size:], txt[-size:]
        idx = (self.ptr + torch.arange(img.shape[0], device=img.device)) % size
        self.img[idx], self.txt[idx] = img.to(self.img.dtype), txt.to(self.txt.dtype)
        self.ptr = int((self.ptr + img.shape[0]) % size)
        self.filled = min(size, self.filled + img.shape[0])

    def state_dict(self) -> dict:
        return {"img": self.img, "txt": self.txt, "filled": self.filled, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.img.copy_(state["img"]), self.txt.copy_(state["txt"])
        self.filled, self.ptr = int(state["filled"]), int(state["ptr"])


def compute_losses(cfg: Config, outs: list[Embeddings], image_ids: torch.Tensor, step: int = 0,
                   queues: Optional[KeyQueues] = None) -> list[Optional[dict[str, torch.Tensor]]]:
    """Loss terms of every trained branch (None for the others), from this rank's queries
    against the candidates of all ranks. Each term is a per-rank share of the single-process
    loss of the global batch; "loss" is the weighted total a branch optimises."""
    lc = cfg.loss
    roles = branch_roles(lc)
    ids = image_ids if lc.mask_same_image else None
    if lc.method == "coder":
        return [None, coder_losses(cfg, outs[1], outs[0], ids, queues)]
    if lc.method == "aoq":
        return [aoq_losses(cfg, outs[0], ids)]
    cache: dict[int, Scores] = {}
    all_ids = distributed.gather_no_grad(ids) if ids is not None else None  # once for every branch

    def scores(k: int) -> Scores:  # branch k's cross-modal scores, built once, only when a loss uses them
        if k not in cache:
            cache[k] = Scores.gathered(outs[k].img, outs[k].txt, ids, roles[k] == "trained", all_ids)
        return cache[k]

    max_violation = lc.max_violation and step >= lc.sum_warmup_steps

    def raw(k: int) -> torch.Tensor:
        return hinge_triplet(scores(k), lc.margin, max_violation)

    def boost(k: int, n: int) -> torch.Tensor:
        d = lc.dbl
        if d.boost == "relative":
            return boost_relative(scores(k), scores(n), lc.margin, d.beta, max_violation=max_violation,
                                  soft_adapt=d.soft_adapt)
        return boost_absolute(scores(k), scores(n), lc.margin, d.beta, d.gamma, max_violation=max_violation,
                              soft_adapt=d.soft_adapt)

    terms: list[Optional[dict[str, torch.Tensor]]] = [None] * len(outs)
    if lc.method == "triplet":
        terms[0] = {"loss/raw": raw(0)}
        terms[0]["loss"] = terms[0]["loss/raw"]
    elif lc.method == "infonce":
        terms[0] = {"loss/infonce": info_nce(scores(0), outs[0].logit_scale)}
        terms[0]["loss"] = terms[0]["loss/infonce"]
    elif lc.method == "dbl":
        for k, role in enumerate(roles):
            if role != "trained":
                continue
            t = {"loss/raw": raw(k)}
            t["loss"] = t["loss/raw"]
            if k > 0:  # boosted against the mean over the branches before it
                t["loss/boost"] = torch.stack([boost(k, n) for n in range(k)]).mean()
                t["loss"] = t["loss"] + lc.dbl.alpha * t["loss/boost"]
            terms[k] = t
    elif lc.method == "distill":
        t = {"loss/raw": raw(1), "loss/distill": distillation(scores(1), scores(0), lc.distill.temperature)}
        t["loss"] = t["loss/raw"] + lc.distill.weight * t["loss/distill"]
        terms[1] = t
    elif lc.method == "mutual":
        for k in (0, 1):
            t = {"loss/raw": raw(k), "loss/mutual": mutual_learning(scores(k), scores(1 - k), lc.mutual.smooth)}
            t["loss"] = t["loss/raw"] + lc.mutual.weight * t["loss/mutual"]
            terms[k] = t
    elif lc.method == "structure":
        sc, teacher, h = lc.structure, outs[0], outs[1].heads
        rep_scale = 1.0 / sc.repr_temperature
        t = {"loss/raw": raw(1),
             "loss/structure": structure_distillation(outs[1].img, outs[1].txt, teacher.img, teacher.txt,
                                                      h["lam"], h["tau"], sc.mode),
             "loss/repr_image": info_nce(Scores.gathered(h["proj_img"], teacher.img, ids, all_ids=all_ids), rep_scale),
             "loss/repr_text": info_nce(Scores.gathered(h["proj_txt"], teacher.txt, ids, all_ids=all_ids), rep_scale)}
        t["loss"] = (t["loss/raw"] + sc.weight * t["loss/structure"] + sc.repr_weight_image * t["loss/repr_image"]
                     + sc.repr_weight_text * t["loss/repr_text"])
        terms[1] = t
    return terms


def aoq_losses(cfg: Config, out: Embeddings, ids: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """AOQ. The branch embedded 3B images [I, I-, I_{T-}] and 3B captions [T, T-, T_{I-}]
    (the pairs, then their offline negatives from `mining.OfflineNegatives`)."""
    a = cfg.loss.aoq
    img, ineg, itneg = out.img.chunk(3)
    txt, tneg, tineg = out.txt.chunk(3)
    offline = OfflineScores((img * tneg).sum(1), (ineg * txt).sum(1), (ineg * tneg).sum(1), (itneg * tineg).sum(1))
    loss = aoq_quintuplet(Scores.gathered(img, txt, ids), offline, a.m_on, a.m_off, a.a, a.b, a.clamp_weights)
    return {"loss/aoq": loss, "loss": loss}


def coder_losses(cfg: Config, query: Embeddings, key: Embeddings, ids: Optional[torch.Tensor],
                 queues: Optional[KeyQueues]) -> dict[str, torch.Tensor]:
    """CODER: instance-level DCL of the queries against the in-batch keys of all ranks plus the
    other modality's queue; concept-level DCL between the concept descriptors; and the concept
    logits predicting the pseudo labels that balanced clustering (Sinkhorn-Knopp) of the keys
    gives, with the concept vectors as prototypes."""
    c = cfg.loss.coder
    all_k_img, all_k_txt = distributed.gather_no_grad(key.img), distributed.gather_no_grad(key.txt)
    all_ids = distributed.gather_no_grad(ids) if ids is not None else None
    offset = distributed.rank() * query.img.shape[0]
    inst = Scores.local(query.img, query.txt, all_k_img, all_k_txt, offset, ids, all_ids)
    queue_i2t = queue_t2i = None
    if queues is not None and queues.filled:
        queue_i2t = query.img @ queues.txt[:queues.filled].t()
        queue_t2i = query.txt @ queues.img[:queues.filled].t()
    if queues is not None:
        queues.stage(all_k_img, all_k_txt)
    h = query.heads
    concept = Scores.gathered(h["concept_img"], h["concept_txt"], ids, all_ids=all_ids)
    with torch.no_grad():
        keys = F.normalize(key.img + key.txt, dim=-1)
        labels = sinkhorn(keys @ h["prototypes"].detach().t(), c.sinkhorn_epsilon, c.sinkhorn_iterations).argmax(1)
    n = all_k_img.shape[0]
    t = {"loss/dcl": diversity_contrastive(inst, c.temperature, c.beta, queue_i2t, queue_t2i),
         "loss/dcl_concept": diversity_contrastive(concept, c.temperature, c.beta),
         "loss/pseudo_label": (F.cross_entropy(h["concept_logits_img"], labels, reduction="sum")
                               + F.cross_entropy(h["concept_logits_txt"], labels, reduction="sum")) / (2 * n)}
    t["loss"] = t["loss/dcl"] + c.concept_weight * (t["loss/dcl_concept"] + t["loss/pseudo_label"])
    return t
