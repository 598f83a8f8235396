"""`dbl-scale bench data`: the input pipeline against bare baselines, in one run.

Source: `--images` generated JPEGs of `--source-size` (smooth shapes on gradients, so they
compress like photos rather than noise), each with a .txt caption, written before timing.

Converter: `data convert folder` on `--processes` processes (read, resize so the longer side is
at most `--max-side`, JPEG re-encode, tar) against a bare loop on as many processes (PIL open,
the same resize, JPEG save to memory), images/s. Target: >= 0.8x the bare loop.

Loader, over the converted shards, at each worker count x image size: (a) a bare WebDataset
read + JPEG decode (webdataset's own pipeline, `decode("rgb8")`, no resize) against (b) our
training loader (decode, resize and centre crop to S px, normalise, draw a caption, batch,
tokenise), samples/s from the first batch to the end of `--epochs` epochs, so worker start-up
is not counted for either. Target: (b) >= 0.85x (a).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from data_tools import convert

from ...config import load_config
from ...data import TrainLoader, split_shards
from ...preprocess import ImageTransform
from ...tokenizer import ensure_tokenizer
from .common import machine_line

WORDS = ["red", "blue", "green", "large", "small", "circle", "square", "dog", "tree", "street", "left", "right"]


def make_source(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """n JPEGs (quality 90) with a one-line caption each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, 3).astype(np.float32)
        top = rng.integers(0, 256, 3).astype(np.float32)
        arr = (base * (1 - ramp) + top * ramp) * np.ones((h, 1, 1), np.float32)
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        path = folder / f"{i:06d}.jpg"
        img.save(path, quality=90)
        path.with_suffix(".txt").write_text(" ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), 8)) + "\n")
        paths.append(path)
    return paths


def _bare_resize(task) -> int:
    path, max_side, quality = task
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue())


def bench_converter(src: Path, paths: list[Path], out: Path, processes: int, max_side: int, quality: int,
                    shard_size: int) -> dict:
    t0 = time.perf_counter()
    with Pool(processes) as pool:
        pool.map(_bare_resize, [(str(p), max_side, quality) for p in paths], chunksize=16)
    bare = len(paths) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    opts = convert.Options(out=str(out), shard_size=shard_size, max_side=max_side, quality=quality,
                           processes=processes, progress=False)
    convert.write_shards(convert.folder(str(src)), opts)
    ours = len(paths) / (time.perf_counter() - t0)
    return {"processes": processes, "bare_images_s": bare, "convert_images_s": ours, "ratio": ours / bare}


def _rate(batches, count) -> float:
    """Items per second from the first batch to the last."""
    it = iter(batches)
    next(it)  # the workers are up once the first batch is here
    t0, total = time.perf_counter(), 0
    for b in it:
        total += count(b)
    return total / (time.perf_counter() - t0)


def bench_loader(root: Path, tokenizer, workers: int, size: int, epochs: int, batch: int) -> dict:
    import webdataset as wds  # heavy-ish: only this benchmark uses webdataset's own pipeline

    urls, samples = split_shards(root, "train")
    bare = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only,
                          workersplitter=wds.split_by_worker, empty_check=False).repeat(epochs).decode("rgb8")
    loader = torch.utils.data.DataLoader(bare.to_tuple("jpg", "json"), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    bare_rate = _rate(loader, lambda _: 1)
    cfg = load_config(None, [f"data.root={root}", f"data.workers={workers}", f"data.batch_size={batch}"])
    ours = TrainLoader(cfg.data, ImageTransform(size), tokenizer, 32, 0, 1, 0)
    n_batches = epochs * ours.steps_per_epoch
    batches = (b for _, b in zip(range(n_batches), ours.batches()))
    ours_rate = _rate(batches, lambda b: len(b["captions"]))
    return {"workers": workers, "size": size, "bare_samples_s": bare_rate, "ours_samples_s": ours_rate,
            "ratio": ours_rate / bare_rate, "samples": samples}


def run_bench(images: int, source_size: tuple[int, int], processes: int, max_side: int, workers: list[int],
              sizes: list[int], epochs: int, batch: int, shard_size: int, keep: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(keep) if keep else Path(tmp)
        src, out = base / "source", base / "shards"
        paths = make_source(src, images, source_size)
        conv = bench_converter(src, paths, out, processes, max_side, 90, shard_size)
        cfg = load_config(None, [f"data.root={out}"])
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
        loaders = [bench_loader(out, tokenizer, w, s, epochs, batch) for s in sizes for w in workers]
    return {"converter": conv, "loader": loaders}


def format_results(res: dict, images: int, source_size, max_side: int) -> str:
    c = res["converter"]
    lines = [f"converter: {images} JPEGs of {source_size[0]}x{source_size[1]} -> longer side {max_side}, "
             f"{c['processes']} processes",
             f"  bare PIL loop {c['bare_images_s']:.0f} images/s | dbl-scale data convert "
             f"{c['convert_images_s']:.0f} images/s | ratio {c['ratio']:.2f} (target >= 0.8)",
             "loader (samples/s, first batch to the end):",
             "  workers  size    bare wds+decode    ours (resize, normalise, tokenise)    ratio (target >= 0.85)"]
    for r in res["loader"]:
        lines.append(f"  {r['workers']:>7}  {r['size']:>4}  {r['bare_samples_s']:>17.0f}  "
                     f"{r['ours_samples_s']:>36.0f}    {r['ratio']:.2f}")
    return "\n".join(lines)


def cmd_bench_data(args) -> int:
    size = tuple(int(x) for x in args.source_size.split("x"))
    print(machine_line(torch.device("cpu")))
    res = run_bench(args.images, size, args.processes, args.max_side, args.workers, args.sizes, args.epochs,
                    args.batch_size, args.shard_size, args.keep)
    print(format_results(res, args.images, size, args.max_side))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


def add_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register `data` on the `bench` sub-parser set."""
    b = bench_subparsers.add_parser("data", help="input pipeline and converter speed against bare baselines",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--images", type=int, default=2000)
    b.add_argument("--source-size", default="640x480", help="WxH of the generated source JPEGs")
    b.add_argument("--processes", type=int, default=2, help="converter processes (and the bare loop's)")
    b.add_argument("--max-side", type=int, default=320, help="the converter's resize")
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts")
    b.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sizes the loader makes")
    b.add_argument("--epochs", type=int, default=2)
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--shard-size", type=int, default=100)
    b.add_argument("--keep", default=None, metavar="DIR", help="keep the source and shards here")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.set_defaults(func=cmd_bench_data)
    return b
