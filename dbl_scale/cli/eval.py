"""`dbl-scale eval`: evaluate a finished run (or its `best/` model) on any shard set.

    dbl-scale eval --run-dir runs/coco-dbl/best --data data/coco --split test --protocol coco1k

The split is embedded on all ranks (`evaluation.evaluate`, as training evaluates); rank 0
writes the per-query ranks (`ranks.npz`; with `--save-embeddings` the embeddings too) and
`metrics.json` (`standard`: every image of the
split, e.g. Flickr30K 1K test or COCO 5K; `coco1k`: mean over 5 folds of 1000 images), the
recall@K plot and the HTML sample page, and logs everything to the MLflow run that trained
the model, or to a nested run under it with `--nested`.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from . import quiet
from .checks import CommandError, run_folder, sqlite_store, tracking_answers
from .launch import run_ranks

MODULE = "dbl_scale.cli.eval"
OPTIONS = ("run_dir", "data", "split", "protocol", "batch_size", "out", "tracking_uri")


def main(argv=None) -> int:
    """Rank side: every rank embeds its share; rank 0 writes and logs."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    _add_options(p)
    args = p.parse_args(argv)
    quiet.setup()  # before the libraries are imported: they read their settings then
    import numpy as np
    import torch

    from .. import distributed
    from ..branches import load_model
    from ..config import load_config
    from ..data import eval_root
    from ..evaluation import evaluate, format_evaluation, report
    from ..preprocess import Tokenize, image_transform
    from ..tokenizer import ensure_tokenizer
    from ..tracking import Tracker

    quiet.same_format()
    distributed.init_distributed()
    model_dir = Path(args.run_dir)
    run_dir = model_dir.parent if model_dir.name == "best" else model_dir
    cfg = load_config(model_dir / "config.yaml", [f"data.eval_root={args.data}"] if args.data else [])
    tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    model = load_model(model_dir, tokenizer).to(distributed.device()).eval()
    ev = evaluate(model, eval_root(cfg.data), args.split, image_transform(cfg),
                  Tokenize(tokenizer, cfg.model.text.max_length), args.batch_size, args.protocol,
                  cfg.eval.single_modal, cfg.eval.image_relevance)
    if distributed.is_main():
        out = Path(args.out or run_dir / "eval" / f"{args.split}-{args.protocol}")
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "ranks.npz", **ev.ranks, image_ids=ev.image_ids.numpy())
        if args.save_embeddings:  # N x d and K*N x d float32, image-id order: for your own analysis
            np.savez(out / "embeddings.npz", img=ev.img.numpy(), txt=ev.txt.numpy(), image_ids=ev.image_ids.numpy(),
                     captions_per_image=ev.captions_per_image)
        (out / "metrics.json").write_text(json.dumps(ev.metrics, indent=2))
        print(f"{model_dir} on {eval_root(cfg.data)} / {args.split} ({args.protocol}, {len(ev.image_ids)} images)\n"
              + format_evaluation(cfg.loss.method, ev.metrics), flush=True)
        run_file = run_dir / "run.json"
        tracker = Tracker(args.tracking_uri or cfg.tracking.uri, cfg.tracking.experiment)
        parent = json.loads(run_file.read_text())["mlflow_run_id"] if run_file.exists() else None
        prefix = f"eval/{args.split}-{args.protocol}"
        if parent and not args.nested:
            tracker.resume(parent)
        else:
            tags = {"mlflow.parentRunId": parent} if parent else {}
            tracker.start(f"eval-{run_dir.name}-{args.split}", {"model_dir": str(model_dir), "data": eval_root(cfg.data),
                                                                "split": args.split, "protocol": args.protocol}, tags)
        tracker.log_metrics({f"{prefix}/{k}": v for k, v in ev.metrics.items()}, 0)
        tracker.log_artifact(out / "ranks.npz", prefix)
        tracker.log_artifact(out / "metrics.json", prefix)
        if args.protocol == "standard":
            report(ev, tracker, out, eval_root(cfg.data), args.split, artifact_path=prefix,
                   name=f"{run_dir.name} ({cfg.loss.method})")
        tracker.finish("FINISHED")
        print(f"ranks, metrics and reports in {out}; logged to MLflow run {tracker.run_id}")
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024] * distributed.world_size()  # KiB -> MiB
    if distributed.world_size() > 1:
        torch.distributed.all_gather_object(peaks, peaks[0])
    if distributed.is_main():
        print("peak resident memory per rank: " + ", ".join(f"{p:.0f} MiB" for p in peaks), flush=True)
    distributed.shutdown()  # every rank leaves together; no communication thread outlives the run
    return 0


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="a finished run's folder, or its best/ folder")
    p.add_argument("--data", help="shard folder to evaluate on (default: the run's data.eval_root, else data.root)")
    p.add_argument("--split", default="test", help="split of that folder's index to evaluate")
    p.add_argument("--protocol", choices=["standard", "coco1k"], default="standard",
                   help="standard: every image of the split; coco1k: the mean over 5 folds of 1000 images")
    p.add_argument("--batch-size", type=int, default=128, help="images (and their captions) embedded at once per rank")
    p.add_argument("--out", help="folder for ranks.npz, metrics.json and reports (default: RUN/eval/SPLIT-PROTOCOL)")
    p.add_argument("--tracking-uri", help="MLflow store to log to (default: the run's tracking.uri)")
    p.add_argument("--nested", action="store_true", help="log to a nested run under the training run")
    p.add_argument("--save-embeddings", action="store_true", help="also write embeddings.npz (image and caption "
                                                                   "embeddings in image-id order)")


def check(args) -> None:
    """What the ranks will need, checked before they start: the run's model and config, and
    the split in the shards it will read."""
    model_dir = run_folder(args.run_dir)  # a wrong run is one line before any rank starts
    from ..config import load_config
    from ..data import eval_root, split_shards  # heavy (torch)

    cfg = load_config(model_dir / "config.yaml", [f"data.eval_root={args.data}"] if args.data else [])
    root = eval_root(cfg.data)
    if not Path(root).exists():
        raise CommandError(f"the shards to evaluate on, {root}, are not here: give them with --data FOLDER")
    split_shards(root, args.split)
    uri = args.tracking_uri or cfg.tracking.uri  # where the results are logged at the end
    sqlite_store(uri, "the run's MLflow store (tracking.uri; else --tracking-uri)")
    tracking_answers(uri)


def cmd_eval(args) -> int:
    check(args)
    forwarded = []
    for key in OPTIONS:
        value = getattr(args, key)
        if value is not None:
            forwarded += [f"--{key.replace('_', '-')}", str(value)]
    forwarded += [f"--{flag}" for flag in ("nested", "save-embeddings") if getattr(args, flag.replace("-", "_"))]
    return run_ranks(args.nproc, MODULE, forwarded)


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a finished run on a shard set (standard or COCO 1K protocol)",
                       description=__doc__,
                       epilog="examples:\n"
                              "  dbl-scale eval --run-dir runs/demo-dbl-20261207-101500   # the run's own test split\n"
                              "  dbl-scale eval --run-dir runs/coco-dbl/best --data data/coco --split test "
                              "--protocol coco1k")
    _add_options(p)
    p.add_argument("--nproc", type=int, default=2, help="ranks that embed the split")
    p.set_defaults(func=cmd_eval)


if __name__ == "__main__":
    from .. import distributed

    distributed.exit_process(main())  # after the process group, not through a teardown that may abort
