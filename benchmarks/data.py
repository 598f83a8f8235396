"""`python -m benchmarks.data`: the input pipeline against bare baselines, what it costs per
core, and what a real run waits for it (`DESCRIPTION` says what each part measures)."""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from dbl_scale.cli.bench.common import cpu_count

DESCRIPTION = """`python -m benchmarks.data`: the input pipeline against bare baselines, what it costs per core,
and what a real run waits for it, in one run.

Source: `--images` generated JPEGs of `--source-size` (photo-sized by default: smooth shapes on
gradients, so they compress like photos rather than noise), each with a .txt caption, written
before timing.

Converter: `data convert folder` on `--processes` processes (read, resize so the longer side is
at most `--max-side`, JPEG re-encode, tar) against a bare loop on as many processes (PIL open,
the same resize, JPEG save to memory), images/s. Target: >= 0.8x the bare loop.

Loader, over the converted shards, at each worker count x image size: (a) a bare WebDataset
read + JPEG decode (webdataset's own pipeline, `decode("rgb8")`, no resize) against (b) our
training loader (decode, resize and centre crop to S px, normalise, draw a caption, batch,
tokenise), samples/s from the first batch to the end of `--epochs` epochs, so worker start-up
is not counted for either. Target: (b) >= 0.85x (a).

Per core, at 224 px from the source JPEGs as they are (shards of the originals): the decode
alone in this process (one core, `--repeats` times: median and range), the training loader
with one worker and with `data.workers=auto`, and from the one-worker rate the loader cores a
step rate of `--target-rate` samples/s needs (one more per rank for its main process).

A real run (`--train-steps`, 0 to skip): `dbl-scale train` on one rank from the same shards,
small towers at 224 px (the step is cheap, so the loader shows), `data.workers=auto`: the
loader's wait per step and its share of the time as the run logged them (`data/wait_s`,
`data/wait_share` in MLflow), and its samples/s.
"""  # the --help text

# per-pixel grain (std, levels) of the generated JPEGs: 640 x 480 at quality 90 then weigh
# about what photos of that size do (COCO's average about 160 KB), and decode as slowly
GRAIN = 16.0
WORDS = ["red", "blue", "green", "large", "small", "circle", "square", "dog", "tree", "street", "left", "right"]


