"""`dbl-scale compare`: the runs of one MLflow experiment side by side, best first.

One row per run: its name, method, key parameters, final retrieval metrics of its evaluation
split (`test/...`, or whatever split prefix the run logged, e.g. `val/...`), training
throughput (`samples_per_s`: the mean over its logged history, each value being the rate
over one logging interval, warm-up included), the last step it logged, and its status.
Works with any tracking URI (sqlite:///..., http://...).

    dbl-scale compare --experiment dbl_scale_demo --sort test/rsum --format markdown

`--register NAME` registers the best run's MLflow model (its target, logged at its end) as a
new version of NAME: `mlflow.pyfunc.load_model("models:/NAME/<version>")` then embeds images
and captions.

`--plot OUT.png` also draws the runs in one figure: recall@K curves of both directions (from
each run's per-query ranks), and the training loss and validation rSum over steps. Runs that
differ only in their seed (or in per-seed paths such as a checkpoint they start from) form
one setting, drawn as the mean with a band of one standard deviation. The figure is logged to
a new run of the experiment ("compare-..."), which becomes the parent of the runs it shows.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..config import default_tracking_uri
from ..evaluation import RECALL_HEADS, RECALL_KEYS, SINGLE_MODAL_HEADS, SINGLE_MODAL_KEYS
from ..evaluation.report import recall_curve
from ..export import export, log_model

PARAMS = {"scenario": "loss.dbl.scenario", "train_steps": "train.steps", "batch_size": "data.batch_size",
          "lr": "optim.lr", "deepspeed": "train.deepspeed"}
SPLITS = ("test", "val")  # preferred evaluation split prefixes, in order
THROUGHPUT = "samples_per_s"

# column key -> header (text and markdown); CSV uses the keys
_HEADS = {"run": "run", "method": "method", "scenario": "scenario", "steps": "steps", "train_steps": "train.steps",
          "batch_size": "batch", "lr": "lr", "deepspeed": "deepspeed", "split": "split", **RECALL_HEADS,
          **SINGLE_MODAL_HEADS, "samples_per_s": "samples/s", "status": "status"}


def _eval_split(metric_names: Iterable[str], sort_by: str) -> Optional[str]:
    """The split prefix whose metrics this run reports: the sort key's own if the run has it,
    then test, then val, then any other `<prefix>/rsum`."""
    prefixes = {name.rsplit("/", 1)[0] for name in metric_names if name.endswith("/rsum")}
    wanted = [sort_by.rsplit("/", 1)[0]] if "/" in sort_by else []
    for p in wanted + list(SPLITS) + sorted(prefixes):
        if p in prefixes:
            return p
    return None


def _experiment(client, name: str, tracking_uri: str):
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(f"no experiment named {name!r} at {tracking_uri}")
    return exp


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
    metrics to read, without split prefix (default: R@1/5/10 both ways and rSum, then the
    single-modal recalls; a column no run has is left out).
    """
    from mlflow.tracking import MlflowClient  # heavy (seconds): imported when used

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    keys = tuple(metrics) if metrics else RECALL_KEYS + SINGLE_MODAL_KEYS
    rows = []
    for run in _search_all(client, exp.experiment_id):
        params, tags, latest = run.data.params, run.data.tags, run.data.metrics
        if tags.get("dbl_scale.comparison"):
            continue  # a figure's run (`--plot`), not a run to compare
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
            last = "rsum" if "rsum" in keys else keys[-1]
            steps += [m.step for m in client.get_metric_history(run.info.run_id, f"{split}/{last}")]
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
    metric_cols = [k for k in (rows[0] if rows else {}) if k not in fixed + tail + ["run_id"]
                   and (k not in SINGLE_MODAL_KEYS or any(r.get(k) is not None for r in rows))]
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


# parameters that differ between the seeds of one setting, not between settings
PER_SEED = ("train.seed", "tracking.run_name", "tracking.uri", "tracking.experiment", "train.output_dir",
            "train.init_from", "loss.dbl.anchor", "loss.distill.teacher", "loss.structure.teacher",
            "loss.aoq.candidates")
CURVES = (("loss", "training loss"), ("val/rsum", "validation rSum"))


def _settings(runs: list) -> dict[str, list]:
    """Runs grouped by setting (their parameters less the per-seed ones), each group named by
    the parameters that tell it from the others (its method alone where nothing else differs)."""
    groups: dict[tuple, list] = {}
    for run in runs:
        key = tuple(sorted((k, v) for k, v in run.data.params.items() if k not in PER_SEED))
        groups.setdefault(key, []).append(run)
    varying = sorted({k for key in groups for k, v in key
                      if len({dict(other).get(k) for other in groups}) > 1} - {"loss.method"})
    named = {}
    for key, members in groups.items():
        params = dict(key)
        parts = [params.get("loss.method", "?")] + [f"{k.rsplit('.', 1)[-1]}={params.get(k)}" for k in varying[:4]]
        named[", ".join(parts) + f" ({len(members)} seed{'s' * (len(members) > 1)})"] = members
    return named


