"""Shared fixtures: a small ShapesCaptions shard set with its tokenizer, built once per session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "dbl_scale" / "presets" / "tiny.yaml")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """128 train images in 8 shards of 16, 16 val, 40 test; 32 px; tokenizer in <root>/tokenizer."""
    from data_tools.shapes_captions import build_shapes_captions
    from dbl_scale.config import load_config
    from dbl_scale.data import ensure_tokenizer

    root = tmp_path_factory.mktemp("shapes") / "data"
    build_shapes_captions(str(root), n_train=128, n_val=16, n_test=40, image_size=32, shard_size=16, seed=3)
    cfg = load_config(TINY, [f"data.root={root}"])
    ensure_tokenizer(cfg.data, cfg.model.text)
    return root


@pytest.fixture(scope="session")
def tokenizer(shapes_root):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shapes_root / "tokenizer"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, cwd=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run` with `nproc` CPU ranks; fail the test with its output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}"] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
