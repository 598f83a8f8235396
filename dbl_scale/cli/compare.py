"""`dbl-scale compare`: the runs of one MLflow experiment side by side, best first, read-only
(`DESCRIPTION`, the --help text, says what each row and the figure hold)."""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..config import default_tracking_uri
from .checks import CommandError, no_experiment, sqlite_experiment, sqlite_store

DESCRIPTION = """`dbl-scale compare`: the runs of one MLflow experiment side by side, best first. It reads
only: the runs' tags, parameters and metrics stay as they were, and an `sqlite:///` store that
is not there is an error, never a new empty store.

One row per run: its name, method, the parameters that differ between runs (those every run
shares are named once under the table), final retrieval metrics of its evaluation split
(`test/...`, or whatever split prefix the run logged, e.g. `val/...`), training throughput
(`samples_per_s`: the mean over its logged history, each value being the rate over one
logging interval, warm-up included), the last step it logged, and its status. Works with any
tracking URI (sqlite:///..., http://...).

`--register NAME` registers the best run's MLflow model (its target, logged at its end) as a
new version of NAME: `mlflow.pyfunc.load_model("models:/NAME/<version>")` then embeds images
and captions.

`--plot OUT.png` also draws the runs into one figure (a file; nothing is logged): recall@K
curves of both directions (from each run's per-query ranks), the matching loss over steps on
a log axis (the term every method shares, so methods compare; DBL's boost term dashed beside
it), and validation rSum (or a note that no run validated). Runs that differ only in their
seed (or in per-seed paths such as a checkpoint they start from) form one setting, drawn as
the mean with a band of one standard deviation.
"""  # the --help text

PARAMS = {"scenario": "loss.dbl.scenario", "train_steps": "train.steps", "batch_size": "data.batch_size",
          "lr": "optim.lr", "deepspeed": "train.deepspeed"}
SPLITS = ("test", "val")  # preferred evaluation split prefixes, in order
THROUGHPUT = "samples_per_s"
CSV_DIGITS = 4  # CSV floats are rounded to this many decimals

# column key -> header (text and markdown); CSV uses the keys. Metric keys get theirs from `_head`.
_HEADS = {"run": "run", "method": "method", "scenario": "scenario", "steps": "steps", "train_steps": "train.steps",
          "batch_size": "batch", "lr": "lr", "deepspeed": "deepspeed", "split": "split",
          "samples_per_s": "samples/s", "status": "status"}
_DIRECTIONS = {"i2t": "I2T", "t2i": "T2I", "t2t": "T2T", "i2i": "I2I"}


def _head(key: str) -> str:
    """A column's header, unambiguous on its own (pasted tables keep it): `i2t_r5` -> "I2T R@5"."""
    if key in _HEADS:
        return _HEADS[key]
    if key == "rsum":
        return "rSum"
    m = re.fullmatch(r"(i2t|t2i|t2t|i2i)_(r(\d+)|medr|meanr|tied|queries)", key)
    if m:
        return f"{_DIRECTIONS[m.group(1)]} {'R@' + m.group(3) if m.group(3) else m.group(2)}"
    return key


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
        raise no_experiment(name, tracking_uri, [e.name for e in client.search_experiments()])
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
    sqlite_store(tracking_uri)  # a mistyped store or experiment is told before the heavy imports
    sqlite_experiment(tracking_uri, experiment)
    from mlflow.tracking import MlflowClient  # heavy (seconds): imported when used

    from ..evaluation import RECALL_KEYS, SINGLE_MODAL_KEYS

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    keys = tuple(metrics) if metrics else RECALL_KEYS + SINGLE_MODAL_KEYS
    rows = []
    for run in _search_all(client, exp.experiment_id):
        params, tags, latest = run.data.params, run.data.tags, run.data.metrics
        if tags.get("dbl_scale.comparison"):
            continue  # a figure's run, as `--plot` logged them before it became read-only
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


FIXED = ("run", "method", "scenario", "steps", "batch_size", "lr", "deepspeed", "split")
SHARED = ("batch_size", "lr", "deepspeed", "split", "status")  # named once under the table when every run agrees


