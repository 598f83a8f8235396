"""The benchmarks behind BENCHMARKS.md (benchmarks/) at toy sizes: `loss` measures every loss with
ratios and memory that make sense, `methods` tabulates and resumes, `eval` and `scale` print
their figures, `data` sizes the loader cores and reads back a run's logged wait."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dbl_scale import distributed
from benchmarks.loss import BOOST_TERMS, LOSSES, bench_losses, format_bench

from conftest import REPO


@pytest.fixture(scope="module")
def rows():
    return bench_losses(local_batches=(8, 16, 64), global_batches=(32,), dim=32, repeats=1, warmup=0)


def test_every_loss_measured_at_every_size(rows):
    sizes = [(8, 32), (16, 32)]  # B = 64 > N is skipped
    assert sorted({(r["local"], r["global"]) for r in rows}) == sorted(sizes)
    for size in sizes:
        at = {r["loss"]: r for r in rows if (r["local"], r["global"]) == size}
        assert set(at) == set(LOSSES)
        for r in at.values():
            assert r["ms"] > 0 and r["peak_mib"] > 0, r
            assert math.isfinite(r["value"]), r
        assert at["triplet"]["time_ratio"] == 1.0 and at["triplet"]["mem_ratio"] == 1.0
        for r in at.values():
            assert r["time_ratio"] == pytest.approx(r["ms"] / at["triplet"]["ms"])
            assert r["mem_ratio"] == pytest.approx(r["peak_mib"] / at["triplet"]["peak_mib"])


def test_memory_grows_with_the_batch(rows):
    small = {r["loss"]: r["peak_mib"] for r in rows if (r["local"], r["global"]) == (8, 32)}
    large = {r["loss"]: r["peak_mib"] for r in rows if (r["local"], r["global"]) == (16, 32)}
    for name in LOSSES:
        assert large[name] > small[name], (name, small[name], large[name])


@pytest.mark.launch
def test_format_names_every_loss(rows):
    text = format_bench(rows)
    for name in LOSSES:
        assert name in text
    assert "worst" in text and any(name in text.splitlines()[-1] for name in BOOST_TERMS)


def test_simulated_gathers_are_restored(rows):
    assert distributed.gather_with_grad.__module__ == "dbl_scale.distributed"
    assert distributed.gather_no_grad.__module__ == "dbl_scale.distributed"
    assert distributed.rank() == 0


@pytest.mark.launch
def test_cli(tmp_path, capsys):
    from benchmarks import run
    from benchmarks.loss import add_parser

    out = tmp_path / "rows.json"
    threads = torch.get_num_threads()
    try:
        assert run(add_parser, ["--local", "8", "--global", "16", "--dim", "16", "--repeats", "1", "--warmup", "0",
                                "--threads", "1", "--quiet", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "torch" in printed and "dbl_relative_soft" in printed
    saved = json.loads(out.read_text())["rows"]
    assert {r["loss"] for r in saved} == set(LOSSES)


def test_bench_methods_rows_yardsticks_and_intervals():
    """Rows bring their yardsticks (and the checkpoint they start from); the paired interval is
    Student's t over seeds; the table states each row's yardstick and both models."""
    from dbl_scale.cli.seeds import paired_interval
    from benchmarks.methods import BASE, markdown, select_rows, single_modal_markdown, split_only

    assert [r.name for r in select_rows(["DBL offline"])] == [BASE, "triplet, continued", "DBL offline"]
    assert [r.name for r in select_rows(["DBL online K=2"])] == [BASE, "DBL online K=2", "mutual learning"]
    assert [r.name for r in select_rows(["AOQ"])] == [BASE, "triplet, continued", "AOQ"]
    varied = select_rows(["DBL momentum"], "loss.dbl.momentum_init_left=0.2,0.5")
    assert [r.name for r in varied][1:] == ["DBL momentum [momentum_init_left=0.2]",
                                            "DBL momentum [momentum_init_left=0.5]"]
    assert varied[2].overrides[-1] == "loss.dbl.momentum_init_left=0.5" and varied[2].yardsticks == (BASE,)
    with pytest.raises(ValueError, match="unknown rows"):
        select_rows(["DBL"])
    assert split_only(["DBL online K=2", "AOQ", "data.root=x"], ["a=1"]) == (["DBL online K=2", "AOQ"], ["a=1", "data.root=x"])

    mean, half = paired_interval([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4: sd 1
    assert mean == pytest.approx(3.0) and half == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(paired_interval([1.0], [0.0])[1])

    def run(rsum, best):
        return {"final": {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 3.0, "t2i_r1": 4.0, "t2i_r5": 5.0,
                          "t2i_r10": 6.0, "rsum": rsum}, "best": {"rsum": best}, "seconds": 10.0}
    rows = {r.name: r for r in select_rows(["DBL momentum"])}
    results = {BASE: {"row": rows[BASE], "runs": [run(400, 405), run(410, 411)]},
               "DBL momentum": {"row": rows["DBL momentum"], "runs": [run(402, 400), run(416, 420)]}}
    table = markdown(results)
    line = [x for x in table.splitlines() if x.startswith("| DBL momentum")][0]
    assert "409.0 ± 9.9" in line and "410.0 ± 14.1" in line  # final and best-on-val, mean ± std
    assert f"{BASE}: +4.0 [-21.4, +29.4]" in line  # differences 2 and 6: 4 ± 12.706 * 2.83 / 1.41
    assert single_modal_markdown(results) == ""  # runs without single-modal metrics: no second table
    for entry, t2t in ((results[BASE], (50.0, 54.0)), (results["DBL momentum"], (53.0, 55.0))):
        for r, v in zip(entry["runs"], t2t):
            r["final"].update(t2t_r1=v, t2t_r5=v + 10, t2t_r10=v + 20)
    single = [x for x in single_modal_markdown(results).splitlines() if x.startswith("| DBL momentum")][0]
    assert "| 54.0 ± 1.4 | 64.0 | 74.0 |" in single and f"{BASE}: +2.0 [-10.7, +14.7]" in single


@pytest.mark.slow
@pytest.mark.launch
@pytest.mark.timeout(600)
def test_bench_methods_resumes_a_table(tmp_path, shapes_root, monkeypatch):
    """The same table run again with the same --out keeps its finished runs, continues a run left
    half-done from its checkpoint (same run, same MLflow run), adds what is missing (a second
    seed), keeps rows a later invocation leaves out; a table with other settings is refused."""
    from conftest import TINY, torchrun
    from benchmarks.methods import BASE, run_table, select_rows

    monkeypatch.chdir(tmp_path)
    rows = [r for r in select_rows(["DBL momentum"]) if r.name == BASE]
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "out"
    overrides = [f"data.root={shapes_root}", "train.steps=3", f"train.output_dir={tmp_path / 'runs'}"]
    first = run_table(TINY, 2, uri, "bench", overrides, rows, seeds=1, val_every=0, out=out)
    run0 = first[BASE]["runs"][0]
    metrics0 = (tmp_path / "runs" / run0["run"] / "metrics.json").stat().st_mtime_ns

    # seed 1 as the table would start it, stopped after step 1 with a checkpoint (a killed run)
    stamp = json.loads((out / "results.json").read_text())["stamp"]
    half = tmp_path / "runs" / f"table-triplet--vse-s1-{stamp}"
    torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, *overrides, f"tracking.uri={uri}",
              "tracking.experiment=bench", "loss.method=triplet", "train.seed=1", f"tracking.run_name={half.name}",
              "checkpoint.every=1", "checkpoint.stop_at=1"], cwd=tmp_path)
    half_id = json.loads((half / "run.json").read_text())["mlflow_run_id"]
    assert not (half / "metrics.json").exists()

    second = run_table(TINY, 2, uri, "bench", overrides, rows, seeds=2, val_every=0, out=out)
    runs = second[BASE]["runs"]
    assert runs[0] == run0 and (tmp_path / "runs" / run0["run"] / "metrics.json").stat().st_mtime_ns == metrics0
    assert runs[1]["seed"] == 1 and runs[1]["run"] == half.name and runs[1]["run_id"] == half_id
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted([run0["run"], half.name])
    saved = json.loads((out / "results.json").read_text())
    assert [r["seed"] for r in saved["rows"][BASE]["runs"]] == [0, 1]
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    assert sorted(m.step for m in client.get_metric_history(half_id, "lr")) == [2, 3]  # log_every 2, from step 1
    assert any(k.endswith("/rsum") for k in client.get_run(half_id).data.metrics)

    # a narrower selection (here no row at all) keeps the finished rows in results.json
    third = run_table(TINY, 2, uri, "bench", overrides, [], seeds=2, val_every=0, out=out)
    assert third[BASE]["runs"] == runs
    assert json.loads((out / "results.json").read_text())["rows"][BASE]["runs"] == saved["rows"][BASE]["runs"]

    with pytest.raises(ValueError, match=r"other settings \(overrides\)"):
        run_table(TINY, 2, uri, "bench", overrides + ["optim.lr=1e-3"], rows, seeds=2, val_every=0, out=out)


def test_bench_eval_tiny(capsys):
    from benchmarks.eval import add_parser as add_bench_eval_parser, bench_eval, format_bench_eval

    r = bench_eval(n_images=40, k=5, dim=16, repeats=1, naive_images=10)
    assert r["naive_agrees"] and r["naive_extrapolated"] and r["naive_queries"] == [10, 50]
    assert r["product_s"] > 0 and r["metrics_s"] > 0 and r["naive_s"] > r["product_s"]
    assert r["ratio_metrics_to_product"] > 0 and r["speedup_vs_naive"] > 0
    assert r["product_peak_mib"] == pytest.approx(40 * 200 * 4 / 2 ** 20, rel=0.01)  # the sims matrix
    assert 0 < r["metrics_peak_mib"] < 1  # one 40 x 200 tile and its counts
    text = format_bench_eval(r)
    assert "(b)/(a)" in text and "(c)/(b)" in text and "extrapolated linearly" in text

    from benchmarks import run

    assert run(add_bench_eval_parser, ["--images", "12", "--dim", "8", "--repeats", "1", "--naive-images", "0",
                                       "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "12 images x 60 captions" in out and "all queries timed" in out


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_bench_scale_prints_its_figures(tmp_path):
    """`python -m benchmarks.scale` at toy sizes: every part prints its figures and writes them;
    with aligned (trained-like) embeddings the evaluation is far above chance and no query ties."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--images", "700", "--dim", "16",
                           "--mine-images", "300", "--aoq-images", "40", "80", "--aoq-size", "32", "--aoq-batches", "2",
                           "--tmp", str(tmp_path), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    ev = r["eval"]
    assert ev["bare_seconds"] > 0 and ev["rsum"] < 30  # random embeddings: near chance
    for run in (ev["compiled"], ev["eager"]):  # the evaluation's own tile products, timed inside it
        assert 0 < run["product_s"] < run["seconds"]
    assert r["mining"]["output_bytes"] == 300 * 1495 * 4 + 1500 * 299 * 4  # top-k capped by the split, own pairs out
    assert [x["images"] for x in r["aoq"]] == [40, 80]
    assert "evaluation / its tile products" in proc.stdout and "(3) AOQ's negatives" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--images", "700", "--dim", "16",
                           "--embeddings", "aligned", "--parts", "eval", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["eval"]["rsum"] > 400 and r["eval"]["i2t_tied"] == r["eval"]["t2i_tied"] == 0
    assert r["eval"]["eager_agrees"] and "mining" not in r and r["aoq"] == []
    assert "(2) mining" not in proc.stdout


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_bench_data_sizes_the_cores_for_a_step_rate_and_reads_the_wait_a_run_logged(tmp_path):
    """`python -m benchmarks.data` at small sizes: samples/s per core at 224 px, the loader cores a
    step rate needs from it, and a real one-rank run whose logged `data/wait_*` it reads back."""
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.data", "--images", "48",
                           "--source-size", "320x240", "--workers", "1", "--sizes", "32", "--epochs", "1",
                           "--shard-size", "8", "--repeats", "1", "--train-steps", "4", "--target-rate", "2600",
                           "--keep", str(tmp_path / "work"), "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=560,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    res = json.loads(out.read_text())
    cores, run = res["cores"], res["run"]
    assert cores["size"] == 224 and cores["source"] == [320, 240] and cores["decode_samples_s"] > 0
    assert cores["loader_cores_needed"] == math.ceil(2600 / cores["per_core_samples_s"]) >= 1
    assert cores["decode_cores_needed"] == math.ceil(2600 / cores["decode_samples_s"]) >= 1
    assert cores["auto_workers"] >= 1 and cores["loader_auto_samples_s"] > 0
    assert run["steps"] == 4 and run["samples_per_s"] > 0 and run["wait_s"] > 0 and 0 < run["wait_share"] <= 1
    assert f"2600 samples/s needs {cores['loader_cores_needed']} loader cores" in proc.stdout
    assert "the loader's wait" in proc.stdout
