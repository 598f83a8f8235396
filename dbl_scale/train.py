"""One training run, top to bottom: shards -> towers -> embeddings -> gathered scores ->
losses -> DeepSpeed step -> (anchor update) -> MLflow; validation, checkpoints, and the
evaluation at the end. `train()` is the table of contents; `train_step` is one step.

Start it on every rank with a launcher (the command lives in `dbl_scale.cli.train`):
    torchrun --standalone --nproc_per_node 2 -m dbl_scale.cli.train --config demo loss.method=dbl
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint, distributed
from .branches import Branch, anchor_metrics, build_branches, ema_update, param_dtype
from .config import Config
from .data import TrainLoader
from .preprocess import image_transform, resolve_image_config
from .tokenizer import ensure_tokenizer, tokenizer_path
from .methods import Method, build_method
from .roles import EMA, TARGET
from .models import Embeddings, FrozenEncoders
from .run import Preempted, Preemption, Run
from .meter import StepMeter

log = logging.getLogger("dbl_scale")


def train(cfg: Config) -> Optional[Path]:
    """Train one run; returns its folder once finished (None when stopped at
    `checkpoint.stop_at`, to be resumed)."""
    distributed.init_distributed(cfg.train.collective_timeout_s)
    rank, world = distributed.rank(), distributed.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    seed_everything(cfg.train.seed)
    cfg = resolve_image_config(cfg)  # the image processor's settings, recorded in the run's config.yaml
    with distributed.rank_zero_first():  # rank 0 builds a missing tokenizer once
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    log.info("tokenizer from %s (data.tokenizer, model.text.pretrained, or <eval root>/tokenizer built from the "
             "training captions)", tokenizer_path(cfg.data, cfg.model.text))

    method = build_method(cfg)
    branches = build_branches(cfg, method, tokenizer, world)
    target = branches[TARGET]
    loader = TrainLoader(cfg.data, image_transform(cfg, train=True), tokenizer, cfg.model.text.max_length,
                         rank, world, cfg.train.seed, target.engine.device)
    run = Run(cfg, method, branches, loader.tokenize)
    method.start(target.module, loader.tokenize, loader.steps_per_epoch, rank, run.dir)  # CODER's queues, AOQ's mining
    step = run.begin()  # a new run, or the newest checkpoint of this one
    preemption = Preemption()
    meter = StepMeter(cfg.train, cfg.data.batch_size, cfg.tracking.flush_every, run.tracker, run.name, loader,
                      target.scheduler, lambda s: {**method.step_metrics(s), **anchor_metrics(branches)})
    status = "FAILED"
    try:
        meter.begin(step)
        gas = cfg.train.grad_accum
        consumed = step * gas  # loader batches trained on so far
        nonfinite_in_a_row = 0
        for batch in loader.batches_from(consumed):
            if step >= cfg.train.steps:
                break
            batch = method.prepare(batch, consumed, target.module)
            consumed += 1
            boundary = consumed % gas == 0  # the last micro-batch of an optimizer step
            logged = train_step(method, branches, batch, step, boundary)
            meter.add(logged)
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if logged is None else 0
            if not boundary:
                continue
            step += 1
            if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                meter.log(step)
                run.checkpoint(step, now=True)  # nothing changed since the last good step: it is that state
                raise FloatingPointError(
                    f"{nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite): stopped at step {step}; "
                    f"the last good state is in {run.checkpoints}. Lower the learning rate or check the data.")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                meter.log(step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                run.validate(step)
            run.checkpoint(step)  # when checkpoint.every says so
            if step % cfg.train.log_every == 0 and step < cfg.train.steps and preemption.requested():
                run.checkpoint(step, now=True)
                run.mark_preempted(step)
                status = "KILLED"  # to be resumed: `checkpoint.resume=latest`
                raise Preempted(f"preempted at step {step}: checkpoint in {run.checkpoints}; continue with "
                                f"tracking.run_name={run.name} checkpoint.resume=latest")
            if cfg.checkpoint.stop_at is not None and step == cfg.checkpoint.stop_at < cfg.train.steps:
                run.checkpoint(step, now=True)
                status = "KILLED"  # stopped on purpose, to be resumed
                distributed.barrier()
                return None
        train_seconds = time.time() - meter.t_start
        if cfg.checkpoint.at_end:
            run.checkpoint(step, now=True)
        checkpoint.save_model(target.engine, run.dir / "model.pt")
        if cfg.eval.at_end:
            run.final_evaluation(step, train_seconds)
        status = "FINISHED"
        distributed.barrier()
        return run.dir
    finally:  # no collective here: after a failure on one rank the launcher stops the others
        run.tracker.finish(status)


def train_step(method: Method, branches: list[Branch], batch: dict, step: int,
               boundary: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """Forward every branch, take each trained branch's loss, backward and step its engine
    (DeepSpeed applies the update at the last micro-batch of an accumulation, `boundary`).
    Returns the logged terms, or None when a loss was not finite on some rank and every rank
    skipped the micro-batch."""
    target = branches[TARGET]
    dev = target.engine.device
    pixels = batch["pixel_values"].to(dev, param_dtype(target.module), non_blocking=True)
    input_ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    outs = []
    for br in branches:
        if br.engine is not None:
            outs.append(br.engine(pixels, input_ids, mask, **method.forward_inputs(outs)))
        elif isinstance(br.module, FrozenEncoders):  # reads the raw captions
            with torch.no_grad():
                outs.append(br.module(pixels, captions=batch["captions"]))
        else:
            with torch.no_grad():
                outs.append(br.module(pixels, input_ids, mask))
    terms = method.losses([in_float32(out) for out in outs], batch["image_ids"].to(dev), step)
    if _skip_nonfinite(terms, step):
        if target.engine.gradient_accumulation_steps() == 1:
            return None  # no backward, no optimizer or LR step, no EMA, no queue push
        # one micro-batch of several: it adds no gradient, the others still make the step
        for br in branches:
            if br.engine is not None:
                br.engine.step()  # keeps DeepSpeed's micro-batch count in line with ours
        _update_anchors(method, branches, step, boundary)
        return None
    # Gradients are averaged over ranks by DeepSpeed; each loss is a per-rank share of a sum,
    # so scaling by the world size gives exactly the single-process gradient.
    for br, t in zip(branches, terms):
        if t is not None:
            br.engine.backward(t["loss"] * distributed.world_size())
    dropped = boundary and _drop_nonfinite_gradients(branches)
    for br in branches:
        if br.engine is not None and not dropped:
            br.engine.step()
    if boundary and _gradient_skipped(branches, dropped, step):
        return None  # no EMA update, no queue push: as for a non-finite loss
    _update_anchors(method, branches, step, boundary)
    method.after_step()
    logged = {}
    for k, t in enumerate(terms):
        if t is not None:  # the target's terms as they are, other trained branches' with a prefix
            prefix = "" if k == len(branches) - 1 else f"branch{k}/"
            logged.update({prefix + name: v.detach() for name, v in t.items()})
    if outs[TARGET].logit_scale is not None:
        # the same on every rank; the log step adds ranks up, so each contributes its share
        logged["logit_scale"] = outs[TARGET].logit_scale.detach().squeeze() / distributed.world_size()
    return logged


def in_float32(out: Embeddings) -> Embeddings:
    """A branch's outputs in float32 for the losses (a no-op for fp32 towers). Under bf16 the
    towers run in bf16, but scores, margins and their sums keep float32's precision: a bf16
    loss is rounded to 3 significant digits, and its gradient with it. Costs a B x N x d product
    in float32 per branch, small beside the towers."""
    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return Embeddings(up(out.img), up(out.txt), up(out.logit_scale),
                      {k: up(v) for k, v in out.heads.items()} if out.heads else out.heads)


def _update_anchors(method: Method, branches: list[Branch], step: int, boundary: bool) -> None:
    for br in branches:
        if br.role == EMA and boundary:
            ema_update(br.module, branches[TARGET].module, method.momentum(step + 1), br.master)


def _skip_nonfinite(terms: list, step: int) -> bool:
    """True on every rank when any rank's loss terms are not all finite: one all-reduce of one
    flag, the step's only host sync for it; the ranks that saw it name the terms."""
    values = {name: v for t in terms if t is not None for name, v in t.items()}
    bad_here = (~torch.stack([torch.isfinite(v).all() for v in values.values()]).all()).float().reshape(1)
    if distributed.all_reduce_max(bad_here).item() == 0:
        return False
    bad = [name for name, v in values.items() if not torch.isfinite(v).all()]
    if bad:
        log.warning("step %d, rank %d: non-finite %s: the step is skipped on every rank",
                    step + 1, distributed.rank(), ", ".join(bad))
    return True


