"""Invariant 1: on 2 ranks x batch B (DeepSpeed ZeRO-2, gloo) every method's losses have the
same value and every trained branch the same parameter gradients as 1 process x batch 2B,
through the training code (each method's `losses`, dbl_scale.methods)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, torchrun

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
from parity_common import VARIANTS, compute_losses, forward_inputs, make_batch, make_queues, models_for  # noqa: E402


@pytest.fixture(scope="module")
def two_rank_results(shapes_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "ranks.pt"
    torchrun([str(WORKERS / "loss_parity.py"), str(out), str(shapes_root / "tokenizer"), "2"], cwd=REPO)
    return torch.load(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_process(variant, two_rank_results, shapes_root):
    cfg, roles, models, tokenizer = models_for(variant, str(shapes_root / "tokenizer"))
    batch = make_batch(tokenizer, cfg)
    outs = []
    for m, role in zip(models, roles):
        with torch.set_grad_enabled(role == "trained"):
            extra = forward_inputs(cfg, outs) if role == "trained" else {}
            outs.append(m(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], **extra))
    terms = compute_losses(cfg, outs, batch["image_ids"], queues=make_queues(cfg))
    got = two_rank_results[variant]
    assert sorted(got) == [k for k, t in enumerate(terms) if t is not None]
    for k, t in enumerate(terms):
        if t is None:
            continue
        model = models[k]
        model.zero_grad()
        t["loss"].backward()
        assert t["loss"].item() > 0
        assert got[k]["loss"] == pytest.approx(t["loss"].item(), rel=1e-5)
        # float32 noise floor, relative to the whole gradient: it covers gradients that are zero
        # in exact arithmetic (attention key biases), whose float value is pure rounding noise
        floor = 1e-7 * torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        n_nonzero = 0
        for name, p in model.named_parameters():
            diff = (got[k]["grads"][name] - p.grad).norm().item()
            assert diff <= 1e-5 * p.grad.norm().item() + floor, (k, name, diff, p.grad.norm().item())
            n_nonzero += int(p.grad.norm() > 1e-3)
        assert n_nonzero > len(list(model.parameters())) // 2  # the comparison is not between zeros


def test_gradient_accumulation_averages_micro_batches(two_rank_results, shapes_root):
    """2 ranks x 2 pairs x 2 accumulated micro-batches = the mean of two single-process losses
    over 4 pairs each: negatives come from the micro-batch, gradients are averaged."""
    cfg, _, models, tokenizer = models_for("triplet", str(shapes_root / "tokenizer"))
    batch = make_batch(tokenizer)
    losses = []
    for mb in range(2):
        rows = slice(mb * 4, mb * 4 + 4)
        out = models[0](batch["pixel_values"][rows], batch["input_ids"][rows], batch["attention_mask"][rows])
        losses.append(compute_losses(cfg, [out], batch["image_ids"][rows])[0]["loss"])
    loss = (losses[0] + losses[1]) / 2
    loss.backward()
    got = two_rank_results["triplet_grad_accum"][0]
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    floor = 1e-7 * torch.cat([p.grad.flatten() for p in models[0].parameters()]).norm().item()
    for name, p in models[0].named_parameters():
        diff = (got["grads"][name] - p.grad).norm().item()
        assert diff <= 1e-5 * p.grad.norm().item() + floor, (name, diff)
