"""`dbl-scale data build`: write ShapesCaptions shards; and `prepare_data`, which the commands
that train call to make sure a data set and its tokenizer are in place."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from data_tools import shapes_captions
from data_tools.shapes_captions import build_shapes_captions

from ..data import ensure_tokenizer, load_sizes


def prepare_data(cfg) -> dict:
    """Build ShapesCaptions under data.root when it holds no shard set yet (an existing one,
    of any dataset, is used as it is, never overwritten), then the tokenizer if missing."""
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
                                      shard_size=max(1, min(500, cfg.data.build_train // 8)),
                                      variant=cfg.data.build_variant)
    ensure_tokenizer(cfg.data, cfg.model.text)
    if time.time() - t0 > 1:
        print(f"data ready in {time.time() - t0:.1f}s", flush=True)
    return sizes


def cmd_build(args) -> int:
    if args.force and Path(args.out).exists():
        shutil.rmtree(args.out)
    return shapes_captions.run(args)


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write ShapesCaptions as WebDataset shards")
    shapes_captions.add_arguments(b, default_out="data/shapes_captions")
    b.add_argument("--force", action="store_true", help="replace an existing folder")
    b.set_defaults(func=cmd_build)
