"""`python -m benchmarks.scale`: how evaluation, mining and AOQ's negatives grow with the data.

Each measurement runs in a fresh process, which makes its inputs, then counts its peak
resident memory above them (Linux's VmHWM, reset once the inputs exist):
  (1) evaluation of N images x K*N captions from random unit embeddings (`embedding_metrics`:
      tiles, both directions counted at once), with the counting compiled and eager, against
      its own tile products (timed tile by tile inside the run) and a bare pass over the same
      tiles. `--embeddings aligned` makes each caption its image plus noise, as a
      trained model's are: positives stand out;
  (2) mining (`top_candidates`, kc = 2000, ki = 400) of N_mine images;
  (3) AOQ's sampler (`OfflineNegatives`) on generated ShapesCaptions shards of two sizes:
      what it holds after drawing batches, against what the in-memory sampler held
      (N x 3 x S x S bytes of decoded images).
No download: embeddings are random, shards generated.

    python -m benchmarks.scale --images 100000 --dim 128
    python -m benchmarks.scale --images 100000 --embeddings aligned --parts eval
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from data_tools.shapes_captions import build_shapes_captions

from dbl_scale.data import read_samples, sample_meta, split_shards
from dbl_scale.evaluation.metrics import embedding_metrics
from dbl_scale.evaluation.ranking import TILE_ROWS, TileSource
from dbl_scale.mining import Candidates, OfflineNegatives, top_candidates
from dbl_scale.cli.bench.common import MIB, machine_line

EVAL_TARGET = 1.3  # evaluation's time over the bare product's


def _vm(key: str) -> int:
    """A /proc/self/status figure in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} is not in /proc/self/status (Linux only)")


