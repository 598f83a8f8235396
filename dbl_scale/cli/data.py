"""`dbl-scale data build | convert | verify | stats | preview`: write ShapesCaptions, convert a
user's data into shards, check and look at a shard set; and `prepare_data`, which the commands
that train call to make sure a data set and its tokenizer are in place."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from data_tools import shapes_captions
from data_tools.shapes_captions import build_shapes_captions

from ..data import eval_root, is_shard_list, load_index, plain_shard_folder
from ..tokenizer import ensure_tokenizer


def prepare_data(cfg) -> dict:
    """The training data's index, after building ShapesCaptions under data.root when that folder
    is absent or empty; then the tokenizer if missing. A folder that holds anything but no index
    is an error that says what it holds: it may be a user's own data, never overwritten."""
    t0 = time.time()
    root = Path(cfg.data.root)
    if is_shard_list(cfg.data.root) or plain_shard_folder(root):  # shards as they are: nothing to build
        index = load_index(eval_root(cfg.data)) if cfg.data.eval_root else {}
    elif root.is_dir() and any(root.iterdir()):
        index = load_index(root)  # names what the folder holds when it has no index
    else:
        print(f"building ShapesCaptions in {root} ({cfg.data.build_train} train / {cfg.data.build_val} val / "
              f"{cfg.data.build_test} test images) ...", flush=True)
        # at least 8 training shards, so up to 8 ranks x workers each get a share
        index = build_shapes_captions(str(root), n_train=cfg.data.build_train, n_val=cfg.data.build_val,
                                      n_test=cfg.data.build_test, image_size=cfg.model.vision.image_size,
                                      shard_size=max(1, min(500, cfg.data.build_train // 8)),
                                      variant=cfg.data.build_variant)
    ensure_tokenizer(cfg.data, cfg.model.text)
    if time.time() - t0 > 1:
        print(f"data ready in {time.time() - t0:.1f}s", flush=True)
    return index


def cmd_build(args) -> int:
    if args.force and Path(args.out).exists():
        shutil.rmtree(args.out)
    return shapes_captions.run(args)


def cmd_convert(args) -> int:
    from data_tools import convert

    source = {k: v for k, v in vars(args).items() if k not in ("func", "command", "data_command", "processes",
                                                                 "progress", "strict")}
    opts = convert.Options(out=args.out, shard_size=args.shard_size, max_side=args.max_side, quality=args.quality,
                           processes=args.processes, strict=args.strict, progress=sys.stderr.isatty(),
                           source=source)
    t0 = time.time()
    try:
        if args.source == "karpathy":
            splits = convert.karpathy(args.json, args.images, args.restval)
        elif args.source == "table":
            splits = convert.table(args.file, args.image_col, args.caption_col, args.images_root, args.split_col,
                                   args.val_frac, args.test_frac)
        elif args.source == "folder":
            splits = convert.folder(args.images, args.val_frac, args.test_frac)
        elif args.source == "precomp":
            splits = convert.precomp(args.dir)
        else:
            splits = convert.wds(args.shards, args.val_frac, args.test_frac)
        index = convert.write_shards(splits, opts)
    except convert.ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parts = [f"{s}={index[s]['samples']} images, {index[s]['captions']} captions ({len(index[s]['shards'])} shards)"
             for s in splits]
    n = sum(index[s]["samples"] for s in splits)
    dt = time.time() - t0
    print(f"converted {args.source}: {'; '.join(parts)}; {len(index['problems'])} problem(s); "
          f"{n / max(dt, 1e-9):.0f} images/s in {dt:.1f}s -> {args.out}")
    return 0


def cmd_verify(args) -> int:
    from data_tools.inspect_shards import verify

    report = verify(args.root)
    for line in report.warnings:
        print(f"skipped when converted: {line}")
    for line in report.errors:
        print(f"error: {line}")
    counts = ", ".join(f"{s}={n}" for s, n in report.samples.items())
    failed = bool(report.errors) or (args.strict and bool(report.warnings))
    print(f"{args.root}: {counts} samples; {len(report.errors)} error(s), {len(report.warnings)} skipped when "
          f"converted{' (--strict: a failure)' if args.strict and report.warnings else ''}: "
          f"{'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


def cmd_stats(args) -> int:
    from data_tools.inspect_shards import stats

    print(stats(args.root, args.png))
    return 0


def cmd_preview(args) -> int:
    from data_tools.inspect_shards import preview

    out = args.out or str(Path(args.root) / "preview.html")
    n = preview(args.root, out, args.split, args.n)
    print(f"{n} samples -> {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset tools: build, convert, verify, stats, preview")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write ShapesCaptions as WebDataset shards")
    shapes_captions.add_arguments(b, default_out="data/shapes_captions")
    b.add_argument("--force", action="store_true", help="replace an existing folder")
    b.set_defaults(func=cmd_build)

    c = dsub.add_parser("convert", help="your images and captions -> training shards (resumable)")
    csub = c.add_subparsers(dest="source", required=True)
    k = csub.add_parser("karpathy", help="COCO / Flickr30K with the Karpathy split JSON")
    k.add_argument("--json", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    k.add_argument("--images", required=True, help="image folder (COCO: the one holding train2014/ and val2014/)")
    k.add_argument("--restval", choices=("train", "keep", "drop"), default="train",
                   help="COCO's restval images: into train (the usual 113K protocol), own split, or left out")
    t = csub.add_parser("table", help="a CSV / TSV / JSONL / Parquet of (image, caption) rows")
    t.add_argument("--file", required=True)
    t.add_argument("--image-col", required=True)
    t.add_argument("--caption-col", required=True)
    t.add_argument("--split-col", default=None, help="column naming each row's split (else drawn by image)")
    t.add_argument("--images-root", default="", help="folder the image column is relative to")
    f = csub.add_parser("folder", help="a folder of images, each with a .txt of captions (one per line)")
    f.add_argument("--images", required=True)
    w = csub.add_parser("wds", help="existing WebDataset / img2dataset tars")
    w.add_argument("--shards", required=True, help="brace pattern or URL, e.g. 'in/{00000..00009}.tar'")
    pc = csub.add_parser("precomp", help="SCAN / VSE-infinity region features ({split}_ims.npy, {split}_caps.txt)")
    pc.add_argument("--dir", required=True, help="e.g. data/f30k_precomp; train with model.vision.kind=precomp")
    for q in (t, f, w):
        q.add_argument("--val-frac", type=float, default=0.0, help="share of images drawn into val (by image)")
        q.add_argument("--test-frac", type=float, default=0.0, help="share of images drawn into test (by image)")
    for q in (k, t, f, w, pc):
        q.add_argument("--out", required=True, help="output folder (a re-run resumes into it)")
        q.add_argument("--shard-size", type=int, default=1000, help="images per shard")
        q.add_argument("--max-side", type=int, default=512,
                       help="resize so the longer side is at most this (aspect kept); 0 keeps sizes")
        q.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
        q.add_argument("--processes", type=int, default=2, help="encoding processes")
        q.add_argument("--strict", action="store_true", help="any skipped image or empty caption fails the run")
        q.set_defaults(func=cmd_convert)

    v = dsub.add_parser("verify", help="every tar reads, counts match, images decode, captions non-empty")
    v.add_argument("root")
    v.add_argument("--strict", action="store_true", help="images skipped when converting also fail")
    v.set_defaults(func=cmd_verify)
    st = dsub.add_parser("stats", help="samples, captions per image, caption and image size histograms")
    st.add_argument("root")
    st.add_argument("--png", default=None, help="also draw the histograms into this PNG")
    st.set_defaults(func=cmd_stats)
    pv = dsub.add_parser("preview", help="an HTML contact sheet of N samples with their captions")
    pv.add_argument("root")
    pv.add_argument("--split", default=None)
    pv.add_argument("-n", type=int, default=48)
    pv.add_argument("--out", default=None, help="HTML file (default: ROOT/preview.html)")
    pv.set_defaults(func=cmd_preview)
