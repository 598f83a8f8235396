"""`python -m benchmarks.eval`: what the retrieval evaluation costs next to the similarity product.

From random L2-normalised float32 embeddings (default: 5,000 images x 25,000 captions, d =
1024, COCO 5K size) it times
  (a) the similarity matrix product alone, img @ txt.T;
  (b) all metrics via `evaluation.embedding_metrics` (the product made and counted tile by
      tile, as training evaluates), and via `retrieval_metrics` on the given matrix;
  (c) the published code's ranking, per query `argsort(scores)[::-1]` then `where(inds == i)`,
      on the same matrix, plus the product (a) once. Sorting 30,000 queries takes long, so the
      ranking is timed on an evenly spaced subset of the queries of each direction and
      extrapolated linearly (the time per query does not depend on which query it is); the
      subset's ranks are also checked against (b)'s;
  (d) the published code as written, which also scores each query with its own numpy.dot
      (timed on a fifth of (c)'s subset, extrapolated linearly).
All are timed interleaved, one of each per repeat, and the medians reported.
Targets: (b)/(a) <= 1.5 and (c)/(b) >= 3. Peak memory above the inputs: torch's allocations
(the product's output, the evaluation's tiles) with the torch profiler's memory events, the
naive reference's numpy buffers with tracemalloc.

    python -m benchmarks.eval --images 5000 --captions-per-image 5 --dim 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from dbl_scale.evaluation import embedding_metrics, retrieval_metrics
from benchmarks.common import torch_cpu_peak_bytes
from dbl_scale.cli.bench.common import MIB, machine_line

TARGET_PRODUCT_RATIO = 1.5  # (b)/(a): metrics add at most half a product
TARGET_SPEEDUP = 3.0  # (c)/(b): counting beats the per-query sort by this much


def _embeddings(n_images: int, k: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(k * n_images, dim, generator=gen), dim=-1)
    return img, txt


def naive_ranks(sims: np.ndarray, sims_t: np.ndarray, k: int, images: np.ndarray, captions: np.ndarray):
    """The published evaluation code's ranking for the given queries: i2t over rows of sims,
    t2i over rows of sims_t (captions x images, as that code computes them)."""
    i2t = np.zeros(len(images))
    for j, i in enumerate(images):
        inds = np.argsort(sims[i])[::-1]
        rank = 1e20
        for c in range(k * i, k * i + k):
            tmp = np.where(inds == c)[0][0]
            if tmp < rank:
                rank = tmp
        i2t[j] = rank
    t2i = np.zeros(len(captions))
    for j, c in enumerate(captions):
        inds = np.argsort(sims_t[c])[::-1]
        t2i[j] = np.where(inds == c // k)[0][0]
    return i2t, t2i


def published_code(img: np.ndarray, txt: np.ndarray, k: int, images: np.ndarray, groups: np.ndarray) -> None:
    """The published evaluation loops as written, scores included: a numpy.dot per image query,
    and one per image's K caption queries, each followed by the per-query argsort."""
    for index in images:
        d = np.dot(img[index][None], txt.T).flatten()
        inds = np.argsort(d)[::-1]
        min(np.where(inds == i)[0][0] for i in range(k * index, k * index + k))
    for index in groups:
        d = np.dot(txt[k * index:k * index + k], img.T)
        for i in range(len(d)):
            inds = np.argsort(d[i])[::-1]
            np.where(inds == index)[0][0]


