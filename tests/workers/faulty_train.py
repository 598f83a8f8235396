"""`python -m dbl_scale.cli.train` with faults injected, for tests/test_faults.py only (the
library's training step carries no test hooks). DBL_SCALE_INJECT_<FAULT>="RANK:STEP,STEP"
(0-based optimizer steps):
  NONFINITE        the target's loss is NaN on that rank at those steps
  NONFINITE_GRAD   its gradient is NaN there, the loss finite (+0: 0 * d sqrt(0) is NaN)
  KILL             the rank kills itself (SIGKILL) as the step begins
"""
import os
import signal
import sys

from dbl_scale import distributed, train
from dbl_scale.cli import train as cli_train

FAULTS = {fault: os.environ.get(f"DBL_SCALE_INJECT_{fault}", "") for fault in ("NONFINITE", "NONFINITE_GRAD", "KILL")}
real_step = train.train_step


def injected(fault: str, step: int) -> bool:
    if not FAULTS[fault]:
        return False
    rank, steps = FAULTS[fault].split(":")
    return int(rank) == distributed.rank() and str(step) in steps.split(",")


def faulty_step(method, branches, batch, step, boundary=True):
    if injected("KILL", step):
        os.kill(os.getpid(), signal.SIGKILL)
    losses = method.losses

    def faulted(outs, image_ids, s=0):
        terms = losses(outs, image_ids, s)
        if injected("NONFINITE", step):
            terms[-1]["loss"] = terms[-1]["loss"] * float("nan")
        if injected("NONFINITE_GRAD", step):
            terms[-1]["loss"] = terms[-1]["loss"] + (0.0 * outs[-1].img).sum().sqrt()
        return terms

    method.losses = faulted
    try:
        return real_step(method, branches, batch, step, boundary)
    finally:
        del method.losses  # the class's own again


train.train_step = faulty_step

if __name__ == "__main__":
    sys.exit(cli_train.main())
