"""The sbatch scripts on a real one-node Slurm cluster (slurmctld, slurmd and munged started
here; installed from the Debian packages when missing): a 2-rank CPU run submitted with
`sbatch`, preempted by Slurm's own USR1 to the batch script, requeued, and resumed into the
same MLflow run."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port, torchrun

pytestmark = pytest.mark.launch  # every test here starts a process


def _sh(*cmd, env=None, check=True, timeout=120) -> str:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check, timeout=timeout).stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a one-node cluster with this machine's CPUs."""
    if not shutil.which("slurmctld"):
        subprocess.run(["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"], check=True, timeout=600,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), capture_output=True)
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=dbltest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "MpiDefault=none", "ReturnToService=2", "JobRequeue=1",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool", f"SlurmctldPidFile={root}/ctld.pid",
        f"SlurmdPidFile={root}/d.pid", f"SlurmctldLogFile={root}/ctld.log", f"SlurmdLogFile={root}/d.log",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
        f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    (root / "state").mkdir()
    (root / "spool").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        _sh("munged", "--force")
    _sh("slurmctld", "-f", str(conf), env=env)
    _sh("slurmd", "-f", str(conf), env=env)
    deadline = time.time() + 60
    while "idle" not in _sh("sinfo", "-h", "-o", "%T", env=env, check=False):
        assert time.time() < deadline, (root / "ctld.log").read_text()[-3000:]
        time.sleep(0.5)
    yield env
    _sh("scontrol", "shutdown", env=env, check=False)
    for pid_file in ("ctld.pid", "d.pid"):  # slurmd outlives `scontrol shutdown` when it is busy
        if (root / pid_file).exists():
            subprocess.run(["kill", (root / pid_file).read_text().strip()], check=False)


def _job_state(env, job: str) -> dict[str, str]:
    fields = _sh("scontrol", "show", "job", "-o", job, env=env, check=False).split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def _wait(predicate, timeout: float, what: str, log: Path, env=None, job: str = ""):
    """Until `predicate()`; fails at `timeout`, or at once when the job ended without it."""
    deadline = time.time() + timeout
    while not predicate():
        ended = job and _job_state(env, job).get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
        assert time.time() < deadline and not ended, \
            f"no {what}:\n" + (log.read_text()[-5000:] if log.exists() else "")
        time.sleep(0.5)


