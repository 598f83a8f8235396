"""`dbl-scale compare`: the runs of one MLflow experiment side by side, best first.

One row per run: its name, method, key parameters, final retrieval metrics of its evaluation
split (`test/...`, or whatever split prefix the run logged, e.g. `val/...`), training
throughput (`samples_per_s`: the mean over its logged history, each value being the rate
over one logging interval, warm-up included), the last step it logged, and its status.
Works with any tracking URI (sqlite:///..., http://...).

    dbl-scale compare --experiment dbl_scale_demo --sort test/rsum --format markdown
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from typing import Iterable, Optional, Sequence

from ..evaluation import RECALL_HEADS, RECALL_KEYS

PARAMS = {"scenario": "loss.dbl.scenario", "train_steps": "train.steps", "batch_size": "data.batch_size",
          "lr": "optim.lr", "deepspeed": "train.deepspeed"}
SPLITS = ("test", "val")  # preferred evaluation split prefixes, in order
THROUGHPUT = "samples_per_s"

# column key -> header (text and markdown); CSV uses the keys
_HEADS = {"run": "run", "method": "method", "scenario": "scenario", "steps": "steps", "train_steps": "train.steps",
          "batch_size": "batch", "lr": "lr", "deepspeed": "deepspeed", "split": "split", **RECALL_HEADS,
          "samples_per_s": "samples/s", "status": "status"}


def _eval_split(metric_names: Iterable[str], sort_by: str) -> Optional[str]:
    """The split prefix whose metrics this run reports: the sort key's own if the run has it,
    then test, then val, then any other `<prefix>/rsum`."""
    prefixes = {name.rsplit("/", 1)[0] for name in metric_names if name.endswith("/rsum")}
    wanted = [sort_by.rsplit("/", 1)[0]] if "/" in sort_by else []
    for p in wanted + list(SPLITS) + sorted(prefixes):
        if p in prefixes:
            return p
    return None


def _search_all(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def compare_runs(tracking_uri: str, experiment: str, sort_by: str = "test/rsum",
                 metrics: Optional[Sequence[str]] = None) -> list[dict]:
    """One dict per run of `experiment`, sorted by `sort_by` descending (runs without it last).

    `sort_by` is a metric name as logged (`test/rsum`, `samples_per_s`) or a row key
    (`rsum`: of whichever split the run reports, `steps`, ...). `metrics`: the evaluation
    metrics to read, without split prefix (default: R@1/5/10 both ways and rSum).
    """
    from mlflow.tracking import MlflowClient  # heavy (seconds): imported when used

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment named {experiment!r} at {tracking_uri}")
    keys = tuple(metrics) if metrics else RECALL_KEYS
    rows = []
    for run in _search_all(client, exp.experiment_id):
        params, tags, latest = run.data.params, run.data.tags, run.data.metrics
        method = params.get("loss.method") or tags.get("method")
        split = _eval_split(latest, sort_by)
        row = {"run": run.info.run_name or run.info.run_id, "run_id": run.info.run_id, "method": method}
        for col, name in PARAMS.items():
            row[col] = params.get(name)
        if method != "dbl":
            row["scenario"] = None  # every run carries the DBL defaults; they mean nothing elsewhere
        row["split"] = split
        for k in keys:
            row[k] = latest.get(f"{split}/{k}") if split else None
        history = client.get_metric_history(run.info.run_id, THROUGHPUT) if THROUGHPUT in latest else []
        row["samples_per_s"] = sum(m.value for m in history) / len(history) if history else None
        steps = [m.step for m in history]
        if split:
            steps += [m.step for m in client.get_metric_history(run.info.run_id, f"{split}/{keys[-1]}")]
        row["steps"] = max(steps) if steps else None
        row["status"] = run.info.status
        rows.append((latest.get(sort_by, row.get(sort_by)), row))

    def order(item):
        i, (v, _) = item
        try:  # params are strings: "0.0005" sorts as a number
            v = float(v)
        except (TypeError, ValueError):
            return (1, 0, i)
        return (1, 0, i) if math.isnan(v) else (0, -v, i)

    return [row for _, (_, row) in sorted(enumerate(rows), key=order)]


def _columns(rows: Sequence[dict]) -> list[str]:
    fixed = ["run", "method", "scenario", "steps", "train_steps", "batch_size", "lr", "deepspeed", "split"]
    tail = ["samples_per_s", "status"]
    metric_cols = [k for k in (rows[0] if rows else {}) if k not in fixed + tail + ["run_id"]]
    if not any(r.get("scenario") for r in rows):
        fixed.remove("scenario")
    return fixed + metric_cols + tail


def _cell(key: str, v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if key != "lr" else f"{v:g}"
    return str(v)


def format_runs(rows: Sequence[dict], fmt: str = "text") -> str:
    """Rows of `compare_runs` as an aligned text table, a Markdown table, or CSV (all keys, raw values)."""
    if fmt == "csv":
        keys = list(rows[0]) if rows else ["run"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in keys})
        return buf.getvalue()
    cols = _columns(rows)
    heads = [_HEADS.get(c, c) for c in cols]
    table = [[_cell(c, r.get(c)) for c in cols] for r in rows]
    numeric = {c for c in cols if any(isinstance(r.get(c), (int, float)) for r in rows)}
    if fmt == "markdown":
        lines = ["| " + " | ".join(heads) + " |",
                 "|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
        return "\n".join(lines)
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}: text, markdown or csv")
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(heads)]

    def line(cells):
        return "  ".join(c.rjust(w) if col in numeric else c.ljust(w)
                         for c, w, col in zip(cells, widths, cols)).rstrip()

    return "\n".join([line(heads)] + [line(row) for row in table])


def cmd_compare(args) -> int:
    try:
        rows = compare_runs(args.tracking_uri, args.experiment, sort_by=args.sort)
    except ValueError as exc:
        print(f"dbl-scale compare: {exc}", file=sys.stderr)
        return 2
    out = format_runs(rows, args.format)
    print(out if out.endswith("\n") else out + "\n", end="")
    if args.format == "text":
        print(f"\n{len(rows)} runs in experiment '{args.experiment}', sorted by {args.sort} (descending); "
              f"samples/s = mean of the logged {THROUGHPUT} history")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `compare` on an argparse sub-parser set."""
    p = subparsers.add_parser("compare", help="the runs of an MLflow experiment side by side",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="any MLflow tracking URI")
    p.add_argument("--sort", default="test/rsum", help="metric (as logged) or column to sort by, descending")
    p.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    p.set_defaults(func=cmd_compare)
    return p
