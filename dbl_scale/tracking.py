"""MLflow tracking from global rank 0 only, with batched uploads.

Metrics are buffered and sent with `log_batch` every `flush_every` steps (and at the end),
never one call per value. Any tracking URI works: the default embedded
`sqlite:///mlflow.db`, or an `http://` tracking server.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

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
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)

    def start(self, run_name: Optional[str], params: dict[str, Any], tags: Optional[dict[str, str]] = None) -> Optional[str]:
        if not self.enabled:
            return None
        from mlflow.entities import Param

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
        from mlflow.entities import Metric

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

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.flush()
            self.client.set_terminated(self.run_id, status)
