"""One training run, top to bottom: shards -> towers -> embeddings -> gathered scores ->
losses -> DeepSpeed step -> (anchor update) -> MLflow; validation, checkpoints, and the
evaluation at the end. `train()` is the table of contents; `train_step` is one step.

Start it on every rank with a launcher (the command lives in `dbl_scale.cli.train`):
    torchrun --standalone --nproc_per_node 2 -m dbl_scale.cli.train --config demo loss.method=dbl
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint, distributed
from .branches import Branch, anchor_metrics, build_branches, ema_update, load_model, param_dtype
from .config import Config, flatten, save_config, to_dict
from .data import (TrainLoader, dataset_inputs, ensure_tokenizer, eval_root, image_transform,
                   resolve_image_config, tokenizer_path)
from .evaluation import evaluate, format_table, report
from .export import export
from .export import log_model as log_mlflow_model
from .methods import Method, build_method
from .models import Embeddings, FrozenEncoders
from .tracking import StepMeter, Tracker

log = logging.getLogger("dbl_scale")


def train(cfg: Config) -> dict:
    """Train one run; returns the final evaluation metrics (on every rank)."""
    distributed.init_distributed(cfg.train.collective_timeout_s)
    rank, world = distributed.rank(), distributed.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    seed_everything(cfg.train.seed)
    resolve_image_config(cfg)  # the image processor's settings, recorded in the run's config.yaml
    with distributed.rank_zero_first():  # rank 0 builds a missing tokenizer once
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    log.info("tokenizer from %s (data.tokenizer, model.text.pretrained, or <eval root>/tokenizer built from the "
             "training captions)", tokenizer_path(cfg.data, cfg.model.text))

    method = build_method(cfg)
    branches = build_branches(cfg, method, tokenizer, world)
    target = branches[-1]
    loader = TrainLoader(cfg.data, image_transform(cfg, train=True), tokenizer, cfg.model.text.max_length,
                         rank, world, cfg.train.seed, target.engine.device)
    run = Run(cfg, method, branches, loader.tokenize)
    method.start(target.module, loader.tokenize, loader.steps_per_epoch, rank, run.dir)  # CODER's queues, AOQ's mining
    step = run.begin()  # a new run, or the newest checkpoint of this one
    preemption = Preemption()
    meter = StepMeter(cfg, run.tracker, run.name, loader, target.scheduler,
                      lambda s: {**method.step_metrics(s), **anchor_metrics(branches)})
    status = "FAILED"
    try:
        meter.begin(step)
        gas = cfg.train.grad_accum
        consumed = step * gas  # loader batches trained on so far
        nonfinite_in_a_row = 0
        for batch in loader.batches_from(consumed):
            if step >= cfg.train.steps:
                break
            if _injected("KILL", step):
                os.kill(os.getpid(), signal.SIGKILL)
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
                run.save_checkpoint(step)  # nothing changed since the last good step: it is that state
                raise FloatingPointError(
                    f"{nonfinite_in_a_row} non-finite losses in a row (train.max_nonfinite): stopped at step {step}; "
                    f"the last good state is in {run.checkpoints}. Lower the learning rate or check the data.")
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                meter.log(step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                run.validate(step)
            if run.checkpoint_due(step):
                run.save_checkpoint(step)
            if step % cfg.train.log_every == 0 and step < cfg.train.steps and preemption.requested():
                if not run.checkpoint_due(step):
                    run.save_checkpoint(step)
                run.mark_preempted(step)
                status = "KILLED"  # to be resumed: `checkpoint.resume=latest`
                raise Preempted(f"preempted at step {step}: checkpoint in {run.checkpoints}; continue with "
                                f"tracking.run_name={run.name} checkpoint.resume=latest")
            if cfg.checkpoint.stop_at is not None and step == cfg.checkpoint.stop_at < cfg.train.steps:
                if not run.checkpoint_due(step):
                    run.save_checkpoint(step)
                status = "KILLED"  # stopped on purpose, to be resumed
                distributed.barrier()
                return {}
        train_seconds = time.time() - meter.t_start
        if cfg.checkpoint.at_end:
            run.save_checkpoint(step)
        checkpoint.save_model(target.engine, run.dir / "model.pt")
        results = run.final_evaluation(step, train_seconds) if cfg.eval.at_end else {}
        if cfg.tracking.log_model:
            run.log_model()
        status = "FINISHED"
        distributed.barrier()
        return results
    finally:  # no collective here: after a failure on one rank the launcher stops the others
        run.tracker.finish(status)


def train_step(method: Method, branches: list[Branch], batch: dict, step: int,
               boundary: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """Forward every branch, take each trained branch's loss, backward and step its engine
    (DeepSpeed applies the update at the last micro-batch of an accumulation, `boundary`).
    Returns the logged terms, or None when a loss was not finite on some rank and every rank
    skipped the micro-batch."""
    target = branches[-1]
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
    if _injected("NONFINITE", step):
        terms[-1]["loss"] = terms[-1]["loss"] * float("nan")
    if _injected("NONFINITE_GRAD", step):  # the loss stays finite (+0), its gradient is NaN (0 * d sqrt(0))
        terms[-1]["loss"] = terms[-1]["loss"] + (0.0 * outs[-1].img).sum().sqrt()
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
    if outs[-1].logit_scale is not None:
        # the same on every rank; the log step adds ranks up, so each contributes its share
        logged["logit_scale"] = outs[-1].logit_scale.detach().squeeze() / distributed.world_size()
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
        if br.role == "ema" and boundary:
            ema_update(br.module, branches[-1].module, method.momentum(step + 1), br.master)


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


# Fault injection for tests, read once: DBL_SCALE_INJECT_<FAULT>="RANK:STEP,STEP" (0-based steps).
# NONFINITE makes the target's loss NaN on that rank at those steps, NONFINITE_GRAD its gradient
# (the loss stays finite); KILL kills the rank (-9).
_FAULTS = {fault: os.environ.get(f"DBL_SCALE_INJECT_{fault}", "") for fault in ("NONFINITE", "NONFINITE_GRAD", "KILL")}


def _injected(fault: str, step: int) -> bool:
    spec = _FAULTS[fault]
    if not spec:
        return False
    rank, steps = spec.split(":")
    return int(rank) == distributed.rank() and str(step) in steps.split(",")


def where_tags() -> dict[str, str]:
    """Where a run comes from: the code's git commit and whether the checkout had changes
    (when run from a checkout), the host, and the Slurm job when there is one."""
    tags = {"host": socket.gethostname()}
    try:
        git = ["git", "-C", str(Path(__file__).parent)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=30).stdout.strip()
            tags["git_dirty"] = str(bool(dirty)).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass  # no git here: an installed package
    slurm = ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
             "SLURM_RESTART_COUNT")
    tags.update({k.lower(): os.environ[k] for k in slurm if k in os.environ})
    return tags


class Preempted(Exception):
    """The run stopped at a step boundary on a signal, with a checkpoint to resume from."""

    exit_code = 75  # EX_TEMPFAIL: try again later (each rank exits with it; see cli.train)


class Preemption:
    """SIGUSR1 and SIGTERM (what Slurm sends before a job's time limit or a preemption, what
    torchrun forwards when it is stopped) only set a flag, so a second signal during the
    checkpoint changes nothing. At each step boundary every rank learns whether any rank
    got one: one all-reduce of one integer, at log steps only (the step already syncs there),
    so a run stops within `train.log_every` steps of the signal."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            log.warning("rank %d got %s: stopping with a checkpoint at the next step boundary",
                        distributed.rank(), signal.Signals(signum).name)
        self.signum = signum

    def requested(self) -> bool:
        return distributed.all_reduce_max_int(self.signum) > 0


