"""Invariant 1, through the production training step: on 2 ranks x batch B (DeepSpeed
ZeRO-2 and ZeRO-3, gloo) every method's loss has the same value, every trained branch the same
gradient, and every EMA anchor the same update as 1 process x batch 2B. Both sides run
`train.train_step` on branches from `branches.build_branches` (tests/workers/step_parity.py):
a wrong world-size scale, a gather that drops a rank's rows, or an accumulation that sums
instead of averaging shows here. The loss math itself is checked against independent
references in test_loss_gradients.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, torchrun

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from parity_common import LOSS_ONLY  # noqa: E402  (the worker's own list: ZeRO-2 only)

pytestmark = pytest.mark.launch  # every test here starts a process
VARIANTS = ["triplet", "triplet_sum", "triplet_nomask", "infonce", "dbl_momentum_relative", "dbl_absolute_soft",
            "dbl_online_3", "dbl_offline", "distill", "mutual", "structure", "structure_pair_mean", "coder", "aoq",
            "aoq_unclamped", "triplet_grad_accum"]


@pytest.fixture(scope="module")
def steps(shapes_root, tmp_path_factory):
    """stage -> {world: results} of one training step on 1 and on 2 ranks (run once per stage)."""
    cache = {}

    def run(stage: int) -> dict:
        if stage not in cache:
            cache[stage] = {}
            for world in (1, 2):
                path = tmp_path_factory.mktemp(f"parity{world}") / "result.pt"
                torchrun([str(WORKERS / "step_parity.py"), str(path), str(shapes_root), str(stage)], nproc=world,
                         cwd=REPO)
                cache[stage][world] = torch.load(path, weights_only=True)
        return cache[stage]
    return run


def _close(got: dict, want: dict, what: str) -> int:
    """Parameter-wise equality to a float32 noise floor relative to the whole tensor set (it
    covers entries that are zero in exact arithmetic); returns how many are not ~0."""
    floor = 1e-7 * torch.cat([w.flatten() for w in want.values()]).norm().item()
    assert got.keys() == want.keys()
    nonzero = 0
    for name, w in want.items():
        diff = (got[name] - w).norm().item()
        assert diff <= 2e-5 * w.norm().item() + floor, (what, name, diff, w.norm().item())
        nonzero += int(w.norm() > 1e-6)
    return nonzero


CASES = [(2, v) for v in VARIANTS] + [(3, v) for v in VARIANTS if v not in LOSS_ONLY]


@pytest.mark.parametrize("stage,variant", CASES, ids=[f"zero{s}-{v}" for s, v in CASES])
def test_two_ranks_equal_one_process(stage, variant, steps):
    one, two = steps(stage)[1][variant], steps(stage)[2][variant]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and one["loss"] > 0
    assert sorted(two["grads"]) == sorted(one["grads"]) and one["grads"]
    for k in one["grads"]:
        nonzero = _close(two["grads"][k], one["grads"][k], f"branch {k} gradient")
        assert nonzero > len(one["grads"][k]) // 2  # the comparison is not between zeros
    for k in one["ema"]:
        _close(two["ema"][k], one["ema"][k], f"EMA anchor {k}")
        for result in (one, two):  # the anchor moved as m * anchor + (1 - m) * target, every parameter
            _close(result["ema"][k], result["ema_formula"][k], f"EMA anchor {k} against its formula")
    if variant.startswith("dbl_momentum"):
        assert one["ema"], "a momentum run has an EMA anchor to compare"
