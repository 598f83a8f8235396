"""Configuration: YAML + dotted overrides, validated with errors that name the key."""
from __future__ import annotations

import os

import subprocess
import sys

import pytest

from dbl_scale.config import ConfigError, load_config, parse_overrides
from conftest import REPO, TINY


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  text:\n    layers: 3\nloss:\n  method: dbl\n")
    cfg = load_config(path, ["model.text.layers=4", "optim.lr=1e-3", "loss.dbl.boost=absolute"])
    assert cfg.model.text.layers == 4 and cfg.loss.method == "dbl" and cfg.loss.dbl.boost == "absolute"
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32  # untouched default


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.text.layrs=4"])
    msg = str(err.value)
    assert "model.text.layrs" in msg and "did you mean 'model.text.layers'" in msg and "max_length" in msg


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"loss.method.*'triplet', 'infonce', 'dbl'"):
        load_config(None, ["loss.method=arcface"])


def test_bad_type_and_bad_value():
    with pytest.raises(ConfigError, match="data.batch_size.*expected int"):
        load_config(None, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match="data.batch_size.*positive"):
        load_config(None, ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="patch_size"):
        load_config(None, ["model.vision.patch_size=7"])


def test_section_given_a_value_and_malformed_override():
    with pytest.raises(ConfigError, match="'model'.*expected ModelConfig"):
        load_config(None, ["model=3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["loss.method"])


def test_presets_are_valid():
    names = sorted(f.stem for f in (REPO / "dbl_scale" / "presets").glob("*.yaml"))
    assert {"demo", "tiny", "vitb16_bertbase"} <= set(names)
    for name in names:
        load_config(name)
    big = load_config("vitb16_bertbase")
    assert (big.model.vision.hidden, big.model.vision.layers, big.model.vision.patch_size) == (768, 12, 16)
    assert (big.model.text.hidden, big.model.text.layers) == (768, 12)
    load_config(TINY)


@pytest.mark.launch
def test_cli_reports_config_errors_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "train", "--config", "tiny", "loss.margn=0.3"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'loss.margn'" in proc.stderr and "did you mean 'loss.margin'" in proc.stderr
    assert "torch.distributed" not in proc.stderr


def test_ranges_and_deepspeed_files_that_contradict_the_config(tmp_path):
    import json

    from dbl_scale.optim import deepspeed_config

    for override, key in (("loss.margin=0", "loss.margin"), ("optim.lr=-1e-4", "optim.lr"),
                          ("loss.dbl.momentum=1.0", "loss.dbl.momentum"), ("loss.dbl.beta=0", "loss.dbl.beta"),
                          ("optim.weight_decay=-0.1", "optim.weight_decay")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_config(None, [override])
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    for key, value, ours in (("train_micro_batch_size_per_gpu", 16, "data.batch_size"),
                             ("gradient_accumulation_steps", 4, "train.grad_accum")):
        (tmp_path / "ds.json").write_text(json.dumps({**ds, key: value}))
        with pytest.raises(ConfigError, match=f"'{key}' is {value} but config key '{ours}'"):
            deepspeed_config(load_config(None, [f"train.deepspeed={tmp_path / 'ds.json'}"]), 2)
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "train_batch_size": 96}))
    with pytest.raises(ConfigError, match="'train_batch_size' is 96.*32 x 2 ranks"):
        deepspeed_config(load_config(None, [f"train.deepspeed={tmp_path / 'ds.json'}"]), 2)
    assert deepspeed_config(load_config(None, [f"train.deepspeed={tmp_path / 'ds.json'}"]), 3)["train_batch_size"] == 96


def test_tracking_uri_follows_mlflow_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert load_config("demo").tracking.uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5005")
    assert load_config("demo").tracking.uri == "http://127.0.0.1:5005"
    assert load_config("demo", ["tracking.uri=sqlite:///x.db"]).tracking.uri == "sqlite:///x.db"


def test_deepspeed_configs_by_name_with_precision():
    import json

    from dbl_scale.optim import deepspeed_config

    ds = deepspeed_config(load_config(None, ["train.deepspeed=zero3"]), 2)
    assert ds["zero_optimization"]["stage"] == 3 and not ds.get("bf16", {}).get("enabled")
    ds = deepspeed_config(load_config(None, ["train.deepspeed=zero3", "train.precision=bf16"]), 2)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    legacy = deepspeed_config(load_config(None, ["train.deepspeed=ds_configs/zero1.json"]), 2)
    assert legacy["zero_optimization"]["stage"] == 1
    with pytest.raises(ConfigError, match="bf16 is on there, but config key 'train.precision' is fp32"):
        deepspeed_config(load_config(None, ["train.deepspeed=ds_configs/zero2_bf16.json", "train.precision=fp32"]), 2)
    with pytest.raises(ConfigError, match="no DeepSpeed config named 'zero4'; named ones: zero0, zero1, zero2"):
        deepspeed_config(load_config(None, ["train.deepspeed=zero4"]), 2)
    assert json.loads((REPO / "ds_configs" / "zero2.json").read_text())  # the checkout's path still works


