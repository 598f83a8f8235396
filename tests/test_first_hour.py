"""A newcomer's first hour (issue 33): every command answers as a user expects. `--help` is
instant and complete; a wrong path is one line before any rank starts; read-only commands
change nothing; the demo's data verifies; the plot and the tables read at a glance; what
the libraries print stays out of the way unless --verbose; the README's examples hold."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY

HEAVY = ("torch", "transformers", "deepspeed", "mlflow")
COMMANDS = ("demo", "train", "data", "eval", "compare", "mine", "export", "tracking")


def _cli(*args, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`dbl-scale ARGS` as a user runs it (the package from this checkout)."""
    return subprocess.run([sys.executable, "-m", "dbl_scale.cli.main", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A user error: non-zero, one line on stderr naming what is wrong, no traceback, no rank."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err and "[rank" not in err and "torch.distributed" not in err, err[-3000:]
    assert err.count("\n") == 0, err
    for word in words:
        assert word in err, (word, err)


# ----------------------------------------------------------------------------- --help

def _walk(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


@pytest.mark.launch
def test_help_imports_no_heavy_library_and_is_fast():
    """`dbl-scale --help` builds its parser without torch, transformers, deepspeed or mlflow
    (they took 10-15 s to import before any usage was printed), in under a second of CPU."""
    code = ("import sys, time; t = time.process_time(); from dbl_scale.cli.main import build_parser; "
            "build_parser(['--help']).format_help(); print(time.process_time() - t); "  # CPU time: a busy machine's wait apart
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout.splitlines()
    assert out[1] == "[]", out
    assert float(out[0]) < 1.0, out


@pytest.mark.launch
def test_a_wrong_key_or_a_missing_run_is_told_before_any_heavy_import(tmp_path):
    """The user's mistakes that need no library (a misspelt key, a run folder, an MLflow store
    or an experiment in it that is not there) are one line before torch, transformers,
    deepspeed or mlflow are imported; the store is left as it was."""
    store = (tmp_path / "mlflow.db").read_bytes()  # an empty MLflow store (conftest)
    code = ("import sys\nfrom dbl_scale.cli.main import main\n"
            "for argv in ([c, 'loss.metod=x'] for c in ('train', 'demo')), "
            "([c, '--run-dir', 'nothere'] + ['--out', 'o'] * (c != 'eval') for c in ('eval', 'export', 'mine')), "
            "[['compare', '--experiment', 'e', '--tracking-uri', 'sqlite:///nothere.db'], "
            "['compare', '--experiment', 'nope', '--tracking-uri', 'sqlite:///mlflow.db']]:\n"
            "    for args in argv:\n"
            "        print('@@', args[0], main(args))\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    codes = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("@@")]
    assert codes == [["train", "2"], ["demo", "2"], ["eval", "2"], ["export", "2"], ["mine", "2"], ["compare", "2"],
                     ["compare", "2"]], proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout
    assert "'loss.metod' (did you mean 'loss.method'?)" in proc.stderr and "nothere: no such folder" in proc.stderr
    assert "sqlite:///nothere.db: no MLflow store there" in proc.stderr and not (tmp_path / "nothere.db").exists()
    assert "no experiment named 'nope' at sqlite:///mlflow.db; experiments there: Default" in proc.stderr
    assert (tmp_path / "mlflow.db").read_bytes() == store


def test_every_option_has_help_and_every_command_an_example():
    from dbl_scale.cli.main import HelpFormatter, build_parser

    parser = build_parser(["--help"])
    for path, p in _walk(parser):
        assert p.formatter_class is HelpFormatter, path
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, (path, action.dest)
        if path:
            assert "dbl-scale " + path[0] in (p.epilog or "") + (p.description or ""), path
    # defaults are shown: an option with a default says it
    text = dict(_walk(parser))[("eval",)].format_help()
    assert "(default: 128)" in " ".join(text.split()) and "(default: test)" in " ".join(text.split())


@pytest.mark.launch
def test_help_of_every_command_exits_0():
    """Every command's --help (data build's crashed on a % in its text) answers with exit 0."""
    from dbl_scale.cli.main import build_parser

    paths = [path for path, _ in _walk(build_parser(None)) if path]
    code = ("import sys; from dbl_scale.cli.main import main\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        main(path.split() + ['--help'])\n"
            "    except SystemExit as e:\n"
            "        print('@@', path, '=', e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code, *[" ".join(p) for p in paths]], capture_output=True,
                          text=True, cwd=REPO, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    codes = dict(line[3:].rsplit(" = ", 1) for line in proc.stdout.splitlines() if line.startswith("@@ "))
    assert len(codes) == len(paths) > 20 and set(codes.values()) == {"0"}, (codes, proc.stderr[-3000:])
    assert "50% of the images" in _cli("data", "build", "--help").stdout


# ----------------------------------------------------------------------------- data verify / stats / preview

def test_verify_passes_on_shapes_captions_whose_splits_each_number_from_0(shapes_root):
    from data_tools.inspect_shards import verify

    report = verify(str(shapes_root))
    assert report.errors == [] and report.samples == {"train": 128, "val": 16, "test": 40}


def _truncated_copy(shapes_root, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(shapes_root, root, ignore=shutil.ignore_patterns("tokenizer"))
    shard = root / "train-00003.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # cut short, as a copy that died half-way
    return root


@pytest.mark.launch
def test_verify_puts_a_truncated_tar_first_and_caps_the_list(shapes_root, tmp_path):
    root = _truncated_copy(shapes_root, tmp_path)
    proc = _cli("data", "verify", root)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and lines[0].startswith("error: train-00003.tar: unreadable tar"), lines[:3]
    assert lines[-1].endswith("FAILED") and "also in" not in proc.stdout

    many = tmp_path / "many"  # 30 images that do not decode: 5 listed, the rest counted
    many.mkdir()
    from dbl_scale.shards import write_json_atomic, write_shard

    write_shard(str(many / "test-00000.tar"),
                [{"__key__": f"s{i:03d}", "jpg": b"not a jpeg", "json": json.dumps({"image_id": i, "captions": ["x"]}).encode()}
                 for i in range(30)])
    write_json_atomic(str(many / "dbl_index.json"), {"test": {"shards": ["test-00000.tar"], "samples": 30}})
    lines = _cli("data", "verify", many, "--limit", "5").stdout.splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 5 and "... and 25 more error(s)" in lines[5], lines


@pytest.mark.launch
@pytest.mark.parametrize("command", ["verify", "stats", "preview"])
def test_data_commands_on_a_wrong_folder_are_one_line(command, tmp_path):
    _one_line_error(_cli("data", command, tmp_path / "nope"), "no folder", "nope")
    (tmp_path / "empty").mkdir()
    _one_line_error(_cli("data", command, tmp_path / "empty"), "not a shard set", "it is empty", "data build")
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(_cli("data", command, tmp_path / "notes.txt"), "is a file")


@pytest.mark.launch
def test_stats_and_preview_name_a_truncated_shard_and_write_nothing_into_the_data(shapes_root, tmp_path):
    root = _truncated_copy(shapes_root, tmp_path)
    before = sorted(p.name for p in root.iterdir())
    _one_line_error(_cli("data", "stats", root), "train-00003.tar", "dbl-scale data verify")
    proc = _cli("data", "preview", root, "-n", "3", cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "data_preview.html").exists(), proc.stderr
    assert sorted(p.name for p in root.iterdir()) == before  # the shard set is read, never written


# ----------------------------------------------------------------------------- eval / export / mine on a wrong run

@pytest.mark.launch
@pytest.mark.parametrize("command", ["eval", "export", "mine"])
def test_a_missing_run_is_one_line_before_any_rank(command, tmp_path):
    args = {"eval": [], "export": ["--out", tmp_path / "out"], "mine": ["--out", tmp_path / "out"]}[command]
    t0 = time.time()
    proc = _cli(command, "--run-dir", tmp_path / "runs" / "nothere", *args, cwd=tmp_path)
    _one_line_error(proc, "nothere", "no such folder")
    assert time.time() - t0 < 60 and not (tmp_path / "out").exists()
    (tmp_path / "runs" / "half").mkdir(parents=True)
    (tmp_path / "runs" / "half" / "config.yaml").write_text("train: {steps: 3}\n")
    _one_line_error(_cli(command, "--run-dir", tmp_path / "runs" / "half", *args, cwd=tmp_path), "no model.pt",
                    "checkpoint.resume=latest")


@pytest.mark.launch
def test_eval_names_a_missing_split_before_any_rank(shapes_root, tmp_path):
    from dbl_scale.config import load_config, save_config

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    save_config(load_config(TINY, [f"data.root={shapes_root}"]), run / "config.yaml")
    import torch

    torch.save({}, run / "model.pt")  # read as weights before the ranks start, not loaded into a model
    _one_line_error(_cli("eval", "--run-dir", run, "--split", "nosuch"), "data error", "'nosuch'", "test")
    _one_line_error(_cli("eval", "--run-dir", run, "--data", tmp_path / "gone"), "gone", "--data")
    (run / "model.pt").write_bytes((run / "model.pt").read_bytes()[:40])  # a copy cut short
    for command, *more in (("eval",), ("export", "--out", tmp_path / "out"), ("mine", "--out", tmp_path / "out")):
        _one_line_error(_cli(command, "--run-dir", run, *more), "model.pt does not load as weights")


@pytest.mark.launch
def test_a_broken_config_a_file_for_a_folder_and_an_unknown_experiment_are_one_line(shapes_root, tmp_path):
    from conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # no MLflow server there: rank 0 failed after the ranks started
    _one_line_error(_cli("train", "--config", "tiny", f"data.root={shapes_root}", f"tracking.uri={closed}",
                         cwd=tmp_path), "does not answer", "mlflow server")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    _one_line_error(_cli("train", "--config", tmp_path / "bad.yaml", cwd=tmp_path), "config error", "does not parse",
                    "line 2")
    (tmp_path / "notes.txt").write_text("x")
    _one_line_error(_cli("data", "build", "--out", tmp_path / "notes.txt"), "dbl-scale data build:", "is a file")
    shutil.copyfile(tmp_path / "mlflow.db", tmp_path / "store.db")
    _one_line_error(_cli("compare", "--experiment", "nope", "--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}"),
                    "no experiment named 'nope'", "experiments there: Default")


@pytest.mark.launch
def test_tracking_replay_leaves_a_file_that_is_not_a_spool(tmp_path):
    other = tmp_path / "config.yaml"
    other.write_text("train:\n  steps: 3\n")
    _one_line_error(_cli("tracking", "replay", other), "not an MLflow spool")
    assert other.read_text() == "train:\n  steps: 3\n"  # it deleted any file it could not read


# ----------------------------------------------------------------------------- compare

def _runs(tmp_path):
    """Two finished runs (triplet, DBL with its boost term) with ranks, losses, no validation."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("first_hour")
    rng = np.random.default_rng(1)
    for name, method in (("demo-triplet-1", "triplet"), ("demo-dbl-1", "dbl")):
        run = client.create_run(exp, run_name=name, tags={"method": method})
        params = {"loss.method": method, "train.steps": "30", "data.batch_size": "32", "optim.lr": "0.0005",
                  "train.deepspeed": "zero2", "train.seed": "0", "tracking.run_name": name}
        metrics = [Metric("samples_per_s", 100.0, 0, s) for s in (10, 20, 30)]
        metrics += [Metric("loss/raw", v, 0, s) for v, s in ((1500.0, 10), (40.0, 20), (12.0, 30))]
        metrics += [Metric("loss", v + (30.0 if method == "dbl" else 0.0), 0, s) for v, s in ((1500.0, 10), (40.0, 20), (12.0, 30))]
        if method == "dbl":
            metrics += [Metric("loss/boost", 30.0, 0, s) for s in (10, 20, 30)]
        metrics += [Metric(f"test/{k}", 445.76000000000005 if k == "rsum" else 74.3, 0, 30)
                    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")]
        client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        np.savez(tmp_path / "test_ranks.npz", i2t=rng.integers(0, 20, 40), t2i=rng.integers(0, 20, 200))
        client.log_artifact(run.info.run_id, str(tmp_path / "test_ranks.npz"), "reports")
        client.set_terminated(run.info.run_id, "FINISHED")
    return uri, client, exp


def _state(client, exp):
    return {r.info.run_id: (dict(r.data.tags), dict(r.data.params), r.info.status)
            for r in client.search_runs([exp])}


def test_compare_with_plot_leaves_every_run_as_it_was(tmp_path, monkeypatch, capsys):
    from dbl_scale.cli.compare import add_parser

    monkeypatch.chdir(tmp_path)
    uri, client, exp = _runs(tmp_path)
    before = _state(client, exp)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--experiment", "first_hour", "--tracking-uri", uri, "--plot",
                              str(tmp_path / "fig.png")])
    assert args.func(args) == 0 and (tmp_path / "fig.png").stat().st_size > 20_000
    after = _state(client, exp)
    assert after == before  # no tag (mlflow.parentRunId), no parameter, no new run
    for run_id in after:
        assert [a.path for a in client.list_artifacts(run_id)] == ["reports"]
    missing = tmp_path / "elsewhere" / "mlflow.db"
    args = parser.parse_args(["compare", "--experiment", "first_hour", "--tracking-uri", f"sqlite:///{missing}"])
    assert args.func(args) == 2 and not missing.exists()  # no empty store made for a mistyped path
    assert "no MLflow store there" in capsys.readouterr().err


def test_the_plot_compares_matching_losses_on_a_log_axis_and_says_what_is_missing(tmp_path):
    from dbl_scale.cli.compare import collect_curves, draw_curves

    uri, _, _ = _runs(tmp_path)
    names, curves = collect_curves(uri, "first_hour")
    assert sorted(names) == ["demo-dbl-1", "demo-triplet-1"]
    dbl = next(c for label, c in curves.items() if label.startswith("dbl"))
    np.testing.assert_allclose(dbl["loss/raw"][1], [[1500.0, 40.0, 12.0]])  # the matching term, not loss + boost
    np.testing.assert_allclose(dbl["loss/boost"][1], [[30.0, 30.0, 30.0]])
    assert all("val/rsum" not in c for c in curves.values())
    assert any("demo-dbl-1" in label for label in curves)  # a single run's setting is named by its run
    fig = draw_curves(curves, "first_hour: " + ", ".join(names), tmp_path / "fig.png")
    i2t, t2i, loss, val = fig.axes[:4]
    assert loss.get_yscale() == "log" and "matching loss" in loss.get_title() and "boost" in loss.get_title()
    assert any(line.get_linestyle() == "--" for line in loss.lines)  # the boost term apart
    assert [t.get_text() for t in val.texts] == ["no validation logged\n(train with eval.every=N to draw it)"]
    assert "demo-dbl-1" in fig._suptitle.get_text()


def test_compare_tables_have_unambiguous_headers_and_rounded_csv(tmp_path):
    from dbl_scale.cli.compare import compare_runs, format_runs

    uri, _, _ = _runs(tmp_path)
    rows = compare_runs(uri, "first_hour")
    md = format_runs(rows, "markdown")
    head = md.splitlines()[0]
    assert "| I2T R@5 |" in head and "| T2I R@5 |" in head and "| R@5 |" not in head
    text = format_runs(rows, "text")
    assert max(len(line) for line in text.splitlines()) <= 120, text
    assert "train.steps" not in text and "every run: batch 32, lr 0.0005, deepspeed zero2" in text
    parsed = list(csv.DictReader(io.StringIO(format_runs(rows, "csv"))))
    assert parsed[0]["rsum"] == "445.76" and parsed[0]["train_steps"] == "30"


# ----------------------------------------------------------------------------- noise at its causes

def test_the_pyfunc_model_has_type_hints_mlflow_reads():
    import mlflow.pyfunc  # noqa: F401  (its own import warns of its own type hints: not ours)
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MLflow's "Add type hints to the predict method" was a UserWarning
        from dbl_scale.mlflow_pyfunc import DualEncoderModel

        hints = DualEncoderModel().predict_type_hints
    assert hints.input is pd.DataFrame


@pytest.mark.launch
def test_dataset_inputs_log_without_a_warning(tmp_path, shapes_root):
    from mlflow.tracking import MlflowClient

    from dbl_scale.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "inputs")
    tracker.start("r", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The specified dataset source can be interpreted in multiple ways"
        tracker.log_inputs([{"name": "data/train", "source": str(shapes_root), "digest": "abc", "context": "training"}])
    tracker.finish()
    run = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.inputs.dataset_inputs[0].dataset.source_type == "local"


def test_the_demo_verdict_wraps():
    from dbl_scale.cli.demo import SEEDS_FILE, seed_spread

    text = seed_spread(1.5, str(SEEDS_FILE.with_name("demo.yaml")))
    assert "+1.5 rSum" in text and "95% interval" in text
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.mark.launch
def test_a_tiny_run_prints_no_library_noise_unless_verbose(shapes_root, tmp_path):
    """`dbl-scale train` of the tiny preset, with its model exported and logged: our lines only
    (no warning, no library progress bar, no colour codes); --verbose brings them back."""
    common = ["train", "--config", "tiny", f"data.root={shapes_root}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
              f"train.output_dir={tmp_path / 'runs'}"]
    proc = _cli(*common, "tracking.log_model=true", "tracking.run_name=quiet", cwd=tmp_path, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "retrieval on the test split" in out and (tmp_path / "runs" / "quiet" / "model" / "config.json").exists()
    for noise in ("Warning", "WARNING", "\x1b[", "it/s]", "%|", "Setting accelerator", "INFO mlflow", "requires torchvision",
                  "zero checkpoint", "Reconstructed fp32"):
        assert noise not in out, (noise, out[-4000:])
    stamps = {m.group(0)[:3] for m in re.finditer(r"^\S+ (INFO|DEBUG|ERROR)", out, re.M)}
    assert len(stamps) <= 1, stamps  # one timestamp format
    loud = _cli("--verbose", *common, "train.steps=2", "eval.at_end=false", "tracking.run_name=loud", cwd=tmp_path,
                timeout=400)
    assert loud.returncode == 0 and "Setting accelerator to CPU" in loud.stdout + loud.stderr, loud.stderr[-3000:]


# ----------------------------------------------------------------------------- the README

README = (REPO / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_readme_examples_name_what_the_demo_makes():
    import yaml

    from dbl_scale.cli.demo import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    experiment = parser.parse_args(["demo"]).experiment
    output_dir = yaml.safe_load((REPO / "dbl_scale" / "presets" / "demo.yaml").read_text())["train"]["output_dir"]
    assert 'f"demo-{method}-{stamp}"' in (REPO / "dbl_scale" / "cli" / "demo.py").read_text()  # its run names
    compares = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("dbl-scale compare")]
    assert compares and all(f"--experiment {experiment}" in line for line in compares), compares
    evals = [line for block in _blocks("bash") for line in block.splitlines() if line.startswith("dbl-scale eval")]
    assert any(f"{output_dir}/demo-dbl-*" in line for line in evals) and "runs/r1" not in README, evals
    assert "make test-fast" in README and "under 3 minutes" in README.split("make test-fast", 1)[1][:120]
    assert "(under 3 minutes)" in (REPO / "Makefile").read_text()
    assert "one 2-core machine" in README and "95% interval" in README  # the table is one run, beside the seeds'


@pytest.mark.launch
def test_readme_config_error_is_what_the_tool_prints(tmp_path):
    shown = re.search(r"\$ (dbl-scale train [^\n]*)\n([^\n]*)\n", README)
    proc = _cli(*shown.group(1).split()[1:], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == shown.group(2)


@pytest.mark.launch
def test_readme_model_snippet_runs_as_pasted_after_the_demo(finished_run, tmp_path):
    """The README's Python block, run as it is in a folder laid out as `make demo` leaves it:
    runs/demo-dbl-<stamp>/ with its exported model, and its MLflow run in ./mlflow.db."""
    run = tmp_path / "runs" / "demo-dbl-20261207-101500"
    shutil.copytree(finished_run, run)
    shutil.copyfile(finished_run.parents[1] / "mlflow.db", tmp_path / "mlflow.db")
    exported = _cli("export", "--run-dir", run, "--out", run / "model", "--log", "--tracking-uri",
                    f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    (snippet,) = _blocks("python")
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tensor([[" in proc.stdout and proc.stdout.strip().endswith("(2, 64)"), proc.stdout
