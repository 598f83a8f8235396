"""`dbl-scale tracking replay SPOOL`: send what a run could not send to MLflow.

A run that loses its tracking server keeps training and writes the metrics, artifacts and
final status MLflow did not take to `<run>/mlflow_spool.jsonl`; it replays them itself when
MLflow answers again. If the run ended first, this command does it later, to the run's own
tracking URI or to `--tracking-uri`. Repeating it is safe: MLflow keeps each metric once.

    dbl-scale tracking replay runs/dbl-20261126-101500/mlflow_spool.jsonl
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..tracking import replay_spool


def cmd_replay(args) -> int:
    for spool in args.spools:
        if not Path(spool).exists():
            print(f"dbl-scale tracking replay: no spool at {spool} (nothing left to send)", file=sys.stderr)
            continue
        if Path(spool).is_dir():
            raise ValueError(f"{spool} is a folder: give the spool file in it, e.g. {Path(spool) / 'mlflow_spool.jsonl'}")
        try:
            sent = replay_spool(Path(spool), args.tracking_uri)
        except ValueError:  # not a spool at all: one line from the command, the file left as it is
            raise
        except Exception as exc:
            print(f"dbl-scale tracking replay: MLflow did not take {spool} ({exc}); what was not sent "
                  "stays in the spool, run this again later", file=sys.stderr)
            return 1
        print(f"{spool}: {sent} tracking records sent to MLflow; spool removed")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tracking", help="MLflow tools", description=__doc__,
                       epilog="example:\n  dbl-scale tracking replay runs/dbl-20261126-101500/mlflow_spool.jsonl")
    tsub = p.add_subparsers(dest="tracking_command", required=True)
    r = tsub.add_parser("replay", help="send a run's MLflow spool (left by an outage) to MLflow", description=__doc__,
                        epilog="example:\n  dbl-scale tracking replay runs/dbl-20261126-101500/mlflow_spool.jsonl")
    r.add_argument("spools", nargs="+", metavar="SPOOL", help="a run's mlflow_spool.jsonl")
    r.add_argument("--tracking-uri", default=None, help="send there instead of the run's own tracking URI")
    r.set_defaults(func=cmd_replay)
