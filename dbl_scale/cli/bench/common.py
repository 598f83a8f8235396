"""What the bench commands and the repository's benchmarks share: the machine line their
figures are printed under, the usable CPUs, and freeing a set of branches."""
from __future__ import annotations

import gc
import os
import platform
from pathlib import Path

MIB = 2 ** 20


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_line(device) -> str:
    import torch

    dev = (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f"cpu ({_cpu_model()})")
    return (f"machine: {cpu_count()} CPUs usable ({os.cpu_count()} total), torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, device {dev}")


def release(branches) -> None:
    """Free a set of branches before building the next (engines hold hooks and cycles)."""
    from ... import distributed

    for br in branches:
        for engine in (br.engine, br.partitioner):
            if engine is not None:
                engine.destroy()
    branches.clear()
    gc.collect()
    distributed.barrier()
