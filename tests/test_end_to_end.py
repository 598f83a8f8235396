"""End to end: a 2-rank DeepSpeed run that logs to a real MLflow store, read back with
mlflow.search_runs; the demo command on a small ShapesCaptions it builds itself, and
`dbl-scale compare` on the demo's runs."""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port, torchrun

pytestmark = pytest.mark.launch  # every test here starts a process


def test_two_rank_run_logs_to_mlflow_validates_and_reports(shapes_root, tmp_path):
    """A DBL run on 2 ranks logs to a real MLflow store (one run, its parameters, tags, loss
    terms, diagnostics and artifacts); validation every 4 steps keeps the best model (chosen
    on val, evaluated on test); the final test evaluation leaves a recall plot and an HTML page
    in MLflow; `dbl-scale eval` re-evaluates the best model, writes per-query ranks and logs
    to the same run."""
    import numpy as np

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={shapes_root}", "loss.method=dbl",
                     "train.steps=8", "train.log_every=2", "eval.every=4", f"tracking.uri={uri}",
                     "tracking.experiment=e2e", "tracking.run_name=e2e-dbl", f"train.output_dir={tmp_path / 'runs'}",
                     "tracking.system_metrics_s=1", "tracking.log_model=true"],
                    cwd=tmp_path)
    assert "step 8/8" in proc.stdout and "rSum" in proc.stdout

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["e2e"])
    assert len(runs) == 1  # only rank 0 logged
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["tags.mlflow.runName"] == "e2e-dbl"
    assert run["params.loss.method"] == "dbl" and run["params.model.text.layers"] == "1"
    assert run["tags.world_size"] == "2" and run["tags.zero_stage"] == "2" and run["tags.host"]
    assert len(run["tags.mlflow.source.git.commit"]) == 40 and run["tags.git_dirty"] in ("true", "false")
    assert run["metrics.system/cpu_utilization_percentage"] >= 0  # sampled on rank 0 every second
    assert 0 < run["metrics.test/rsum"] <= 600
    assert 0 <= run["metrics.test/t2t_r1"] <= run["metrics.test/t2t_r10"] <= 100  # single-modal beside it

    client = MlflowClient(uri)
    for key in ("loss", "loss/raw", "loss/boost", "lr", "samples_per_s", "momentum", "dbl/active",
                "dbl/same_negative", "dbl/target_gap", "dbl/anchor_gap", "anchor/distance"):
        history = client.get_metric_history(run["run_id"], key)
        assert [m.step for m in history] == [2, 4, 6, 8], key
    for key in ("dbl/active", "dbl/same_negative"):  # shares of the global batch's queries
        assert all(0.0 <= m.value <= 1.0 for m in client.get_metric_history(run["run_id"], key)), key
    distance = [m.value for m in client.get_metric_history(run["run_id"], "anchor/distance")]
    assert 0 < distance[0] < distance[-1]  # the EMA anchor trails the target by more as it trains
    artifacts = {a.path for a in client.list_artifacts(run["run_id"])}
    assert {"config.yaml", "ds_config.json", "metrics.json", "best_metrics.json"} <= artifacts
    run_dir = tmp_path / "runs" / "e2e-dbl"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["rsum"] == pytest.approx(run["metrics.test/rsum"])
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 8
    # the data as MLflow dataset inputs, the tokenizer's source, and the target as an MLflow model
    inputs = client.get_run(run["run_id"]).inputs.dataset_inputs
    contexts = {i.dataset.name: {t.value for t in i.tags if t.key == "mlflow.data.context"} for i in inputs}
    assert contexts == {"data/train": {"training"}, "data/test": {"evaluation"}}
    assert all(len(i.dataset.digest) == 16 for i in inputs)
    assert run["tags.tokenizer"] == str(shapes_root / "tokenizer")
    logged = mlflow.search_logged_models(experiment_ids=[run["experiment_id"]], output_format="list",
                                         filter_string=f"source_run_id = '{run['run_id']}'")
    assert len(logged) == 1 and (run_dir / "model" / "modeling_dbl.py").exists()

    val = client.get_metric_history(run["run_id"], "val/rsum")
    assert [m.step for m in val] == [4, 8]
    best_step = int((run_dir / "best" / "step.txt").read_text())
    assert best_step == max(val, key=lambda m: (m.value, -m.step)).step
    assert "metrics.best/test/rsum" in run
    reports = {a.path for a in client.list_artifacts(run["run_id"], "reports")}
    assert reports == {"reports/test_recall_curve.png", "reports/test_retrieval.html", "reports/test_ranks.npz"}

    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "eval", "--run-dir", str(run_dir / "best"),
                           "--nproc", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = np.load(run_dir / "eval" / "test-standard" / "ranks.npz")
    assert ranks["i2t"].shape == (40,) and ranks["t2i"].shape == (200,)
    assert ranks["t2t"].shape == (200,) and ranks["i2i"].shape == (40,) and (ranks["t2t"] >= 0).all()
    assert "T2T R@1" in proc.stdout
    html = (run_dir / "eval" / "test-standard" / "test_retrieval.html").read_text()
    assert "T2T R@1" in html and "I2T R@1" in html
    assert f"{run_dir.name} ({run['params.loss.method']})" in html  # titled with the run and its method
    metrics = MlflowClient(uri).get_run(run["run_id"]).data.metrics
    assert metrics["eval/test-standard/rsum"] == pytest.approx(metrics["best/test/rsum"], rel=1e-5)


@pytest.mark.slow
def test_demo_builds_data_trains_both_methods_and_compares(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, "-m", "dbl_scale.cli", "demo", "--config", "tiny", "--tracking-uri", uri,
         "--experiment", "demo-test", f"data.root={tmp_path / 'data'}", "data.build.train=64",
         "data.build.val=8", "data.build.test=20", "train.steps=4", f"train.output_dir={tmp_path / 'runs'}"],
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

    # `dbl-scale compare` on the demo's runs: both listed, best first, drawn into a figure
    # file, and the best one registered
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "compare", "--experiment", "demo-test",
                           "--tracking-uri", uri, "--format", "csv", "--plot", str(tmp_path / "cmp.png"),
                           "--register", "demo-best"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("demo-")]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("run,")).split(",")
    assert {"rsum", "t2t_r1", "t2t_r10"} <= set(header)  # single-modal recalls beside the cross-modal ones
    assert all(line.split(",")[header.index("t2t_r1")] not in ("", "-") for line in lines)
    ordered = runs.sort_values("metrics.test/rsum", ascending=False)
    assert [line.split(",")[0] for line in lines] == list(ordered["tags.mlflow.runName"])
    # the best run's model, exported from its folder (tiny runs log none themselves), registered
    assert "registered " + ordered["tags.mlflow.runName"].iloc[0] in proc.stdout
    (version,) = MlflowClient(uri).search_model_versions("name = 'demo-best'")
    assert version.run_id == ordered["run_id"].iloc[0]
    assert (tmp_path / "cmp.png").stat().st_size > 10_000
    # the figure is a file: compare logs no run of its own and re-parents nothing
    after = mlflow.search_runs(experiment_names=["demo-test"])
    assert sorted(after["run_id"]) == sorted(runs["run_id"])
    assert "tags.mlflow.parentRunId" not in after or after["tags.mlflow.parentRunId"].isna().all()
