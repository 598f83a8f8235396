"""`dbl-scale train`: one run on this machine's ranks under torchrun; and the rank-side entry
point every launcher starts:

    torchrun --standalone --nproc_per_node 2 -m dbl_scale.cli.train --config demo loss.method=dbl
    dbl-scale train --nnodes 2 --node-rank R --rdzv-endpoint node0:29400 --nproc gpu --config ...   # on each node
    deepspeed --num_gpus 2 --module dbl_scale.cli.train --config demo
    accelerate launch --config_file ds_configs/accelerate_zero2.yaml -m dbl_scale.cli.train --config demo
"""
from __future__ import annotations

import argparse
import faulthandler
import os
import sys

from . import quiet
from .checks import tracking_answers
from .launch import config_args, local_ranks, run_ranks

MODULE = "dbl_scale.cli.train"


def cmd_train(args) -> int:
    from ..config import load_config, resolve_config

    config = resolve_config(args.config)
    cfg = load_config(config, args.overrides)  # fail here, before any process starts or heavy import
    from ..methods import build_method  # heavy (torch, transformers, deepspeed)
    from ..optim import deepspeed_config
    from ..preprocess import resolve_image_config
    from .data import prepare_data

    build_method(cfg)  # and on what the method itself needs
    nproc = local_ranks(args.nproc)
    deepspeed_config(cfg, nproc * args.nnodes)  # and on a DeepSpeed file that contradicts the config
    cfg = resolve_image_config(cfg)  # and on an image processor that contradicts model.vision.image_size
    if args.build_data:
        prepare_data(cfg)
    check_data(cfg, nproc * args.nnodes)  # a data problem is one line here, not a traceback from every rank
    if args.node_rank == 0:
        tracking_answers(cfg.tracking.uri)  # only global rank 0 talks to MLflow
    return run_ranks(nproc, MODULE, config_args(config, args.overrides), args.nnodes, args.node_rank,
                     args.rdzv_endpoint)


def check_data(cfg, world: int) -> None:
    """What the ranks will ask of the data, asked once before any of them starts, so a problem
    is one line (a DataError), not a traceback from every rank: the training shards and their
    sample count, enough shards for every rank and loader worker, the evaluation splits the
    run will score, and where the tokenizer is."""
    from ..data import DataError, eval_root, split_shards
    from ..tokenizer import tokenizer_path

    d = cfg.data
    urls, samples = split_shards(d.root, d.train_split, d.samples_per_epoch)
    workers = 1 if d.workers == "auto" else max(d.workers, 1)  # auto never asks for more workers than shards
    if len(urls) < world * workers:
        raise DataError(f"{len(urls)} '{d.train_split}' shard(s) of {d.root} for {world} ranks x {workers} loader "
                        f"worker(s): every worker needs a shard of its own; write smaller shards (dbl-scale data "
                        f"convert --shard-size) or set data.workers={max(1, len(urls) // world)}")
    if samples < world * d.batch_size:
        raise DataError(f"{samples} samples in {d.root} cannot fill one batch of {d.batch_size} on each of {world} ranks")
    splits = ([d.eval_split] if cfg.eval.at_end else []) + ([cfg.eval.val_split] if cfg.eval.every else [])
    for split in splits:
        split_shards(eval_root(d), split)
    tokenizer_path(d, cfg.model.text)


def nproc_type(value: str) -> str:
    """--nproc: a positive number of ranks, or `gpu`."""
    if value != "gpu" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of ranks (e.g. 2) or gpu")
    return value


EXAMPLES = """examples:
  dbl-scale train --config demo --build-data loss.method=dbl train.steps=1000
  dbl-scale train --config tiny data.root=data/mine tracking.run_name=first
  dbl-scale train --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400 --nproc gpu --config vitb16_bertbase

Every key of a config (dbl_scale/config.py) can be overridden as key=value; a wrong key or value
is one line naming the key and what is allowed, before any rank starts."""


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="one training run under torchrun", description=__doc__, epilog=EXAMPLES)
    p.add_argument("--config", default=None, help="preset name (demo, tiny, vitb16_bertbase) or YAML path; "
                                                  "default: the defaults of dbl_scale/config.py")
    p.add_argument("--nproc", default="2", type=nproc_type, help="ranks on this machine: a number, or gpu (one per GPU)")
    p.add_argument("--nnodes", type=int, default=1, help="machines in the run (start the command on each)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="where the machines meet (the first node); needed when --nnodes > 1")
    p.add_argument("--build-data", action="store_true", help="build ShapesCaptions under data.root if missing")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_train)


def main(argv=None) -> int:
    """Rank side: parse the config, train, leave the process group."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="Train one run (start it with torchrun, deepspeed or accelerate).")
    parser.add_argument("--config", help="YAML config or preset name (defaults apply to anything it leaves out)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.method=dbl data.batch_size=64")
    # the `deepspeed` launcher appends --local_rank=N; the LOCAL_RANK environment variable says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --config (as slurm/ passes them)
    faulthandler.enable()  # a native crash prints the Python stack of every thread
    quiet.setup()  # before the libraries are imported: they read their settings then
    from .. import distributed
    from ..config import load_config
    from ..run import Preempted
    from ..train import train

    quiet.same_format()
    cfg = load_config(args.config, args.overrides)  # validated before any process group starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_dir = train(cfg)
    except Preempted as stop:
        print(stop, file=sys.stderr, flush=True)
        distributed.shutdown()
        return Preempted.exit_code
    if run_dir is not None and cfg.tracking.log_model and distributed.is_main():
        from .export import publish

        publish(run_dir, cfg.tracking.uri)  # a step after the run: training does not depend on the format
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    from .. import distributed

    distributed.exit_process(main())  # after the process group, not through a teardown that may abort
