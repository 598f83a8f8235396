"""`dbl-scale mine`: AOQ's offline hard negatives of a split, mined with a finished run on all
ranks (`mining.mine`), written to one candidates file.

    dbl-scale mine --run-dir runs/r1 --out runs/r1/candidates.pt [--data DIR --split train]

(Under torchrun spell the run option `--run-dir`: torchrun's own parser rejects `--run` as an
ambiguous abbreviation of its --run-path; `dbl-scale mine` accepts both.)
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import quiet
from .checks import run_folder
from .launch import run_ranks

MODULE = "dbl_scale.cli.mine"


def _add_options(p: argparse.ArgumentParser) -> None:
    # --run-dir first: under torchrun only that spelling passes, since torchrun's own parser
    # rejects `--run` as an ambiguous abbreviation of its --run-path
    p.add_argument("--run-dir", "--run", dest="run", required=True,
                   help="folder of a finished run (config.yaml, model.pt)")
    p.add_argument("--data", default=None, help="shard folder (default: the run's data.root)")
    p.add_argument("--split", default=None, help="split to mine (default: the run's data.train_split)")
    p.add_argument("--out", required=True, help="folder to write the candidates to (replaced if it exists)")
    p.add_argument("--k-captions", type=int, default=2000, help="caption candidates per image")
    p.add_argument("--k-images", type=int, default=400, help="image candidates per caption")
    p.add_argument("--batch-size", type=int, default=128, help="embedding batch per rank")
    p.add_argument("--memory-mb", type=float, default=256.0, help="score memory of one top-k chunk")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Rank side: every rank embeds its share, mines its block of rows and writes it."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="Mine AOQ offline hard negatives with a finished run "
                                                 "(start it with torchrun; every rank takes part).")
    _add_options(parser)
    args = parser.parse_args(argv)
    faulthandler.enable()
    quiet.setup()  # before the libraries are imported: they read their settings then
    from .. import distributed
    from ..branches import load_model
    from ..config import load_config
    from ..mining import mine
    from ..preprocess import Tokenize, image_transform
    from ..tokenizer import ensure_tokenizer

    quiet.same_format()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_config(Path(args.run) / "config.yaml", [f"data.root={args.data}"] if args.data else [])
    split = args.split or cfg.data.train_split
    t0 = time.time()
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=quiet.FORMAT, datefmt=quiet.DATEFMT)
    with distributed.rank_zero_first():  # rank 0 builds a missing tokenizer once
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    model = load_model(args.run, tokenizer).to(distributed.device())
    t_mine = time.time()
    cands = mine(model, cfg.data.root, split, image_transform(cfg),
                 Tokenize(tokenizer, cfg.model.text.max_length), args.batch_size, args.out,
                 k_captions=args.k_captions, k_images=args.k_images, memory_mb=args.memory_mb,
                 run=str(Path(args.run).resolve()))
    mine_seconds = time.time() - t_mine
    if rank == 0:
        print(f"mined '{split}' of {cfg.data.root} with {args.run} on {world} rank(s): "
              f"{cands.n_images} images x {cands.captions_per_image} captions, "
              f"{cands.k_captions} caption candidates per image, {cands.k_images} image candidates per "
              f"caption -> {args.out} ({mine_seconds:.1f}s mining, {time.time() - t0:.1f}s in all)", flush=True)
    distributed.shutdown()
    return 0


def forwarded(args: argparse.Namespace) -> list[str]:
    """The rank-side arguments of a `dbl-scale mine` command line."""
    out = ["--run-dir", str(args.run), "--out", str(args.out), "--k-captions", str(args.k_captions),
           "--k-images", str(args.k_images), "--batch-size", str(args.batch_size),
           "--memory-mb", str(args.memory_mb)]
    if args.data:
        out += ["--data", str(args.data)]
    if args.split:
        out += ["--split", str(args.split)]
    return out


def cmd_mine(args: argparse.Namespace) -> int:
    run = run_folder(args.run)  # a wrong run is one line before any rank starts
    from ..config import load_config
    from ..data import split_shards  # heavy (torch)

    cfg = load_config(run / "config.yaml")
    split_shards(args.data or cfg.data.root, args.split or cfg.data.train_split)  # before any rank starts
    return run_ranks(args.nproc, MODULE, forwarded(args))


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `dbl-scale mine`: the rank-side options plus --nproc."""
    p = sub.add_parser("mine", help="mine AOQ offline hard negatives with a finished run (torchrun)",
                       description=__doc__,
                       epilog="example:\n  dbl-scale mine --run-dir runs/triplet-20261207-101500 "
                              "--out runs/triplet-20261207-101500/candidates\n"
                              "  then: dbl-scale train loss.method=aoq "
                              "loss.aoq.candidates=runs/triplet-20261207-101500/candidates ...")
    _add_options(p)
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    p.set_defaults(func=cmd_mine)
    return p


if __name__ == "__main__":
    from .. import distributed

    distributed.exit_process(main())  # after the process group, not through a teardown that may abort
