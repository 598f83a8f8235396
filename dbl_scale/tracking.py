"""MLflow tracking from global rank 0 only, with batched uploads that survive an outage.

Only `start` (and `resume`) talk to MLflow from the training thread; metric batches, artifacts
and the final status go to a background sender, so training never waits for the store. What
the store does not take is appended to an on-disk spool (JSON lines in the run folder) and
retried with backoff, then replayed in order; replaying is idempotent (a metric keeps its
timestamp). If MLflow never comes back, the run still finishes and names its spool for
`dbl-scale tracking replay`. Any tracking URI works (`sqlite:///...`, `http://...`)."""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger("dbl_scale")

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100
MAX_PARAM_LENGTH = 6000
# MLflow's HTTP client retries a request for minutes by default; the sender retries on its own
# schedule instead, so one attempt gives up fast (a user's own setting wins).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def _client(uri: str):
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient  # heavy (seconds): only rank 0 talks to MLflow

    return MlflowClient(tracking_uri=uri)


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs", "ceph", "glusterfs")


def network_filesystem(uri: str, mounts: str | None = None) -> str | None:
    """The network filesystem type an `sqlite:///` store lies on (None when local or not
    sqlite): SQLite's locking is unreliable there, and several jobs writing one file on a
    shared home is a known way to corrupt it. `mounts`: /proc/mounts' text."""
    if not uri.startswith("sqlite:///"):
        return None
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    path = Path(uri[len("sqlite:///"):]).absolute()
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and (path.as_posix() + "/").startswith(fields[1].rstrip("/") + "/") and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