def test_the_optimizer_is_torch_adamw_never_a_deepspeed_jit_build(monkeypatch):
    """"auto" picks torch's AdamW, fused on CUDA (DeepSpeed's FusedAdam would JIT-compile with
    nvcc for minutes of a GPU allocation), except for an optimizer offloaded from GPUs, which
    DeepSpeed runs with its CPU Adam; the GPU configs ask for torch's fused AdamW themselves."""
    import torch

    from dbl_scale.optim import deepspeed_config

    def params(name):
        return deepspeed_config(load_config(None, [f"train.deepspeed={name}"]), 2)["optimizer"]["params"]

    assert params("zero2")["torch_adam"] is True and "fused" not in params("zero2")  # CPU: torch's AdamW as it is
    for gpu in ("zero2_gpu", "zero3_gpu"):
        assert params(gpu)["torch_adam"] is True and params(gpu)["fused"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert params("zero2")["torch_adam"] is True and params("zero2")["fused"] is True
    assert params("zero2_offload")["torch_adam"] is False and "fused" not in params("zero2_offload")


def test_zero_options_of_the_other_side_of_stage_3_are_refused(tmp_path):
    import json

    from dbl_scale.optim import deepspeed_config

    for stage, extra, key in ((2, {"stage3_max_live_parameters": 10**9}, "stage3_max_live_parameters"),
                              (2, {"offload_param": {"device": "cpu"}}, "offload_param"),
                              (3, {"round_robin_gradients": True}, "round_robin_gradients")):
        ds = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
        ds["zero_optimization"].update(extra)
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        with pytest.raises(ConfigError, match=f"stage is {stage}, but \\['{key}'\\] only apply"):
            deepspeed_config(load_config(None, [f"train.deepspeed={tmp_path / 'ds.json'}"]), 2)


@pytest.mark.launch
def test_an_installed_package_finds_its_deepspeed_configs_and_trains(tmp_path, shapes_root):
    """A non-editable install (the wheel, installed to a folder) resolves `zero2` by name from
    anywhere, and trains 2 steps on 2 ranks from a folder outside the checkout with a named
    preset and a named DeepSpeed config."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path / "wheel")], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("dbl_scale-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    probe = ("import dbl_scale.optim as o; from dbl_scale.config import load_config; "
             "print(o.resolve_ds_config('zero3', 'bf16')); print(load_config('demo').train.deepspeed)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == [str(tmp_path / "site" / "dbl_scale" / "ds_configs" / "zero3_bf16.json"), "zero2"]
    env = {"PYTHONPATH": str(tmp_path / "site"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": os.environ["PATH"]}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "dbl_scale.cli.train", "--config", "tiny", f"data.root={shapes_root}", "train.steps=2",
                          "train.deepspeed=zero1", "eval.at_end=false", "tracking.run_name=installed"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-5000:]
    assert "ZeRO-1" in run.stderr and (tmp_path / "runs" / "installed" / "model.pt").exists()


def test_every_bound_declared_beside_its_field_is_enforced():
    """Each field that declares its range (`config.bounded`) refuses a value just outside it,
    naming the key; a value at an open end is refused, at a closed end taken."""
    import dataclasses

    from dbl_scale.config import Config

    def bounded_fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else None):
                continue
            bounds = f.metadata.get("bounds")
            if bounds:
                yield prefix + f.name, bounds
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(value):
                yield from bounded_fields(type(value), prefix + f.name + ".")

    found = dict(bounded_fields(Config))
    assert len(found) > 60 and "loss.dbl.momentum" in found and "data.batch_size" in found
    for key, (low, low_open, high, high_open) in found.items():
        if low is not None:
            with pytest.raises(ConfigError, match=f"'{key}'"):
                load_config(None, [f"{key}={low if low_open else low - 1}"])
        if high is not None:
            with pytest.raises(ConfigError, match=f"'{key}'"):
                load_config(None, [f"{key}={high if high_open else high + 1}"])
