"""Faults injected into real 2-rank runs: a non-finite loss on one rank is skipped on every rank
(no optimizer, EMA or LR step), counted in MLflow, and too many in a row stop the run with a
checkpoint of the last good state; a rank killed mid-run stops the job promptly and leaves a
checkpoint the run resumes from."""
from __future__ import annotations

import subprocess
import time

import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY
from dbl_scale.checkpoint import safe_load
from dbl_scale.cli.launch import launch_env, torchrun_command


def _run(shapes_root, tmp_path, inject: str, *overrides, kill: str = "") -> subprocess.CompletedProcess:
    """A DBL momentum run (EMA anchor, ZeRO-2) whose target loss is NaN on rank 1 at `inject`
    (0-based steps), and which `kill` ("RANK:STEP") kills with SIGKILL."""
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=dbl", "loss.dbl.momentum=0.9",
            "train.steps=6", "train.log_every=2", "checkpoint.every=2", "eval.at_end=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=faults",
            "tracking.run_name=nan", f"train.output_dir={tmp_path / 'runs'}", *overrides]
    env = dict(launch_env(2), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DBL_SCALE_INJECT_NONFINITE=f"1:{inject}",
               DBL_SCALE_INJECT_KILL=kill)
    return subprocess.run(torchrun_command(2, "dbl_scale.cli.train", args), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _state(ckpt):
    """The target's fp32 master weights, its Adam moments and the EMA anchor of a checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    optim = [safe_load(f)["optimizer_state_dict"]
             for f in sorted((ckpt / "branch1").glob("*optim_states.pt"))]
    moments = [v for o in optim for s in o["base_optimizer_state"]["state"].values() for v in s.values()]
    return (get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="branch1"), moments,
            torch.load(ckpt / "branch0_ema.pt", weights_only=True))


def _assert_same(a, b):
    for x, y in zip(a[0].values(), b[0].values()):
        assert torch.equal(x, y)
    assert len(a[1]) == len(b[1]) > 0 and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k


def test_a_non_finite_loss_on_one_rank_is_skipped_on_every_rank(shapes_root, tmp_path):
    proc = _run(shapes_root, tmp_path, "2,3")  # steps 3 and 4 (1-based) are NaN on rank 1 only
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "step 3, rank 1: non-finite loss" in proc.stderr and "rank 0: non-finite" not in proc.stderr
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    _assert_same(_state(ckpts / "step_00000002"), _state(ckpts / "step_00000004"))  # nothing moved
    after = _state(ckpts / "step_00000006")
    assert not torch.equal(next(iter(after[0].values())), next(iter(_state(ckpts / "step_00000004")[0].values())))
    assert all(torch.isfinite(w).all() for w in after[0].values())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FINISHED"
    skipped = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/skipped_nonfinite")]
    assert skipped == [(2, 0), (4, 2), (6, 2)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 6]  # only finite steps


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_good_state(shapes_root, tmp_path):
    proc = _run(shapes_root, tmp_path, "2,3,4,5", "train.max_nonfinite=2")
    assert proc.returncode != 0
    assert "2 non-finite losses in a row (train.max_nonfinite): stopped at step 4" in proc.stdout + proc.stderr
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    assert (ckpts / "step_00000004" / "COMPLETE").exists() and not (ckpts / "step_00000006").exists()
    _assert_same(_state(ckpts / "step_00000002"), _state(ckpts / "step_00000004"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FAILED"


def test_a_rank_killed_mid_run_stops_the_job_and_the_run_resumes(shapes_root, tmp_path):
    """kill -9 of rank 1 before step 6: the launcher fails within a bounded time (not the
    collective timeout), the newest complete checkpoint (step 4) is intact and nothing newer
    exists; `checkpoint.resume=latest` finishes the same MLflow run."""
    t0 = time.time()
    proc = _run(shapes_root, tmp_path, "", "train.steps=8", "train.collective_timeout_s=300", kill="1:5")
    assert proc.returncode != 0 and time.time() - t0 < 240
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    _state(ckpts / "step_00000004")  # loads: complete and plain data
    proc = _run(shapes_root, tmp_path, "", "train.steps=8", "checkpoint.resume=latest")
    assert proc.returncode == 0, proc.stderr[-5000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]
