"""The rank process of `python -m benchmarks.gpu`: parts (b)-(e) in one process, started by
the driver through torchrun (benchmarks/gpu.py)."""
import sys

from benchmarks.gpu import rank_main

if __name__ == "__main__":
    from dbl_scale import distributed

    distributed.exit_process(rank_main())
