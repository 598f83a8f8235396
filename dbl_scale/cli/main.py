"""`dbl-scale`: the command line.

  dbl-scale demo                      build ShapesCaptions, train triplet and DBL on 2 CPU ranks, compare
  dbl-scale train --nproc 2 [--config demo] [key=value ...]   one run under torchrun
  dbl-scale data build --out DIR      write ShapesCaptions shards
  dbl-scale eval --run-dir RUN [--data DIR --split test --protocol coco1k]   evaluate, log, report
  dbl-scale compare --experiment NAME [--format markdown]   runs of an experiment side by side
  dbl-scale mine --run-dir RUN --out FILE    AOQ: offline hard negatives of the training set
  dbl-scale export --run-dir RUN --out DIR [--register NAME]   for transformers alone, and as an MLflow model
  dbl-scale bench loss | methods | eval | memory | data | gpu   benchmarks (see BENCHMARKS.md)
  dbl-scale tracking replay SPOOL     send what a run kept while MLflow was unreachable
"""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError
from ..data import DataError
from . import bench, compare, data, demo, export, mine, tracking, train
from . import eval as eval_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbl-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (demo, train, data, eval_command, compare, mine, export, bench, tracking):
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dbl-scale: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"dbl-scale: data error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