def _numpy_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of traced (numpy and Python) allocations during `run`, above those before it."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def bench_eval(n_images: int = 5000, k: int = 5, dim: int = 1024, repeats: int = 3, seed: int = 0,
               naive_images: Optional[int] = 500,
               progress: Optional[Callable[[str], None]] = None) -> dict:
    """Times (a) to (d) and peak memories; see the module docstring. `naive_images`: image
    queries the naive reference sorts (and k times as many caption queries; (d) a fifth of
    them); None = all."""
    say = progress or (lambda msg: None)
    img, txt = _embeddings(n_images, k, dim, seed)
    n_cap = k * n_images

    def product():
        return img @ txt.T

    sims_t = product()  # also the warm-up (thread pools, allocator)
    metrics, ranks = embedding_metrics(img, txt, k, return_ranks=True)
    sims = sims_t.numpy()
    captions_x_images = np.ascontiguousarray(sims.T)  # the published code scores captions against images
    q_img = n_images if naive_images is None else max(1, min(naive_images, n_images))
    img_q = np.linspace(0, n_images - 1, q_img).round().astype(np.int64)
    cap_q = np.linspace(0, n_cap - 1, min(k * q_img, n_cap)).round().astype(np.int64)
    want_i2t, want_t2i = naive_ranks(sims, captions_x_images, k, img_q, cap_q)
    agree = bool((ranks["i2t"][img_q] == want_i2t).all() and (ranks["t2i"][cap_q] == want_t2i).all())
    img_np, txt_np = img.numpy(), txt.numpy()
    pub_q = img_q[np.linspace(0, len(img_q) - 1, max(1, len(img_q) // 5)).round().astype(np.int64)]

    jobs = {  # interleaved, one of each per repeat, so a busy machine slows them alike
        "product": product,
        "metrics": lambda: embedding_metrics(img, txt, k),
        "metrics_only": lambda: retrieval_metrics(sims_t, captions_per_image=k),
        "naive_i2t": lambda: naive_ranks(sims, captions_x_images, k, img_q, cap_q[:0]),
        "naive_t2i": lambda: naive_ranks(sims, captions_x_images, k, img_q[:0], cap_q),
        "published_i2t": lambda: published_code(img_np, txt_np, k, pub_q, pub_q[:0]),
        "published_t2i": lambda: published_code(img_np, txt_np, k, pub_q[:0], pub_q),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for rep in range(repeats):
        say(f"timing, repeat {rep + 1}/{repeats}: (a), (b), metrics alone, naive on {len(img_q)} image + "
            f"{len(cap_q)} caption queries, published code on {len(pub_q)} + {k * len(pub_q)}")
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    t_product, t_metrics, t_metrics_only = med["product"], med["metrics"], med["metrics_only"]
    t_naive_rank = med["naive_i2t"] * n_images / len(img_q) + med["naive_t2i"] * n_cap / len(cap_q)
    t_published = (med["published_i2t"] + med["published_t2i"]) * n_images / len(pub_q)
    del captions_x_images, sims, sims_t

    say("peak memory")
    product_bytes = torch_cpu_peak_bytes(product)
    metrics_bytes = torch_cpu_peak_bytes(lambda: embedding_metrics(img, txt, k))
    held = product()
    held_np = held.numpy()
    naive_bytes = _numpy_peak_bytes(lambda: naive_ranks(held_np, held_np[:0], k, img_q[:50], cap_q[:0]))
    del held, held_np

    return {
        "n_images": n_images, "n_captions": n_cap, "dim": dim, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "product_s": t_product, "metrics_s": t_metrics, "metrics_only_s": t_metrics_only,
        "naive_s": t_product + t_naive_rank, "naive_rank_s": t_naive_rank,
        "naive_queries": [int(len(img_q)), int(len(cap_q))],
        "naive_extrapolated": bool(len(img_q) < n_images or len(cap_q) < n_cap),
        "naive_agrees": agree,
        "ratio_metrics_to_product": t_metrics / t_product,
        "speedup_vs_naive": (t_product + t_naive_rank) / t_metrics,
        "ranking_speedup_vs_naive": t_naive_rank / t_metrics_only,
        "published_s": t_published, "published_queries": [int(len(pub_q)), int(k * len(pub_q))],
        "speedup_vs_published": t_published / t_metrics,
        "product_peak_mib": product_bytes / MIB,
        "metrics_peak_mib": metrics_bytes / MIB,
        "naive_peak_mib": naive_bytes / MIB,
        "sims_mib": n_images * n_cap * 4 / MIB,
        "rsum": metrics["rsum"],
    }


def format_bench_eval(r: dict) -> str:
    ok_ratio = r["ratio_metrics_to_product"] <= TARGET_PRODUCT_RATIO
    ok_speed = r["speedup_vs_naive"] >= TARGET_SPEEDUP
    n_i, n_c = r["naive_queries"]
    how = (f"ranking timed on {n_i} of {r['n_images']} image and {n_c} of {r['n_captions']} caption queries, "
           f"extrapolated linearly" if r["naive_extrapolated"] else "all queries timed")
    return "\n".join([
        f"bench eval: {r['n_images']} images x {r['n_captions']} captions, d = {r['dim']}, float32, "
        f"median of {r['repeats']}, {r['threads']} torch threads",
        f"  (a) similarity product img @ txt.T        {r['product_s']:8.3f} s",
        f"  (b) embedding_metrics, product included   {r['metrics_s']:8.3f} s   (retrieval_metrics on a given matrix: "
        f"{r['metrics_only_s']:.3f} s)",
        f"  (c) naive argsort per query, product included {r['naive_s']:8.3f} s   (ranking alone: "
        f"{r['naive_rank_s']:.3f} s; {how}; ranks agree with (b): {'yes' if r['naive_agrees'] else 'NO'})",
        f"  (d) the published code as written (a numpy.dot per query, then argsort) {r['published_s']:8.3f} s   "
        f"(timed on {r['published_queries'][0]} image and {r['published_queries'][1]} caption queries, "
        f"extrapolated linearly)",
        f"  (b)/(a) = {r['ratio_metrics_to_product']:.2f}x (target <= {TARGET_PRODUCT_RATIO}x: "
        f"{'met' if ok_ratio else 'MISSED'});  (c)/(b) = {r['speedup_vs_naive']:.1f}x faster "
        f"(target >= {TARGET_SPEEDUP:.0f}x: {'met' if ok_speed else 'MISSED'}); ranking alone: counting is "
        f"{r['ranking_speedup_vs_naive']:.1f}x faster than sorting; (d)/(b) = {r['speedup_vs_published']:.1f}x",
        f"  peak memory above the inputs: product {r['product_peak_mib']:.1f} MiB (torch profiler memory events; "
        f"the sims matrix is {r['sims_mib']:.1f} MiB); embedding_metrics {r['metrics_peak_mib']:.1f} MiB "
        f"(torch profiler); naive reference {r['naive_peak_mib']:.1f} MiB "
        f"(tracemalloc)",
        f"  rSum of these random embeddings: {r['rsum']:.2f} (chance level)",
    ])


def cmd_bench_eval(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(torch.device("cpu")), flush=True)
    t0 = time.time()
    r = bench_eval(args.images, args.captions_per_image, args.dim, args.repeats, args.seed,
                   naive_images=None if args.naive_images <= 0 else args.naive_images,
                   progress=None if args.quiet else (lambda m: print(f"  ... {m}", file=sys.stderr, flush=True)))
    print(format_bench_eval(r))
    print(f"bench wall time: {time.time() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
        print(f"results written to {args.json}")
    return 0


def add_parser(bench_subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the `bench` sub-parser set."""
    b = bench_subparsers.add_parser("eval", help="retrieval evaluation cost: counting vs the product vs argsort",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--images", type=int, default=5000, help="N images (the 5K test split: 5000)")
    b.add_argument("--captions-per-image", type=int, default=5)
    b.add_argument("--dim", type=int, default=1024, help="embedding width")
    b.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    b.add_argument("--naive-images", type=int, default=500,
                   help="image queries the naive reference sorts (x K caption queries), extrapolated to all; "
                        "0 = all queries")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=cmd_bench_eval)
    return b


if __name__ == "__main__":
    import benchmarks

    sys.exit(benchmarks.run(add_parser))