def _reset_peak() -> int:
    """Reset the resident-memory high-water mark; returns the resident bytes now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm("VmRSS")


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, d)
    for lo in range(0, n, 65536):  # in pieces: no transient copy of the whole
        x[lo:lo + 65536] = torch.nn.functional.normalize(torch.randn(min(65536, n - lo), d, generator=g), dim=1)
    return x


def _measured(fn, *args) -> dict:
    """Run fn in a fresh process; its figures and its peak resident bytes above its inputs."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def _aligned(img: torch.Tensor, k: int, noise: float, seed: int) -> torch.Tensor:
    """K captions per image: each its image plus Gaussian noise of `noise` times a unit vector's
    spread per coordinate, normalised."""
    g = torch.Generator().manual_seed(seed)
    n, d = img.shape
    txt = torch.empty(k * n, d)
    for lo in range(0, k * n, 65536):
        rows = torch.arange(lo, min(lo + 65536, k * n))
        jitter = noise * torch.randn(len(rows), d, generator=g) / d ** 0.5
        txt[lo:lo + len(rows)] = torch.nn.functional.normalize(img[rows // k] + jitter, dim=1)
    return txt


def _eval_child(n: int, d: int, k: int, threads: int, embeddings: str = "random") -> dict:
    torch.set_num_threads(threads)
    img = _unit(n, d, 1)
    txt = _unit(k * n, d, 2) if embeddings == "random" else _aligned(img, k, 1.0, 2)
    out = {"inputs_bytes": img.nbytes + txt.nbytes}
    rows = TILE_ROWS["cpu"]
    # the compiled counting's warm-up, on a small grid of the same tile shape (cached on disk after)
    t0 = time.perf_counter()
    embedding_metrics(img[:rows * 16], txt[:k * rows * 16], k, compile=True)
    out["compile_seconds"] = time.perf_counter() - t0

    def bare() -> float:  # every score made once, nothing counted: the tiles evaluation makes
        source = TileSource(img, txt, rows, k * rows)
        t0 = time.perf_counter()
        for t in range(math.ceil(n / rows)):
            for u in range(math.ceil(n / rows)):
                source.tile(t, u)
        return time.perf_counter() - t0

    def evaluation(compile: bool) -> tuple[dict, dict]:
        base, stats = _reset_peak(), {}
        metrics = embedding_metrics(img, txt, k, compile=compile, stats=stats)
        return {**stats, "peak_above_inputs": _vm("VmHWM") - base}, metrics

    # The machine's pace drifts by tens of percent from minute to minute, so the ratio is taken
    # within each run: the evaluation's whole time over the time its own tile products took (tile
    # by tile, interleaved with the counting). A bare pass over the same tiles runs beside them.
    out["bare_seconds"] = bare()
    out["compiled"], metrics = evaluation(True)
    out["eager"], eager = evaluation(False)
    out.update(rsum=metrics["rsum"], i2t_tied=metrics["i2t_tied"], t2i_tied=metrics["t2i_tied"],
               eager_agrees=eager == metrics)
    return out


def _mine_child(n: int, d: int, k: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    img, txt = _unit(n, d, 3), _unit(k * n, d, 4)
    base = _reset_peak()
    t0 = time.perf_counter()
    caption_cands, image_cands = top_candidates(img, txt, 2000, 400)
    return {"seconds": time.perf_counter() - t0, "peak_above_inputs": _vm("VmHWM") - base,
            "inputs_bytes": img.nbytes + txt.nbytes, "output_bytes": caption_cands.nbytes + image_cands.nbytes}


def _aoq_child(root: str, size: int, batches: int, batch: int, cache_mb: float) -> dict:
    ids = torch.tensor(sorted(sample_meta(s)[0] for s in read_samples(split_shards(root, "train")[0])))
    n, k = len(ids), 5
    g = torch.Generator().manual_seed(0)
    cands = Candidates(ids, k, torch.randint(0, k * n, (n, 300), generator=g, dtype=torch.int32),
                       torch.randint(0, n, (k * n, 60), generator=g, dtype=torch.int32), split="train")
    base = _reset_peak()
    t0 = time.perf_counter()
    sampler = OfflineNegatives(cands, root, "train", size, n_max=300, cache_mb=cache_mb)
    start_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(batches):
        pick = ids[torch.randint(0, n, (batch,), generator=gen)]
        sampler.sample(pick, torch.randint(0, k, (batch,), generator=gen), gen)
    return {"images": n, "start_seconds": start_s, "ms_per_batch": 1e3 * (time.perf_counter() - t0) / batches,
            "held_bytes": sampler.memory_bytes, "index_bytes": sampler.index.nbytes,
            "peak_above_candidates": _vm("VmHWM") - base, "in_memory_bytes": n * 3 * size * size}


def cmd_bench_scale(args) -> int:
    threads = torch.get_num_threads()
    print(machine_line(torch.device("cpu")), flush=True)
    t_all = time.time()
    result = {"args": vars(args).copy()}
    result["args"].pop("func", None)
    n, k, d = args.images, 5, args.dim
    if "eval" in args.parts:
        print(f"(1) evaluation of {n} images x {k * n} captions, d = {d}, float32, {args.embeddings} ...", flush=True)
        result["eval"] = _measured(_eval_child, n, d, k, threads, args.embeddings)
    if "mining" in args.parts:
        print(f"(2) mining of {args.mine_images} images x {k * args.mine_images} captions ...", flush=True)
        result["mining"] = _measured(_mine_child, args.mine_images, d, k, threads)
    result["aoq"] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size_n in (args.aoq_images if "aoq" in args.parts else []):
            root = Path(tmp) / f"shapes_{size_n}"
            print(f"(3) AOQ's negatives on {size_n} generated images ({args.aoq_size} px) ...", flush=True)
            build_shapes_captions(str(root), n_train=size_n, n_val=0, n_test=0, image_size=args.aoq_size,
                                  shard_size=max(1, min(1000, size_n // 8)))
            result["aoq"].append(_measured(_aoq_child, str(root), args.aoq_size, args.aoq_batches, 128,
                                           args.cache_mb))
    print(format_result(result, threads))
    print(f"bench wall time: {time.time() - t_all:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"results written to {args.json}")
    return 0


def format_result(r: dict, threads: int) -> str:
    a = r["args"]
    lines = [f"\nbench scale ({threads} torch threads):"]
    if "eval" in r:
        lines += _format_eval(r["eval"], a)
    if "mining" in r:
        mi = r["mining"]
        lines.append(f"(2) mining {a['mine_images']} x {5 * a['mine_images']} (top 2000 / 400): {mi['seconds']:.1f} s, "
                     f"peak {mi['peak_above_inputs'] / MIB:.0f} MiB above the embeddings (its output: "
                     f"{mi['output_bytes'] / MIB:.0f} MiB)")
    if r["aoq"]:
        lines += _format_aoq(r["aoq"], a)
    return "\n".join(lines)


def _format_eval(ev: dict, a: dict) -> list[str]:
    c, e = ev["compiled"], ev["eager"]
    ratio, eager = c["seconds"] / c["product_s"], e["seconds"] / e["product_s"]
    chance = " (chance level)" if a.get("embeddings", "random") == "random" else ""
    return [
        f"(1) evaluation ({a.get('embeddings', 'random')} embeddings) {a['images']} x {5 * a['images']} "
        f"(d {a['dim']}): {c['seconds']:.1f} s compiled (after a {ev['compile_seconds']:.1f} s warm-up), of which "
        f"its tile products {c['product_s']:.1f} s; eager {e['seconds']:.1f} s, of which products {e['product_s']:.1f} s; "
        f"a bare pass over the same tiles {ev['bare_seconds']:.1f} s",
        f"    evaluation / its tile products = {ratio:.2f}x compiled (target <= {EVAL_TARGET}: "
        f"{'met' if ratio <= EVAL_TARGET else 'NOT met'}), {eager:.2f}x eager (the fallback; same metrics: "
        f"{'yes' if ev['eager_agrees'] else 'NO'})",
        f"    peak {c['peak_above_inputs'] / MIB:.0f} MiB above the embeddings ({ev['inputs_bytes'] / MIB:.0f} MiB), "
        f"eager {e['peak_above_inputs'] / MIB:.0f} MiB; rSum {ev['rsum']:.2f}{chance}; queries tied with a "
        f"negative: {ev['i2t_tied']} images, {ev['t2i_tied']} captions"]


def _format_aoq(runs: list, a: dict) -> list[str]:
    lines = [
        f"(3) AOQ's negatives ({a['aoq_size']} px, a cache of at most {a['cache_mb']:g} MiB; peak: resident "
        f"memory growth over {a['aoq_batches']} batches of 128; in-memory: the decoded split the old sampler held):",
        f"    {'images':>8}{'bound MiB':>10}{'index MiB':>11}{'peak MiB':>10}{'in-memory MiB':>15}{'ms/batch':>10}"
        f"{'start s':>9}"]
    for x in runs:
        lines.append(f"    {x['images']:>8}{x['held_bytes'] / MIB:>10.1f}{x['index_bytes'] / MIB:>11.2f}"
                     f"{x['peak_above_candidates'] / MIB:>10.1f}{x['in_memory_bytes'] / MIB:>15.1f}"
                     f"{x['ms_per_batch']:>10.1f}{x['start_seconds']:>9.1f}")
    return lines


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("scale", help="memory and time of evaluation, mining and AOQ as the data grows",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100_000, help="evaluation images (captions: 5 each)")
    p.add_argument("--dim", type=int, default=128, help="embedding width")
    p.add_argument("--embeddings", choices=["random", "aligned"], default="random",
                   help="evaluation's embeddings: random unit vectors, or captions near their image (trained-like)")
    p.add_argument("--parts", nargs="+", choices=["eval", "mining", "aoq"], default=["eval", "mining", "aoq"],
                   help="which measurements to run")
    p.add_argument("--mine-images", type=int, default=20_000, help="images to mine")
    p.add_argument("--aoq-images", type=int, nargs="+", default=[2000, 20000],
                   help="sizes of the generated training splits for AOQ's sampler")
    p.add_argument("--aoq-size", type=int, default=64, help="their image size (px)")
    p.add_argument("--aoq-batches", type=int, default=40, help="batches of 128 drawn from each")
    p.add_argument("--cache-mb", type=float, default=256.0, help="AOQ's decoded-image cache")
    p.add_argument("--tmp", default=None, help="where to generate the shards (default: the system's temp)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench_scale)


if __name__ == "__main__":
    import sys

    import benchmarks

    sys.exit(benchmarks.run(add_parser))
