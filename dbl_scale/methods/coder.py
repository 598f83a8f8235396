"""CODER (our reading of the paper; no public code exists): momentum key encoders fill a
FIFO queue per modality from all ranks; queries learn with the diversity-sensitive
contrastive loss (DCL) against in-batch keys plus the other modality's queue; a concept bank
gives concept-level descriptors (DCL again) and logits that predict the pseudo labels of a
balanced clustering of the keys (Sinkhorn-Knopp)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..losses import Scores, diversity_contrastive, sinkhorn
from ..models import ConceptBank
from .base import Layout, Method, gathered_scores
from ..roles import EMA, TRAINED


class KeyQueues:
    """CODER's dictionaries: a FIFO of key embeddings per modality, filled after every step
    with the keys of all ranks, so it is identical on every rank (and saved with checkpoints).
    Each entry keeps its image id, so that a query never meets a key of its own image as a
    negative: when the queue is longer than an epoch (a small data set), it holds older keys
    of the very pairs in the batch."""

    def __init__(self, size: int, dim: int, device=None, dtype=torch.float32):
        self.img = torch.zeros(size, dim, device=device, dtype=dtype)
        self.txt = torch.zeros(size, dim, device=device, dtype=dtype)
        self.ids = torch.full((size,), -1, dtype=torch.long, device=device)  # -1: no id (never masked)
        self.filled, self.ptr = 0, 0

    def stage(self, img: torch.Tensor, txt: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        """Keep this step's gathered keys (and their image ids); `commit` enqueues them once
        backward no longer needs the queue as it was (the loss's queue scores keep a view of
        it for the gradient)."""
        self._staged = (img.detach(), txt.detach(), ids)

    def commit(self) -> None:
        staged, self._staged = getattr(self, "_staged", None), None
        if staged is not None:
            self.push(*staged)

    @torch.no_grad()
    def push(self, img: torch.Tensor, txt: torch.Tensor, ids: Optional[torch.Tensor] = None) -> None:
        size = self.img.shape[0]
        if size == 0:
            return
        img, txt = img[-size:], txt[-size:]
        idx = (self.ptr + torch.arange(img.shape[0], device=img.device)) % size
        self.img[idx], self.txt[idx] = img.to(self.img.dtype), txt.to(self.txt.dtype)
        self.ids[idx] = ids[-size:].to(self.ids.device) if ids is not None else -1
        self.ptr = int((self.ptr + img.shape[0]) % size)
        self.filled = min(size, self.filled + img.shape[0])

    def state_dict(self) -> dict:
        return {"img": self.img, "txt": self.txt, "ids": self.ids, "filled": self.filled, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        self.img.copy_(state["img"]), self.txt.copy_(state["txt"])
        self.ids.copy_(state["ids"]) if "ids" in state else self.ids.fill_(-1)  # older checkpoints: no ids
        self.filled, self.ptr = int(state["filled"]), int(state["ptr"])

    def keep(self, ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(queries x filled) True where the entry is a negative for the query: not of its image."""
        if ids is None:
            return None
        return self.ids[:self.filled][None, :] != ids[:, None].to(self.ids.device)


class CODER(Method):
    name = "coder"
    queues: KeyQueues | None = None

    def branch_layout(self):
        return Layout([EMA, TRAINED])  # momentum key encoders, query encoders

    def heads(self, teacher_dims=None):
        c, init = self.loss_cfg.coder, None
        if c.concept_file:
            path = Path(c.concept_file)
            init = torch.from_numpy(np.load(path)) if path.suffix == ".npy" else torch.load(path, weights_only=True)
        return {"concepts": ConceptBank(self.cfg.model.embed_dim, c.concepts, c.concept_temperature, init)}

    def momentum(self, step):
        return self.loss_cfg.coder.momentum  # constant, as MoCo's key encoders

    def start(self, target, tokenize, steps_per_epoch, rank, workdir):
        self.queues = KeyQueues(self.loss_cfg.coder.queue_size, self.cfg.model.embed_dim, distributed.device())

    def after_step(self):
        if self.queues is not None:  # enqueue this step's keys of all ranks (gathered by the loss)
            self.queues.commit()

    def state_dict(self):
        return {"queues": self.queues.state_dict()}

    def load_state_dict(self, state, rank_state):
        self.queues.load_state_dict(state["queues"])

    def losses(self, outs, image_ids, step=0):
        """Instance-level DCL of the queries against the in-batch keys of all ranks plus the
        other modality's queue; concept-level DCL between the concept descriptors; and the
        concept logits predicting the pseudo labels that balanced clustering of the keys gives,
        with the concept vectors as prototypes."""
        c, key, query, queues = self.loss_cfg.coder, outs[0], outs[1], self.queues
        ids = self.mask_ids(image_ids)
        all_k_img, all_k_txt = distributed.gather_no_grad(key.img), distributed.gather_no_grad(key.txt)
        all_ids = distributed.gather_no_grad(ids) if ids is not None else None
        offset = distributed.rank() * query.img.shape[0]
        inst = Scores.local(query.img, query.txt, all_k_img, all_k_txt, offset, ids, all_ids)
        queue_i2t = queue_t2i = queue_keep = None
        if queues is not None and queues.filled:
            queue_i2t = query.img @ queues.txt[:queues.filled].t()
            queue_t2i = query.txt @ queues.img[:queues.filled].t()
            queue_keep = queues.keep(ids)
        if queues is not None:
            queues.stage(all_k_img, all_k_txt, all_ids)
        heads = query.heads
        concept = gathered_scores(heads["concept_img"], heads["concept_txt"], ids, all_ids=all_ids)
        with torch.no_grad():
            keys = F.normalize(key.img + key.txt, dim=-1)
            labels = sinkhorn(keys @ heads["prototypes"].detach().t(), c.sinkhorn_epsilon, c.sinkhorn_iterations,
                              distributed.all_reduce).argmax(1)
        n = all_k_img.shape[0]
        terms = {"loss/dcl": diversity_contrastive(inst, c.temperature, c.beta, queue_i2t, queue_t2i,
                                                   queue_keep=queue_keep),
             "loss/dcl_concept": diversity_contrastive(concept, c.temperature, c.beta),
             "loss/pseudo_label": (F.cross_entropy(heads["concept_logits_img"], labels, reduction="sum")
                                   + F.cross_entropy(heads["concept_logits_txt"], labels, reduction="sum")) / (2 * n)}
        terms["loss"] = terms["loss/dcl"] + c.concept_weight * (terms["loss/dcl_concept"] + terms["loss/pseudo_label"])
        return [None, terms]
