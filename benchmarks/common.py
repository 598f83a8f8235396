"""Peak memory of torch's CPU allocations over a call, for the benchmarks that state one."""
from __future__ import annotations

from typing import Callable, Optional


def _allocation_events(prof) -> Optional[list[tuple[int, int]]]:
    """(time ns, bytes; negative for a free) of every allocator event the profiler saw, or None
    where this torch does not expose its event tree."""
    try:  # a private API, imported here so that its absence only costs the fallback
        from torch._C._profiler import _EventType
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except Exception:  # noqa: BLE001 - a private API: fall back below
        return None
    out, stack = [], list(roots)
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            out.append((e.start_time_ns, int(e.extra_fields.alloc_size)))
        stack.extend(e.children)
    return out


def torch_cpu_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of torch's CPU allocations over `run`, above what was allocated before it: the
    running sum of the profiler's allocation and free events, in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = _allocation_events(prof)
    if events is None:  # public API: each op's own net allocations, at its start (coarser)
        events = [(int(e.time_range.start * 1000), int(e.self_cpu_memory_usage)) for e in prof.events()
                  if e.self_cpu_memory_usage]
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak
