"""`python -m benchmarks.loss`: what each matching loss costs one rank, in time and memory.

One process plays one rank of a data-parallel group: its B local queries (image and caption
embeddings with gradient) are scored against the N = W*B gathered candidates, which are the
local rows (at offset 0, the very same tensors, so the gradient reaches them as through the
autograd gather) followed by N - B rows of the other ranks (no gradient). Each loss is timed
over forward + backward, including the score matmuls a step pays for (the target's and, where
the loss has one, the anchor's / teacher's / peer's, which are built without gradient), and
its peak memory is measured over one forward + backward. Every row is also given as a ratio
to the VSE++ hinge triplet ("triplet") measured in the same run at the same sizes.

    python -m benchmarks.loss --local 256 1024 --global 2048 8192 --dim 256 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from dbl_scale.losses import (OfflineScores, Scores, aoq_quintuplet, boost_absolute, boost_relative, distillation,
                     diversity_contrastive, hinge_triplet, info_nce, mutual_learning, structure_distillation)
from benchmarks.common import torch_cpu_peak_bytes
from dbl_scale.cli.bench.common import cpu_count, machine_line

LOSSES = ("triplet", "triplet_sum", "dbl_relative", "dbl_absolute", "dbl_relative_soft", "dbl_total",
          "infonce", "distillation", "mutual_learning", "dcl", "aoq", "structure")
BASELINE = "triplet"
BOOST_TERMS = ("dbl_relative", "dbl_absolute", "dbl_relative_soft")
BOOST_TIME_LIMIT = 1.5  # a DBL boosting term should cost at most this many triplets

DCL_QUEUE = 4096  # momentum queue entries per modality for "dcl"
TEACHER_DIM = 384  # teacher feature width for "structure"
MARGIN = 0.2
IMAGE_REPEAT = 0.2  # share of candidates whose image is also another candidate's (several captions)


# ----------------------------------------------------------------------------- inputs

def _unit(rows: int, dim: int, gen: torch.Generator, device, dtype, requires_grad: bool = False) -> torch.Tensor:
    x = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float32), dim=-1)
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def _near(x: torch.Tensor, noise: float, gen: torch.Generator) -> torch.Tensor:
    """A no-grad embedding close to x (an anchor / teacher / peer of the same pair)."""
    eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return F.normalize(x.detach() + noise * eps, dim=-1)


def _image_ids(n: int, gen: torch.Generator, device) -> torch.Tensor:
    """Image ids of the N candidates, a share IMAGE_REPEAT of them repeating an earlier image."""
    ids = torch.arange(n)
    repeat = torch.rand(n, generator=gen) < IMAGE_REPEAT
    repeat[0] = False
    ids[repeat] = (torch.rand(int(repeat.sum()), generator=gen) * torch.nonzero(repeat).squeeze(1)).long()
    return ids.to(device)


@dataclass
class _Inputs:
    """One rank's view: local rows (with grad) and the other ranks' rows (without)."""
    img: torch.Tensor  # B x d, requires grad
    txt: torch.Tensor
    other_img: torch.Tensor  # (N - B) x d
    other_txt: torch.Tensor
    ref_img: torch.Tensor  # anchor / teacher / peer embeddings of the local pairs, no grad
    ref_txt: torch.Tensor
    ref_other_img: torch.Tensor
    ref_other_txt: torch.Tensor
    ids: torch.Tensor  # B
    all_ids: torch.Tensor  # N
    queue_img: torch.Tensor  # DCL_QUEUE x d, momentum queue (no grad)
    queue_txt: torch.Tensor
    off_img: torch.Tensor  # AOQ offline negatives of each local pair, B x d, requires grad
    off_txt: torch.Tensor  # (the model embeds them in the same step)
    off_img2: torch.Tensor
    off_txt2: torch.Tensor
    log_logit_scale: torch.Tensor  # learnable InfoNCE temperature
    teacher_img: torch.Tensor  # B x TEACHER_DIM, structure distillation teacher features
    teacher_txt: torch.Tensor
    teacher_other_img: torch.Tensor
    teacher_other_txt: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [self.img, self.txt, self.off_img, self.off_txt, self.off_img2, self.off_txt2, self.log_logit_scale]


def _make_inputs(b: int, n: int, dim: int, seed: int, device, dtype) -> _Inputs:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + b * 7919 + n)
    img, txt = _unit(b, dim, gen, device, dtype, True), _unit(b, dim, gen, device, dtype, True)
    other_img, other_txt = _unit(n - b, dim, gen, device, dtype), _unit(n - b, dim, gen, device, dtype)
    all_ids = _image_ids(n, gen, device)
    return _Inputs(
        img=img, txt=txt, other_img=other_img, other_txt=other_txt,
        ref_img=_near(img, 0.3, gen), ref_txt=_near(txt, 0.3, gen),
        ref_other_img=_near(other_img, 0.3, gen), ref_other_txt=_near(other_txt, 0.3, gen),
        ids=all_ids[:b], all_ids=all_ids,
        queue_img=_unit(DCL_QUEUE, dim, gen, device, dtype), queue_txt=_unit(DCL_QUEUE, dim, gen, device, dtype),
        off_img=_unit(b, dim, gen, device, dtype, True), off_txt=_unit(b, dim, gen, device, dtype, True),
        off_img2=_unit(b, dim, gen, device, dtype, True), off_txt2=_unit(b, dim, gen, device, dtype, True),
        log_logit_scale=torch.tensor([2.659], device=device, dtype=dtype, requires_grad=True),  # 1/0.07
        teacher_img=_unit(b, TEACHER_DIM, gen, device, dtype), teacher_txt=_unit(b, TEACHER_DIM, gen, device, dtype),
        teacher_other_img=_unit(n - b, TEACHER_DIM, gen, device, dtype),
        teacher_other_txt=_unit(n - b, TEACHER_DIM, gen, device, dtype),
    )


def _simulated_gather(x: _Inputs):
    """The `gather` a structure-distillation step is given: this rank's rows followed by the
    other ranks' (student rows with gradient: images, then captions; teacher rows without,
    in the same order), as `distributed.gather` would return them on rank 0."""
    others = {True: [x.other_img, x.other_txt], False: [x.teacher_other_img, x.teacher_other_txt]}
    calls = {True: 0, False: 0}

    def gather(t: torch.Tensor, with_grad: bool) -> torch.Tensor:
        other = others[with_grad][calls[with_grad] % 2]
        calls[with_grad] += 1
        return torch.cat([t, other.to(t.dtype)])
    return gather


# ----------------------------------------------------------------------------- the timed steps

def _target(x: _Inputs) -> Scores:
    """The target's Scores as a step builds them: gather (local rows first), then the matmuls."""
    all_img, all_txt = torch.cat([x.img, x.other_img]), torch.cat([x.txt, x.other_txt])
    return Scores.local(x.img, x.txt, all_img, all_txt, 0, x.ids, x.all_ids)