def _band(ax, x, ys: list, label: str) -> None:
    ys = np.asarray(ys, dtype=float)
    mean = ys.mean(axis=0)
    line, = ax.plot(x, mean, label=label, marker="o" if len(mean) < 3 else None)
    if len(ys) > 1:
        std = ys.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def plot_runs(tracking_uri: str, experiment: str, out: str | Path, run_ids: Optional[Sequence[str]] = None,
              split: str = "test", max_k: int = 50, log: bool = True) -> dict[str, dict]:
    """Draw the training runs of `experiment` (or those in `run_ids`) into one PNG at `out`, and
    log it to a new parent run of them (`log`). Returns, per setting, the mean curves drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (seconds): when a figure is drawn
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient  # heavy (seconds): imported when used

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's ranks: noise
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    runs = [r for r in _search_all(client, exp.experiment_id)
            if THROUGHPUT in r.data.metrics and (run_ids is None or r.info.run_id in run_ids)]
    if not runs:
        raise ValueError(f"no training runs to plot in experiment {experiment!r}")
    fig = Figure(figsize=(12, 8.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    drawn: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, members in _settings(runs).items():
            drawn[label] = {}
            curves = {"i2t": [], "t2i": []}
            for run in members:
                try:
                    path = client.download_artifacts(run.info.run_id, f"reports/{split}_ranks.npz", tmp)
                except Exception:  # noqa: BLE001 - a run without ranks (no final evaluation) has no curve
                    continue
                with np.load(path) as ranks:
                    for d in curves:
                        curves[d].append(recall_curve(ranks[d], max_k))
            for ax, d in zip(axes[0], ("i2t", "t2i")):
                if curves[d]:
                    k = np.arange(1, len(curves[d][0]) + 1)
                    _band(ax, k, curves[d], label)
                    drawn[label][d] = np.mean(curves[d], axis=0)
            for ax, (key, _) in zip(axes[1], CURVES):
                histories = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, key)} for r in members]
                steps = sorted(set.intersection(*(set(h) for h in histories)))
                if steps:
                    _band(ax, steps, [[h[s] for s in steps] for h in histories], label)
                    drawn[label][key] = np.mean([[h[s] for s in steps] for h in histories], axis=0)
    titles = (f"image to text, recall@K on {split} (%)", f"text to image, recall@K on {split} (%)") + tuple(
        t for _, t in CURVES)
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.set_xscale("log")
        ax.set_xlabel("K")
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{experiment}: {len(runs)} runs; bands: one standard deviation over seeds")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    if log:
        parent = client.create_run(exp.experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={"dbl_scale.comparison": "true"})
        client.log_artifact(parent.info.run_id, str(out))
        client.set_terminated(parent.info.run_id, "FINISHED")
        for run in runs:
            client.set_tag(run.info.run_id, "mlflow.parentRunId", parent.info.run_id)
    return drawn


def cmd_compare(args) -> int:
    try:
        rows = compare_runs(args.tracking_uri, args.experiment, sort_by=args.sort)
        drawn = plot_runs(args.tracking_uri, args.experiment, args.plot) if args.plot else None
    except ValueError as exc:
        print(f"dbl-scale compare: {exc}", file=sys.stderr)
        return 2
    out = format_runs(rows, args.format)
    print(out if out.endswith("\n") else out + "\n", end="")
    if args.format == "text":
        print(f"\n{len(rows)} runs in experiment '{args.experiment}', sorted by {args.sort} (descending); "
              f"samples/s = mean of the logged {THROUGHPUT} history")
    if drawn is not None:
        print(f"figure of {len(drawn)} setting(s) in {args.plot}, logged to MLflow as their parent run",
              file=sys.stderr)
    if args.register:
        best = next((r for r in rows if r.get(args.sort.rsplit("/", 1)[-1]) is not None), None)
        if best is None:
            print(f"dbl-scale compare: no run has {args.sort}: nothing to register", file=sys.stderr)
            return 2
        print(f"registered {best['run']} (best by {args.sort}) as {register_run(args.tracking_uri, best['run_id'], args.register)}")
    return 0


def register_run(tracking_uri: str, run_id: str, name: str) -> str:
    """Register a run's MLflow model under `name` (a new version); a run that logged none
    (`tracking.log_model=false`) is exported from its folder and logged first."""
    import mlflow  # heavy (seconds): only when registering
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    run = MlflowClient(tracking_uri).get_run(run_id)
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}'")
    if found:
        version = mlflow.register_model(f"models:/{found[-1].model_id}", name)
        return f"models:/{name}/{version.version}"
    run_dir = run.data.tags.get("run_dir")
    if not run_dir or not Path(run_dir).is_dir():
        raise ValueError(f"run {run_id} logged no model and its folder ({run_dir}) is not here: "
                         "dbl-scale export --run-dir RUN --out DIR --register NAME, where the run is")
    version = mlflow.register_model(log_model(export(run_dir, Path(run_dir) / "model"), tracking_uri, run_id), name)
    return f"models:/{name}/{version.version}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `compare` on an argparse sub-parser set."""
    p = subparsers.add_parser("compare", help="the runs of an MLflow experiment side by side",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="any MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--sort", default="test/rsum", help="metric (as logged) or column to sort by, descending")
    p.add_argument("--format", choices=("text", "markdown", "csv"), default="text")
    p.add_argument("--plot", metavar="OUT.png", help="also draw recall@K, loss and val-rSum curves of the runs")
    p.add_argument("--register", metavar="NAME", help="register the best run's MLflow model (by --sort) as NAME")
    p.set_defaults(func=cmd_compare)
    return p
