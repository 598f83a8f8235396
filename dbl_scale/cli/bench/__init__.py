"""`dbl-scale bench ...`: benchmarks that print their figures (BENCHMARKS.md records them).

  loss     time and peak memory of every loss at scale, against the triplet
  methods  every method trained on ShapesCaptions with the same budget, tabulated
  eval     the evaluation's cost against the similarity product and the published code
  memory   per-rank bytes of ZeRO 0-3, and the step time of each DBL scenario
  data     the loader and the converters against bare WebDataset and PIL loops
  gpu      the GPU path end to end in one command (make gpu-check)
  scale    evaluation, mining and AOQ's negatives as the data grows (memory and time)
"""
from __future__ import annotations

import argparse


def add_parser(subparsers, commands: bool = True) -> argparse.ArgumentParser:
    """Register `bench` and, with `commands`, its sub-commands on an argparse sub-parser set.
    The sub-commands' modules import torch: `dbl-scale --help` and the other commands leave
    them out (`commands=False`) and stay fast."""
    p = subparsers.add_parser("bench", help="benchmarks (BENCHMARKS.md records their figures)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench_command", required=True)
    if not commands:
        return p
    from . import data as bench_data  # heavy (torch): only when `bench` is the command
    from . import eval as bench_eval
    from . import gpu, loss, memory, methods, scale

    for module in (loss, methods, bench_eval, memory, bench_data, gpu, scale):
        module.add_parser(bsub)
    return p
