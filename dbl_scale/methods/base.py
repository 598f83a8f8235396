"""What a method is: its branches and their roles (`roles.py`), the heads its target carries,
the state it keeps between steps, and the loss each trained branch gets (docs/methods.md).
Losses take this rank's queries against the candidates of all ranks, gathered once per step
through `distributed`; each term is this rank's share of the global batch's loss."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import distributed
from ..config import Config, ConfigError
from ..losses import Scores, hinge_triplet
from ..models import Embeddings
from ..roles import EMA, TRAINED

Terms = dict[str, torch.Tensor]



def gathered_scores(img: torch.Tensor, txt: torch.Tensor, image_ids: Optional[torch.Tensor] = None,
                    with_grad: bool = True, all_ids: Optional[torch.Tensor] = None) -> Scores:
    """Local embeddings (B x d) against the embeddings of all ranks (W*B x d).

    `with_grad=False` for an anchor or teacher branch: gathered without a backward path.
    `all_ids`: the already gathered image ids, when several branches share them.
    """
    all_img, all_txt = distributed.gather(img, with_grad), distributed.gather(txt, with_grad)
    if image_ids is not None and all_ids is None:
        all_ids = distributed.gather_no_grad(image_ids)
    offset = distributed.rank() * img.shape[0]
    return Scores.local(img, txt, all_img, all_txt, offset, image_ids, all_ids)


class StepScores:
    """One step's cross-modal scores of every branch, each built on first use only (a loss
    that needs no scores of a branch costs no matmul), with the image ids gathered once."""

    def __init__(self, outs: list[Embeddings], roles: list[str], ids: Optional[torch.Tensor]):
        self.outs, self.roles, self.ids = outs, roles, ids
        self.all_ids = distributed.gather_no_grad(ids) if ids is not None else None
        self._built: dict[int, Scores] = {}

    def __getitem__(self, k: int) -> Scores:
        if k not in self._built:
            out = self.outs[k]
            self._built[k] = gathered_scores(out.img, out.txt, self.ids, self.roles[k] == TRAINED, self.all_ids)
        return self._built[k]


@dataclass(frozen=True)
class Layout:
    """A method's branches, fixed for the run (read when the branches are built): their roles
    in order, the target last, and where a frozen branch and the target's start come from."""
    roles: list = field(default_factory=lambda: [TRAINED])
    frozen_source: Optional[str] = None  # the finished run whose target becomes the frozen branch
    teacher_folders: Optional[tuple[str, str]] = None  # or single-modal HF folders (vision, text)
    target_starts_from_frozen: bool = False  # the target starts as a copy of the frozen branch
    logit_temperature: Optional[float] = None  # initial temperature of a learnable logit scale


class Method:
    """A method family: its branch `Layout` (static), the heads and per-run state it adds, and
    the loss terms of each trained branch at every step. Subclasses override `branch_layout`
    and `losses`; the rest has defaults that fit a single trained branch without state."""

    name = ""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.loss_cfg = cfg.loss
        self.check()
        self.layout = self.branch_layout()

    def check(self) -> None:
        """Settings this method needs (a ConfigError names the key and what is expected)."""

    def require(self, value, key: str, what: str) -> None:
        if not value:
            raise ConfigError(f"config key '{key}': {self.name} needs {what}")

    # ------------------------------------------------------------------ branches
    def branch_layout(self) -> Layout:
        """The branches this method's settings make (called once, after `check`)."""
        return Layout()

    @property
    def roles(self) -> list[str]:
        return self.layout.roles

    def heads(self, teacher_dims: Optional[tuple[int, int]] = None) -> dict[str, nn.Module]:
        """Extra modules the method trains inside each of its DualEncoders."""
        return {}

    def forward_inputs(self, outs: list[Embeddings]) -> dict:
        """Extra inputs of the trained branches' forward, from the branches before them (in
        branch order): e.g. the teacher's features that a head projects."""
        return {}

    def momentum(self, step: int) -> float:
        """The EMA momentum after optimizer step `step` (methods with an EMA branch)."""
        raise NotImplementedError(f"{self.name} has no momentum branch")

    # ------------------------------------------------------------------ per-run state
    def start(self, target: nn.Module, tokenize, steps_per_epoch: int, rank: int, workdir: Path) -> None:
        """Create the run's state once the branches and the loader exist (`workdir`: the run's
        folder, for state kept in files, which every rank sees)."""

    def prepare(self, batch: dict, consumed: int, target: nn.Module) -> dict:
        """The batch a step trains on, given the loader's (`consumed`: loader batches so far)."""
        return batch

    def after_step(self) -> None:
        """Called after every micro-step's update."""

    def state_dict(self) -> dict:
        """State that is the same on every rank (saved once)."""
        return {}

    def rank_state_dict(self) -> dict:
        """State of this rank only."""
        return {}

    def load_state_dict(self, state: dict, rank_state: dict) -> None:
        pass

    def step_metrics(self, step: int) -> dict[str, float]:
        """Logged with every metric line: what the method's schedule is at `step`."""
        return {"momentum": self.momentum(step)} if EMA in self.roles else {}

    # ------------------------------------------------------------------ losses
    def losses(self, outs: list[Embeddings], image_ids: torch.Tensor, step: int = 0) -> list[Optional[Terms]]:
        """Loss terms of every trained branch (None for the others)."""
        raise NotImplementedError

    def mask_ids(self, image_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The image ids that mark same-image pairs as non-negatives (None: nothing masked)."""
        return image_ids if self.loss_cfg.mask_same_image else None

    def max_violation(self, step: int) -> bool:
        """Hardest negative or sum over negatives: VSE-infinity's warm-up sums for
        `sum_warmup_steps` steps, then takes the hardest."""
        return self.loss_cfg.max_violation and step >= self.loss_cfg.sum_warmup_steps

    def triplet(self, scores: Scores, step: int) -> torch.Tensor:
        """The hinge triplet every matching method builds on."""
        return hinge_triplet(scores, self.loss_cfg.margin, self.max_violation(step))
