"""`dbl-scale bench methods`: every method trained on the same data with the same steps,
batch and towers, evaluated with the same protocol, logged to one MLflow experiment, and
tabulated (text and markdown).

Methods that need a trained checkpoint (offline DBL anchor, distillation and structure
teachers, AOQ's mining model, and the baseline continued from it) use the triplet run of
the same table; their rows say so, since that checkpoint's steps come on top.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ...config import load_config, resolve_config
from ...evaluation import RECALL_KEYS, chance_metrics, format_table
from ..data import prepare_data
from ..launch import config_args, run_ranks
from ..train import MODULE as TRAIN

# (row, overrides, what it starts from); "{ckpt}" is the folder of the table's triplet run
METHODS = [
    ("triplet (VSE++)", ["loss.method=triplet"], "scratch"),
    ("InfoNCE", ["loss.method=infonce"], "scratch"),
    ("DBL momentum", ["loss.method=dbl", "loss.dbl.scenario=momentum"], "scratch"),
    ("DBL online K=2", ["loss.method=dbl", "loss.dbl.scenario=online", "loss.dbl.branches=2"], "scratch"),
    ("mutual learning", ["loss.method=mutual"], "scratch"),
    ("CODER", ["loss.method=coder"], "scratch"),
    ("distillation", ["loss.method=distill", "loss.distill.teacher={ckpt}"], "scratch, triplet teacher"),
    ("structure distillation", ["loss.method=structure", "loss.structure.teacher={ckpt}"],
     "scratch, triplet teacher"),
    ("triplet, continued", ["loss.method=triplet", "train.init_from={ckpt}"], "triplet checkpoint"),
    ("DBL offline", ["loss.method=dbl", "loss.dbl.scenario=offline", "loss.dbl.anchor={ckpt}"],
     "triplet checkpoint"),
    ("AOQ", ["loss.method=aoq", "train.init_from={ckpt}"], "triplet checkpoint, mined with it"),
]


def run_table(config: str, nproc: int, tracking_uri: str, experiment: str, overrides: list[str],
              only: list[str] | None = None) -> dict[str, dict]:
    cfg = load_config(resolve_config(config), overrides)
    sizes = prepare_data(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}"] + overrides
    results: dict[str, dict] = {}
    ckpt = None
    for row, method_overrides, start in METHODS:
        if only and row not in only and not (row.startswith("triplet (") and ckpt is None):
            continue
        run_name = f"table-{row.split(' ')[0].lower()}-{len(results)}-{stamp}"
        run_overrides = common + [o.format(ckpt=ckpt) for o in method_overrides] + [f"tracking.run_name={run_name}"]
        print(f"\n=== {row}: {cfg.train.steps} steps, {nproc} ranks x batch {cfg.data.batch_size} ===", flush=True)
        t0 = time.time()
        rc = run_ranks(nproc, TRAIN, config_args(resolve_config(config), run_overrides))
        if rc != 0:
            raise RuntimeError(f"{row} failed with exit code {rc}")
        run_dir = Path(cfg.train.output_dir) / run_name
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics.update(start=start, seconds=time.time() - t0, run=run_name)
        results[row] = metrics
        if ckpt is None:
            ckpt = str(run_dir)
    n_test = sizes[cfg.data.eval_split]["samples"]
    results["chance"] = dict(chance_metrics(n_test), start="", seconds=0.0, run="")
    return results


def markdown(results: dict[str, dict]) -> str:
    lines = ["| method | starts from | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | rSum | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row, m in results.items():
        cells = " | ".join(f"{m[k]:.1f}" for k in RECALL_KEYS)
        lines.append(f"| {row} | {m['start']} | {cells} | {m['seconds']:.0f} |")
    return "\n".join(lines)


def cmd_bench_methods(args) -> int:
    results = run_table(args.config, args.nproc, args.tracking_uri, args.experiment, args.overrides, args.only)
    print("\n" + format_table(results))
    print("\n" + markdown(results))
    if args.markdown:
        Path(args.markdown).write_text(markdown(results) + "\n")
    return 0


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("methods", help="train every method on the same data, steps and towers; tabulate")
    p.add_argument("--config", default="demo")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="dbl_scale_methods")
    p.add_argument("--only", nargs="*", help="rows to run (the triplet run always runs first when needed)")
    p.add_argument("--markdown", help="also write the markdown table to this file")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_bench_methods)

