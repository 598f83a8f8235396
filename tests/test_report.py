"""Evaluation reports: the HTML page shows what the ranks say, the PNG is a real PNG, both reach MLflow."""
from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from dbl_scale.evaluation import retrieval_metrics
from dbl_scale.evaluation.report import log_reports, recall_curve, recall_curve_png, retrieval_html

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "black": (0, 0, 0), "white": (255, 255, 255)}
K = 2


@pytest.fixture()
def case():
    """6 solid-colour images, 2 captions each (one with markup to escape); images 1 and 4 are
    confused with each other, the rest are retrieved correctly."""
    names = list(COLOURS)
    images = [Image.new("RGB", (24, 16), rgb) for rgb in COLOURS.values()]
    images[5] = np.full((16, 24, 3), 255, np.uint8)  # an array works as well as a PIL image
    captions = [text for name in names for text in (f"a {name} square", f"<b>{name}</b> & 'co'")]
    rng = np.random.default_rng(0)
    n = len(names)
    sims = rng.uniform(0.0, 0.4, size=(n, K * n))
    sims[np.arange(n).repeat(K), np.arange(K * n)] += 0.5
    sims[1, 8:10] = 0.99  # image 1's best captions are image 4's
    sims[4, 2:4] = 0.98  # and image 4's are image 1's
    return images, captions, sims