def make_source(folder: Path, n: int, size: tuple[int, int], seed: int = 0, processes: int = 1,
                grain: float = GRAIN) -> list[Path]:
    """n JPEGs (quality 90) with a one-line caption each: shapes on a gradient under a per-pixel
    `grain` (its standard deviation in levels), which sets how much a JPEG holds and so how
    long it takes to decode. Image i is drawn from (seed, i) alone, so any number of
    `processes` writes the same files."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(str(folder), i, size, seed, grain) for i in range(n)]
    if processes > 1 and n > 64:
        from multiprocessing import Pool

        with Pool(processes) as pool:
            return [Path(p) for p in pool.map(_make_one, tasks, chunksize=16)]
    return [Path(_make_one(t)) for t in tasks]


def _make_one(task) -> str:
    import numpy as np
    from PIL import Image, ImageDraw

    folder, i, (w, h), seed, grain = task
    rng = np.random.default_rng([seed, i])
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    base = rng.integers(0, 256, 3).astype(np.float32)
    top = rng.integers(0, 256, 3).astype(np.float32)
    arr = (base * (1 - ramp) + top * ramp) * np.ones((h, 1, 1), np.float32)
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(20, max(21, w // 2))), y0 + int(rng.integers(20, max(21, h // 2))))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    if grain:
        noisy = np.asarray(img, np.float32) + grain * rng.standard_normal((h, w, 3), dtype=np.float32)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    path = Path(folder) / f"{i:06d}.jpg"
    img.save(path, quality=90)
    path.with_suffix(".txt").write_text(" ".join(WORDS[int(k)] for k in rng.integers(0, len(WORDS), 8)) + "\n")
    return str(path)


def _bare_resize(task) -> int:
    import io

    from PIL import Image

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
    from multiprocessing import Pool

    from data_tools import convert

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


def _our_loader(root: Path, tokenizer, workers, size: int, batch: int):
    from dbl_scale.config import load_config
    from dbl_scale.data import TrainLoader
    from dbl_scale.preprocess import ImageTransform

    cfg = load_config(None, [f"data.root={root}", f"data.workers={workers}", f"data.batch_size={batch}"])
    return TrainLoader(cfg.data, ImageTransform(size), tokenizer, 32, 0, 1, 0)


def bench_loader(root: Path, tokenizer, workers: int, size: int, epochs: int, batch: int) -> dict:
    import torch
    import webdataset as wds  # heavy-ish: only this benchmark uses webdataset's own pipeline

    from dbl_scale.data import split_shards

    urls, samples = split_shards(root, "train")
    # webdataset hands read-only arrays to the collate, which warns once per worker
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    bare = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.single_node_only,
                          workersplitter=wds.split_by_worker, empty_check=False).repeat(epochs).decode("rgb8")
    loader = torch.utils.data.DataLoader(bare.to_tuple("jpg", "json"), batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    bare_rate = _rate(loader, lambda _: 1)
    ours = _our_loader(root, tokenizer, workers, size, batch)
    n_batches = epochs * ours.steps_per_epoch
    batches = (b for _, b in zip(range(n_batches), ours.batches()))
    ours_rate = _rate(batches, lambda b: len(b["captions"]))
    return {"workers": workers, "size": size, "bare_samples_s": bare_rate, "ours_samples_s": ours_rate,
            "ratio": ours_rate / bare_rate, "samples": samples}


def bench_cores(paths: list[Path], shards: Path, tokenizer, size: int, batch: int, repeats: int,
                target_rate: float) -> dict:
    """Samples/s per core at `size` px from the JPEGs as they are: the decode alone in this
    process (what one core does), the training loader with one worker and with `auto`; and the
    loader cores `target_rate` samples/s needs, at the decode's rate (a bound: no reading, no
    passing between processes) and at the one-worker loader's (plus one core per rank for its
    main process, which `data.workers=auto` keeps free)."""
    from dbl_scale.preprocess import ImageTransform

    transform = ImageTransform(size)
    encoded = [p.read_bytes() for p in paths[:400]]
    decode = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for data in encoded:
            transform.decode(data, fast=True)
        decode.append(len(encoded) / (time.perf_counter() - t0))
    one = _our_loader(shards, tokenizer, 1, size, batch)
    one_rate = _rate((b for _, b in zip(range(2 * one.steps_per_epoch), one.batches())), lambda b: len(b["captions"]))
    auto = _our_loader(shards, tokenizer, "auto", size, batch)
    auto_rate = _rate((b for _, b in zip(range(2 * auto.steps_per_epoch), auto.batches())),
                      lambda b: len(b["captions"]))
    decode_rate = statistics.median(decode)
    return {"size": size, "source": list(_image_size(paths[0])), "decode_samples_s": decode_rate,
            "decode_range": [min(decode), max(decode)], "decode_repeats": len(decode),
            "loader_1_worker_samples_s": one_rate, "auto_workers": auto.plan.workers,
            "loader_auto_samples_s": auto_rate, "target_rate": target_rate,
            "loader_cores_needed": math.ceil(target_rate / one_rate), "per_core_samples_s": one_rate,
            "decode_cores_needed": math.ceil(target_rate / decode_rate)}


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def bench_run_wait(shards: Path, work: Path, steps: int, batch: int, size: int) -> dict:
    """A real `dbl-scale train` on one rank from `shards` (the tiny preset's towers at `size` px,
    patch 32, so the step is cheap; `data.workers=auto`): the loader's wait per step and its
    share of the time, and samples/s, as the run logged them (after the first log interval,
    which holds the workers' start)."""
    from mlflow.tracking import MlflowClient  # heavy (seconds)

    from dbl_scale.config import resolve_config
    from dbl_scale.cli.launch import config_args, run_ranks
    from dbl_scale.cli.train import MODULE as TRAIN

    uri, log_every = f"sqlite:///{work / 'mlflow.db'}", max(1, steps // 4)
    overrides = [f"data.root={shards}", f"data.batch_size={batch}", "data.workers=auto", f"train.steps={steps}",
                 f"train.log_every={log_every}", f"model.vision.image_size={size}", "model.vision.patch_size=32",
                 "eval.at_end=false", "checkpoint.at_end=false", f"tracking.uri={uri}",
                 "tracking.experiment=bench_data", "tracking.run_name=wait", f"train.output_dir={work / 'runs'}"]
    t0 = time.time()
    rc = run_ranks(1, TRAIN, config_args(resolve_config("tiny"), overrides))
    if rc != 0:
        raise RuntimeError(f"dbl-scale train exited with {rc}")
    run_id = json.loads((work / "runs" / "wait" / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)

    def steady(key: str) -> list[float]:
        values = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.value for m in values[1:] or values]

    return {"steps": steps, "batch": batch, "size": size, "log_every": log_every, "wall_s": time.time() - t0,
            "wait_s": statistics.mean(steady("data/wait_s")), "wait_share": statistics.mean(steady("data/wait_share")),
            "samples_per_s": statistics.mean(steady("samples_per_s"))}


def run_bench(images: int, source_size: tuple[int, int], processes: int, max_side: int, workers: list[int],
              sizes: list[int], epochs: int, batch: int, shard_size: int, keep: str | None = None,
              target_rate: float = 2600, repeats: int = 3, train_steps: int = 0) -> dict:
    from data_tools import convert

    from dbl_scale.config import load_config
    from dbl_scale.tokenizer import ensure_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(keep) if keep else Path(tmp)
        src, out, photos = base / "source", base / "shards", base / "photo_shards"
        paths = make_source(src, images, source_size, processes=processes)
        conv = bench_converter(src, paths, out, processes, max_side, 90, shard_size)
        cfg = load_config(None, [f"data.root={out}"])
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
        loaders = [bench_loader(out, tokenizer, w, s, epochs, batch) for s in sizes for w in workers]
        # the originals as they are (max_side 0: each JPEG copied byte for byte)
        convert.write_shards(convert.folder(str(src)), convert.Options(out=str(photos), shard_size=shard_size,
                                                                       max_side=0, processes=processes,
                                                                       progress=False))
        ensure_tokenizer(load_config(None, [f"data.root={photos}"]).data, cfg.model.text)
        cores = bench_cores(paths, photos, tokenizer, 224, batch, repeats, target_rate)
        run = bench_run_wait(photos, base, train_steps, batch, 224) if train_steps else None
    return {"converter": conv, "loader": loaders, "cores": cores, "run": run}


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
    k = res["cores"]
    lines += [f"per core at {k['size']} px from the {k['source'][0]}x{k['source'][1]} JPEGs as they are:",
              f"  decode, resize, crop in one process: {k['decode_samples_s']:.0f} samples/s "
              f"(median of {k['decode_repeats']}, range {k['decode_range'][0]:.0f}-{k['decode_range'][1]:.0f})",
              f"  training loader, 1 worker: {k['loader_1_worker_samples_s']:.0f} samples/s; data.workers=auto "
              f"({k['auto_workers']} here): {k['loader_auto_samples_s']:.0f} samples/s",
              f"  {k['target_rate']:.0f} samples/s needs {k['loader_cores_needed']} loader cores at the loader's "
              f"{k['per_core_samples_s']:.0f} per worker ({k['decode_cores_needed']} at the bare decode's "
              f"{k['decode_samples_s']:.0f}), plus 1 per rank for its main process (data.workers=auto keeps it)"]
    r = res.get("run")
    if r:
        lines.append(f"a real run (dbl-scale train, 1 rank, tiny towers at {r['size']} px, batch {r['batch']}, "
                     f"{r['steps']} steps, data.workers=auto): {r['samples_per_s']:.0f} samples/s; the loader's wait "
                     f"{1e3 * r['wait_s']:.1f} ms per step, {100 * r['wait_share']:.0f}% of the time "
                     f"(data/wait_s, data/wait_share in MLflow, after the first log interval)")
    return "\n".join(lines)


def cmd_bench_data(args) -> int:
    import torch

    from dbl_scale.cli.bench.common import machine_line

    size = tuple(int(x) for x in args.source_size.split("x"))
    print(machine_line(torch.device("cpu")))
    res = run_bench(args.images, size, args.processes, args.max_side, args.workers, args.sizes, args.epochs,
                    args.batch_size, args.shard_size, args.keep, args.target_rate, args.repeats, args.train_steps)
    print(format_results(res, args.images, size, args.max_side))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


EXAMPLES = """examples:
  python -m benchmarks.data                                  2000 photo-sized JPEGs, loaders at 64 and 224 px
  python -m benchmarks.data --target-rate 2600 --train-steps 0   the cores a 2,600 samples/s step needs"""


def add_parser(bench_subparsers) -> argparse.ArgumentParser:
    b = bench_subparsers.add_parser("data", help="the converter and loader against bare baselines, cores per step rate",
                                    description=DESCRIPTION, epilog=EXAMPLES,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--images", type=int, default=2000, help="source JPEGs to generate")
    b.add_argument("--source-size", default="640x480", help="WxH of the generated source JPEGs")
    b.add_argument("--processes", type=int, default=min(2, cpu_count()),
                   help="converter processes (and the bare loop's)")
    b.add_argument("--max-side", type=int, default=320, help="the converter's resize")
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts")
    b.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="image sizes the loader makes")
    b.add_argument("--epochs", type=int, default=2, help="epochs the loaders read")
    b.add_argument("--batch-size", type=int, default=32, help="the training loader's batch")
    b.add_argument("--shard-size", type=int, default=100, help="samples per converted shard")
    b.add_argument("--target-rate", type=float, default=2600, metavar="SAMPLES_S",
                   help="the step rate to size the loader cores for (samples/s per rank)")
    b.add_argument("--repeats", type=int, default=3, help="repeats of the per-core decode")
    b.add_argument("--train-steps", type=int, default=40, metavar="N",
                   help="steps of the real run that measures the loader's wait (0: no run)")
    b.add_argument("--keep", default=None, metavar="DIR", help="keep the source and shards here")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.set_defaults(func=cmd_bench_data)
    return b


if __name__ == "__main__":
    import sys

    import benchmarks

    sys.exit(benchmarks.run(add_parser))
