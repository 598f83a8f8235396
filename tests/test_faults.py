"""Faults injected into real 2-rank runs: a non-finite loss on one rank is skipped on every rank
(no optimizer, EMA or LR step), counted in MLflow, and too many in a row stop the run with a
checkpoint of the last good state; a rank killed mid-run stops the job promptly and leaves a
checkpoint the run resumes from; a real MLflow server that dies mid-run loses no metric."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port
from dbl_scale.checkpoint import safe_load
from dbl_scale.cli.launch import launch_env, torchrun_command

pytestmark = pytest.mark.launch  # every test here starts a process


def _run(shapes_root, tmp_path, inject: str, *overrides, kill: str = "", fault: str = "NONFINITE"
         ) -> subprocess.CompletedProcess:
    """A DBL momentum run (EMA anchor, ZeRO-2) whose target loss (`fault=NONFINITE_GRAD`: its
    gradient) is NaN on rank 1 at `inject` (0-based steps), and which `kill` ("RANK:STEP")
    kills with SIGKILL."""
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=dbl", "loss.dbl.momentum=0.9",
            "train.steps=6", "train.log_every=2", "checkpoint.every=2", "eval.at_end=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=faults",
            "tracking.run_name=nan", f"train.output_dir={tmp_path / 'runs'}", *overrides]
    env = dict(launch_env(2), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{f"DBL_SCALE_INJECT_{fault}": f"1:{inject}"},
               DBL_SCALE_INJECT_KILL=kill)
    return subprocess.run(torchrun_command(2, str(REPO / "tests" / "workers" / "faulty_train.py"), args), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def _state(ckpt):
    """The target's fp32 master weights, its Adam moments and the EMA anchor of a checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ema = torch.load(ckpt / "branch0_ema.pt", weights_only=True)
    shards = sorted((ckpt / "branch1").glob("*optim_states.pt"))
    if not shards:  # ZeRO-0: weights and the optimizer in one file
        states = safe_load(ckpt / "branch1" / "mp_rank_00_model_states.pt")
        return states["module"], [v for s in states["optimizer"]["state"].values() for v in s.values()], ema
    optim = [safe_load(f)["optimizer_state_dict"] for f in shards]
    moments = [v for o in optim for s in o["base_optimizer_state"]["state"].values() for v in s.values()]
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="branch1"), moments, ema


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


@pytest.mark.parametrize("stage", [0, 2])
def test_a_non_finite_gradient_from_a_finite_loss_is_skipped_on_every_rank(shapes_root, tmp_path, stage):
    """ZeRO-0 checks the gradients itself; ZeRO 1-3 rely on DeepSpeed's own check of the global
    gradient norm. Either way no rank updates weights, moments or the EMA anchor."""
    proc = _run(shapes_root, tmp_path, "2,3", f"train.deepspeed={REPO / 'ds_configs' / f'zero{stage}.json'}",
                fault="NONFINITE_GRAD")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "step 3: non-finite gradient (the loss was finite)" in proc.stderr
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    _assert_same(_state(ckpts / "step_00000002"), _state(ckpts / "step_00000004"))
    after = _state(ckpts / "step_00000006")
    assert all(torch.isfinite(w).all() for w in after[0].values())
    assert not torch.equal(next(iter(after[0].values())), next(iter(_state(ckpts / "step_00000004")[0].values())))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    skipped = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/skipped_nonfinite")]
    assert skipped == [(2, 0), (4, 2), (6, 2)]


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
    exists; `checkpoint.resume=latest` removes a half-written checkpoint and finishes the same
    MLflow run."""
    t0 = time.time()
    proc = _run(shapes_root, tmp_path, "", "train.steps=8", "train.collective_timeout_s=300", kill="1:5")
    assert proc.returncode != 0 and time.time() - t0 < 240
    ckpts = tmp_path / "runs" / "nan" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    _state(ckpts / "step_00000004")  # loads: complete and plain data
    (ckpts / "step_00000006.tmp" / "branch1").mkdir(parents=True)  # as a crash mid-save leaves it
    (ckpts / "step_00000006.tmp" / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    proc = _run(shapes_root, tmp_path, "", "train.steps=8", "checkpoint.resume=latest")
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "a checkpoint a crash left half-written" in proc.stderr and not (ckpts / "step_00000006.tmp").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6, 8]


class MlflowServer:
    """A real `mlflow server` on loopback (sqlite behind it), killed and restarted at will."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def wait_up(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.uri} did not come up in {timeout} s")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole server (its uvicorn workers too), no goodbye
        self.proc.wait(timeout=30)


def _tracked_run(shapes_root, tmp_path, server: MlflowServer, name: str, when_started, *overrides,
                 uri_from_env: bool = False) -> str:
    """An 8-step 1-rank triplet run logging every step to `server` (named by tracking.uri, or by
    MLFLOW_TRACKING_URI); `when_started()` runs as soon as its MLflow run exists (before the
    first step). Returns its output."""
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=triplet", "train.steps=8",
            "train.log_every=1", "tracking.flush_every=1", "eval.at_end=false", "tracking.retry_max_s=2",
            "tracking.experiment=outage", f"tracking.run_name={name}", f"train.output_dir={tmp_path / 'runs'}",
            *([] if uri_from_env else [f"tracking.uri={server.uri}"]), *overrides]
    env = {"MLFLOW_TRACKING_URI": server.uri} if uri_from_env else {}
    code, out = _watched(1, args, tmp_path, f"MLflow {server.uri} run ", lambda proc: when_started(), env)
    assert code == 0, out[-5000:]
    return out