class Page(HTMLParser):
    """Queries with their result items (class, data-index, text), and every <img> src."""

    def __init__(self):
        super().__init__()
        self.queries, self.srcs, self.title = [], [], ""
        self._li = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "div" and "query" in cls:
            self.queries.append({"direction": a["data-direction"], "query": int(a["data-query"]),
                                 "rank": int(a["data-rank"]), "results": [], "text": ""})
        elif tag == "li" and "result" in cls:
            self._li = {"classes": set(cls), "index": int(a["data-index"]), "text": ""}
            self.queries[-1]["results"].append(self._li)
        elif tag == "img":
            self.srcs.append(a["src"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "li":
            self._li = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._li is not None:
            self._li["text"] += data
        elif self.queries:
            self.queries[-1]["text"] += data
        if self._in_title:
            self.title += data


def test_html_shows_queries_with_correct_and_wrong_marks(case, tmp_path):
    images, captions, sims = case
    metrics, ranks = retrieval_metrics(sims, captions_per_image=K, return_ranks=True)
    path = retrieval_html(tmp_path / "r.html", images, captions, torch.from_numpy(sims), ranks, n_queries=4,
                          k=5, seed=1, title="a <test> page", metrics=metrics)
    text = path.read_text(encoding="utf-8")
    assert "<b>" not in text and "&lt;b&gt;" in text  # caption markup escaped
    page = Page()
    page.feed(text)
    assert page.title == "a <test> page"
    assert all(s.startswith("data:image/png;base64,") for s in page.srcs) and page.srcs
    assert "rSum" in text and f"{metrics['rsum']:.1f}" in text  # metrics table at the top
    by_dir = {d: [q for q in page.queries if q["direction"] == d] for d in ("i2t", "t2i")}
    assert len(by_dir["i2t"]) == 4 and len(by_dir["t2i"]) == 4
    n_marks = {"correct": 0, "wrong": 0}
    for q in page.queries:
        i2t = q["direction"] == "i2t"
        scores = sims[q["query"]] if i2t else sims[:, q["query"]]
        want = np.argsort(scores)[::-1][:5]  # the reference's order
        assert [r["index"] for r in q["results"]] == list(want)
        assert len(q["results"]) == 5
        for r in q["results"]:
            ok = (r["index"] // K == q["query"]) if i2t else (r["index"] == q["query"] // K)
            assert ("correct" in r["classes"]) == ok and ("wrong" in r["classes"]) == (not ok)
            assert ("✓ correct" in r["text"]) == ok and ("✗ wrong" in r["text"]) == (not ok)
            n_marks["correct" if ok else "wrong"] += 1
            if i2t:
                assert captions[r["index"]] in r["text"]  # the caption, unescaped by the parser
        assert q["rank"] == ranks[q["direction"]][q["query"]] + 1
        assert f"rank of first correct {'caption' if i2t else 'image'}: {q['rank']}" in q["text"]
    assert n_marks["correct"] and n_marks["wrong"]
    # the confused pair shows up as wrong at the top when sampled
    for q in by_dir["i2t"]:
        if q["query"] in (1, 4):
            assert "wrong" in q["results"][0]["classes"] and q["rank"] == 3


def test_recall_curve_png(case, tmp_path):
    _, _, sims = case
    _, ranks = retrieval_metrics(sims, captions_per_image=K, return_ranks=True)
    path = recall_curve_png(ranks, tmp_path / "sub" / "curve.png", title="curve")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.mode in ("RGB", "RGBA") and im.size[0] > 0 and im.size[1] > 0
    curve = recall_curve(ranks["i2t"], 6)
    assert curve[0] == pytest.approx(100 * 4 / 6) and curve[-1] == 100.0


def test_log_reports_logs_both_artifacts(case, tmp_path, monkeypatch):
    from dbl_scale.tracking import Tracker

    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts under ./mlruns
    images, captions, sims = case
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "reports")
    tracker.start("eval-report", {})
    paths = log_reports(tracker, tmp_path / "out", images, captions, sims, split="val", n_queries=3)
    tracker.finish()
    assert paths["png"].exists() and paths["html"].exists()
    logged = {a.path for a in tracker.client.list_artifacts(tracker.run_id, "reports")}
    assert logged == {"reports/val_recall_curve.png", "reports/val_retrieval.html"}


# ----------------------------------------------------------------------------- dbl-scale compare

def _log_run(client, exp_id, name, method, rsum, speeds, split="test", status="FINISHED", scenario="momentum"):
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=name, tags={"method": method})
    params = {"loss.method": method, "loss.dbl.scenario": scenario, "train.steps": "20", "data.batch_size": "32",
              "optim.lr": "0.0005", "train.deepspeed": "ds_configs/zero2.json"}
    metrics = [Metric("samples_per_s", v, 0, 10 * (i + 1)) for i, v in enumerate(speeds)]
    recalls = {"i2t_r1": rsum / 6, "i2t_r5": rsum / 6, "i2t_r10": rsum / 6, "t2i_r1": rsum / 6,
               "t2i_r5": rsum / 6, "t2i_r10": rsum / 6, "rsum": rsum}
    metrics += [Metric(f"{split}/{k}", v, 0, 10 * len(speeds)) for k, v in recalls.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status)


@pytest.mark.launch
def test_compare_lists_runs_best_first_in_every_format(tmp_path, monkeypatch, capsys):
    import argparse
    import csv
    import io

    from mlflow.tracking import MlflowClient

    from dbl_scale.cli.compare import add_parser as add_compare_parser, compare_runs

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("cmp")
    _log_run(client, exp, "run-mid", "triplet", 300.0, [100.0, 200.0])
    _log_run(client, exp, "run-best", "dbl", 420.0, [50.0, 70.0, 90.0])
    _log_run(client, exp, "run-worst", "infonce", 120.0, [400.0], status="FAILED")
    val_exp = client.create_experiment("val-only")
    _log_run(client, val_exp, "on-val", "dbl", 99.0, [1.0], split="val", scenario="online")

    rows = compare_runs(uri, "cmp")
    assert [r["run"] for r in rows] == ["run-best", "run-mid", "run-worst"]
    best = rows[0]
    assert best["method"] == "dbl" and best["scenario"] == "momentum" and best["split"] == "test"
    assert best["rsum"] == 420.0 and best["samples_per_s"] == pytest.approx(70.0)  # mean of the history
    assert best["steps"] == 30 and best["batch_size"] == "32" and best["status"] == "FINISHED"
    assert rows[1]["scenario"] is None  # a triplet run's DBL defaults are not shown
    assert [r["run"] for r in compare_runs(uri, "cmp", sort_by="samples_per_s")] == ["run-worst", "run-mid", "run-best"]
    assert compare_runs(uri, "val-only")[0]["split"] == "val" and compare_runs(uri, "val-only")[0]["rsum"] == 99.0

    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    outputs = {}
    for fmt in ("text", "markdown", "csv"):
        args = parser.parse_args(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", fmt])
        assert args.func(args) == 0
        outputs[fmt] = capsys.readouterr().out
        pos = [outputs[fmt].index(name) for name in ("run-best", "run-mid", "run-worst")]
        assert pos == sorted(pos), fmt
        assert "420.0" in outputs[fmt] or "420" in outputs[fmt]
    assert outputs["markdown"].splitlines()[1].startswith("|")
    assert all(line.startswith("|") for line in outputs["markdown"].strip().splitlines())
    parsed = list(csv.DictReader(io.StringIO(outputs["csv"])))
    assert [r["run"] for r in parsed] == ["run-best", "run-mid", "run-worst"]
    assert float(parsed[0]["test/rsum" if "test/rsum" in parsed[0] else "rsum"]) == 420.0
    assert parsed[2]["status"] == "FAILED" and parsed[1]["scenario"] == ""

    args = parser.parse_args(["compare", "--experiment", "nope", "--tracking-uri", uri])
    assert args.func(args) == 2


@pytest.mark.launch
def test_compare_plot_draws_settings_as_mean_and_band(tmp_path, monkeypatch):
    """Two seeds of one setting and one run of another: the figure's curves are the seeds' mean
    (recall@K from each run's logged ranks, loss and val rSum from the metric histories); the
    figure is a file, and the runs stay as they were (no parent, no new run)."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from dbl_scale.cli.compare import compare_runs, plot_runs
    from dbl_scale.evaluation.report import recall_curve

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("plot")
    rng = np.random.default_rng(0)
    logged = {}
    for name, method, seed in (("a0", "dbl", 0), ("a1", "dbl", 1), ("b0", "triplet", 0)):
        run = client.create_run(exp, run_name=name)
        params = {"loss.method": method, "train.seed": str(seed), "tracking.run_name": name, "train.steps": "20"}
        losses = rng.uniform(1, 2, size=3)
        metrics = [Metric("samples_per_s", 10.0, 0, 10)] + [Metric("loss", v, 0, s) for v, s in zip(losses, (5, 10, 15))]
        metrics += [Metric("val/rsum", 100.0 + seed, 0, 10)]
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        ranks = {"i2t": rng.integers(0, 30, size=20), "t2i": rng.integers(0, 20, size=100)}
        np.savez(tmp_path / "test_ranks.npz", **ranks)
        client.log_artifact(run.info.run_id, str(tmp_path / "test_ranks.npz"), "reports")
        client.set_terminated(run.info.run_id, "FINISHED")
        logged[name] = (run.info.run_id, ranks, losses)

    drawn = plot_runs(uri, "plot", tmp_path / "fig" / "cmp.png", max_k=10)
    png = (tmp_path / "fig" / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert sorted(drawn) == ["dbl (2 seeds)", "triplet (b0)"]
    a = drawn["dbl (2 seeds)"]
    want = (recall_curve(logged["a0"][1]["i2t"], 10) + recall_curve(logged["a1"][1]["i2t"], 10)) / 2
    np.testing.assert_allclose(a["i2t"], want)
    np.testing.assert_allclose(a["loss"], (logged["a0"][2] + logged["a1"][2]) / 2)
    np.testing.assert_allclose(a["val/rsum"], [100.5])
    assert len(client.search_runs([exp])) == 3
    for run_id, _, _ in logged.values():
        assert "mlflow.parentRunId" not in client.get_run(run_id).data.tags
    assert sorted(r["run"] for r in compare_runs(uri, "plot")) == ["a0", "a1", "b0"]