@torch.no_grad()
def _reference(x: _Inputs) -> Scores:
    """An anchor / teacher / peer branch's Scores, built without a backward path."""
    all_img, all_txt = torch.cat([x.ref_img, x.ref_other_img]), torch.cat([x.ref_txt, x.ref_other_txt])
    return Scores.local(x.ref_img, x.ref_txt, all_img, all_txt, 0, x.ids, x.all_ids)


def _offline(x: _Inputs) -> OfflineScores:
    """AOQ's offline hard-negative scores of each local pair, from embeddings with gradient."""
    def dot(a, b):
        return (a * b).sum(dim=-1)
    return OfflineScores(i_tneg=dot(x.img, x.off_txt), ineg_t=dot(x.off_img, x.txt),
                         ineg_tneg=dot(x.off_img, x.off_txt), itneg_tineg=dot(x.off_img2, x.off_txt2))


def _structure(x: _Inputs) -> torch.Tensor:
    return structure_distillation(x.img, x.txt, x.teacher_img, x.teacher_txt, lam=0.5, tau=0.1,
                                  gather=_simulated_gather(x))


def _dcl(x: _Inputs) -> torch.Tensor:
    s = _target(x)
    return diversity_contrastive(s, 0.07, 1.0, queue_i2t=x.img @ x.queue_txt.t(), queue_t2i=x.txt @ x.queue_img.t())


def _infonce(x: _Inputs) -> torch.Tensor:
    return info_nce(_target(x), x.log_logit_scale.clamp(max=math.log(100.0)).exp())


