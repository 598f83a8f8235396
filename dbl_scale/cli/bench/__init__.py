"""`dbl-scale bench memory`: a diagnostic a user points at their own model.

  memory   per-rank bytes of ZeRO 0-3 for your model, and the step time of each DBL anchor

What a run waits for its loader is logged by every run (`data/wait_s`, `data/wait_share`). The
benchmarks behind BENCHMARKS.md (loss, eval, scale, methods, data, gpu) live in the
repository's `benchmarks/` folder: `python -m benchmarks.NAME` or `make bench NAME=...`.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers, commands: bool = True) -> argparse.ArgumentParser:
    """Register `bench` and, with `commands`, its sub-commands on an argparse sub-parser set.
    The sub-commands' modules import torch: `dbl-scale --help` and the other commands leave
    them out (`commands=False`) and stay fast."""
    p = subparsers.add_parser("bench", help="diagnostics of your setup: ZeRO memory for your model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", required=True)
    if not commands:
        return p
    from . import memory  # heavy (torch): only when `bench` is the command

    memory.add_parser(bsub)
    return p
