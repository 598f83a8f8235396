"""A rank that finished its work also exits cleanly (issue 33, item 13).

The abort seen once in the suite ("terminate called without an active exception", after the
ZeRO-3 load worker had written its report) came from a gloo process group still alive when
the interpreter tore itself down: a gloo worker thread freeing a finished collective's tensors
takes the GIL, Python ends that thread with pthread_exit during finalization, and the unwind
through a noexcept destructor calls std::terminate (core dump: `ProcessGroupGloo::runLoop` ->
`~AsyncBarrierWork` -> `TensorImpl::decref_pyobject` -> `take_gil` -> `pthread_exit`). It
strikes at random (measured: 4 of 25 and 2 of 10 two-rank runs holding the group; 0 of 30
with the fix), so the test checks its precondition instead, which is certain: no rank may
reach the interpreter's teardown while a gloo thread runs. DeepSpeed keeps the group
referenced past `destroy_process_group` (in ZeRO-3 state Python cannot reach), so the ranks
end through `distributed.exit_process`.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, TINY, free_port
from dbl_scale.cli.launch import launch_env, torchrun_command

# Loaded by every Python process that has this folder on its path: at the interpreter's
# teardown (atexit) a rank writes which gloo threads are still running.
PROBE = '''import atexit, json, os


def _probe():
    from dbl_scale import distributed

    path = os.path.join(os.environ["EXIT_PROBE_DIR"], f"rank{os.environ['RANK']}-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(distributed.comm_threads(), f)


if os.environ.get("EXIT_PROBE_DIR") and "RANK" in os.environ:
    atexit.register(_probe)
'''


def test_comm_threads_sees_a_gloo_group_until_its_last_reference_goes():
    import gc

    import torch.distributed as dist

    from dbl_scale import distributed

    assert distributed.comm_threads() == []
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    held = [dist.group.WORLD]  # as DeepSpeed's engines hold it
    distributed.shutdown()
    assert "pt_gloo_runloop" in distributed.comm_threads()  # destroyed, yet running while referenced
    held.clear()
    gc.collect()
    assert distributed.comm_threads() == []


@pytest.mark.launch
def test_no_rank_tears_down_the_interpreter_with_gloo_threads_running(shapes_root, tmp_path):
    """Two ranks of `python -m dbl_scale.cli.train` under ZeRO-3 (where the group outlives
    `shutdown`): a rank that reached the teardown must have had no gloo thread left."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "sitecustomize.py").write_text(PROBE)
    (tmp_path / "seen").mkdir()
    env = dict(launch_env(2), OMP_NUM_THREADS="1", PYTHONPATH=f"{tmp_path / 'probe'}{os.pathsep}{REPO}",
               EXIT_PROBE_DIR=str(tmp_path / "seen"))
    args = ["--config", TINY, f"data.root={shapes_root}", "train.deepspeed=zero3", "train.steps=2",
            "eval.at_end=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"train.output_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(torchrun_command(2, "dbl_scale.cli.train", args), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-4000:]
    for seen in (tmp_path / "seen").iterdir():
        assert json.loads(seen.read_text()) == [], (seen.name, "reached the teardown with gloo threads running")