def seed_everything(seed: int) -> None:
    """The same seed on every rank: towers start identical, as data parallelism requires."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """What outlives one process: the run folder (config, model, best model, metrics), its
    MLflow run, and its checkpoints. Every method is collective unless it says otherwise."""

    def __init__(self, cfg: Config, method: Method, branches: list[Branch], tokenize):
        self.cfg, self.method, self.branches, self.tokenize = cfg, method, branches, tokenize
        # rank 0's clock names the run: every rank must write into the same folder
        self.name = cfg.tracking.run_name or distributed.broadcast_object(
            f"{cfg.loss.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.dir = Path(cfg.train.output_dir) / self.name
        self.checkpoints = self.dir / "checkpoints"
        tc = cfg.tracking
        self.tracker = Tracker(tc.uri, tc.experiment, enabled=distributed.is_main(), spool=self.dir / "mlflow_spool.jsonl",
                               spool_max_mb=tc.spool_max_mb, retry_max_s=tc.retry_max_s, final_wait_s=tc.final_wait_s,
                               system_metrics_s=tc.system_metrics_s)
        self.best_val = float("-inf")

    @property
    def engine(self):
        return self.branches[-1].engine

    def begin(self) -> int:
        """Resume from the newest checkpoint when `checkpoint.resume` names one (same MLflow
        run), else start a new run: folder, config files, MLflow run. Returns the start step."""
        cfg, rank = self.cfg, distributed.rank()
        resume_from = checkpoint.resolve(self.checkpoints, cfg.checkpoint.resume) if cfg.checkpoint.resume else None
        step = 0
        if rank == 0 and cfg.checkpoint.resume:
            for stale in checkpoint.clean_partial(self.checkpoints):
                log.info("removed %s, a checkpoint a crash left half-written", stale)
        if resume_from is not None:
            state, rank_state = checkpoint.load(resume_from, self.branches,
                                                checkpoint.layout(cfg.loss.method, self.branches))
            step, self.best_val = state["step"], state.get("best_val", float("-inf"))
            checkpoint.set_rng_state(rank_state["rng"])
            self.method.load_state_dict(state["method"], rank_state["method"])
            self.tracker.resume(state["mlflow_run_id"])
            if rank == 0:
                (self.dir / "PREEMPTED").unlink(missing_ok=True)
            log.info("resumed %s from %s (step %d)", self.name, resume_from, step)
        elif rank == 0:
            if cfg.checkpoint.resume:
                log.info("no checkpoint under %s yet: starting %s from step 0", self.checkpoints, self.name)
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.dir / "config.yaml")
            (self.dir / "ds_config.json").write_text(json.dumps(self.engine.config, indent=2, default=str))
            self.tracker.start(self.name, flatten(to_dict(cfg)),
                               tags={"method": cfg.loss.method, "world_size": str(distributed.world_size()),
                                     "zero_stage": str(self.engine.zero_optimization_stage()),
                                     "branches": ",".join(br.role for br in self.branches),
                                     "tokenizer": str(tokenizer_path(cfg.data, cfg.model.text)),
                                     "run_dir": str(self.dir.resolve()), **where_tags()})
            self.tracker.log_inputs(dataset_inputs(cfg.data))
            self.tracker.log_artifact(self.dir / "config.yaml")
            self.tracker.log_artifact(self.dir / "ds_config.json")
            (self.dir / "run.json").write_text(json.dumps({"mlflow_run_id": self.tracker.run_id,
                                                           "tracking_uri": cfg.tracking.uri}) + "\n")
        if rank == 0:
            log.info("run %s: %d ranks x batch %d, %d steps, ZeRO-%d, MLflow %s run %s", self.name,
                     distributed.world_size(), cfg.data.batch_size, cfg.train.steps,
                     self.engine.zero_optimization_stage(), cfg.tracking.uri, self.tracker.run_id)
        return step

    def mark_preempted(self, step: int) -> None:
        """`<run>/PREEMPTED` tells a job script to requeue the job (a resume removes it)."""
        if distributed.is_main():
            (self.dir / "PREEMPTED").write_text(f"{step}\n")
            log.info("preempted at step %d: checkpoint in %s", step, self.checkpoints)
        distributed.barrier()

    def checkpoint_due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0 and step < self.cfg.train.steps

    def save_checkpoint(self, step: int) -> None:
        # the metric history up to this step is in MLflow (or in the spool) before the checkpoint exists
        self.tracker.flush(wait_s=30)
        state = {"step": step, "mlflow_run_id": self.tracker.run_id, "best_val": self.best_val,
                 "method": self.method.state_dict(), "layout": checkpoint.layout(self.cfg.loss.method, self.branches)}
        rank_state = {"rng": checkpoint.rng_state(), "method": self.method.rank_state_dict()}
        path = checkpoint.save(self.checkpoints, step, self.branches, state, rank_state, self.cfg.checkpoint.keep)
        if distributed.is_main():
            log.info("checkpoint %s", path)

    def evaluate(self, model, split: str):
        """Collective; the evaluation split is scored under `eval.protocol`, others as standard."""
        cfg = self.cfg
        protocol = cfg.eval.protocol if split == cfg.data.eval_split else "standard"
        return evaluate(model, eval_root(cfg.data), split, image_transform(cfg), self.tokenize,
                        cfg.eval.batch_size, protocol)

    def validate(self, step: int) -> None:
        """Validation rSum; a new best is saved to <run>/best/ (the model selected on val)."""
        val = self.evaluate(self.engine.module, self.cfg.eval.val_split).metrics
        self.tracker.log_metrics({f"val/{k}": v for k, v in val.items()}, step)
        if val["rsum"] > self.best_val:
            self.best_val = val["rsum"]
            if distributed.is_main():
                (self.dir / "best").mkdir(exist_ok=True)
                save_config(self.cfg, self.dir / "best" / "config.yaml")
                (self.dir / "best" / "step.txt").write_text(f"{step}\n")
            checkpoint.save_model(self.engine, self.dir / "best" / "model.pt")
            self.tracker.log_metrics({"val/best_rsum": self.best_val}, step)

    def log_model(self) -> None:
        """Rank 0 exports the target to <run>/model (transformers alone loads it) and logs that
        folder to the MLflow run as a pyfunc model. A failure (MLflow away, say) is reported
        and costs nothing else: `dbl-scale export --run-dir RUN --out DIR --log` does it later."""
        if distributed.is_main():
            try:
                folder = export(self.dir, self.dir / "model")
                uri = log_mlflow_model(folder, self.cfg.tracking.uri, self.tracker.run_id)
                log.info("model exported to %s and logged to MLflow as %s", folder, uri)
            except Exception as exc:  # noqa: BLE001 - the run's results are already saved
                log.warning("the model was not exported or logged (%s); later: dbl-scale export --run-dir %s "
                            "--out DIR --log", exc, self.dir)
        distributed.barrier()

    def final_evaluation(self, step: int, train_seconds: float) -> dict:
        """The final model on the evaluation split (with reports and per-query ranks), and the
        model chosen on validation when there is one; metrics.json (best_metrics.json) and the
        printed table on rank 0."""
        cfg, split, t0 = self.cfg, self.cfg.data.eval_split, time.time()
        ev = self.evaluate(self.engine.module, split)
        if distributed.is_main():
            report(ev, self.tracker, self.dir / "reports", eval_root(cfg.data), split)
            np.savez(self.dir / "reports" / f"{split}_ranks.npz", **ev.ranks)  # for `dbl-scale compare --plot`
            self.tracker.log_artifact(self.dir / "reports" / f"{split}_ranks.npz", "reports")
        self.tracker.log_metrics({f"{split}/{k}": v for k, v in ev.metrics.items()}, step)
        written = {"metrics.json": ev.metrics}
        if (self.dir / "best" / "model.pt").exists():  # the model chosen on validation, on test
            tokenizer = self.tokenize.tokenizer
            best = self.evaluate(load_model(self.dir / "best", tokenizer).to(self.engine.device), split)
            self.tracker.log_metrics({f"best/{split}/{k}": v for k, v in best.metrics.items()}, step)
            written["best_metrics.json"] = best.metrics
        self.tracker.log_metrics({"train_seconds": train_seconds, "eval_seconds": time.time() - t0}, step)
        if distributed.is_main():
            print(f"\n[{self.name}] retrieval on the {split} split\n"
                  + format_table({cfg.loss.method: ev.metrics}), flush=True)
            for name, metrics in written.items():
                (self.dir / name).write_text(json.dumps(metrics, indent=2))
                self.tracker.log_artifact(self.dir / name)
        return ev.metrics