def _columns(rows: Sequence[dict], trim: bool) -> tuple[list[str], dict]:
    """The table's columns, and with `trim` the values every run shares (named under the table
    instead). Metrics are the cross-modal ones, rSum and the single-modal R@1 (all are in CSV)."""
    from ..evaluation import SINGLE_MODAL_KEYS

    shared = {c: rows[0].get(c) for c in SHARED if trim and rows and len({str(r.get(c)) for r in rows}) == 1}
    metric_cols = [k for k in (rows[0] if rows else {}) if k not in FIXED + ("train_steps", "samples_per_s", "status",
                                                                             "run_id")
                   and (k not in SINGLE_MODAL_KEYS or (k.endswith("_r1") and any(r.get(k) is not None for r in rows)))]
    cols = [c for c in FIXED if c not in shared and (c != "scenario" or any(r.get("scenario") for r in rows))]
    return cols + metric_cols + ["samples_per_s"] + [c for c in ("status",) if c not in shared], shared


def _cell(key: str, row: dict) -> str:
    v = row.get(key)
    if key == "steps" and v is not None and row.get("train_steps") not in (None, str(v)):
        return f"{v}/{row['train_steps']}"  # an unfinished run: its last step of its planned steps
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if key != "lr" else f"{v:g}"
    return str(v)


def _csv_value(v):
    if v is None:
        return ""
    return round(v, CSV_DIGITS) if isinstance(v, float) else v


def format_runs(rows: Sequence[dict], fmt: str = "text") -> str:
    """Rows of `compare_runs` as an aligned text table (the columns that tell runs apart; what
    all share is one line under it), a Markdown table (a table only, to paste), or CSV (every
    key, floats rounded to `CSV_DIGITS` decimals)."""
    if fmt == "csv":
        keys = list(rows[0]) if rows else ["run"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in keys})
        return buf.getvalue()
    if fmt not in ("text", "markdown"):
        raise ValueError(f"unknown format {fmt!r}: text, markdown or csv")
    cols, shared = _columns(rows, trim=fmt == "text")
    heads = [_head(c) for c in cols]
    table = [[_cell(c, r) for c in cols] for r in rows]
    numeric = {c for c in cols if any(isinstance(r.get(c), (int, float)) for r in rows)}
    note = ("every run: " + ", ".join(f"{_head(c)} {_cell(c, rows[0])}" for c in shared)) if shared else ""
    if fmt == "markdown":
        lines = ["| " + " | ".join(heads) + " |",
                 "|" + "|".join("---:" if c in numeric else "---" for c in cols) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(heads)]

    def line(cells):
        return "  ".join(c.rjust(w) if col in numeric else c.ljust(w)
                         for c, w, col in zip(cells, widths, cols)).rstrip()

    return "\n".join([line(heads)] + [line(row) for row in table] + ([note] if note else []))


# parameters that differ between the seeds of one setting, not between settings
PER_SEED = ("train.seed", "tracking.run_name", "tracking.uri", "tracking.experiment", "train.output_dir",
            "train.init_from", "loss.dbl.anchor", "loss.distill.teacher", "loss.structure.teacher",
            "loss.aoq.candidates")
MATCHING, BOOST, VAL = "loss/raw", "loss/boost", "val/rsum"  # the triplet term every triplet-based method logs


def _settings(runs: list) -> dict[str, list]:
    """Runs grouped by setting (their parameters less the per-seed ones), each group named by
    the parameters that tell it from the others (its method alone where nothing else differs)
    and by its run's name, or its number of seeds."""
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
        which = (members[0].info.run_name or members[0].info.run_id) if len(members) == 1 else f"{len(members)} seeds"
        named[", ".join(parts) + f" ({which})"] = members
    return named


def _band(ax, x, ys: list, label: str, **style):
    import numpy as np

    ys = np.asarray(ys, dtype=float)
    mean = ys.mean(axis=0)
    line, = ax.plot(x, mean, label=label, marker="o" if len(mean) < 3 else None, **style)
    if len(ys) > 1:
        std = ys.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    return line


