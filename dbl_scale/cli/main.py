"""`dbl-scale`: the command line; `DESCRIPTION` (its --help) lists the commands with examples."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from . import quiet
from .checks import CommandError

DESCRIPTION = """dbl-scale: image-text matching (DBL and its baselines) on DeepSpeed ZeRO, WebDataset and MLflow.

examples:
  dbl-scale demo                                   ShapesCaptions, triplet vs DBL on 2 CPU ranks, compared
  dbl-scale train --nproc 2 --config demo loss.method=dbl train.steps=1000
  dbl-scale data build --out data/shapes_captions  write ShapesCaptions shards
  dbl-scale data verify data/shapes_captions       every shard reads, counts match
  dbl-scale eval --run-dir runs/RUN --split test   evaluate a finished run, log it to MLflow
  dbl-scale compare --experiment dbl_scale_demo    runs side by side (--plot curves.png)
  dbl-scale export --run-dir runs/RUN --out exported/RUN   for transformers alone
  dbl-scale mine --run-dir runs/RUN --out runs/RUN/candidates   AOQ's offline hard negatives
  dbl-scale bench memory                           ZeRO memory and DBL step cost for your model
  dbl-scale tracking replay runs/RUN/mlflow_spool.jsonl   what a run kept while MLflow was away

`dbl-scale COMMAND --help` shows each command's options and examples. Errors are one line;
--debug (or DBL_SCALE_DEBUG=1) adds the traceback, --verbose shows what the libraries print.
"""  # the --help text

# The parser imports only light modules: every command imports its heavy libraries (torch,
# transformers, deepspeed, mlflow) when it runs, so `--help` answers at once.
TRACEBACK_HINT = "(a bug? run again with --debug for the traceback)"
COMMANDS = ("demo", "train", "data", "eval", "compare", "mine", "export", "bench", "tracking")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; each option's default after its help, unless the
    help says it already or there is none to show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS or default == []
                or getattr(action, "required", False) or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)"


def _command_of(argv: Sequence[str]) -> Optional[str]:
    """The command named on the command line (the first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _parsers(parser: argparse.ArgumentParser):
    """This parser and every sub-command's, depth first."""
    yield parser
    for action in parser._actions:  # argparse keeps its sub-parsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The whole command line. The `bench` sub-commands import torch to register themselves:
    they are registered only when `argv` names `bench` (or when `argv` is None)."""
    parser = argparse.ArgumentParser(prog="dbl-scale", description=DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--verbose", action="store_true",
                        help="also show what the libraries print (their notes, progress bars and warnings)")
    parser.add_argument("--debug", action="store_true", help="a traceback with any error (also: DBL_SCALE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from . import bench, compare, data, demo, export, mine, tracking, train
    from . import eval as eval_command

    for command in (demo, train, data, eval_command, compare, mine, export):
        command.add_parser(sub)
    bench.add_parser(sub, commands=argv is None or _command_of(argv) == "bench")
    tracking.add_parser(sub)
    for p in list(_parsers(parser))[1:]:  # the same two switches after any command, and the same help layout
        p.formatter_class = HelpFormatter
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def one_line(exc: BaseException) -> str:
    """An exception as the one line a user reads: what is wrong and what to do."""
    import yaml

    from ..config import ConfigError
    from ..shards import DataError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ConfigError):
        return f"config error: {text}"
    if isinstance(exc, DataError):
        return f"data error: {text}"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return (f"config error: a YAML file does not parse at line {mark.line + 1}, column {mark.column + 1}: "
                f"{exc.problem}{f' ({exc.context})' if exc.context else ''}")
    if isinstance(exc, KeyError):
        return text.strip("'\"")
    if isinstance(exc, OSError) and exc.strerror:  # a path that is missing, a file, a folder, not allowed
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    if isinstance(exc, (CommandError, ValueError)):
        return text
    return f"{type(exc).__name__}: {text} {TRACEBACK_HINT}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    quiet.setup("--verbose" in argv or quiet.verbose())  # before the parser imports anything (tqdm reads it then)
    args = build_parser(argv).parse_args(argv)
    if args.debug:
        os.environ[quiet.DEBUG] = "1"
    logging.basicConfig(level=logging.INFO, format=quiet.FORMAT, datefmt=quiet.DATEFMT)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("dbl-scale: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line; the traceback with --debug
        if quiet.debug():
            raise
        line = one_line(exc)
        command = " ".join(getattr(args, k) for k in ("command", "data_command", "tracking_command", "bench_command")
                           if getattr(args, k, None))
        print(f"dbl-scale {command}: {line}", file=sys.stderr)
        return 1 if line.endswith(TRACEBACK_HINT) else 2


if __name__ == "__main__":
    sys.exit(main())
