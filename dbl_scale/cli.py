"""`dbl-scale`: the command line.

  dbl-scale demo                      build ShapesCaptions, train triplet and DBL on 2 CPU ranks, compare
  dbl-scale train --nproc 2 [--config demo] [key=value ...]   one run under torchrun
  dbl-scale data build --out DIR      write ShapesCaptions shards
  dbl-scale mine --run-dir RUN --out FILE    AOQ: offline hard negatives of the training set
  dbl-scale bench loss | methods      loss cost at scale | every method trained and tabulated
  dbl-scale export --run-dir RUN --out DIR   target towers as Hugging Face folders
  dbl-scale eval --run-dir RUN [--data DIR --split test --protocol coco1k]   evaluate, log, report
  dbl-scale compare --experiment NAME [--format markdown]   runs of an experiment side by side
  dbl-scale bench eval                ranking speed against the similarity product
  dbl-scale bench memory              per-rank bytes of ZeRO 0-3, step time of each DBL scenario
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config, resolve_config

def torchrun_command(nproc: int, config: str | None, overrides: list[str], module: str = "dbl_scale.train",
                     args: tuple = ()) -> list[str]:
    """`python -m torch.distributed.run` of `module` on `nproc` local ranks: its `args`,
    then --config and the dotted overrides."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", module, *args]
    if config:
        cmd += ["--config", config]
    return cmd + list(overrides)


def launch_env(nproc: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def prepare_data(cfg) -> dict:
    """Build ShapesCaptions under data.root when it holds no shard set yet (an existing one,
    of any dataset, is used as it is, never overwritten), then the tokenizer if missing."""
    from data_tools.shapes_captions import build_shapes_captions

    from .data import ensure_tokenizer, load_sizes

    root = Path(cfg.data.root)
    t0 = time.time()
    if (root / "sizes.json").exists():
        sizes = load_sizes(root)
    else:
        print(f"building ShapesCaptions in {root} ({cfg.data.build_train} train / {cfg.data.build_val} val / "
              f"{cfg.data.build_test} test images) ...", flush=True)
        # at least 8 training shards, so up to 8 ranks x workers each get a share
        sizes = build_shapes_captions(str(root), n_train=cfg.data.build_train, n_val=cfg.data.build_val,
                                      n_test=cfg.data.build_test, image_size=cfg.model.vision.image_size,
                                      shard_size=max(1, min(500, cfg.data.build_train // 8)))
    ensure_tokenizer(cfg.data, cfg.model.text)
    if time.time() - t0 > 1:
        print(f"data ready in {time.time() - t0:.1f}s", flush=True)
    return sizes


# ----------------------------------------------------------------------------- commands

def cmd_train(args) -> int:
    config = resolve_config(args.config)
    cfg = load_config(config, args.overrides)  # fail here, before any process starts
    if args.build_data:
        prepare_data(cfg)
    return subprocess.call(torchrun_command(args.nproc, config, args.overrides), env=launch_env(args.nproc))


def cmd_demo(args) -> int:
    from .eval import chance_metrics, format_table

    config = resolve_config(args.config)
    overrides = [f"tracking.uri={args.tracking_uri}", f"tracking.experiment={args.experiment}"] + args.overrides
    cfg = load_config(config, overrides)
    t0 = time.time()
    sizes = prepare_data(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results, run_ids = {}, {}
    for method in ("triplet", "dbl"):
        run_name = f"demo-{method}-{stamp}"
        print(f"\n=== {method}: {cfg.train.steps} steps on {args.nproc} CPU ranks "
              f"({cfg.train.deepspeed}) ===", flush=True)
        run_overrides = overrides + [f"loss.method={method}", f"tracking.run_name={run_name}"]
        rc = subprocess.call(torchrun_command(args.nproc, config, run_overrides), env=launch_env(args.nproc))
        if rc != 0:
            print(f"training {method} failed with exit code {rc}", file=sys.stderr)
            return rc
        results[method] = json.loads((Path(cfg.train.output_dir) / run_name / "metrics.json").read_text())

    import mlflow
    mlflow.set_tracking_uri(args.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[args.experiment],
                              filter_string=f"tags.mlflow.runName LIKE 'demo-%-{stamp}'")
    n_test = sizes[cfg.data.eval_split]["samples"]
    rows = {"triplet (VSE++)": results["triplet"], "DBL (momentum)": results["dbl"],
            "chance": chance_metrics(n_test)}
    if sizes.get("generator", "").startswith("shapes_captions"):
        from data_tools.shapes_captions import oracle_rsum, read_split_jsons
        rows["oracle ceiling"] = {"rsum": oracle_rsum(read_split_jsons(cfg.data.root, cfg.data.eval_split))}
    print(f"\nShapesCaptions {cfg.data.eval_split} split: {n_test} images x 5 captions; "
          f"{cfg.train.steps} steps each, {args.nproc} ranks x batch {cfg.data.batch_size}")
    print(format_table(rows))
    print(f"\nMLflow: {len(runs)} runs in experiment '{args.experiment}' at {args.tracking_uri} "
          f"(browse: mlflow ui --backend-store-uri {args.tracking_uri})")
    print(f"demo wall time: {time.time() - t0:.0f}s")
    return 0


def cmd_data(args) -> int:
    from data_tools.shapes_captions import build_shapes_captions

    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    t0 = time.time()
    sizes = build_shapes_captions(str(out), n_train=args.train, n_val=args.val, n_test=args.test,
                                  image_size=args.image_size, shard_size=args.shard_size, seed=args.seed)
    counts = ", ".join(f"{s}: {sizes[s]['samples']} images / {len(sizes[s]['shards'])} shards"
                       for s in ("train", "val", "test"))
    print(f"ShapesCaptions in {out}: {counts} ({time.time() - t0:.1f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbl-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train triplet and DBL on ShapesCaptions (2 CPU ranks) and compare")
    p.add_argument("--config", default="demo", help="preset name or YAML path (default: demo)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="dbl_scale_demo")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="one training run under torchrun")
    p.add_argument("--config", default=None, help="preset name or YAML path")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    p.add_argument("--build-data", action="store_true", help="build ShapesCaptions under data.root if missing")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_train)

    from .bench import add_bench_parser
    from .compare import add_compare_parser
    from .evaluate import add_eval_parser
    from .export import add_export_parser
    from .mining import add_mine_parser
    add_mine_parser(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    add_eval_parser(sub)
    add_compare_parser(sub)

    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write ShapesCaptions as WebDataset shards")
    b.add_argument("--out", default="data/shapes_captions")
    b.add_argument("--train", type=int, default=4000)
    b.add_argument("--val", type=int, default=250)
    b.add_argument("--test", type=int, default=500)
    b.add_argument("--image-size", type=int, default=64)
    b.add_argument("--shard-size", type=int, default=500)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true", help="replace an existing folder")
    b.set_defaults(func=cmd_data)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dbl-scale: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
