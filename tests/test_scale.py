"""Issue 4 at small scale on 2 CPU ranks: every DBL scenario under every ZeRO stage trains;
the same entry point starts under torchrun, the deepspeed launcher and accelerate launch; a
tower pair exported after ZeRO-3 training reloads with AutoModel and embeds identically."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import REPO, TINY, free_port, torchrun

FAST = ["optim.warmup_steps=0", "optim.lr=5e-4", "optim.schedule=constant", "loss.max_violation=false",
        "eval.at_end=false", "train.log_every=1"]


def _losses(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("scale").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    return [m.value for m in client.get_metric_history(run.info.run_id, "loss")], run


def _args(shapes_root, tmp_path, name, *overrides):
    return ["--config", TINY, f"data.root={shapes_root}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=scale", f"tracking.run_name={name}", f"train.output_dir={tmp_path / 'runs'}",
            *FAST, *overrides]


@pytest.fixture(scope="module")
def anchor(finished_run):
    return finished_run


SCENARIOS = {"momentum": ["loss.dbl.scenario=momentum", "loss.dbl.momentum=0.9"],
             "online": ["loss.dbl.scenario=online"],
             "offline": ["loss.dbl.scenario=offline", "loss.dbl.anchor={anchor}"]}


@pytest.mark.parametrize("ds", ["zero0", "zero1", "zero2", "zero3", "zero2_bf16", "zero3_bf16"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_trains_under_every_zero_stage(scenario, ds, shapes_root, tmp_path, anchor):
    """fp32 under ZeRO 0-3 and bf16 under ZeRO-2/3 (the momentum anchor then averages bf16
    shards, the offline anchor is cast to bf16)."""
    overrides = [o.format(anchor=anchor) for o in SCENARIOS[scenario]]
    name = f"{scenario}-{ds}"
    torchrun(["-m", "dbl_scale.cli.train", *_args(shapes_root, tmp_path, name, "loss.method=dbl", "train.steps=16",
                                               "train.log_every=8", f"train.deepspeed=ds_configs/{ds}.json",
                                               *overrides)], cwd=tmp_path)
    losses, run = _losses(tmp_path, name)
    assert len(losses) == 2 and run.data.tags["zero_stage"] == ds[4]
    assert losses[1] < losses[0]  # the mean loss of steps 9-16 is below that of steps 1-8


def _launch(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_deepspeed_launcher(shapes_root, tmp_path):
    out = _launch([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                   f"--master_port={free_port()}", "--module", "dbl_scale.cli.train",
                   *_args(shapes_root, tmp_path, "ds", "train.steps=3")], tmp_path)
    assert "2 ranks x batch 8" in out
    assert len(_losses(tmp_path, "ds")[0]) == 3


def test_accelerate_launch_with_a_deepspeed_yaml(shapes_root, tmp_path):
    out = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "ds_configs" / "accelerate_zero3.yaml"), f"--main_process_port={free_port()}",
                   "-m", "dbl_scale.cli.train", *_args(shapes_root, tmp_path, "acc", "train.steps=3")], tmp_path)
    assert "2 ranks x batch 8" in out and "ZeRO-3" in out  # the YAML's DeepSpeed file was used
    assert len(_losses(tmp_path, "acc")[0]) == 3


def test_export_after_zero3_reloads_with_automodel(shapes_root, tmp_path, tokenizer):
    from transformers import AutoModel

    from dbl_scale.export import export, load_exported
    from dbl_scale.branches import load_model

    torchrun(["-m", "dbl_scale.cli.train", *_args(shapes_root, tmp_path, "z3", "train.steps=3",
                                               "train.deepspeed=ds_configs/zero3.json")], cwd=tmp_path)
    run_dir = tmp_path / "runs" / "z3"
    out = export(run_dir, tmp_path / "exported")
    assert type(AutoModel.from_pretrained(out / "vision")).__name__ == "CLIPVisionModel"
    assert type(AutoModel.from_pretrained(out / "text")).__name__ == "BertModel"
    exported, exported_tok = load_exported(out)
    trained = load_model(run_dir, tokenizer).eval()
    pixels = torch.randn(4, 3, 32, 32)
    enc = exported_tok(["a red circle", "two blue squares", "a star", "x"], padding="max_length",
                       max_length=24, return_tensors="pt")
    with torch.no_grad():
        a = exported(pixels, enc["input_ids"], enc["attention_mask"])
        b = trained(pixels, enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(a.img, b.img, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.txt, b.txt, rtol=0, atol=1e-6)


def test_zero3_builds_a_model_larger_than_a_rank_may_hold(tokenizer, shapes_root, tmp_path):
    """Under a cap of 0.65x the model's size per process, the ZeRO-3 build (zero.Init) succeeds
    with each rank holding half the parameters; the same model built whole does not fit."""
    import json

    worker = str(REPO / "tests" / "workers" / "build_capped.py")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by torchrun's ranks
    try:
        torchrun([worker, "zero3", str(shapes_root / "tokenizer"), str(tmp_path / "z3")], cwd=REPO)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    subprocess.run([sys.executable, worker, "full", str(shapes_root / "tokenizer"), str(tmp_path / "full")],
                   cwd=REPO, env=env, check=True, timeout=300)
    for rank in (0, 1):
        z3 = json.loads((tmp_path / f"z3.rank{rank}").read_text())
        assert z3["built"] and z3["all_partitioned"], z3
        assert z3["local_bytes"] <= 0.51 * z3["full_bytes"]  # half of every parameter (plus padding)
        assert z3["data_growth_bytes"] < z3["cap_bytes"] < z3["full_bytes"]
    full = json.loads((tmp_path / "full.rank0").read_text())
    assert full["full_bytes"] == z3["full_bytes"] > 150e6
    assert not full["built"] and "allocate" in full["error"]


def test_zero3_partitioned_models_load_exact_weights(anchor, shapes_root, tmp_path):
    """A finished run loaded into ZeRO-3 shards, and towers from local from_pretrained folders
    built under ZeRO-3, gather back to exactly the weights on disk."""
    import json

    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    torchrun([str(REPO / "tests" / "workers" / "zero3_load.py"), str(shapes_root / "tokenizer"), str(anchor),
              str(tmp_path / "vit"), str(tmp_path / "bert"), str(tmp_path / "out")], cwd=REPO)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"out.rank{rank}").read_text())
        for part, (diff, compared, on_disk) in report.items():
            assert diff == 0.0 and compared > 0, (part, report)
        assert report["vision"][1] == report["vision"][2] and report["text"][1] == report["text"][2]
