"""`python -m benchmarks.methods`: every method trained on the same data with the same steps,
batch and towers, evaluated with the same protocol, over several seeds, logged to one MLflow
experiment, and tabulated against a stated yardstick.

    python -m benchmarks.methods --seeds 3 --out runs/bench_methods
    python -m benchmarks.methods --seeds 3 --only "DBL momentum" --vary loss.dbl.momentum_init_left=0.2,0.5,0.8

Every row names its yardstick: the rows it is compared with, seed by seed (the paired
difference of rSum, with a 95% interval over seeds from Student's t). Methods that need a
trained checkpoint (offline DBL anchor, distillation and structure teachers, AOQ's mining
model, and the baseline continued from it) start from the triplet run of the same seed;
their extra steps come on top of that checkpoint's, which is why DBL offline is compared
both with its starting checkpoint and with the triplet continued for as many steps.
Validation every `--val-every` steps keeps the best model on val; the table reports the
final model and that best one. `--out` gets table.md, results.json and curves.png (the
`dbl-scale compare --plot` figure of these runs).

A table of many long runs survives interruptions: results.json is rewritten after every
run, and the same command with the same `--out` keeps the finished runs, continues a run left
half-done from its newest checkpoint (pass `checkpoint.every=N` to have one), and runs what is
missing; more seeds or more --vary values can be added that way, and rows left out of a later
invocation (a narrower --only or --vary) keep their runs in the table. Other settings are refused.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dbl_scale.config import default_tracking_uri, load_config, resolve_config
from dbl_scale.data import eval_root, split_shards
from dbl_scale.evaluation import RECALL_HEADS, RECALL_KEYS, SINGLE_MODAL_KEYS, chance_metrics, format_table
from dbl_scale.shards import write_json_atomic
from dbl_scale.cli.compare import plot_runs
from dbl_scale.cli.data import prepare_data
from dbl_scale.cli.launch import config_args, run_ranks
from dbl_scale.cli.seeds import mean_std, paired_interval
from dbl_scale.cli.train import MODULE as TRAIN

BASE = "triplet (VSE++)"
CONTINUED = "triplet, continued"


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]  # "{ckpt}": the folder of the same seed's triplet run
    start: str
    yardsticks: tuple[str, ...] = ()  # rows it is compared with, seed by seed

    @property
    def needs_checkpoint(self) -> bool:
        return any("{ckpt}" in o for o in self.overrides)


ROWS = [
    Row(BASE, ("loss.method=triplet",), "scratch"),
    Row("InfoNCE", ("loss.method=infonce",), "scratch", (BASE,)),
    Row("DBL momentum", ("loss.method=dbl", "loss.dbl.scenario=momentum"), "scratch", (BASE,)),
    Row("DBL online K=2", ("loss.method=dbl", "loss.dbl.scenario=online", "loss.dbl.branches=2"), "scratch",
        ("mutual learning", BASE)),  # mutual learning: two branches, the same compute
    Row("mutual learning", ("loss.method=mutual",), "scratch", (BASE,)),
    Row("CODER", ("loss.method=coder",), "scratch", ("CODER, no concept branch", BASE)),
    Row("CODER, no concept branch", ("loss.method=coder", "loss.coder.concept_weight=0"), "scratch",
        ("InfoNCE, CODER's queues", BASE)),  # DCL alone
    Row("InfoNCE, CODER's queues", ("loss.method=coder", "loss.coder.concept_weight=0", "loss.coder.beta=0"),
        "scratch", ("InfoNCE", BASE)),  # uniform weights: the same key encoders and queues, no diversity weighting
    Row("distillation", ("loss.method=distill", "loss.distill.teacher={ckpt}"), "scratch, triplet teacher", (BASE,)),
    Row("structure distillation", ("loss.method=structure", "loss.structure.teacher={ckpt}"),
        "scratch, triplet teacher", (BASE,)),
    Row(CONTINUED, ("loss.method=triplet", "train.init_from={ckpt}"), "triplet checkpoint", (BASE,)),
    Row("DBL offline", ("loss.method=dbl", "loss.dbl.scenario=offline", "loss.dbl.anchor={ckpt}"),
        "triplet checkpoint", (BASE, CONTINUED)),
    Row("AOQ", ("loss.method=aoq", "train.init_from={ckpt}"), "triplet checkpoint, mined with it", (CONTINUED,)),
]

def select_rows(only: Optional[list[str]] = None, vary: Optional[str] = None) -> list[Row]:
    """The rows to run, in table order: `only` (all rows when None) with every yardstick they
    name, and the checkpoint row for rows that start from it; `vary` ("key=v1,v2") turns each
    row of `only` into one row per value."""
    known = {r.name: r for r in ROWS}
    unknown = sorted(set(only or []) - set(known))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; rows: {', '.join(known)}")
    if vary and not only:
        raise ValueError("--vary needs --only: the rows whose setting varies")
    chosen, todo = set(), list(only or known)
    while todo:  # the rows named, their yardsticks, theirs in turn, and the checkpoint row where needed
        name = todo.pop()
        if name not in chosen:
            chosen.add(name)
            todo += list(known[name].yardsticks) + ([BASE] if known[name].needs_checkpoint else [])
    rows = []
    for row in ROWS:
        if row.name not in chosen:
            continue
        if vary and row.name in (only or []):
            key, values = vary.split("=", 1)
            rows += [Row(f"{row.name} [{key.rsplit('.', 1)[-1]}={v}]", row.overrides + (f"{key}={v}",), row.start,
                         row.yardsticks) for v in values.split(",")]
        else:
            rows.append(row)
    return rows


def table_settings(config: str, nproc: int, overrides: list[str], val_every: int,
                   from_checkpoint: tuple[str, ...]) -> dict:
    """What makes two invocations the same table (rows and seeds may grow between them)."""
    return {"config": config, "nproc": nproc, "overrides": list(overrides), "val_every": val_every,
            "from_checkpoint": list(from_checkpoint)}


def load_saved(out: Path, settings: dict) -> dict:
    """The `results.json` an earlier invocation left in `out` ({} if none), refused when it was
    run with other settings: its runs would not be comparable with new ones."""
    path = out / "results.json"
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        differ = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
        raise ValueError(f"{path} is a table run with other settings ({', '.join(differ)}): pass another "
                         f"--out for a new table, or the same settings to resume that one")
    return saved


def save_results(out: Path, stamp: str, settings: dict, results: dict[str, dict]) -> None:
    """`results.json`, rewritten atomically after every run so that an interrupted table resumes."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / "results.json"), {
        "stamp": stamp, "settings": settings,
        "rows": {name: {"row": vars(e["row"]), "runs": e["runs"]} for name, e in results.items()}})


