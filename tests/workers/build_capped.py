"""Build a DualEncoder while this process may not hold more than `fraction` of the model's
full size on top of what it already uses (a cap on its data segment, RLIMIT_DATA, which
covers every heap and anonymous allocation), and report what happened as JSON.

    torchrun --nproc_per_node 2 build_capped.py zero3 TOKENIZER OUT.json   # built partitioned (train.partitioned)
    python build_capped.py full TOKENIZER OUT.json                         # built whole, as without zero.Init

The size is known beforehand from a build on the meta device (no memory); that build also
imports every module the real build needs, so the baseline is taken after all imports.
Run it with MALLOC_MMAP_THRESHOLD_=65536: glibc then hands every freed block of 64 KiB or
more back to the system at once, so the data segment measures what the build needs rather
than what the allocator keeps cached from the full-size layers it has already freed.
"""
from __future__ import annotations

import gc
import json
import re
import resource
import sys

import torch

from dbl_scale import distributed
from dbl_scale.config import load_config
from dbl_scale.branches import new_model
from dbl_scale.optim import deepspeed_config

FRACTION = 0.65  # of the full model; a rank holds 1/2 of it, plus one layer while it is built
OVERRIDES = ["model.vision.hidden=512", "model.vision.layers=8", "model.vision.heads=8",
             "model.text.hidden=512", "model.text.layers=8", "model.text.heads=8", "model.embed_dim=256",
             "train.deepspeed=ds_configs/zero3.json"]


def vm_data() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmData:\s+(\d+) kB", f.read()).group(1)) * 1024


def main() -> None:
    mode, tokenizer_dir, out = sys.argv[1:4]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = load_config(None, OVERRIDES)
    ds = None
    if mode == "zero3":
        distributed.init_distributed()
        ds = deepspeed_config(cfg, distributed.world_size())
    with torch.device("meta"):
        full_bytes = sum(p.numel() * p.element_size() for p in new_model(cfg, tokenizer, 0).parameters())
    gc.collect()
    distributed.barrier()
    base = vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (base + int(FRACTION * full_bytes), resource.RLIM_INFINITY))
    report = {"mode": mode, "full_bytes": full_bytes, "cap_bytes": int(FRACTION * full_bytes)}
    try:
        model = new_model(cfg, tokenizer, 0, ds=ds)
        params = list(model.parameters())
        report.update(built=True, data_growth_bytes=vm_data() - base,
                      local_bytes=sum(p.ds_tensor.numel() * p.ds_tensor.element_size() if hasattr(p, "ds_tensor")
                                      else p.numel() * p.element_size() for p in params),
                      all_partitioned=all(hasattr(p, "ds_tensor") and p.numel() == 0 for p in params))
    except (RuntimeError, MemoryError) as e:  # torch: "DefaultCPUAllocator: can't allocate memory"
        report.update(built=False, error=str(e).splitlines()[0][:200])
    rank = distributed.rank()
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(report, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