@pytest.mark.slow
def test_train_sbatch_is_preempted_requeued_and_resumes_in_the_same_mlflow_run(slurm, shapes_root, tmp_path):
    env = dict(slurm, DBL_SCALE_NPROC_PER_NODE="2", DBL_SCALE_PYTHON=sys.executable, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1")
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=triplet", "train.steps=40",
            "train.log_every=1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=slurm", f"train.output_dir={tmp_path / 'runs'}"]
    job = _sh("sbatch", "--parsable", "-N", "1", "--job-name=sb", f"--chdir={tmp_path}",
              str(REPO / "slurm" / "train.sbatch"), *args, env=env).strip().split(";")[0]
    log = tmp_path / f"sb-{job}.out"
    _wait(lambda: log.exists() and "[sb-%s] step 3/40" % job in log.read_text(), 300, "step 3", log, env, job)
    _sh("scancel", "--signal=USR1", "--batch", job, env=env)  # what --signal=B:USR1@120 delivers
    run_dir = tmp_path / "runs" / f"sb-{job}"
    _wait(lambda: _job_state(env, job).get("Restarts") == "1", 300, "requeue", log, env, job)
    stopped = int((run_dir / "PREEMPTED").read_text())
    assert 3 <= stopped < 40 and (run_dir / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").exists()
    # Slurm holds a requeued job ~2 min (BeginTime); release it now, but not within the second of
    # the requeue: slurmd compares the old job's credential revocation with the new credential's
    # time at one-second granularity and kills a job started in the same second ("Job credential
    # revoked", seen once)
    time.sleep(3)
    _sh("scontrol", "update", f"JobId={job}", "StartTime=now", env=env)
    _wait(lambda: _job_state(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 600, "the end", log)
    text = log.read_text()
    assert _job_state(env, job)["JobState"] == "COMPLETED", text[-5000:]
    assert "requeueing job" in text and f"resumed sb-{job} from" in text and "restart 1" in text
    assert not (run_dir / "PREEMPTED").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("slurm").experiment_id])
    assert run.info.run_name == f"sb-{job}" and run.info.status == "FINISHED"
    assert run.data.tags["slurm_job_id"] == job and run.data.tags["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 41))
    assert run.data.tags["slurm_job_nodelist"] and 0 < run.data.metrics["test/rsum"] <= 600

    torchrun(["-m", "dbl_scale.cli.train", *args, "tracking.run_name=uninterrupted", "eval.at_end=false"], cwd=tmp_path)
    ours = torch.load(run_dir / "model.pt", weights_only=True)
    reference = torch.load(tmp_path / "runs" / "uninterrupted" / "model.pt", weights_only=True)
    assert max((ours[k].float() - reference[k].float()).abs().max().item() for k in ours) <= 1e-6


def test_srun_without_torchrun_is_one_rank_per_task_and_a_batch_script_without_srun_is_refused(
        slurm, shapes_root, tmp_path):
    env = dict(slurm, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    train = [sys.executable, "-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={shapes_root}",
             "train.steps=2", "eval.at_end=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
             "tracking.experiment=srun", f"train.output_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(["srun", "-n", "2", f"--chdir={tmp_path}", *train, "tracking.run_name=srun2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("srun").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"

    job = _sh("sbatch", "--parsable", "-n", "2", "--job-name=nosrun", f"--chdir={tmp_path}", "--wrap",
              " ".join(train + ["tracking.run_name=nosrun"]), env=env).strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"
    _wait(lambda: _job_state(env, job).get("JobState") in ("COMPLETED", "FAILED"), 300, "the job's end", log)
    assert _job_state(env, job)["JobState"] == "FAILED"
    assert "SLURM_NTASKS=2 processes are visible but this one has no rank" in log.read_text()


def test_sweep_sbatch_trains_one_seed_per_array_task_and_eval_sbatch_scores_one(slurm, shapes_root, tmp_path):
    env = dict(slurm, DBL_SCALE_NPROC_PER_NODE="1", DBL_SCALE_PYTHON=sys.executable, PYTHONPATH=str(REPO),
               OMP_NUM_THREADS="1", DBL_SCALE_SLURM_DIR=str(REPO / "slurm"))
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=triplet", "train.steps=4",
            "eval.at_end=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=sweep",
            f"train.output_dir={tmp_path / 'runs'}"]
    array = _sh("sbatch", "--parsable", "--array=0-1", "--job-name=sw", f"--chdir={tmp_path}",
                str(REPO / "slurm" / "sweep.sbatch"), *args, env=env).strip().split(";")[0]
    logs = [tmp_path / f"sw-{array}_{task}.out" for task in (0, 1)]
    _wait(lambda: not _sh("squeue", "-h", "-j", array, env=env, check=False).strip(), 600, "the array's end", logs[0])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id], order_by=["attributes.run_name"])
    assert [(r.info.run_name, r.data.params["train.seed"], r.info.status) for r in runs] == [
        (f"sw-{array}-0", "0", "FINISHED"), (f"sw-{array}-1", "1", "FINISHED")], [p.read_text()[-3000:] for p in logs]

    job = _sh("sbatch", "--parsable", "--job-name=ev", f"--chdir={tmp_path}", str(REPO / "slurm" / "eval.sbatch"),
              "--run-dir", str(tmp_path / "runs" / f"sw-{array}-0"), "--split", "test",
              "--out", str(tmp_path / "eval0"), env=env).strip().split(";")[0]
    log = tmp_path / f"ev-{job}.out"
    _wait(lambda: _job_state(env, job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 300, "eval", log)
    assert _job_state(env, job)["JobState"] == "COMPLETED", log.read_text()[-5000:]
    assert (tmp_path / "eval0" / "ranks.npz").exists() and "rSum" in log.read_text()
