"""The one place that builds a torchrun command line and its environment: every command that
starts ranks (train, demo, eval, mine, bench) goes through here, and so do the tests."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence


def torchrun_command(nproc: int, module: str, args: Sequence[str] = (), nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: Optional[str] = None) -> list[str]:
    """`python -m torch.distributed.run` of `module` (a module name, or a script path ending in
    .py) with its `args`, on `nproc` ranks of this machine: standalone (a free local port)
    for one machine, or one node of `nnodes` meeting at `rdzv_endpoint` (HOST:PORT, c10d)."""
    target = [module] if module.endswith(".py") else ["-m", module]
    if nnodes == 1 and rdzv_endpoint is None:
        where = ["--standalone"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("a run over several nodes needs --rdzv-endpoint HOST:PORT (the first node)")
        where = [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint={rdzv_endpoint}", f"--rdzv_id={rdzv_endpoint}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}", *target, *args]


def local_ranks(nproc: str | int) -> int:
    """`--nproc`: a number, or `gpu` (one rank per visible GPU)."""
    if str(nproc) != "gpu":
        return int(nproc)
    import torch  # heavy: only to count GPUs

    if not torch.cuda.device_count():
        raise SystemExit("--nproc gpu: no GPU is visible here; give a number of ranks")
    return torch.cuda.device_count()


def config_args(config: Optional[str], overrides: Sequence[str]) -> list[str]:
    """`--config PATH` (when given) and the dotted overrides, as the rank-side parsers take them."""
    return (["--config", config] if config else []) + list(overrides)


def launch_env(nproc: int) -> dict:
    """The environment of the ranks: the cores split among them, no tokenizer threads, and
    Hugging Face kept offline (models come from local folders or the local cache)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_ranks(nproc: int, module: str, args: Sequence[str] = (), nnodes: int = 1, node_rank: int = 0,
              rdzv_endpoint: Optional[str] = None) -> int:
    """Start `module` on `nproc` ranks of this machine (one node of `nnodes`) and wait; returns
    the launcher's exit code."""
    return subprocess.call(torchrun_command(nproc, module, args, nnodes, node_rank, rdzv_endpoint),
                           env=launch_env(nproc))