def _history(client, runs: list, key: str) -> tuple[list, list]:
    """The steps every run logged `key` at, and each run's values there."""
    histories = [{m.step: m.value for m in client.get_metric_history(r.info.run_id, key)} for r in runs]
    steps = sorted(set.intersection(*(set(h) for h in histories))) if histories else []
    return steps, [[h[s] for s in steps] for h in histories]


def _note(ax, text: str) -> None:
    """An empty panel says why it is empty instead of showing bare 0-1 axes."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def collect_curves(tracking_uri: str, experiment: str, run_ids: Optional[Sequence[str]] = None,
                   split: str = "test", max_k: int = 50) -> tuple[list[str], dict[str, dict]]:
    """The training runs of `experiment` (or those in `run_ids`), read only: their names, and
    per setting the curves to draw as (x, [y per seed]): "i2t" and "t2i" recall@K from each
    run's logged ranks, the matching loss ("loss/raw", the term every triplet-based method
    logs; "loss" where a run has none), "loss/boost" (DBL's) and "val/rsum", each where logged."""
    import numpy as np
    from mlflow.tracking import MlflowClient  # heavy (seconds): imported when used

    from ..evaluation.report import recall_curve

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's ranks: noise
    sqlite_store(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _experiment(client, experiment, tracking_uri)
    runs = [r for r in _search_all(client, exp.experiment_id)
            if THROUGHPUT in r.data.metrics and (run_ids is None or r.info.run_id in run_ids)]
    if not runs:
        raise ValueError(f"no training runs to plot in experiment {experiment!r}")
    loss_key = MATCHING if all(MATCHING in r.data.metrics for r in runs) else "loss"
    curves: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:  # downloads go here, never into the runs
        for label, members in _settings(runs).items():
            curves[label] = {}
            recalls = {"i2t": [], "t2i": []}
            for run in members:
                try:
                    path = client.download_artifacts(run.info.run_id, f"reports/{split}_ranks.npz", tmp)
                except Exception:  # noqa: BLE001 - a run without ranks (no final evaluation) has no curve
                    continue
                with np.load(path) as ranks:
                    for d in recalls:
                        recalls[d].append(recall_curve(ranks[d], max_k))
            for d, ys in recalls.items():
                if ys:
                    curves[label][d] = (np.arange(1, len(ys[0]) + 1), ys)
            for key in (loss_key, BOOST, VAL):
                steps, values = _history(client, members, key)
                if steps:
                    curves[label][key] = (steps, values)
    return [r.info.run_name or r.info.run_id for r in runs], curves


def draw_curves(curves: dict[str, dict], title: str, out: str | Path, split: str = "test"):
    """One figure of `collect_curves`' curves, written to the PNG `out`: recall@K of both
    directions, the matching loss on a log axis (the boost term dashed in its colour), and
    validation rSum; a panel with nothing to draw says so. Returns the figure."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (seconds): when a figure is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8.5), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    (i2t_ax, t2i_ax), (loss_ax, val_ax) = axes
    loss_key = MATCHING if any(MATCHING in c for c in curves.values()) else "loss"
    for label, c in curves.items():
        for ax, d in ((i2t_ax, "i2t"), (t2i_ax, "t2i")):
            if d in c:
                _band(ax, *c[d], label)
        if loss_key in c:
            line = _band(loss_ax, *c[loss_key], label)
            if BOOST in c:
                _band(loss_ax, *c[BOOST], f"{label}: boost term", linestyle="--", color=line.get_color())
        if VAL in c:
            _band(val_ax, *c[VAL], label)
    for ax, d in ((i2t_ax, "image to text"), (t2i_ax, "text to image")):
        ax.set_title(f"{d}: recall@K on {split} (%)")
        if ax.lines:
            ax.set_xscale("log")
            ax.set_xlabel("K")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        else:
            _note(ax, f"no run logged its {split} ranks (reports/{split}_ranks.npz)")
    boosted = any(BOOST in c for c in curves.values())
    loss_ax.set_title(("matching loss (the triplet term)" if loss_key == MATCHING else "training loss")
                      + ("; DBL's boost term dashed" if boosted else ""))
    if loss_ax.lines:
        loss_ax.set_xlabel("step")
        if all(np.all(np.asarray(line.get_ydata()) > 0) for line in loss_ax.lines):
            loss_ax.set_yscale("log")
            loss_ax.set_ylabel("log scale")
        loss_ax.grid(alpha=0.3, which="both")
        loss_ax.legend(fontsize=7, loc="upper right")
    else:
        _note(loss_ax, "no training loss logged")
    val_ax.set_title("validation rSum")
    if val_ax.lines:
        val_ax.set_xlabel("step")
        val_ax.grid(alpha=0.3)
        val_ax.legend(fontsize=7, loc="lower right")
    else:
        _note(val_ax, "no validation logged\n(train with eval.every=N to draw it)")
    fig.suptitle(textwrap.shorten(title, 170, placeholder=" ...") + "\nbands: one standard deviation over seeds",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return fig


def plot_runs(tracking_uri: str, experiment: str, out: str | Path, run_ids: Optional[Sequence[str]] = None,
              split: str = "test", max_k: int = 50) -> dict[str, dict]:
    """Draw the training runs of `experiment` (or those in `run_ids`) into one PNG at `out`.
    Reads only. Returns, per setting, the mean of each curve drawn (keys as `collect_curves`)."""
    import numpy as np

    names, curves = collect_curves(tracking_uri, experiment, run_ids, split, max_k)
    draw_curves(curves, f"{experiment}: {', '.join(names)}", out, split)
    return {label: {k: np.mean(ys, axis=0) for k, (_, ys) in c.items()} for label, c in curves.items()}


def cmd_compare(args) -> int:
    try:
        rows = compare_runs(args.tracking_uri, args.experiment, sort_by=args.sort)
        drawn = plot_runs(args.tracking_uri, args.experiment, args.plot) if args.plot else None
    except (ValueError, CommandError) as exc:
        print(f"dbl-scale compare: {exc}", file=sys.stderr)
        return 2
    out = format_runs(rows, args.format)
    print(out if out.endswith("\n") else out + "\n", end="")
    if args.format == "text":
        print(f"\n{len(rows)} runs in experiment '{args.experiment}', sorted by {args.sort} (descending); "
              f"samples/s = mean of the logged {THROUGHPUT} history")
    if drawn is not None:
        print(f"figure of {len(drawn)} setting(s) in {args.plot}", file=sys.stderr)
    if args.register:
        best = next((r for r in rows if r.get(args.sort.rsplit("/", 1)[-1]) is not None), None)
        if best is None:
            raise ValueError(f"no run has {args.sort}: nothing to register")
        print(f"registered {best['run']} (best by {args.sort}) as {register_run(args.tracking_uri, best['run_id'], args.register)}")
    return 0


def register_run(tracking_uri: str, run_id: str, name: str) -> str:
    """Register a run's MLflow model under `name` (a new version); a run that logged none
    (`tracking.log_model=false`) is exported from its folder and logged first."""
    import mlflow  # heavy (seconds): only when registering
    from mlflow.tracking import MlflowClient

    from ..export import export, log_model

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


EXAMPLES = """examples:
  dbl-scale compare --experiment dbl_scale_demo
  dbl-scale compare --experiment dbl_scale_demo --sort test/rsum --format markdown
  dbl-scale compare --experiment dbl_scale_demo --plot demo.png
  dbl-scale compare --experiment dbl_scale_demo --register demo-best"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `compare` on an argparse sub-parser set."""
    p = subparsers.add_parser("compare", help="the runs of an MLflow experiment side by side (reads only)",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True, help="MLflow experiment name (make demo writes dbl_scale_demo)")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="any MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--sort", default="test/rsum", help="metric (as logged) or column to sort by, descending")
    p.add_argument("--format", choices=("text", "markdown", "csv"), default="text",
                   help="text and markdown: the columns that tell runs apart; csv: every value")
    p.add_argument("--plot", metavar="OUT.png", help="also draw recall@K, matching loss and validation curves "
                                                     "into this PNG (a file only: nothing is logged)")
    p.add_argument("--register", metavar="NAME", help="register the best run's MLflow model (by --sort) as NAME")
    p.set_defaults(func=cmd_compare)
    return p
