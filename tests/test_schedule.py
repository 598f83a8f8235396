"""Parameter groups and LR schedules: tower LR multiplier, frozen towers, warm-up + cosine or step."""
from __future__ import annotations

import pytest
import torch

from dbl_scale.config import load_config
from dbl_scale.branches import new_model
from dbl_scale.optim import lr_lambdas, param_groups
from conftest import TINY


def _setup(tokenizer, *overrides):
    cfg = load_config(TINY, ["optim.lr=1.0", *overrides])
    model = new_model(cfg, tokenizer, 0)
    groups = param_groups(model, cfg)
    return cfg, model, groups


def test_groups_split_towers_heads_and_decay(tokenizer):
    cfg, model, groups = _setup(tokenizer, "optim.backbone_lr_mult=0.1", "optim.weight_decay=0.3")
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    towers = {id(p) for n, p in model.named_parameters() if n.startswith(("vision.", "text."))}
    for g in groups:
        assert all((id(p) in towers) == g["tower"] for p in g["params"])
        assert g.get("lr", 1.0) == (0.1 if g["tower"] else 1.0)
        assert g["weight_decay"] in (0.0, 0.3) and all((p.dim() >= 2) == (g["weight_decay"] == 0.3) for p in g["params"])


def test_frozen_towers_and_step_schedule(tokenizer):
    cfg, model, groups = _setup(tokenizer, "optim.freeze_towers_steps=3", "optim.warmup_steps=2",
                                "optim.schedule=step", "optim.step_milestones=[5, 8]", "optim.step_gamma=0.5")
    opt = torch.optim.SGD(groups, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, groups))
    tower_lr, head_lr = [], []
    for _ in range(10):
        tower_lr.append(opt.param_groups[0]["lr"]), head_lr.append(opt.param_groups[-1]["lr"])
        opt.step(), sched.step()
    assert head_lr == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25])
    assert tower_lr == pytest.approx([0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_cosine_reaches_zero(tokenizer):
    cfg, _, groups = _setup(tokenizer, "optim.warmup_steps=0", "train.steps=10")
    f = lr_lambdas(cfg, groups)[-1]
    assert f(0) == pytest.approx(1.0) and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


def test_ema_update_is_the_momentum_average(tokenizer):
    """anchor <- m * anchor + (1 - m) * target for every parameter, also a bf16 anchor of an
    fp32 target; m = 0 copies the target (how the EMA anchor starts)."""
    from dbl_scale.branches import ema_update

    cfg = load_config(TINY, [])
    target, anchor = new_model(cfg, tokenizer, 0), new_model(cfg, tokenizer, 1)
    before = {n: p.detach().clone() for n, p in anchor.named_parameters()}
    ema_update(anchor, target, 0.9)
    for (n, a), t in zip(anchor.named_parameters(), target.parameters()):
        torch.testing.assert_close(a, 0.9 * before[n] + 0.1 * t.detach(), rtol=0, atol=1e-6)
    low = new_model(cfg, tokenizer, 2).to(torch.bfloat16)
    ema_update(low, target, 0.0)
    for a, t in zip(low.parameters(), target.parameters()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, t.detach().to(torch.bfloat16))


def test_a_bf16_anchor_accumulates_in_fp32():
    """With m close to 1 each step adds (1 - m)(t - a), far below bf16's resolution: a bf16
    anchor updated in place would never move. The fp32 master (`ema_master`) follows the
    float64 formula a_n = m^n a_0 + (1 - m^n) t, and the bf16 weights are its rounding."""
    from dbl_scale.branches import Branch, ema_master, ema_update

    torch.manual_seed(0)
    target = torch.nn.Linear(64, 64).to(torch.bfloat16)
    anchor = torch.nn.Linear(64, 64).to(torch.bfloat16)
    start = [p.detach().double() for p in anchor.parameters()]
    master = ema_master(anchor)
    assert master is not None and all(x.dtype == torch.float32 for x in master)
    m, n = 0.9995, 400
    for _ in range(n):
        ema_update(anchor, target, m, master)
    for a, a0, t, x in zip(anchor.parameters(), start, target.parameters(), master):
        want = m ** n * a0 + (1 - m ** n) * t.detach().double()
        torch.testing.assert_close(x.double().view_as(want), want, rtol=0, atol=1e-5)
        assert torch.equal(a.detach(), x.view_as(a).to(torch.bfloat16))
        assert (a.detach().double() - a0).abs().max() > 0.01  # it moved (in place in bf16 it stays put)
    assert ema_master(torch.nn.Linear(4, 4)) is None  # fp32 needs no master

    # a checkpoint keeps the fp32 average, and a resumed anchor continues from it exactly
    saved = Branch("ema", anchor, master=master).ema_state_dict()
    assert all(v.dtype == torch.float32 for v in saved.values())
    resumed = Branch("ema", torch.nn.Linear(64, 64).to(torch.bfloat16))
    resumed.reset_master()
    resumed.load_ema_state(saved)
    assert all(torch.equal(x, y) for x, y in zip(resumed.master, master))
    assert all(torch.equal(x, y) for x, y in zip(resumed.module.parameters(), anchor.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer):
    """Recomputing activations in backward changes memory, not the result."""
    grads = []
    for on in ("false", "true"):
        cfg = load_config(TINY, [f"model.vision.gradient_checkpointing={on}", f"model.text.gradient_checkpointing={on}"])
        model = new_model(cfg, tokenizer, 0).train()
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(4, 3, 32, 32, generator=g)
        enc = tokenizer(["a red circle", "two blue squares", "a green star on the left", "a cross"],
                        padding="max_length", max_length=16, return_tensors="pt")
        out = model(pixels, enc["input_ids"], enc["attention_mask"])
        (out.img @ out.txt.t()).diagonal().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
