"""MLflow tracking from global rank 0 only, with batched uploads, and the per-step meter
that turns each step's loss terms into logged metrics.

Metrics are buffered and sent with `log_batch` every `flush_every` steps (and at the end),
never one call per value. Any tracking URI works: the default embedded
`sqlite:///mlflow.db`, or an `http://` tracking server.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import distributed
from .config import Config

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000


class Tracker:
    """A run in MLflow, or a no-op on ranks other than 0 (`enabled=False`)."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.run_id: Optional[str] = None
        self._buffer: list = []
        if not enabled:
            return
        from mlflow.tracking import MlflowClient  # heavy (seconds): only rank 0 talks to MLflow

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def start(self, run_name: Optional[str], params: dict[str, Any], tags: Optional[dict[str, str]] = None) -> Optional[str]:
        if not self.enabled:
            return None
        from mlflow.entities import Param  # heavy, as MlflowClient

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
        return self.run_id

    def resume(self, run_id: str) -> None:
        """Continue an existing run (after a restart): same run id, metric history goes on."""
        if not self.enabled:
            return
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric  # heavy, as MlflowClient

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())

    def flush(self) -> None:
        if not self.enabled or not self._buffer:
            return
        for i in range(0, len(self._buffer), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + MAX_METRICS_PER_BATCH])
        self._buffer = []

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.flush()
            self.client.set_terminated(self.run_id, status)


class StepMeter:
    """Adds up each step's loss terms; at a log step sums them over ranks (each rank holds a
    share of the global loss), averages over the steps since the last log, and reports them
    with the LR, throughput, skipped samples and the method's own schedule (`step_metrics`)."""

    def __init__(self, cfg: Config, tracker: Tracker, run_name: str, loader, scheduler,
                 step_metrics: Callable[[int], dict[str, float]]):
        self.cfg, self.tracker, self.run_name = cfg, tracker, run_name
        self.loader, self.scheduler, self.step_metrics = loader, scheduler, step_metrics
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.t_last = 0, time.time()
        self.t_start, self.start_step = time.time(), 0
        self.nonfinite = 0  # steps skipped for a non-finite loss (the same count on every rank)

    def begin(self, start_step: int) -> None:
        """Training starts (or resumes) at `start_step` now: the ETA counts from here."""
        self.t_start, self.start_step, self.t_last = time.time(), start_step, time.time()

    def add(self, terms: Optional[dict[str, torch.Tensor]]) -> None:
        """One micro-batch's loss terms; None: it was skipped (non-finite), counted instead."""
        if terms is None:
            self.nonfinite += 1
            return
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def log(self, step: int) -> None:
        cfg = self.cfg
        names = sorted(self.sums)
        # every rank skips the same steps, so every rank has the same names (or none)
        totals = distributed.all_reduce_sum(torch.stack([self.sums[k] for k in names]).float()) if names else []
        skipped = int(distributed.all_reduce_sum(torch.tensor([float(self.loader.skipped)])).item())
        elapsed = time.time() - self.t_last
        metrics = {k: totals[i].item() / self.steps for i, k in enumerate(names)}
        metrics["train/skipped_nonfinite"] = self.nonfinite
        lrs = self.scheduler.get_last_lr()  # per group: towers first, heads last (optim.param_groups)
        metrics.update({"lr": lrs[-1], "lr/towers": lrs[0], "epoch": step / self.loader.steps_per_epoch,
                        "samples_per_s": self.steps * distributed.world_size() * cfg.data.batch_size / elapsed,
                        "data/skipped": skipped})
        metrics.update(self.step_metrics(step))
        self.tracker.log_metrics(metrics, step)
        if step % cfg.tracking.flush_every < cfg.train.log_every:
            self.tracker.flush()
        if distributed.is_main() and "loss" in metrics:
            eta = (time.time() - self.t_start) / max(1, step - self.start_step) * (cfg.train.steps - step)
            parts = " ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in names if k.startswith("loss/"))
            print(f"[{self.run_name}] step {step}/{cfg.train.steps} | loss {metrics['loss']:.3f} ({parts}) "
                  f"| lr {metrics['lr']:.2e} | {metrics['samples_per_s']:.0f} samples/s "
                  f"| ETA {_fmt_seconds(eta)}", flush=True)
        self.sums, self.steps, self.t_last = {}, 0, time.time()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s"
