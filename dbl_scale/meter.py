"""The per-step meter: sums a run's loss terms between log steps, then logs their means, the
learning rates, throughput, the loader's wait per step (`data/wait_s`, `data/wait_share`; on
CUDA `data/device_idle_s`, where a starved GPU shows) and skip counts to the tracker
(all-reduced over ranks first) and prints the progress line on rank 0."""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from . import distributed
from .config import TrainConfig
from .tracking import Tracker


class StepMeter:
    """Adds up each step's loss terms; at a log step sums them over ranks (each rank holds a
    share of the global loss), averages over the steps since the last log, and reports them
    with the LR, throughput, skipped samples and the method's own schedule (`step_metrics`)."""

    def __init__(self, train: TrainConfig, batch_size: int, flush_every: int, tracker: Tracker, run_name: str,
                 loader, scheduler, step_metrics: Callable[[int], dict[str, float]]):
        self.train, self.batch_size, self.flush_every = train, batch_size, flush_every
        self.tracker, self.run_name = tracker, run_name
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
        names = sorted(self.sums)
        # every rank skips the same steps, so every rank has the same names (or none)
        totals = distributed.all_reduce_sum(torch.stack([self.sums[k] for k in names]).float()) if names else []
        dev = distributed.device()  # NCCL reduces device tensors only
        skipped = int(distributed.all_reduce_sum(torch.tensor([float(self.loader.skipped)], device=dev)).item())
        elapsed = time.time() - self.t_last
        # the loader's wait per batch and its share of the time, of the slowest rank (the others
        # wait for it at the gathers)
        batches, waited = self.loader.wait.take()
        wait = {k: v / max(1, batches) for k, v in waited.items()}
        wait["wait_share"] = min(1.0, waited["wait_s"] / max(elapsed, 1e-9))
        slowest = distributed.all_reduce_max(torch.tensor(list(wait.values()), dtype=torch.float64, device=dev))
        metrics = {k: totals[i].item() / self.steps for i, k in enumerate(names)}
        metrics["train/skipped_nonfinite"] = self.nonfinite
        metrics.update({f"data/{k}": v for k, v in zip(wait, slowest.tolist())})
        lrs = self.scheduler.get_last_lr()  # per group: towers first, heads last (optim.param_groups)
        metrics.update({"lr": lrs[-1], "lr/towers": lrs[0], "epoch": step / self.loader.steps_per_epoch,
                        "samples_per_s": self.steps * distributed.world_size() * self.batch_size / elapsed,
                        "data/skipped": skipped})
        metrics.update(self.step_metrics(step))
        self.tracker.log_metrics(metrics, step)
        if step % self.flush_every < self.train.log_every:
            self.tracker.flush()
        if distributed.is_main() and "loss" in metrics:
            eta = (time.time() - self.t_start) / max(1, step - self.start_step) * (self.train.steps - step)
            parts = " ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in names if k.startswith("loss/"))
            print(f"[{self.run_name}] step {step}/{self.train.steps} | loss {metrics['loss']:.3f} ({parts}) "
                  f"| lr {metrics['lr']:.2e} | {metrics['samples_per_s']:.0f} samples/s "
                  f"(loader wait {metrics['data/wait_share']:.0%}) "
                  f"| ETA {_fmt_seconds(eta)}", flush=True)
        self.sums, self.steps, self.t_last = {}, 0, time.time()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s"
