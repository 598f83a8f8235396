"""`dbl-scale demo`: build ShapesCaptions, train the triplet baseline and DBL on 2 CPU ranks,
and print both next to chance and the oracle ceiling, with the runs in MLflow."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from data_tools.shapes_captions import oracle_rsum, read_split_jsons

from ..config import default_tracking_uri, load_config, resolve_config
from ..evaluation import chance_metrics, format_table
from .data import prepare_data
from .launch import config_args, run_ranks
from .train import MODULE as TRAIN


def cmd_demo(args) -> int:
    import mlflow  # heavy (seconds): only to count the runs at the end

    config = resolve_config(args.config)
    overrides = [f"tracking.uri={args.tracking_uri}", f"tracking.experiment={args.experiment}"] + args.overrides
    cfg = load_config(config, overrides)
    t0 = time.time()
    sizes = prepare_data(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for method in ("triplet", "dbl"):
        run_name = f"demo-{method}-{stamp}"
        print(f"\n=== {method}: {cfg.train.steps} steps on {args.nproc} CPU ranks "
              f"({cfg.train.deepspeed}) ===", flush=True)
        run_overrides = overrides + [f"loss.method={method}", f"tracking.run_name={run_name}"]
        rc = run_ranks(args.nproc, TRAIN, config_args(config, run_overrides))
        if rc != 0:
            print(f"training {method} failed with exit code {rc}", file=sys.stderr)
            return rc
        results[method] = json.loads((Path(cfg.train.output_dir) / run_name / "metrics.json").read_text())

    mlflow.set_tracking_uri(args.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[args.experiment],
                              filter_string=f"tags.mlflow.runName LIKE 'demo-%-{stamp}'")
    n_test = sizes[cfg.data.eval_split]["samples"]
    rows = {"triplet (VSE++)": results["triplet"], "DBL (momentum)": results["dbl"],
            "chance": chance_metrics(n_test)}
    if sizes.get("generator", "").startswith("shapes_captions"):
        rows["oracle ceiling"] = {"rsum": oracle_rsum(read_split_jsons(cfg.data.root, cfg.data.eval_split))}
    print(f"\nShapesCaptions {cfg.data.eval_split} split: {n_test} images x 5 captions; "
          f"{cfg.train.steps} steps each, {args.nproc} ranks x batch {cfg.data.batch_size}")
    print(format_table(rows))
    print(f"\nMLflow: {len(runs)} runs in experiment '{args.experiment}' at {args.tracking_uri} "
          f"(browse: mlflow ui --backend-store-uri {args.tracking_uri})")
    print(f"demo wall time: {time.time() - t0:.0f}s")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train triplet and DBL on ShapesCaptions (2 CPU ranks) and compare")
    p.add_argument("--config", default="demo", help="preset name or YAML path (default: demo)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="any MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="dbl_scale_demo")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)