def _dbl_total(x: _Inputs) -> torch.Tensor:
    s = _target(x)
    return hinge_triplet(s, MARGIN, True) + boost_relative(s, _reference(x), MARGIN)


STEPS: dict[str, Callable[[_Inputs], torch.Tensor]] = {
    "triplet": lambda x: hinge_triplet(_target(x), MARGIN, True),
    "triplet_sum": lambda x: hinge_triplet(_target(x), MARGIN, False),
    "dbl_relative": lambda x: boost_relative(_target(x), _reference(x), MARGIN),
    "dbl_absolute": lambda x: boost_absolute(_target(x), _reference(x), MARGIN),
    "dbl_relative_soft": lambda x: boost_relative(_target(x), _reference(x), MARGIN, soft_adapt=True),
    "dbl_total": _dbl_total,
    "infonce": _infonce,
    "distillation": lambda x: distillation(_target(x), _reference(x), 0.1),
    "mutual_learning": lambda x: mutual_learning(_target(x), _reference(x), 10.0),
    "dcl": _dcl,
    "aoq": lambda x: aoq_quintuplet(_target(x), _offline(x)),
    "structure": _structure,
}
assert tuple(STEPS) == LOSSES


# ----------------------------------------------------------------------------- measuring

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn: Callable[[_Inputs], torch.Tensor], x: _Inputs, item: bool = True) -> Optional[float]:
    """One forward + backward from cleared gradients; the loss value (a device sync) if `item`."""
    for t in x.leaves():
        t.grad = None
    loss = fn(x)
    loss.backward()
    return float(loss.detach()) if item else None


