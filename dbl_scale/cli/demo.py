"""`dbl-scale demo`: build ShapesCaptions, train the triplet baseline and DBL on 2 CPU ranks,
and print both next to chance and the oracle ceiling, with the runs in MLflow; then DBL's
difference to its yardstick (the triplet, same steps, batch, towers and seed) next to the
spread of that difference over seeds, as measured for this preset and recorded in
`presets/demo_seeds.json` by `python -m benchmarks.methods` (BENCHMARKS.md)."""
from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

from ..config import default_tracking_uri
from .checks import tracking_answers
from .seeds import paired_interval
from .launch import config_args, run_ranks
from .train import MODULE as TRAIN

WIDTH = 100  # the closing lines wrap here
SEEDS_FILE = Path(__file__).resolve().parents[1] / "presets" / "demo_seeds.json"


def cmd_demo(args) -> int:
    from ..config import load_config, resolve_config

    config = resolve_config(args.config)
    overrides = [f"tracking.uri={args.tracking_uri}", f"tracking.experiment={args.experiment}"] + args.overrides
    cfg = load_config(config, overrides)  # a config error before any heavy import
    import mlflow  # heavy (seconds)

    from data_tools.shapes_captions import oracle_rsum, read_split_jsons

    from ..evaluation import chance_metrics, format_table
    from .data import prepare_data

    tracking_answers(cfg.tracking.uri)
    t0 = time.time()
    index = prepare_data(cfg)
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
    n_test = index[cfg.data.eval_split]["samples"]
    rows = {"triplet (VSE++)": results["triplet"], "DBL (momentum)": results["dbl"],
            "chance": chance_metrics(n_test)}
    if index.get("generator", "").startswith("shapes_captions"):
        rows["oracle ceiling"] = {"rsum": oracle_rsum(read_split_jsons(cfg.data.root, cfg.data.eval_split))}
    print(f"\nShapesCaptions {cfg.data.eval_split} split: {n_test} images x 5 captions; "
          f"{cfg.train.steps} steps each, {args.nproc} ranks x batch {cfg.data.batch_size}")
    print(format_table(rows))
    print(seed_spread(results["dbl"]["rsum"] - results["triplet"]["rsum"], config))
    print(f"\nMLflow: {len(runs)} runs in experiment '{args.experiment}' at {args.tracking_uri}\n"
          f"  side by side: dbl-scale compare --experiment {args.experiment} --plot demo.png\n"
          f"  browse: mlflow ui --backend-store-uri {args.tracking_uri}")
    print(f"demo wall time: {time.time() - t0:.0f}s")
    return 0


def seed_spread(diff: float, config: str) -> str:
    """This run's DBL - triplet rSum, and the same difference over seeds as measured for the demo
    preset (one run proves nothing: the spread says what a difference of this size means), as
    paragraphs wrapped at `WIDTH` columns."""
    line = f"DBL - triplet in this run: {diff:+.1f} rSum (its yardstick: same steps, batch, towers and seed)."
    if Path(config).resolve() != SEEDS_FILE.with_name("demo.yaml") or not SEEDS_FILE.exists():
        return _paragraphs([line + " No seed spread is recorded for this config."])
    rec = json.loads(SEEDS_FILE.read_text())
    diffs = [d - t for d, t in zip(rec["rsum"]["dbl"], rec["rsum"]["triplet"])]
    mean, half = paired_interval(rec["rsum"]["dbl"], rec["rsum"]["triplet"])
    spread = (f"One run on one machine proves little. Over seeds {', '.join(map(str, rec['seeds']))} the same "
              f"difference was {', '.join(f'{d:+.1f}' for d in diffs)}: mean {mean:+.1f}, 95% interval "
              f"[{mean - half:+.1f}, {mean + half:+.1f}] ({rec['where']}).")
    return _paragraphs([line, spread, rec["finding"]])


def _paragraphs(texts: list[str]) -> str:
    return "\n" + "\n".join(textwrap.fill(t, WIDTH, break_on_hyphens=False, break_long_words=False) for t in texts)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train triplet and DBL on ShapesCaptions (2 CPU ranks) and compare",
                       description=__doc__,
                       epilog="examples:\n  dbl-scale demo\n  dbl-scale demo train.steps=100   # a quicker look\n"
                              "then: dbl-scale compare --experiment dbl_scale_demo --plot demo.png")
    p.add_argument("--config", default="demo", help="preset name or YAML path")
    p.add_argument("--nproc", type=int, default=2, help="ranks (processes) each run trains on")
    p.add_argument("--tracking-uri", default=default_tracking_uri(),
                   help="any MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="dbl_scale_demo", help="MLflow experiment the two runs go to")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)
