"""End to end: a 2-rank DeepSpeed run that logs to a real MLflow store, read back with
mlflow.search_runs; and the demo command on a small ShapesCaptions it builds itself."""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port, torchrun


def test_two_rank_run_logs_to_mlflow(shapes_root, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = torchrun(["-m", "dbl_scale.train", "--config", TINY, f"data.root={shapes_root}", "loss.method=dbl",
                     "train.steps=6", "train.log_every=2", f"tracking.uri={uri}", "tracking.experiment=e2e",
                     "tracking.run_name=e2e-dbl", f"train.output_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    assert "step 6/6" in proc.stdout and "rSum" in proc.stdout

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 1  # only rank 0 logged
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "e2e-dbl"
    assert run["params.loss.method"] == "dbl" and run["params.model.text.layers"] == "1"
    assert run["tags.world_size"] == "2" and run["tags.zero_stage"] == "2"
    assert 0 < run["metrics.test/rsum"] <= 600

    client = MlflowClient(uri)
    for key in ("loss", "loss/raw", "loss/boost", "lr", "samples_per_s", "momentum"):
        history = client.get_metric_history(run["run_id"], key)
        assert [m.step for m in history] == [2, 4, 6], key
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"config.yaml", "ds_config.json", "metrics.json"} <= artifacts
    saved = json.loads((tmp_path / "runs" / "e2e-dbl" / "metrics.json").read_text())
    assert saved["rsum"] == pytest.approx(run["metrics.test/rsum"])
    ds = json.loads((tmp_path / "runs" / "e2e-dbl" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 8


def test_demo_builds_data_trains_both_methods_and_compares(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "dbl_scale.cli", "demo", "--config", "tiny", "--tracking-uri", uri,
         "--experiment", "demo-test", f"data.root={tmp_path / 'data'}", "data.build_train=64",
         "data.build_val=8", "data.build_test=20", "train.steps=4", f"train.output_dir={tmp_path / 'runs'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "building ShapesCaptions" in out
    for row in ("triplet (VSE++)", "DBL (momentum)", "chance", "oracle ceiling"):
        assert row in out
    assert "MLflow: 2 runs in experiment 'demo-test'" in out
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["demo-test"])
    assert sorted(runs["params.loss.method"]) == ["dbl", "triplet"]
    assert (runs["status"] == "FINISHED").all()