def finished_run(run_dir: Path, seed: int, seconds: float) -> dict:
    best = run_dir / "best_metrics.json"
    return {"seed": seed, "final": json.loads((run_dir / "metrics.json").read_text()),
            "best": json.loads(best.read_text()) if best.exists() else None,
            "seconds": seconds, "run": run_dir.name, "dir": str(run_dir),
            "run_id": json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]}


def run_table(config: str, nproc: int, tracking_uri: str, experiment: str, overrides: list[str],
              rows: list[Row], seeds: int, val_every: int, out: Path,
              from_checkpoint: tuple[str, ...] = ()) -> dict[str, dict]:
    """Train every row at seeds 0..seeds-1 (`from_checkpoint`: extra overrides of the rows that
    start from the triplet checkpoint), saving `out/results.json` after each run. When `out`
    already holds a table with the same settings, its finished runs are kept and an interrupted
    run continues from its newest checkpoint (`checkpoint.resume=latest`, same run name).
    Returns {row: {"row": Row, "runs": [per seed: {"seed", "final": metrics, "best": metrics or
    None, "seconds", "run", "dir", "run_id"}]}}."""
    cfg = load_config(resolve_config(config), overrides)
    prepare_data(cfg)
    settings = table_settings(config, nproc, overrides, val_every, from_checkpoint)
    saved = load_saved(out, settings)
    stamp = saved.get("stamp") or time.strftime("%Y%m%d-%H%M%S")
    seconds_saved = {(name, r["seed"]): r["seconds"] for name, e in saved.get("rows", {}).items() for r in e["runs"]}
    common = [f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}"] + overrides
    if val_every:
        common.append(f"eval.every={val_every}")
    if saved:
        common.append("checkpoint.resume=latest")  # a run the last invocation left half-done
        print(f"resuming the table in {out}: {len(seconds_saved)} runs finished", flush=True)
    results = {row.name: {"row": row, "runs": []} for row in rows}
    for name, entry in saved.get("rows", {}).items():  # rows this invocation leaves out stay in the table
        if name not in results:
            r = entry["row"]
            row = Row(r["name"], tuple(r["overrides"]), r["start"], tuple(r["yardsticks"]))
            results[name] = {"row": row, "runs": entry["runs"]}
    if not saved:  # the stamp names the runs: kept even if the first one dies
        save_results(out, stamp, settings, results)
    for seed in range(seeds):
        ckpt = None
        for row in rows:
            slug = "".join(c if c.isalnum() else "-" for c in row.name.lower()).strip("-")
            run_dir = Path(cfg.train.output_dir) / f"table-{slug}-s{seed}-{stamp}"
            if (run_dir / "metrics.json").exists():
                run = finished_run(run_dir, seed, seconds_saved.get((row.name, seed), math.nan))
            else:
                extra = list(from_checkpoint) if row.start.startswith("triplet checkpoint") else []
                run_overrides = common + extra + [o.format(ckpt=ckpt) for o in row.overrides] + [
                    f"train.seed={seed}", f"tracking.run_name={run_dir.name}"]
                print(f"\n=== {row.name}, seed {seed}: {cfg.train.steps} steps, {nproc} ranks x batch "
                      f"{cfg.data.batch_size} ===", flush=True)
                t0 = time.time()
                rc = run_ranks(nproc, TRAIN, config_args(resolve_config(config), run_overrides))
                if rc != 0:
                    raise RuntimeError(f"{row.name} (seed {seed}) failed with exit code {rc}; the same command "
                                       f"with --out {out} resumes the table")
                run = finished_run(run_dir, seed, time.time() - t0)
            results[row.name]["runs"].append(run)
            save_results(out, stamp, settings, results)
            if row.name == BASE:
                ckpt = str(run_dir)
    return results


