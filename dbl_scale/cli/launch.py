"""The one place that builds a torchrun command line and its environment: every command that
starts ranks (train, demo, eval, mine, bench) goes through here, and so do the tests."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Sequence


def torchrun_command(nproc: int, module: str, args: Sequence[str] = ()) -> list[str]:
    """`python -m torch.distributed.run` on `nproc` local ranks (standalone rendezvous on a free
    port) of `module` (a module name, or a script path ending in .py) with its `args`."""
    target = [module] if module.endswith(".py") else ["-m", module]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *target, *args]


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


def run_ranks(nproc: int, module: str, args: Sequence[str] = ()) -> int:
    """Start `module` on `nproc` local ranks and wait; returns the launcher's exit code."""
    return subprocess.call(torchrun_command(nproc, module, args), env=launch_env(nproc))
