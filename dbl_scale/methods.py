"""Methods: which branches a method has, and the loss each trained branch gets (LOSSES.md).

Branches are listed anchor first; the last branch is the target, the model a run keeps,
evaluates and exports. A branch's role is
  "trained"  its own DeepSpeed engine and optimizer;
  "ema"      the momentum anchor: an exponential moving average of the target, no gradient;
  "frozen"   a trained checkpoint (offline DBL anchor, distillation teacher), no gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import Config, LossConfig
from .losses import (Scores, boost_absolute, boost_relative, distillation, hinge_triplet, info_nce,
                     mutual_learning)
from .models import Embeddings


def branch_roles(lc: LossConfig) -> list[str]:
    if lc.method in ("triplet", "infonce"):
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
    raise ValueError(f"unknown method {lc.method!r}")


def compute_losses(cfg: Config, outs: list[Embeddings], image_ids: torch.Tensor,
                   step: int = 0) -> list[Optional[dict[str, torch.Tensor]]]:
    """Loss terms of every trained branch (None for the others), from this rank's queries
    against the candidates of all ranks. Each term is a per-rank share of the single-process
    loss of the global batch; "loss" is the weighted total a branch optimises."""
    lc = cfg.loss
    roles = branch_roles(lc)
    ids = image_ids if lc.mask_same_image else None
    scores = [Scores.gathered(o.img, o.txt, ids, with_grad=role == "trained") for o, role in zip(outs, roles)]
    max_violation = lc.max_violation and step >= lc.sum_warmup_steps

    def raw(k: int) -> torch.Tensor:
        return hinge_triplet(scores[k], lc.margin, max_violation)

    def boost(k: int, n: int) -> torch.Tensor:
        d = lc.dbl
        if d.boost == "relative":
            return boost_relative(scores[k], scores[n], lc.margin, d.beta, max_violation=max_violation,
                                  soft_adapt=d.soft_adapt)
        return boost_absolute(scores[k], scores[n], lc.margin, d.beta, d.gamma, max_violation=max_violation,
                              soft_adapt=d.soft_adapt)

    terms: list[Optional[dict[str, torch.Tensor]]] = [None] * len(outs)
    if lc.method == "triplet":
        terms[0] = {"loss/raw": raw(0)}
        terms[0]["loss"] = terms[0]["loss/raw"]
    elif lc.method == "infonce":
        terms[0] = {"loss/infonce": info_nce(scores[0], outs[0].logit_scale)}
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
        t = {"loss/raw": raw(1), "loss/distill": distillation(scores[1], scores[0], lc.distill.temperature)}
        t["loss"] = t["loss/raw"] + lc.distill.weight * t["loss/distill"]
        terms[1] = t
    elif lc.method == "mutual":
        for k in (0, 1):
            t = {"loss/raw": raw(k), "loss/mutual": mutual_learning(scores[k], scores[1 - k], lc.mutual.smooth)}
            t["loss"] = t["loss/raw"] + lc.mutual.weight * t["loss/mutual"]
            terms[k] = t
    return terms
