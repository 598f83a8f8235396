"""Invariant 1: on 2 ranks x batch B (DeepSpeed ZeRO-2, gloo) every loss has the same value
and the same parameter gradients as 1 process x batch 2B, through the training code."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, torchrun
from dbl_scale.config import load_config
from dbl_scale.train import compute_losses

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from parity_common import VARIANTS, make_batch, make_models  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_results(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "ranks.pt"
    torchrun([str(WORKERS / "loss_parity.py"), str(out), str(shapes_root / "tokenizer"), "2"], cwd=REPO)
    return torch.load(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_process(variant, two_rank_results, shapes_root):
    target, anchor, tokenizer = make_models(str(shapes_root / "tokenizer"))
    batch = make_batch(tokenizer)
    img, txt = target(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        a_img, a_txt = anchor(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    loss = compute_losses(load_config(None, VARIANTS[variant]), img, txt, batch["image_ids"], a_img, a_txt)["loss"]
    loss.backward()

    got = two_rank_results[variant]
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert loss.item() > 0
    n_nonzero = 0
    # float32 noise floor, relative to the whole gradient: it covers gradients that are zero
    # in exact arithmetic (attention key biases), whose float value is pure rounding noise
    floor = 1e-7 * torch.cat([p.grad.flatten() for p in target.parameters()]).norm().item()
    for name, p in target.named_parameters():
        diff = (got["grads"][name] - p.grad).norm().item()
        assert diff <= 1e-5 * p.grad.norm().item() + floor, (name, diff, p.grad.norm().item())
        n_nonzero += int(p.grad.norm() > 1e-3)
    assert n_nonzero > len(list(target.parameters())) // 2  # the comparison is not between zeros
