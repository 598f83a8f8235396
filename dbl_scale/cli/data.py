"""`dbl-scale data build | convert | verify | stats | preview`: write ShapesCaptions, convert a
user's data into shards, check and look at a shard set; and `prepare_data`, which the commands
that train call to make sure a data set and its tokenizer are in place."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from data_tools import shapes_captions


def prepare_data(cfg) -> dict:
    """The training data's index, after building ShapesCaptions under data.root when that folder
    is absent or empty; then the tokenizer if missing. A folder that holds anything but no index
    is an error that says what it holds: it may be a user's own data, never overwritten."""
    from data_tools.shapes_captions import build_shapes_captions

    from ..data import DataError, eval_root, is_shard_list, load_index, plain_shard_folder  # heavy (torch)
    from ..tokenizer import ensure_tokenizer

    t0 = time.time()
    root = Path(cfg.data.root)
    if is_shard_list(cfg.data.root) or plain_shard_folder(root):  # shards as they are: nothing to build
        index = load_index(eval_root(cfg.data)) if cfg.data.eval_root else {}
    elif root.is_dir() and any(root.iterdir()):
        index = load_index(root)  # names what the folder holds when it has no index
    elif cfg.data.build is None:
        raise DataError(f"{root} holds no data, and there is none to build: data.build is not set (the demo and "
                        "tiny presets set it), or convert your own data there (dbl-scale data convert)")
    else:
        b = cfg.data.build
        print(f"building ShapesCaptions in {root} ({b.train} train / {b.val} val / {b.test} test images) ...",
              flush=True)
        # at least 8 training shards, so up to 8 ranks x workers each get a share
        index = build_shapes_captions(str(root), n_train=b.train, n_val=b.val, n_test=b.test,
                                      image_size=cfg.model.vision.image_size,
                                      shard_size=max(1, min(500, b.train // 8)), variant=b.variant)
    ensure_tokenizer(cfg.data, cfg.model.text)
    if time.time() - t0 > 1:
        print(f"data ready in {time.time() - t0:.1f}s", flush=True)
    return index


def cmd_build(args) -> int:
    from .checks import CommandError

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CommandError(f"--out {args.out} is a file: give a folder for the shards")
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
        print(f"dbl-scale data convert: {exc}", file=sys.stderr)
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
    errors, limit = report.errors, args.limit or None
    for line in errors[:limit]:  # the gravest first
        print(f"error: {line}")
    if limit and len(errors) > limit:
        print(f"... and {len(errors) - limit} more error(s) (--limit 0 lists every one)")
    for line in report.warnings[:limit]:
        print(f"skipped when converted: {line}")
    if limit and len(report.warnings) > limit:
        print(f"... and {len(report.warnings) - limit} more skipped (--limit 0 lists every one)")
    counts = ", ".join(f"{s}={n}" for s, n in report.samples.items())
    failed = bool(errors) or (args.strict and bool(report.warnings))
    print(f"{args.root}: {counts} samples; {len(errors)} error(s), {len(report.warnings)} skipped when "
          f"converted{' (--strict: a failure)' if args.strict and report.warnings else ''}: "
          f"{'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


def cmd_stats(args) -> int:
    from data_tools.inspect_shards import stats

    print(stats(args.root, args.png))
    return 0


def cmd_preview(args) -> int:
    from data_tools.inspect_shards import preview

    out = args.out or f"{Path(args.root).resolve().name}_preview.html"  # beside the user, never into the data
    n = preview(args.root, out, args.split, args.n)
    print(f"{n} samples of {args.root} -> {out}")
    return 0


DATA_EXAMPLES = """examples:
  dbl-scale data build --out data/shapes_captions
  dbl-scale data convert karpathy --json dataset_coco.json --images coco/ --out data/coco
  dbl-scale data verify data/coco
  dbl-scale data stats data/coco --png stats.png
  dbl-scale data preview data/coco -n 48"""


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="dataset tools: build, convert, verify, stats, preview", description=__doc__,
                       epilog=DATA_EXAMPLES)
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="write ShapesCaptions as WebDataset shards",
                        description="Write the ShapesCaptions data set (images of coloured shapes, captions that "
                                    "name them) as WebDataset shards with their index.",
                        epilog="example:\n  dbl-scale data build --out data/shapes_captions --train 4000 --test 500")
    shapes_captions.add_arguments(b, default_out="data/shapes_captions")
    b.add_argument("--force", action="store_true", help="replace an existing folder")
    b.set_defaults(func=cmd_build)

    c = dsub.add_parser("convert", help="your images and captions -> training shards (resumable)",
                        description="Convert images and captions into training shards (a re-run resumes).",
                        epilog="examples:\n"
                               "  dbl-scale data convert karpathy --json dataset_coco.json --images coco/ --out data/coco\n"
                               "  dbl-scale data convert table --file pairs.csv --image-col path --caption-col text "
                               "--out data/mine\n"
                               "  dbl-scale data convert folder --images photos/ --test-frac 0.05 --out data/mine\n"
                               "  dbl-scale data convert wds --shards 'web/{00000..00099}.tar' --out data/web")
    csub = c.add_subparsers(dest="source", required=True)
    k = csub.add_parser("karpathy", help="COCO / Flickr30K with the Karpathy split JSON",
                        epilog="example:\n  dbl-scale data convert karpathy --json coco/dataset_coco.json "
                               "--images coco --out data/coco")
    k.add_argument("--json", required=True, help="dataset_coco.json or dataset_flickr30k.json")
    k.add_argument("--images", required=True, help="image folder (COCO: the one holding train2014/ and val2014/)")
    k.add_argument("--restval", choices=("train", "keep", "drop"), default="train",
                   help="COCO's restval images: into train (the usual 113K protocol), own split, or left out")
    t = csub.add_parser("table", help="a CSV / TSV / JSONL / Parquet of (image, caption) rows",
                        epilog="example:\n  dbl-scale data convert table --file pairs.csv --image-col path "
                               "--caption-col text --images-root photos/ --test-frac 0.01 --out data/mine")
    t.add_argument("--file", required=True, help="the table: .csv, .tsv, .jsonl or .parquet")
    t.add_argument("--image-col", required=True, help="column holding each row's image path")
    t.add_argument("--caption-col", required=True, help="column holding each row's caption")
    t.add_argument("--split-col", default=None, help="column naming each row's split (else drawn by image)")
    t.add_argument("--images-root", default="", help="folder the image column is relative to (default: as written)")
    f = csub.add_parser("folder", help="a folder of images, each with a .txt of captions (one per line)",
                        epilog="example:\n  dbl-scale data convert folder --images photos/ --test-frac 0.05 "
                               "--out data/mine")
    f.add_argument("--images", required=True, help="the folder (searched recursively): photo.jpg beside photo.txt")
    w = csub.add_parser("wds", help="existing WebDataset / img2dataset tars",
                        epilog="example:\n  dbl-scale data convert wds --shards 'web/{00000..00099}.tar' "
                               "--test-frac 0.01 --out data/web")
    w.add_argument("--shards", required=True, help="brace pattern or URL, e.g. 'in/{00000..00009}.tar'")
    pc = csub.add_parser("precomp", help="SCAN / VSE-infinity region features ({split}_ims.npy, {split}_caps.txt)",
                         epilog="example:\n  dbl-scale data convert precomp --dir data/f30k_precomp --out data/f30k")
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

    v = dsub.add_parser("verify", help="every tar reads, counts match, images decode, captions non-empty",
                        description="Read every sample of a shard set: the tars read, the counts match the index, "
                                    "images decode, captions are non-empty, image ids are unique within a split. "
                                    "Errors come first, the gravest first; exit 1 when there is any. Reads only.",
                        epilog="example:\n  dbl-scale data verify data/shapes_captions")
    v.add_argument("root", help="the shard set's folder (holding dbl_index.json)")
    v.add_argument("--strict", action="store_true", help="images skipped when converting also fail")
    v.add_argument("--limit", type=int, default=20, help="problems listed of each kind; 0 lists every one")
    v.set_defaults(func=cmd_verify)
    st = dsub.add_parser("stats", help="samples, captions per image, caption and image size histograms",
                         description="Per split: images, captions per image, caption lengths, image sizes. Reads only.",
                         epilog="example:\n  dbl-scale data stats data/shapes_captions --png stats.png")
    st.add_argument("root", help="the shard set's folder (holding dbl_index.json)")
    st.add_argument("--png", default=None, help="also draw the histograms into this PNG")
    st.set_defaults(func=cmd_stats)
    pv = dsub.add_parser("preview", help="an HTML contact sheet of N samples with their captions",
                         description="An HTML page of the first N samples of a split with their captions; written "
                                     "where --out says, never into the shard set.",
                         epilog="example:\n  dbl-scale data preview data/shapes_captions --split test -n 24 "
                                "--out preview.html")
    pv.add_argument("root", help="the shard set's folder (holding dbl_index.json)")
    pv.add_argument("--split", default=None, help="which split (default: the index's first)")
    pv.add_argument("-n", type=int, default=48, help="samples to show")
    pv.add_argument("--out", default=None, help="HTML file (default: ROOTNAME_preview.html in this folder)")
    pv.set_defaults(func=cmd_preview)