def _rsums(results: dict, name: str, which: str, key: str = "rsum") -> list[float]:
    return [r[which][key] for r in results[name]["runs"] if r[which] is not None and key in r[which]]


def _pm(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"


def _delta(results: dict, name: str, yardstick: str, which: str, key: str = "rsum") -> str:
    values, base = _rsums(results, name, which, key), _rsums(results, yardstick, which, key)
    if not values or len(values) != len(base):
        return "-"
    mean, half = paired_interval(values, base)
    ci = "" if math.isnan(half) else f" [{mean - half:+.1f}, {mean + half:+.1f}]"
    return f"{mean:+.1f}{ci}"


def markdown(results: dict[str, dict]) -> str:
    """Means over seeds of every recall, rSum as mean ± std (final and best-on-val model), and
    each row's paired rSum difference to its yardsticks with the 95% interval over seeds."""
    lines = ["| method | starts from | seeds | " + " | ".join(RECALL_HEADS[k] for k in RECALL_KEYS[:-1])
             + " | rSum final | rSum best-on-val | yardstick: Δ rSum final [95% CI] | Δ best-on-val | wall s |",
             "|---|---|---|" + "---|" * (len(RECALL_KEYS) - 1) + "---|---|---|---|---|"]
    for name, entry in results.items():
        runs, row = entry["runs"], entry["row"]
        if not runs:
            continue
        recalls = " | ".join(f"{statistics.fmean(r['final'][k] for r in runs):.1f}" for k in RECALL_KEYS[:-1])
        deltas = "; ".join(f"{y}: {_delta(results, name, y, 'final')}" for y in row.yardsticks) or "(the yardstick)"
        best_deltas = "; ".join(f"{_delta(results, name, y, 'best')}" for y in row.yardsticks) or "-"
        timed = [r["seconds"] for r in runs if not math.isnan(r["seconds"])]
        seconds = f"{statistics.fmean(timed):.0f}" if timed else "-"
        lines.append(f"| {name} | {row.start} | {len(runs)} | {recalls} | {_pm(_rsums(results, name, 'final'))} | "
                     f"{_pm(_rsums(results, name, 'best'))} | {deltas} | {best_deltas} | {seconds} |")
    return "\n".join(lines)


def single_modal_markdown(results: dict[str, dict]) -> str:
    """The final models' text-to-text and image-to-image R@1 / R@5 / R@10 (mean ± std of R@1
    over seeds) and each row's paired R@1 differences to its yardsticks with the 95% interval;
    empty when the runs have no single-modal metrics."""
    named = [(name, e) for name, e in results.items() if e["runs"] and _rsums(results, name, "final", "t2t_r1")]
    if not named:
        return ""
    keys = [k for k in SINGLE_MODAL_KEYS if any(_rsums(results, n, "final", k) for n, _ in named)]
    lines = ["| method | seeds | " + " | ".join(f"{k.split('_')[0].upper()} R@{k.split('_r')[1]}" for k in keys)
             + " | yardstick: Δ T2T R@1 [95% CI] | Δ I2I R@1 [95% CI] |",
             "|---|---|" + "---|" * len(keys) + "---|---|"]
    for name, entry in named:
        cells = [_pm(_rsums(results, name, "final", k)) if k.endswith("_r1") else
                 f"{statistics.fmean(_rsums(results, name, 'final', k)):.1f}" for k in keys]
        deltas = [("; ".join(f"{y}: {_delta(results, name, y, 'final', key)}" for y in entry["row"].yardsticks)
                   or "(the yardstick)") for key in ("t2t_r1", "i2i_r1")]
        lines.append(f"| {name} | {len(entry['runs'])} | " + " | ".join(cells) + f" | {deltas[0]} | {deltas[1]} |")
    return "\n".join(lines)


def split_only(only: Optional[list[str]], overrides: list[str]) -> tuple[Optional[list[str]], list[str]]:
    """`--only A B key=value`: argparse gives the trailing overrides to --only; a KEY=VALUE that
    names no row is an override."""
    if not only:
        return only, overrides
    known = {r.name for r in ROWS}
    moved = [x for x in only if x not in known and "=" in x and " " not in x]
    return [x for x in only if x not in moved], overrides + moved


def cmd_bench_methods(args) -> int:
    args.only, args.overrides = split_only(args.only, args.overrides)
    rows = select_rows(args.only, args.vary)
    cfg = load_config(resolve_config(args.config), args.overrides)
    out = Path(args.out or Path(cfg.train.output_dir) / f"bench_methods-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"results in {out} (the same command with --out {out} resumes it)", flush=True)
    results = run_table(args.config, args.nproc, args.tracking_uri, args.experiment, args.overrides, rows,
                        args.seeds, args.val_every, out, tuple(args.from_checkpoint.split()))
    n_test = split_shards(eval_root(cfg.data), cfg.data.eval_split)[1]
    means = {name: {k: statistics.fmean(r["final"][k] for r in e["runs"]) for k in RECALL_KEYS}
             for name, e in results.items()}
    print("\n" + format_table({**means, "chance": chance_metrics(n_test)}))
    table = markdown(results)
    single = single_modal_markdown(results)
    table += f"\n\nSingle-modal retrieval (final models):\n\n{single}" if single else ""
    print("\n" + table)
    (out / "table.md").write_text(table + "\n")
    run_ids = [r["run_id"] for e in results.values() for r in e["runs"]]
    plot_runs(args.tracking_uri, args.experiment, out / "curves.png", run_ids=run_ids)
    print(f"\ntable.md, results.json and curves.png in {out}")
    return 0


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("methods", help="train every method on the same data, steps and towers over seeds; "
                                             "tabulate against yardsticks")
    p.add_argument("--config", default="demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row (3 or more for intervals that mean much)")
    p.add_argument("--val-every", type=int, default=100, help="validation interval for the best-on-val model; 0: none")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="any MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="dbl_scale_methods")
    p.add_argument("--only", nargs="*", help="rows to run (with the rows they are compared with)")
    p.add_argument("--vary", metavar="KEY=V1,V2", help="run each --only row once per value of a config key")
    p.add_argument("--from-checkpoint", default="", metavar="'KEY=V ...'",
                   help="overrides for the rows that continue from the triplet checkpoint only, e.g. another optimiser")
    p.add_argument("--out", help="folder for table.md, results.json and curves.png; a folder that holds an "
                                 "interrupted table with the same settings resumes it")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_bench_methods)


if __name__ == "__main__":
    import benchmarks

    sys.exit(benchmarks.run(add_parser))
