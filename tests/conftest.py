"""Shared fixtures: a small ShapesCaptions shard set with its tokenizer, built once per session."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dbl_scale.cli.launch import launch_env, torchrun_command

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ and data_tools/ from the checkout
TINY = str(REPO / "dbl_scale" / "presets" / "tiny.yaml")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """128 train images in 8 shards of 16, 16 val, 40 test; 32 px; tokenizer in <root>/tokenizer."""
    from data_tools.shapes_captions import build_shapes_captions
    from dbl_scale.config import load_config
    from dbl_scale.tokenizer import ensure_tokenizer

    root = tmp_path_factory.mktemp("shapes") / "data"
    build_shapes_captions(str(root), n_train=128, n_val=16, n_test=40, image_size=32, shard_size=16, seed=3)
    cfg = load_config(TINY, [f"data.root={root}"])
    ensure_tokenizer(cfg.data, cfg.model.text)
    return root


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, its tables created once by MLflow itself (creating them
    runs MLflow's schema migrations: about 2 s per store on the 2-core machine)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path, mlflow_template):
    """Every test's `tmp_path / "mlflow.db"` starts as a copy of that empty store: a real
    MLflow store, without each run paying for the migrations again."""
    shutil.copyfile(mlflow_template, tmp_path / "mlflow.db")


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shapes_root / "tokenizer"))


@pytest.fixture(scope="session")
def finished_run(shapes_root, tmp_path_factory) -> Path:
    """One finished triplet run (4 steps, 2 ranks), shared by every test that needs a trained
    checkpoint: offline anchors, teachers, `train.init_from`."""
    tmp = tmp_path_factory.mktemp("finished_run")
    torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={shapes_root}", "loss.method=triplet",
              "train.steps=4", "eval.at_end=false", f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
              "tracking.run_name=anchor", f"train.output_dir={tmp / 'runs'}"], cwd=tmp)
    return tmp / "runs" / "anchor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `args` (`["-m", module, ...]` or `[script.py, ...]`) on `nproc` CPU ranks through the
    project's own torchrun command line; fail the test with its output."""
    env = dict(launch_env(nproc), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    target = args[1] if args[0] == "-m" else args[0]
    cmd = torchrun_command(nproc, target, args[2:] if args[0] == "-m" else args[1:])
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


# ----------------------------------------------------------------------------- tiers
# Each test says its tier on itself: `launch` (starts a process: ranks, a command, a server,
# Slurm; `make test-fast` leaves these out), `slow` (a minute or more), `gpu` (needs CUDA;
# `make gpu-check` runs these).

def pytest_configure(config):
    for marker in ("launch: starts a process (ranks, a command, a server, Slurm); make test-fast leaves these out",
                   "slow: takes a minute or more", "gpu: needs a CUDA device (make gpu-check); skipped without one"):
        config.addinivalue_line("markers", marker)
