"""`dbl-scale bench data | memory`: diagnostics a user points at their own setup.

  data     the loader on your shards (or generated photo-sized JPEGs): samples/s per core, the
           cores a step rate needs, and the wait a real run logs
  memory   per-rank bytes of ZeRO 0-3 for your model, and the step time of each DBL anchor

The benchmarks behind BENCHMARKS.md (loss, eval, scale, methods, gpu) live in the repository's
`benchmarks/` folder: `python -m benchmarks.NAME` or `make bench NAME=...`.
"""
from __future__ import annotations

import argparse


def add_parser(subparsers, commands: bool = True) -> argparse.ArgumentParser:
    """Register `bench` and, with `commands`, its sub-commands on an argparse sub-parser set.
    The sub-commands' modules import torch: `dbl-scale --help` and the other commands leave
    them out (`commands=False`) and stay fast."""
    p = subparsers.add_parser("bench", help="diagnostics of your setup: the loader, ZeRO memory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", required=True)
    if not commands:
        return p
    from . import data as bench_data  # heavy (torch): only when `bench` is the command
    from . import memory

    for module in (memory, bench_data):
        module.add_parser(bsub)
    return p
