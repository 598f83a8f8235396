"""What a command checks before it starts any rank, so a wrong path is one line that says what
was given and what to give instead (`CommandError`), never a traceback from every rank."""
from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse


class CommandError(Exception):
    """A wrong input a user can fix (a missing folder, a run that is not there): one line."""


def _runs_near(path: Path) -> str:
    """A hint naming the newest finished runs beside `path` (or saying there are none)."""
    parent = path.parent if str(path.parent) not in ("", ".") or path.parent.exists() else Path(".")
    runs = sorted((p for p in parent.glob("*") if (p / "config.yaml").is_file()), key=lambda p: p.stat().st_mtime,
                  reverse=True) if parent.is_dir() else []
    if runs:
        return f"runs in {parent}: {', '.join(str(p) for p in runs[:3])}{', ...' if len(runs) > 3 else ''}"
    return f"no run folders in {parent} (dbl-scale train or make demo writes them under runs/)"


def run_folder(path: str | Path, option: str = "--run-dir", checkpoint_ok: bool = False) -> Path:
    """A finished run's folder (or its best/): config.yaml and a model.pt that reads as weights,
    or with `checkpoint_ok` a checkpoints/ folder in place of model.pt."""
    path = Path(path)
    if not path.exists():
        raise CommandError(f"{option} {path}: no such folder; give a finished run's folder ({_runs_near(path)})")
    if not path.is_dir():
        raise CommandError(f"{option} {path} is a file: give a run's folder (it holds config.yaml and model.pt)")
    if not (path / "config.yaml").is_file():
        raise CommandError(f"{option} {path} is not a run folder (no config.yaml); {_runs_near(path)}")
    if not (path / "model.pt").is_file() and not (checkpoint_ok and (path / "checkpoints").is_dir()):
        raise CommandError(f"{option} {path} has no model.pt: the run has not finished; resume it with "
                           f"tracking.run_name={path.name} checkpoint.resume=latest")
    _model_loads(path)
    return path


def _model_loads(run_dir: Path) -> None:
    """The run's model.pt reads as weights (a file cut short or damaged is one line here, not a
    traceback from every rank)."""
    import torch  # heavy: the command that runs imports it anyway

    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        return  # a run exported from its checkpoints
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - whatever the reader says, the file is not a model
        reason = " ".join(str(exc).split()).split(". ")[0][:200]
        raise CommandError(f"{path} does not load as weights ({reason}): the file is "
                           "damaged or not a dbl_scale model; copy it again, or export from the run's checkpoints") from exc


def sqlite_store(uri: str, option: str = "--tracking-uri") -> None:
    """An `sqlite:///` tracking URI names a file that exists: MLflow would create an empty store
    for a mistyped path, which a read-only command must not do."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise CommandError(f"{option} {uri}: no MLflow store there (make demo and dbl-scale train write "
                           "sqlite:///mlflow.db where they run); give the store's URI, e.g. sqlite:///path/to/mlflow.db")


def no_experiment(name: str, uri: str, names) -> CommandError:
    """The one-line error for an experiment `name` that the store at `uri` does not hold."""
    return CommandError(f"no experiment named {name!r} at {uri}; experiments there: "
                        f"{', '.join(sorted(names)) or 'none (make demo makes dbl_scale_demo)'}")


def sqlite_experiment(uri: str, name: str) -> None:
    """An `sqlite:///` store holds an experiment `name` (live or deleted), read with sqlite3
    alone from MLflow's `experiments` table, so a mistyped name is told before MLflow loads; a
    store this cannot read is left to MLflow. Opens the file read-only."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3

    try:
        db = sqlite3.connect(Path(uri[len("sqlite:///"):]).resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT name, lifecycle_stage FROM experiments").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return
    if name not in {n for n, _ in rows}:
        raise no_experiment(name, uri, [n for n, stage in rows if stage == "active"])


def tracking_answers(uri: str) -> None:
    """An http(s) tracking server accepts a connection: a run must not start its ranks only for
    rank 0 to fail at its first MLflow call (one connection attempt, a few seconds at most)."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=5).close()
    except OSError as exc:
        raise CommandError(f"MLflow at {uri} does not answer ({exc.strerror or exc}): start the server "
                           "(mlflow server ...), or set tracking.uri / MLFLOW_TRACKING_URI to a reachable store") from exc