def _drop_nonfinite_gradients(branches: list[Branch]) -> bool:
    """ZeRO-0 has no gradient check of its own: when a gradient of a ZeRO-0 branch is not
    finite on some rank, every rank drops its gradients and no engine steps (as for a
    non-finite loss). One all-reduce of one flag; ZeRO 1-3 runs skip this."""
    engines = [br.engine for br in branches if br.engine is not None and br.engine.zero_optimization_stage() == 0]
    if not engines:
        return False
    grads = [p.grad for e in engines for p in e.module.parameters() if p.grad is not None]
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else torch.tensor(False)
    if distributed.all_reduce_max(bad.float().reshape(1)).item() == 0:
        return False
    if engines[0].gradient_accumulation_steps() > 1:  # skipping the boundary's step would shift DeepSpeed's count
        raise FloatingPointError(f"step {engines[0].global_steps + 1}: non-finite gradient under ZeRO-0 with "
                                 "train.grad_accum > 1, which cannot skip one step exactly; use ZeRO-1 or higher")
    for e in engines:
        e.zero_grad()
    return True


def _gradient_skipped(branches: list[Branch], dropped: bool, step: int) -> bool:
    """True when a trained branch was not updated for a non-finite gradient: dropped above
    (ZeRO-0), or skipped by DeepSpeed, whose ZeRO 1-3 optimizers check the global gradient
    norm on every rank together (with gradient clipping on, the default)."""
    skipped = [k for k, br in enumerate(branches) if br.engine is not None and not br.engine.was_step_applied()]
    if not (dropped or skipped):
        return False
    log.warning("step %d: non-finite gradient (the loss was finite): the update is skipped on every rank",
                step + 1)
    return True


def seed_everything(seed: int) -> None:
    """The same seed on every rank: towers start identical, as data parallelism requires."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
