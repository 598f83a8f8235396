"""Benchmarks that prove the figures in BENCHMARKS.md: not part of the package, run from the
repository's root as `python -m benchmarks.NAME [options]` or `make bench NAME=... ARGS="..."`
(loss, eval, scale, methods, data, gpu). The diagnostic a user points at their own model stays
a command: `dbl-scale bench memory`."""
from __future__ import annotations

import argparse
import sys


class _OwnParser:
    """Stands where argparse's sub-parser set would: a benchmark's `add_parser` builds the
    whole command line of `python -m benchmarks.NAME`."""

    parser: argparse.ArgumentParser

    def add_parser(self, name: str, help: str = "", **kwargs) -> argparse.ArgumentParser:  # noqa: A002
        kwargs.setdefault("description", help)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        self.parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", **kwargs)
        return self.parser


def run(add_parser, argv=None) -> int:
    """Parse the command line of the benchmark that `add_parser` registers, and run it, with the
    libraries as quiet as under `dbl-scale` (DBL_SCALE_VERBOSE=1 lets them speak)."""
    from dbl_scale.cli import quiet

    quiet.setup()
    own = _OwnParser()
    add_parser(own)
    args = own.parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
