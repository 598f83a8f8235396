"""Methods as objects: one class per method family (`base.Method` says what a method owns),
and the registry that maps `loss.method` to its class. Adding a method is one new file here,
one line below, and its name (and options section, if any) in `config.LossConfig`."""
from __future__ import annotations

from ..config import Config
from .aoq import AOQ
from .base import Layout, Method, StepScores, Terms, gathered_scores
from .coder import CODER, KeyQueues
from .dbl import DBL, momentum_at
from .distill import Distill
from .infonce import InfoNCE
from .mutual import Mutual
from .structure import Structure
from .triplet import Triplet

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    Triplet, InfoNCE, DBL, Distill, Mutual, Structure, CODER, AOQ)}


def build_method(cfg: Config) -> Method:
    """The method object of a run's config (`loss.method`)."""
    if cfg.loss.method not in METHODS:
        raise ValueError(f"unknown loss.method {cfg.loss.method!r}; known: {', '.join(METHODS)}")
    return METHODS[cfg.loss.method](cfg)


__all__ = ["METHODS", "build_method", "Layout", "Method", "StepScores", "Terms", "gathered_scores", "KeyQueues",
           "momentum_at", "AOQ", "CODER", "DBL", "Distill", "InfoNCE", "Mutual", "Structure", "Triplet"]