class Tracker:
    """A run in MLflow, or a no-op on ranks other than 0 (`enabled=False`).

    `spool`: the file that holds what MLflow did not take (default `mlflow_spool/<run id>.jsonl`),
    at most `spool_max_mb` (beyond it new records are dropped and counted); `retry_max_s`: the
    longest wait between retries; `final_wait_s`: how long `finish` waits for an unreachable
    MLflow before it leaves the rest in the spool."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True, spool: Optional[Path] = None,
                 spool_max_mb: float = 256, retry_max_s: float = 60, final_wait_s: float = 120,
                 system_metrics_s: float = 0):
        self.enabled = enabled
        self.run_id: Optional[str] = None
        self._buffer: list = []
        self._sender: Optional[_Sender] = None
        self._system = None
        if not enabled:
            return
        self.uri, self.spool, self.final_wait_s, self.system_metrics_s = uri, spool, final_wait_s, system_metrics_s
        self.spool_max_mb, self.retry_max_s = spool_max_mb, retry_max_s
        fs = network_filesystem(uri)
        if fs:
            log.warning("the MLflow store %s is on a network filesystem (%s), where SQLite's locking is not "
                        "reliable: use a local path, or an `mlflow server` all jobs talk to (tracking.uri=http://...)",
                        uri, fs)
        self.client = _client(uri)
        try:
            exp = self.client.get_experiment_by_name(experiment)
            self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        except Exception as exc:  # at the start a wrong URI is likelier than an outage: say so, stop
            raise RuntimeError(f"MLflow at {uri} did not answer ({exc}); start the server, or set "
                               f"tracking.uri (or MLFLOW_TRACKING_URI) to a reachable store") from exc

    def start(self, run_name: Optional[str], params: dict[str, Any], tags: Optional[dict[str, str]] = None) -> Optional[str]:
        if not self.enabled:
            return None
        from mlflow.entities import Param  # heavy, as MlflowClient

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_PARAMS_PER_BATCH])
        self._start_sender()
        return self.run_id

    def log_inputs(self, datasets: list[dict]) -> None:
        """The run's data as MLflow dataset inputs: dicts of name, source (a path or URL),
        digest and context ("training", "evaluation")."""
        if not self.enabled:
            return
        from mlflow.data.code_dataset_source import CodeDatasetSource  # heavy, as MlflowClient
        from mlflow.data.dataset_source_registry import get_dataset_source_from_json, resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        def source(uri: str):
            if "://" not in uri and not uri.startswith("pipe:"):
                # a local path, named as such: MLflow registers two identical "local" sources
                # (schemes "" and "file"), and its guess between them warns on every path
                return get_dataset_source_from_json(json.dumps({"uri": uri}), "local")
            try:
                return resolve_dataset_source(uri)  # s3://, http(s)://
            except Exception:  # noqa: BLE001 - e.g. a pipe: URL, which no MLflow source names
                return CodeDatasetSource({"uri": uri})

        inputs = [DatasetInput(MetaDataset(source(d["source"]), name=d["name"], digest=d["digest"])._to_mlflow_entity(),
                               tags=[InputTag("mlflow.data.context", d["context"])]) for d in datasets]
        try:
            self.client.log_inputs(self.run_id, datasets=inputs)
        except Exception as exc:  # noqa: BLE001 - narrowed below
            # runs of a sweep that start together insert the same dataset row at once; the
            # loser's transaction fails on the unique key and is rolled back: the row exists now
            message = str(exc).lower()
            if "unique constraint" not in message and "duplicate entry" not in message:
                raise
            self.client.log_inputs(self.run_id, datasets=inputs)

    def resume(self, run_id: str) -> None:
        """Continue an existing run (after a restart): same run id, the metric history goes on;
        what an earlier process left in the spool is sent first."""
        if not self.enabled:
            return
        self.run_id = run_id
        self._start_sender()
        self._sender.put({"kind": "status", "status": "RUNNING"})

    def _start_sender(self) -> None:
        spool = self.spool or Path("mlflow_spool") / f"{self.run_id}.jsonl"
        self._sender = _Sender(self.client, self.uri, self.run_id, Path(spool),
                               int(self.spool_max_mb * 2**20), self.retry_max_s)
        if self.system_metrics_s > 0:  # CPU, memory, disk, network (and GPUs with nvidia-ml-py) as system/*
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # heavy, as MlflowClient

            self._system = SystemMetricsMonitor(self.run_id, sampling_interval=self.system_metrics_s,
                                                tracking_uri=self.uri)
            self._system.start()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            now = int(time.time() * 1000)
            self._buffer.extend([k, float(v), now, step] for k, v in metrics.items())

    def flush(self, wait_s: float = 0.0) -> None:
        """Hand the buffered metrics to the sender; with `wait_s`, wait up to that long until
        they are in MLflow or in the spool (both outlive this process)."""
        if not self.enabled or self._sender is None:
            return
        if self._buffer:
            self._sender.put({"kind": "metrics", "metrics": self._buffer})
            self._buffer = []
        if wait_s:
            self._sender.wait_accounted(wait_s)

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        if self.enabled and self._sender is not None:
            self._sender.put({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED") -> None:
        """Send the rest and the run's final status; wait up to `final_wait_s` for an
        unreachable MLflow, then say where the spool is and how to replay it."""
        if not self.enabled or self._sender is None:
            return
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.flush()
        self._sender.put({"kind": "status", "status": status})
        if not self._sender.close(self.final_wait_s):
            print(f"MLflow at {self.uri} is unreachable: {self._sender.spooled_records()} tracking records "
                  f"(metrics, artifacts, the final status) of run {self.run_id} are kept in {self._sender.spool}. "
                  f"Once MLflow is back: dbl-scale tracking replay {self._sender.spool}", flush=True)
        if self._sender.dropped:
            print(f"warning: the MLflow spool was full (tracking.spool_max_mb): {self._sender.dropped} "
                  f"tracking records of run {self.run_id} were dropped", flush=True)
        self._sender = None


class _Sender:
    """One thread that applies records to MLflow in order. A record MLflow does not take goes
    to the spool, and so does every later one while the spool is not empty (so order is
    kept); the spool is retried after 1, 2, 4 ... `retry_max_s` seconds."""

    def __init__(self, client, uri: str, run_id: str, spool: Path, max_bytes: int, retry_max_s: float):
        self.client, self.uri, self.run_id, self.spool = client, uri, run_id, spool
        self.max_bytes, self.retry_max_s = max_bytes, retry_max_s
        self.backoff, self.retry_at, self.dropped = 1.0, 0.0, 0
        self.queue: queue.Queue = queue.Queue()
        self.accounted = threading.Condition()  # records put vs records sent or spooled
        self.put_count = self.done_count = 0
        self.closing = self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="mlflow-sender", daemon=True)
        self.thread.start()

    def put(self, record: dict) -> None:
        with self.accounted:
            self.put_count += 1
        self.queue.put(dict(record, run_id=self.run_id, uri=self.uri))

    def wait_accounted(self, timeout: float) -> bool:
        with self.accounted:
            return self.accounted.wait_for(lambda: self.done_count == self.put_count, timeout)

    def close(self, timeout: float) -> bool:
        """Stop after every record is accounted for and the spool is replayed, or at `timeout`
        (the spool stays). True when everything reached MLflow."""
        self.closing = True  # retry at once, and keep the backoff short while closing
        self.retry_at = 0.0
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():  # MLflow is still away: stop retrying, the spool stays for a replay
            self.abandoned = True
            self.thread.join()
        return not self.spooled()

    def spooled(self) -> bool:
        return self.spool.exists() and self.spool.stat().st_size > 0

    def spooled_records(self) -> int:
        return len(read_spool(self.spool)) if self.spooled() else 0

    def _loop(self) -> None:
        stop = False
        while not self.abandoned and not (stop and not self.spooled()):
            wait = max(0.0, self.retry_at - time.monotonic()) if self.spooled() else None
            try:
                record = self.queue.get(timeout=wait)
            except queue.Empty:
                record = None
            if record is None:
                stop = stop or self.closing
            else:
                if self.spooled() or not self._try(record):
                    self._append(record)
                with self.accounted:
                    self.done_count += 1
                    self.accounted.notify_all()
            if self.spooled() and time.monotonic() >= self.retry_at:
                self._replay()

    def _try(self, record: dict) -> bool:
        try:
            apply_record(self.client, record)
        except Exception as exc:  # any failure of the store: keep the record, retry later
            if self.backoff == 1.0:
                log.warning("MLflow at %s did not take a tracking record (%s); records go to %s and are "
                            "retried with backoff; training goes on", self.uri, str(exc).splitlines()[0][:300],
                            self.spool)
            self.retry_at = time.monotonic() + self.backoff
            self.backoff = min(2 * self.backoff, 2.0 if self.closing else self.retry_max_s)
            return False
        return True

    def _append(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        size = self.spool.stat().st_size if self.spool.exists() else 0
        if size + len(line) > self.max_bytes:
            self.dropped += 1
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spool, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _replay(self) -> None:
        try:
            sent = send_spool(self.spool, self._apply)
        except Exception:
            return  # _apply scheduled the next try
        self.backoff = 1.0
        log.info("MLflow at %s answers again: %d spooled tracking records replayed", self.uri, sent)

    def _apply(self, record: dict) -> None:
        if not self._try(record):
            raise ConnectionError("MLflow did not take a spooled record")


def apply_record(client, record: dict) -> None:
    """One spool record into MLflow: a metric batch, an artifact, or a run status."""
    run_id, kind = record["run_id"], record["kind"]
    if kind == "metrics":
        from mlflow.entities import Metric  # heavy, as MlflowClient

        metrics = [Metric(k, v, ts, step) for k, v, ts, step in record["metrics"]]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
    elif kind == "artifact":
        if Path(record["path"]).exists():  # a file deleted since is not worth an endless retry
            client.log_artifact(run_id, record["path"], record["artifact_path"])
    elif kind == "status":
        if record["status"] == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, record["status"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def read_spool(path: Path) -> list[dict]:
    """The records of a spool; a line cut short by a crash is skipped. A file none of whose
    lines is a JSON object is not a spool: a ValueError, so nothing removes it."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    if lines and not any(line.startswith("{") for line in lines):
        raise ValueError(f"{path} is not an MLflow spool (no line of it is a tracking record): give a run's "
                         "mlflow_spool.jsonl")
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a truncated line in %s", path)
    return records


def _rewrite_spool(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def send_spool(path: Path, apply: Callable[[dict], None]) -> int:
    """Apply a spool's records in order and remove it; when one fails, keep it and what follows
    (what was sent need not be sent again) and raise. Returns the records sent."""
    records = read_spool(path)
    for i, record in enumerate(records):
        try:
            apply(record)
        except Exception:
            if i:
                _rewrite_spool(path, records[i:])
            raise
    path.unlink(missing_ok=True)
    return len(records)


def replay_spool(path: Path, uri: Optional[str] = None) -> int:
    """Send a spool left by a run that could not reach MLflow (to its own URI unless `uri` is
    given), in order; the spool is removed when all of it is in. Returns the records sent.
    Safe to repeat: a metric already in MLflow is not added twice."""
    records = read_spool(Path(path))
    if not records:
        Path(path).unlink(missing_ok=True)
        return 0
    client = _client(uri or records[0]["uri"])
    return send_spool(Path(path), lambda record: apply_record(client, record))
