"""Issue 4 at small scale on 2 CPU ranks: every DBL scenario trains the same weights under every
ZeRO stage;
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

pytestmark = pytest.mark.launch  # every test here starts a process

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


# (offline's ZeRO-3 part, the frozen partitioned anchor, is checked by the 1-vs-2-rank parity
# and by test_zero3_partitioned_models_load_exact_weights)
SCENARIOS = {"momentum": ["loss.dbl.scenario=momentum", "loss.dbl.momentum=0.9", "train.init_from={anchor}"],
             "online": ["loss.dbl.scenario=online", "train.init_from={anchor}"]}
# every stage for the momentum anchor (the scenario with the most ZeRO-specific code: the EMA
# works on shards), the plain and the sharded extremes for the others
# (ZeRO-1 shares ZeRO-2's optimizer; bf16 is covered by the momentum scenario, whose EMA
# precision depends on it). zero3_gpu is the shipped GPU config as it is: bf16, torch's fused
# AdamW, and the small parameters that ZeRO-3 persists whole next to their shards, which the
# EMA must update both of (the CPU configs persist nothing).
STAGES = {"momentum": ["zero0", "zero2", "zero3", "zero2_bf16", "zero3_bf16", "zero3_gpu"], "online": ["zero0", "zero3"]}
BF16 = ("zero2_bf16", "zero3_bf16", "zero3_gpu")
# After 3 Adam steps at lr 5e-4 from identical weights. Adam moves a parameter by up to lr per
# step whatever its gradient's size, so a gradient that is zero in exact arithmetic (attention
# key biases) moves by float noise that differs between reduction orders: fp32 allows a fifth
# of one step. bf16 computes forward and backward in bf16, so its weights differ from fp32's
# by about as much as they moved: there the update itself (weights - start) must point the
# same way as fp32's (cosine, measured >= 0.97) and have the same size (measured within 0.5%).
# A bf16 run's EMA averages (in fp32) the target's bf16 weights, from their start: its update
# carries their rounding (measured: cosine 0.96, size within 4% of fp32's).
FP32_ATOL, BF16_MIN_COSINE, BF16_NORM_RATIO = 1e-4, 0.95, (0.95, 1.05)
BF16_EMA_MIN_COSINE, BF16_EMA_NORM_RATIO = 0.9, (0.9, 1.1)


def _same_weights(got: dict, want: dict, start: dict, bf16: bool, what: str, min_cosine=BF16_MIN_COSINE,
                  norm_ratio=BF16_NORM_RATIO, got_start=None) -> None:
    """fp32: the same weights; bf16: the same update from the start (`got_start` for `got`)."""
    if not bf16:
        for k, w in want.items():
            torch.testing.assert_close(got[k].float(), w.float(), rtol=0, atol=FP32_ATOL, msg=f"{what} {k}")
        return
    got_start = got_start or start
    update = torch.cat([(got[k].float() - got_start[k].float()).flatten() for k in want])
    ref = torch.cat([(want[k].float() - start[k].float()).flatten() for k in want])
    cosine = torch.nn.functional.cosine_similarity(update, ref, dim=0).item()
    ratio = (update.norm() / ref.norm()).item()
    assert cosine >= min_cosine and norm_ratio[0] <= ratio <= norm_ratio[1], (what, cosine, ratio)


def _target_and_anchor(run_dir):
    """The target's fp32 weights (ZeRO's master copy, as `export` reads them) and the EMA anchor's."""
    from dbl_scale.export import fp32_target_state

    ema = run_dir / "checkpoints" / "step_00000003" / "branch0_ema.pt"
    return fp32_target_state(run_dir), torch.load(ema, weights_only=True) if ema.exists() else None


@pytest.fixture(scope="module")
def stage_runs(shapes_root, tmp_path_factory, anchor):
    """{scenario: {stage: run folder}}: 3 steps of every scenario under its stages, from the
    same weights (a finished run)."""
    tmp = tmp_path_factory.mktemp("stages")
    runs = {}
    for scenario, stages in STAGES.items():
        for ds in stages:
            name = f"{scenario}-{ds}"
            torchrun(["-m", "dbl_scale.cli.train", *_args(shapes_root, tmp, name, "loss.method=dbl", "train.steps=3",
                                                       f"train.deepspeed=ds_configs/{ds}.json",
                                                       *[o.format(anchor=anchor) for o in SCENARIOS[scenario]])],
                     cwd=tmp)
            assert _losses(tmp, name)[1].data.tags["zero_stage"] == ds[4]
            runs.setdefault(scenario, {})[ds] = tmp / "runs" / name
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_zero_stage_trains_the_same_weights(scenario, stage_runs, anchor):
    """From the same weights (a finished run) every ZeRO stage trains the same target, and the
    momentum anchor the same EMA: fp32 to a tight tolerance, bf16 (ZeRO-2/3) to a stated one.
    A stage whose optimizer, gradient reduction or EMA differs shows here, not only a loss
    that fails to fall."""
    weights = {ds: _target_and_anchor(run_dir) for ds, run_dir in stage_runs[scenario].items()}
    start = torch.load(anchor / "model.pt", weights_only=True)
    ref_target, ref_ema = weights["zero0"]
    assert max((ref_target[k] - start[k].float()).abs().max().item() for k in start) > 1e-3  # it trained
    for ds, (target, ema) in weights.items():
        _same_weights(target, ref_target, start, ds in BF16, f"{ds} target")
        if scenario == "momentum":  # the EMA starts as the target; bf16 runs keep it in fp32
            assert all(v.dtype == torch.float32 for v in ema.values() if v.is_floating_point()), ds
            _same_weights(ema, ref_ema, start, ds in BF16, f"{ds} EMA", BF16_EMA_MIN_COSINE, BF16_EMA_NORM_RATIO,
                          {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in start.items()})


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


def test_export_after_zero3_reloads_with_automodel(stage_runs, tmp_path, tokenizer):
    from transformers import AutoModel

    from dbl_scale.export import export, load_exported
    from dbl_scale.branches import load_model

    run_dir = stage_runs["momentum"]["zero3"]
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
