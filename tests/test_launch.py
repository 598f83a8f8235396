"""What a process learns from where it runs: its rank from the launcher (and the starts it refuses), and whether its MLflow store sits on a network filesystem."""
from __future__ import annotations

import pytest

from dbl_scale.distributed import first_host, rank_environment


def test_a_launcher_that_sets_the_rank_wins():
    assert rank_environment({"RANK": "3", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}) == {}


def test_an_srun_step_without_torchrun_is_one_rank_per_task():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
           "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "4242"}
    assert rank_environment(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                     "MASTER_ADDR": "gpu003", "MASTER_PORT": str(20000 + 4242)}


@pytest.mark.parametrize("hint", ["SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_several_processes_without_a_rank_are_refused(hint):
    with pytest.raises(RuntimeError, match=f"{hint}=4 processes are visible but this one has no rank"):
        rank_environment({hint: "4", "SLURM_PROCID": "0"})


def test_a_plain_python_run_is_one_process():
    assert rank_environment({"SLURM_NTASKS": "1"})["WORLD_SIZE"] == "1"


@pytest.mark.parametrize("nodes,first", [("gpu[003-005,9],cpu1", "gpu003"), ("n1,n2", "n1"), ("a[7]", "a7"),
                                         ("host", "host"), ("r[10-11]c[1-2]", "r10c1")])
def test_first_host_of_a_slurm_node_list(nodes, first):
    assert first_host(nodes) == first


def test_an_sqlite_store_on_a_network_filesystem_is_named():
    from dbl_scale.tracking import network_filesystem

    mounts = ("/dev/vda / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\n"
              "tmpfs /home/me/scratch tmpfs rw 0 0\n")
    assert network_filesystem("sqlite:////home/me/mlflow.db", mounts) == "nfs4"
    assert network_filesystem("sqlite:////home/me/scratch/mlflow.db", mounts) is None  # the deeper mount wins
    assert network_filesystem("sqlite:////tmp/mlflow.db", mounts) is None
    assert network_filesystem("http://127.0.0.1:5000", mounts) is None


@pytest.mark.launch
def test_two_nodes_of_one_rank_train_what_one_node_of_two_ranks_trains(shapes_root, finished_run, tmp_path):
    """`dbl-scale train --nnodes 2 --node-rank R --rdzv-endpoint` started twice on this machine
    (two "nodes" meeting over c10d) ends with the same weights as the standalone 2-rank run
    of the same config (the shared `finished_run`)."""
    import os
    import subprocess
    import sys

    import torch

    from conftest import REPO, TINY, free_port

    endpoint = f"127.0.0.1:{free_port()}"
    args = ["--config", TINY, f"data.root={shapes_root}", "loss.method=triplet", "train.steps=4", "eval.at_end=false",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.run_name=anchor",
            f"train.output_dir={tmp_path / 'runs'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    nodes = [subprocess.Popen([sys.executable, "-m", "dbl_scale.cli", "train", "--nproc", "1", "--nnodes", "2",
                               "--node-rank", str(r), "--rdzv-endpoint", endpoint, *args], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 ranks x batch 8" in outs[0] + outs[1]
    ours = torch.load(tmp_path / "runs" / "anchor" / "model.pt", weights_only=True)
    theirs = torch.load(finished_run / "model.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