def _time_ms(fn, x: _Inputs, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _step(fn, x, item=False)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def _peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    return torch_cpu_peak_bytes(run)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bench_losses(local_batches: Sequence[int] = (256, 1024), global_batches: Sequence[int] = (2048, 8192),
                 dim: int = 256, repeats: int = 5, warmup: int = 2, seed: int = 0,
                 dtype: torch.dtype = torch.float32, losses: Optional[Sequence[str]] = None,
                 device: Optional[torch.device] = None,
                 progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Time (median ms of forward + backward over `repeats` after `warmup`) and peak memory of
    every loss for each (local B, global N) with B <= N, as rows of dicts; each row also holds
    its ratios to the triplet at the same sizes. The steps run in rounds of every loss once;
    the time ratio is the median over rounds of the loss's time over the triplet's time in the
    same round. Peak memory is over one more forward + backward, above what was allocated
    before it (CPU: the profiler's allocation events; CUDA: max_memory_allocated).
    `losses`: a subset (the triplet is always run). Keys of a row: loss, local, global, dim,
    ms, ms_min, ms_all, time_ratio, peak_mib, mem_ratio, value (the loss), device, dtype."""
    names = list(LOSSES if losses is None else losses)
    unknown = sorted(set(names) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown losses {unknown}; known: {', '.join(LOSSES)}")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    device = device or default_device()
    rows = []
    for n in global_batches:
        for b in local_batches:
            if b > n:
                continue
            x = _make_inputs(b, n, dim, seed, device, dtype)
            order = [BASELINE] + [k for k in names if k != BASELINE]
            # Rounds of every loss once each, so that a load change on a shared machine hits all
            # losses alike rather than whichever one happened to be running; then the median.
            for _ in range(warmup):
                for name in order:
                    _step(STEPS[name], x, item=False)
            times: dict[str, list[float]] = {name: [] for name in order}
            for _ in range(repeats):
                for name in order:
                    times[name].append(_time_ms(STEPS[name], x, device))
            base = None
            for name in order:
                for t in x.leaves():  # freed outside the measured step
                    t.grad = None
                value = []
                peak = _peak_bytes(lambda: value.append(_step(STEPS[name], x)), device)
                row = {"loss": name, "local": b, "global": n, "dim": dim, "ms": statistics.median(times[name]),
                       "ms_min": min(times[name]), "ms_all": times[name], "peak_mib": peak / 2**20, "value": value[0],
                       "device": str(device), "dtype": str(dtype).replace("torch.", "")}
                if base is None:
                    base = row
                # per round against that round's triplet, then the median: robust to load drifting
                row["time_ratio"] = statistics.median(t / t0 for t, t0 in zip(times[name], times[BASELINE]))
                row["mem_ratio"] = row["peak_mib"] / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")
                rows.append(row)
                if progress is not None:
                    progress(row)
            del x
    return rows


# ----------------------------------------------------------------------------- report

def boost_verdict(rows: Sequence[dict], limit: float = BOOST_TIME_LIMIT) -> tuple[bool, Optional[dict]]:
    """Whether every DBL boosting term costs at most `limit` triplets in time at every size,
    and the row with the worst ratio (None when no boosting term was measured)."""
    boost = [r for r in rows if r["loss"] in BOOST_TERMS]
    if not boost:
        return True, None
    worst = max(boost, key=lambda r: r["time_ratio"])
    return worst["time_ratio"] <= limit, worst


def format_bench(rows: Sequence[dict]) -> str:
    """A text table of `bench_losses` rows, and whether the DBL boosting terms stay within
    BOOST_TIME_LIMIT triplets in time at every size (with the worst ratio)."""
    header = f"{'loss':<18} {'local B':>7} {'global N':>8} {'ms (med)':>9} {'x triplet':>9} {'peak MiB':>9} {'x triplet':>9}"
    lines = ["time: forward + backward incl. score matmuls, median over rounds; time ratio: median over rounds "
             "of the ratio to that round's triplet; memory: peak over one forward + backward", header,
             "-" * len(header)]
    last = None
    for r in rows:
        if last is not None and (r["local"], r["global"]) != last:
            lines.append("")
        last = (r["local"], r["global"])
        lines.append(f"{r['loss']:<18} {r['local']:>7} {r['global']:>8} {r['ms']:>9.2f} {r['time_ratio']:>8.2f}x "
                     f"{r['peak_mib']:>9.{1 if r['peak_mib'] >= 10 else 3}f} {r['mem_ratio']:>8.2f}x")
    ok, worst = boost_verdict(rows)
    if worst is None:
        lines.append(f"DBL boosting terms ({', '.join(BOOST_TERMS)}): not measured")
    else:
        lines.append(f"DBL boosting terms ({', '.join(BOOST_TERMS)}) within {BOOST_TIME_LIMIT}x the triplet's time "
                     f"at every size: {'yes' if ok else 'NO'} (worst: {worst['loss']} {worst['time_ratio']:.2f}x "
                     f"at B={worst['local']}, N={worst['global']})")
    return "\n".join(lines)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_bench_loss(args) -> int:
    torch.set_num_threads(args.threads or cpu_count())
    device = default_device()
    dtype = _DTYPES[args.dtype]
    print(machine_line(device), flush=True)
    print(f"bench loss: local B {list(args.local_batches)}, global N {list(args.global_batches)}, dim {args.dim}, "
          f"{args.dtype}, median of {args.repeats} after {args.warmup} warm-up steps; forward + backward "
          f"including the score matmuls", flush=True)
    t0 = time.time()

    def progress(r):
        print(f"  {r['loss']:<18} B={r['local']:<5} N={r['global']:<6} {r['ms']:9.2f} ms {r['peak_mib']:9.1f} MiB",
              file=sys.stderr, flush=True)

    rows = bench_losses(args.local_batches, args.global_batches, dim=args.dim, repeats=args.repeats,
                        warmup=args.warmup, seed=args.seed, dtype=dtype, device=device,
                        progress=None if args.quiet else progress)
    print(format_bench(rows))
    print(f"bench wall time: {time.time() - t0:.0f}s")
    if args.json:
        meta = {"machine": machine_line(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"rows written to {args.json}")
    return 0


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("loss", help="time and peak memory of every loss, forward + backward, as one rank",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--local", dest="local_batches", type=int, nargs="+", default=[256, 1024],
                   help="local batch sizes B (queries of this rank)")
    b.add_argument("--global", dest="global_batches", type=int, nargs="+", default=[2048, 8192],
                   help="global batch sizes N (candidates gathered from all ranks); pairs with B > N are skipped")
    b.add_argument("--dim", type=int, default=256, help="embedding width")
    b.add_argument("--repeats", type=int, default=5, help="timed steps; the median is reported")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    b.add_argument("--quiet", action="store_true", help="no per-loss progress on stderr")
    b.set_defaults(func=cmd_bench_loss)


if __name__ == "__main__":
    import benchmarks

    sys.exit(benchmarks.run(add_parser))
