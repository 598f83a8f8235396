"""`train.compile`: the towers' transformer blocks compiled by torch.compile give the eager
loss and gradients (in one process, and through the 2-rank ZeRO-2 training step against an
eager single-process step on the whole batch); state dicts and copies are unaffected; eager is
the fallback where TorchDynamo is off or no compiler is found; ZeRO-3 is a config error."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from conftest import REPO, TINY, torchrun
from dbl_scale.config import ConfigError, load_config

WORKERS = REPO / "tests" / "workers"
STEADY = ["loss.sum_warmup_steps=0"]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def _step(method, modules, batch):
    """One forward of every branch (anchors without gradient), the target's loss, its backward."""
    from dbl_scale.roles import TARGET, TRAINED

    outs = []
    for role, module in zip(method.roles, modules):
        with torch.set_grad_enabled(role == TRAINED):
            outs.append(module(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]))
    loss = method.losses(outs, batch["image_ids"], 0)[TARGET]["loss"]
    loss.backward()
    return loss.detach()


def _batch(tokenizer, n=8, size=32, length=24):
    g = torch.Generator().manual_seed(0)
    captions = [f"a {c} circle left of a {d} square" for c, d in zip(["red", "blue"] * 4, ["green", "red"] * 4)]
    enc = tokenizer(captions[:n], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"], "image_ids": torch.tensor([0, 1, 1, 2, 3, 4, 5, 6][:n])}


@pytest.mark.timeout(600)
def test_compiled_blocks_give_the_eager_loss_and_gradients(tokenizer, shapes_root):
    """DBL momentum on the tiny preset's towers (CLIP vision + BERT): the target trains, the
    anchor runs without gradient; compiled vs eager, same weights and batch."""
    from torch._dynamo.utils import counters

    from dbl_scale.branches import new_model
    from dbl_scale.methods import build_method
    from dbl_scale.models import compile_towers, transformer_blocks

    torch._dynamo.reset()
    counters.clear()
    cfg = load_config(TINY, [f"data.root={shapes_root}", "loss.method=dbl", *STEADY])
    method = build_method(cfg)
    target = new_model(cfg, tokenizer, 0)
    eager = [copy.deepcopy(target).requires_grad_(False), target]
    compiled = copy.deepcopy(eager)
    keys = list(compiled[1].state_dict())
    blocks = sum(compile_towers(m) for m in compiled)
    assert blocks == 4 and len(transformer_blocks(compiled[1].vision)) == 1  # 1 block per tower, 2 branches
    batch = _batch(tokenizer)
    loss_e, loss_c = _step(method, eager, batch), _step(method, compiled, batch)
    assert counters["stats"]["unique_graphs"] >= 2  # compiled for real: no silent eager fallback
    assert _rel(loss_c, loss_e) < 1e-5
    ge, gc = _grads(eager[1]), _grads(compiled[1])
    assert ge.keys() == gc.keys() and len(ge) > 20
    whole = _rel(torch.cat([gc[k].flatten() for k in ge]), torch.cat([ge[k].flatten() for k in ge]))
    assert whole < 1e-4, whole
    assert list(compiled[1].state_dict()) == keys  # checkpoints and exports see the same names
    # a copy of a compiled model runs its own weights
    twin = copy.deepcopy(compiled[1])
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        a = compiled[1](batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).img
        b = twin(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).img
    assert (a - b).abs().max() > 1e-3


def test_eager_stays_where_dynamo_is_off_or_no_compiler_is_found(tokenizer, shapes_root, monkeypatch, caplog):
    import torch._dynamo
    import torch._inductor.config as inductor

    from dbl_scale.branches import Branch, compile_branches, new_model
    from dbl_scale.models import compile_blocker, transformer_blocks

    cpu = torch.device("cpu")
    assert compile_blocker(cpu) is None  # this machine has g++: the other tests compile for real
    model = new_model(load_config(TINY, [f"data.root={shapes_root}"]), tokenizer, 0)
    monkeypatch.setattr(torch._dynamo.config, "disable", True)  # what TORCHDYNAMO_DISABLE=1 sets
    assert "TORCHDYNAMO_DISABLE" in compile_blocker(cpu)
    with caplog.at_level(logging.WARNING, logger="dbl_scale"):
        compile_branches([Branch("trained", model)], cpu)
    assert "run eager" in caplog.text
    assert not any("forward" in vars(b) for b in transformer_blocks(model.vision) + transformer_blocks(model.text))
    monkeypatch.setattr(torch._dynamo.config, "disable", False)
    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/g++",))
    assert "no C++ compiler" in compile_blocker(cpu)


def test_compile_under_zero3_is_a_config_error_naming_the_key():
    from dbl_scale.optim import deepspeed_config

    with pytest.raises(ConfigError, match="config key 'train.compile'.*stage 3.*train.compile=false"):
        deepspeed_config(load_config(TINY, ["train.compile=true", "train.deepspeed=zero3"]), 2)
    for name in ("zero0", "zero1", "zero2", "zero2_gpu"):
        assert deepspeed_config(load_config(TINY, ["train.compile=true", f"train.deepspeed={name}"]), 2)


@pytest.mark.launch
@pytest.mark.timeout(900)
def test_compiled_zero2_two_ranks_equal_an_eager_single_process_step(tmp_path, shapes_root, tokenizer):
    """Invariant 1 with compiled towers: 2 ranks x 4 under ZeRO-2, compiled, against one eager
    process on the whole batch of 8, for the triplet and DBL momentum (its anchor compiled too)."""
    import sys

    from dbl_scale.branches import new_model
    from dbl_scale.methods import build_method
    from dbl_scale.roles import EMA

    sys.path.insert(0, str(WORKERS))
    from compile_step import MODEL, STEP, VARIANTS  # noqa: E402  the worker's settings, one source
    from parity_common import make_batch

    out = tmp_path / "compiled.pt"
    torchrun([str(WORKERS / "compile_step.py"), str(out), str(shapes_root)], nproc=2, timeout=840)
    got = torch.load(out, weights_only=True)
    assert got["graphs"] >= 2
    for name, overrides in VARIANTS.items():
        cfg = load_config(None, MODEL + [s for s in STEP if s != "train.compile=true"] + overrides
                          + [f"data.root={shapes_root}"])
        method = build_method(cfg)
        target = new_model(cfg, tokenizer, 0)
        modules = [copy.deepcopy(target).requires_grad_(False), target] if EMA in method.roles else [target]
        loss = _step(method, modules, make_batch(tokenizer))
        mine, ref = got["variants"][name], _grads(target)
        assert mine["blocks_compiled"] == 2
        assert abs(mine["loss"] - loss.item()) <= 1e-5 * abs(loss.item()), (name, mine["loss"], loss.item())
        assert ref.keys() <= mine["grads"].keys()
        whole = _rel(torch.cat([mine["grads"][k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref]))
        assert whole < 1e-4, (name, whole)
