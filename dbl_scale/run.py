"""What outlives one training process: the run (`Run`: its folder, MLflow run, checkpoints,
validation, final evaluation and exported model), where it comes from (`where_tags`), and how
it stops early on a signal (`Preemption`, `Preempted`). `train.train()` drives them."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from . import checkpoint, distributed
from .branches import Branch, load_model
from .config import Config, flatten, save_config, to_dict
from .data import dataset_inputs, eval_root
from .preprocess import image_transform
from .tokenizer import tokenizer_path
from .evaluation import evaluate, format_evaluation, report
from .methods import Method
from .roles import TARGET
from .tracking import Tracker

log = logging.getLogger("dbl_scale")


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
        tracking = cfg.tracking
        self.tracker = Tracker(tracking.uri, tracking.experiment, enabled=distributed.is_main(),
                               spool=self.dir / "mlflow_spool.jsonl", spool_max_mb=tracking.spool_max_mb,
                               retry_max_s=tracking.retry_max_s, final_wait_s=tracking.final_wait_s,
                               system_metrics_s=tracking.system_metrics_s)
        self.best_val = float("-inf")
        self.saved_step = -1  # the step of the newest checkpoint this process wrote

    @property
    def engine(self):
        return self.branches[TARGET].engine

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

    def checkpoint(self, step: int, now: bool = False) -> None:
        """Save a checkpoint when `checkpoint.every` says so, or `now` (a stop) unless one of
        this step exists already. Collective."""
        every = self.cfg.checkpoint.every
        due = bool(every) and step % every == 0 and step < self.cfg.train.steps
        if (due or now) and self.saved_step != step:
            self.save_checkpoint(step)

    def save_checkpoint(self, step: int) -> None:
        # the metric history up to this step is in MLflow (or in the spool) before the checkpoint exists
        self.tracker.flush(wait_s=30)
        state = {"step": step, "mlflow_run_id": self.tracker.run_id, "best_val": self.best_val,
                 "method": self.method.state_dict(), "layout": checkpoint.layout(self.cfg.loss.method, self.branches)}
        rank_state = {"rng": checkpoint.rng_state(), "method": self.method.rank_state_dict()}
        path = checkpoint.save(self.checkpoints, step, self.branches, state, rank_state, self.cfg.checkpoint.keep)
        self.saved_step = step
        if distributed.is_main():
            log.info("checkpoint %s", path)

    def evaluate(self, model, split: str):
        """Collective; the evaluation split is scored under `eval.protocol`, others as standard."""
        cfg = self.cfg
        protocol = cfg.eval.protocol if split == cfg.data.eval_split else "standard"
        return evaluate(model, eval_root(cfg.data), split, image_transform(cfg), self.tokenize,
                        cfg.eval.batch_size, protocol, cfg.eval.single_modal, cfg.eval.image_relevance)

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

    def final_evaluation(self, step: int, train_seconds: float) -> dict:
        """The final model on the evaluation split (with reports and per-query ranks), and the
        model chosen on validation when there is one; metrics.json (best_metrics.json) and the
        printed table on rank 0."""
        cfg, split, t0 = self.cfg, self.cfg.data.eval_split, time.time()
        ev = self.evaluate(self.engine.module, split)
        if distributed.is_main():
            report(ev, self.tracker, self.dir / "reports", eval_root(cfg.data), split,
                   name=f"{self.name} ({cfg.loss.method})")
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
                  + format_evaluation(cfg.loss.method, ev.metrics), flush=True)
            for name, metrics in written.items():
                (self.dir / name).write_text(json.dumps(metrics, indent=2))
                self.tracker.log_artifact(self.dir / name)
        return ev.metrics