def _watched(nproc: int, args: list[str], cwd: Path, trigger: str, action, env: Optional[dict] = None
             ) -> tuple[int, str]:
    """A training run on `nproc` ranks; `action(torchrun process)` runs once, at the first
    output line that contains `trigger`. Returns the exit code and the output."""
    env = dict(launch_env(nproc), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.Popen(torchrun_command(nproc, "dbl_scale.cli.train", args), cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, fired = [], False
    try:
        for line in proc.stdout:
            out.append(line)
            if trigger in line and not fired:
                fired = True
                action(proc)
        return proc.wait(timeout=300), "".join(out)
    finally:
        proc.kill()


def _assert_complete(server: MlflowServer, name: str) -> None:
    """Every step's loss is in MLflow once, the run is FINISHED and its config is attached."""
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                                filter_string=f"attributes.run_name = '{name}'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "lr")] == list(range(1, 9))
    assert run.info.status == "FINISHED"
    assert {"config.yaml", "ds_config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_an_mlflow_outage_loses_no_metric(shapes_root, tmp_path):
    """A real `mlflow server` dies as training starts. (1) It comes back while the run is still
    up: the run trains through the outage, replays its spool and ends with the full history.
    (2) It does not come back in time: the run (told the server by MLFLOW_TRACKING_URI) still
    finishes, says where its spool is, and `dbl-scale tracking replay` later completes the
    history; a second replay finds nothing."""
    server = MlflowServer(tmp_path)
    server.start()
    server.wait_up()

    def kill_and_restart():
        server.kill()
        server.start()  # up again within ~10-30 s: after most steps, before the run's end gives up

    out = _tracked_run(shapes_root, tmp_path, server, "back", kill_and_restart, "tracking.final_wait_s=300")
    assert "did not take a tracking record" in out and "spooled tracking records replayed" in out
    assert "is unreachable" not in out and not (tmp_path / "runs" / "back" / "mlflow_spool.jsonl").exists()
    server.wait_up()
    _assert_complete(server, "back")

    out = _tracked_run(shapes_root, tmp_path, server, "gone", server.kill, "tracking.final_wait_s=1", uri_from_env=True)
    spool = tmp_path / "runs" / "gone" / "mlflow_spool.jsonl"
    assert f"Once MLflow is back: dbl-scale tracking replay {spool}" in out and spool.exists()
    server.start()
    server.wait_up()
    replay = [sys.executable, "-m", "dbl_scale.cli", "tracking", "replay", str(spool)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(replay, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "spool removed" in done.stdout, done.stderr
    assert not spool.exists()
    _assert_complete(server, "gone")
    again = subprocess.run(replay, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing left to send" in again.stderr
    server.kill()


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(shapes_root, tmp_path):
    """The run folder is a 3.5 MiB tmpfs: the step-2 checkpoint (2.3 MiB) fits, the step-4 one
    does not. The run stops with an error that says so, the step-2 checkpoint loads, and no
    half-written folder is left behind."""
    out = tmp_path / "small_disk"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3500k", "tmpfs", str(out)], check=True)
    try:
        proc = _run(shapes_root, tmp_path, "", "train.steps=6", f"train.output_dir={out}")
        assert proc.returncode != 0
        log = proc.stdout + proc.stderr
        assert f"could not write checkpoint step 4 into {out / 'nan' / 'checkpoints'}" in log, log[-5000:]
        assert f"the newest complete checkpoint, {out / 'nan' / 'checkpoints' / 'step_00000002'}, is intact" in log
        ckpts = out / "nan" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
        _state(ckpts / "step_00000002")  # complete and loadable
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


def test_a_signal_on_one_rank_stops_every_rank_with_a_checkpoint_and_the_run_resumes(shapes_root, tmp_path):
    """SIGUSR1 (Slurm's warning) reaches rank 1 only: at the next step boundary both ranks
    agree, write a checkpoint, mark the run PREEMPTED and exit with 75; the MLflow run is
    KILLED. `checkpoint.resume=latest` continues it: one history, FINISHED, tagged with its
    commit and host."""
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=triplet", "train.steps=400",
            "train.log_every=1", "eval.at_end=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=faults", "tracking.run_name=pre", f"train.output_dir={tmp_path / 'runs'}"]

    def signal_rank1(torchrun):
        ranks = subprocess.run(["pgrep", "-P", str(torchrun.pid)], capture_output=True, text=True).stdout.split()
        (rank1,) = [int(p) for p in ranks if b"RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
        os.kill(rank1, signal.SIGUSR1)

    code, log = _watched(2, args, tmp_path, "[pre] step 3/400", signal_rank1)
    assert code != 0 and "exitcode  : 75" in log, log[-5000:]
    run_dir = tmp_path / "runs" / "pre"
    stopped = int((run_dir / "PREEMPTED").read_text())
    assert 3 <= stopped < 400 and f"preempted at step {stopped}" in log
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == [f"step_{stopped:08d}"] and (ckpts / f"step_{stopped:08d}" / "COMPLETE").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    assert run.info.status == "KILLED"

    env = dict(launch_env(2), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    resumed = subprocess.run(torchrun_command(2, "dbl_scale.cli.train", args[:4] + [
        f"train.steps={stopped + 2}", *args[5:], "checkpoint.resume=latest"]), cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert not (run_dir / "PREEMPTED").exists()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, stopped + 3))
    assert run.data.tags["host"] and len(run.data.tags["mlflow.source.git.commit"]) == 40
