"""Process-group helpers: start-up, rank info, gathers with and without gradient.

Rank and world size always come from `torch.distributed` (never from a launcher's own
state), so torchrun, the deepspeed launcher, accelerate and srun behave the same.
"""
from __future__ import annotations

import contextlib
import gc
import glob
import importlib
import logging
import os
import sys
from datetime import timedelta
from typing import Mapping, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init_distributed(timeout_s: float = 600) -> None:
    """Join the process group the launcher describes (env://), through DeepSpeed. A collective
    that waits longer than `timeout_s` for another rank fails instead of hanging.

    On CPU the backend is gloo, and DeepSpeed's shared-memory all-reduce op is not built:
    it JIT-compiles C++ for a minute on a cold machine and gloo does not need it.
    """
    import deepspeed  # heavy (seconds): imported by the processes that train, not by every command

    # (`import deepspeed.comm.torch as m` would bind the real torch: deepspeed.comm re-exports it)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")

    os.environ.update(rank_environment(os.environ))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    else:
        ds_torch_comm.build_shm_op = lambda: None
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))


# Process counts other launchers publish; more than one with no rank set means a misstart.
WORLD_HINTS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")


def rank_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The rendezvous variables this process must add to join its job, in this order:
    - a launcher's (torchrun, accelerate, the deepspeed launcher): RANK and WORLD_SIZE are set, nothing to add;
    - a Slurm job step (`srun` without torchrun): SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID,
      with the first node of the step as MASTER_ADDR and a port derived from the job id;
    - a plain `python` run: one process.
    Anything else that shows more than one process but no rank is refused: never N silent
    single-process runs writing the same run folder."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # inside `srun`
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
                "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodes),
                "MASTER_PORT": port}
    for hint in WORLD_HINTS:
        if int(env.get(hint, "1") or "1") > 1:
            where = ("a Slurm batch script, not an srun step: start the ranks with `srun` (or torchrun)"
                     if hint == "SLURM_NTASKS" else "no launcher this project reads: use torchrun or srun")
            raise RuntimeError(f"{hint}={env[hint]} processes are visible but this one has no rank (RANK/WORLD_SIZE "
                               f"unset): {where}, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself")
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": env.get("MASTER_PORT", "29517")}


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003",
    "r[10-11]c[1-2]" -> "r10c1" (what `scontrol show hostnames` prints first)."""
    out, depth, choice = [], 0, []
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        if ch == "[":
            depth, choice = 1, []
        elif ch == "]":
            depth = 0
            out.append("".join(choice).split(",")[0].split("-")[0])
        elif depth:
            choice.append(ch)
        else:
            out.append(ch)
    return "".join(out)


def shutdown() -> None:
    """End of a successful run: every rank leaves together and the process group is destroyed.
    `destroy_process_group` only forgets the group: its gloo threads stop when the last Python
    reference to it goes. References inside reference cycles are collected here; DeepSpeed
    keeps others that Python cannot reach (after ZeRO-2 and ZeRO-3 training alike), so a rank
    ends through `exit_process`."""
    if is_initialized():
        barrier()
        dist.destroy_process_group()
    gc.collect()


COMM_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")  # the thread names of gloo's process groups


def comm_threads() -> list[str]:
    """This process's communication threads still running (gloo's, by name, read from /proc;
    an empty list where /proc does not exist)."""
    names = []
    for comm in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm) as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(n for n in names if n in COMM_THREADS)


def exit_process(code: int) -> NoReturn:
    """End a rank after `shutdown` with exit status `code`.

    While a gloo group is alive its worker threads free finished collectives, and freeing a
    tensor Python used takes the GIL. If that happens while the interpreter finalizes, Python
    ends the thread with pthread_exit, whose unwinding through a noexcept destructor aborts the
    process ("terminate called without an active exception") after all its work is done. So a
    rank whose group outlived `shutdown` flushes what it wrote and ends without the
    interpreter's teardown; any other rank exits normally."""
    if not comm_threads():
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the body first (e.g. builds a missing tokenizer once); the others run it
    after rank 0 has finished, and then find the result in place."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def progress(work, desc: str):
    """A tqdm bar over `work` (an iterable, or a count to `update` by hand) for long work,
    drawn by rank 0 only and only on a terminal."""
    iterable, total = (None, work) if isinstance(work, int) else (work, None)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=rank() != 0 or not sys.stderr.isatty())


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums every rank's gradient of this rank's slice.

    Synchronous collectives on purpose: torch's functional (async) autograd gather corrupted
    the heap under gloo in our 2-rank CPU runs (`munmap_chunk(): invalid pointer` after a few
    hundred steps), while this form ran clean.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty(ctx.rows, *grad.shape[1:], dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        grad = grad.clone()  # gloo has no reduce-scatter: all-reduce, then keep this rank's rows
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank() * ctx.rows:(dist.get_rank() + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; gradients flow back to every rank's slice."""
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, without a backward path."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """`gather_with_grad` or `gather_no_grad`: the form losses take as their `gather` argument."""
    return gather_with_grad(x) if with_grad else gather_no_grad(x)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable value)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
    """A copy of `x` reduced over ranks, `op` "sum" or "max": the form losses take."""
    return {"sum": all_reduce_sum, "max": all_reduce_max}[op](x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_reduce_max_int(value: int) -> int:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
