"""Invariant 2 (ZeRO-2 and ZeRO-3, fp32 and bf16): a run stopped after step k and resumed ends
exactly where the uninterrupted run ends: every trained branch's fp32 master weights, the
momentum anchor, CODER's queues (through the weights they shape), AOQ's candidates and
sampler, the data position (also with loader workers), the RNG and the LR schedule; and the
MLflow run is the same run with one continuous metric history."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY, torchrun


def _train(shapes_root, tmp_path, name, overrides, extra=()):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={shapes_root}", "train.steps=12",
              "train.log_every=1", "eval.at_end=false", f"tracking.uri={uri}", "tracking.experiment=resume",
              f"tracking.run_name={name}", f"train.output_dir={tmp_path / 'runs'}", *overrides, *extra],
             cwd=tmp_path)
    return MlflowClient(uri)


def _weights(run_dir, step, branches):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    out = {}
    for k in branches:
        ema = ckpt / f"branch{k}_ema.pt"
        out[k] = (torch.load(ema, weights_only=True) if ema.exists()
                  else get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=f"branch{k}"))
    return out


SCENARIOS = [
    # (name, overrides, branches with saved weights: EMA anchors and trained ones, DeepSpeed config)
    ("online", ["loss.method=dbl", "loss.dbl.scenario=online"], [0, 1], "zero2"),
    ("offline", ["loss.method=dbl", "loss.dbl.scenario=offline", "loss.dbl.anchor={teacher}"], [1], "zero3"),
    ("coder", ["loss.method=coder", "loss.coder.queue_size=40", "loss.coder.concepts=8"], [0, 1], "zero2"),
    # AOQ's mined candidates and its sampler's position, re-mined at the epoch boundary (step 8)
    ("aoq", ["loss.method=aoq", "train.init_from={teacher}", "loss.aoq.refresh_epochs=1", "loss.aoq.k_captions=50",
             "loss.aoq.k_images=20", "loss.aoq.n_max=10"], [0], "zero2"),
]


@pytest.fixture(scope="module")
def teacher(finished_run):
    return finished_run


def _same_weights(tmp_path, saved, resumed_dir):
    whole = _weights(tmp_path / "runs" / "whole", 12, saved)
    resumed = _weights(resumed_dir, 12, saved)
    for k in whole:
        for name, w in whole[k].items():
            torch.testing.assert_close(resumed[k][name], w, rtol=0, atol=1e-6, msg=f"branch {k} {name}")


@pytest.mark.slow
@pytest.mark.launch
def test_stopped_and_resumed_is_exact_in_the_same_mlflow_run(shapes_root, tmp_path, teacher):
    """Stopped on purpose after step 5 (mid-epoch: 8 steps per epoch) and resumed with
    `checkpoint.resume=latest`: the EMA anchor (bf16 ZeRO-3 shards and their fp32 average), the
    target's fp32 master weights, the loader workers' data position and every RNG continue
    exactly; the MLflow run is the same run, FINISHED, with one continuous history."""
    overrides = ["loss.method=dbl", "loss.dbl.scenario=momentum", "loss.dbl.momentum=0.9", "data.workers=2",
                 "train.deepspeed=ds_configs/zero3_bf16.json"]
    client = _train(shapes_root, tmp_path, "whole", overrides)
    _train(shapes_root, tmp_path, "split", overrides, ["checkpoint.stop_at=5"])
    _train(shapes_root, tmp_path, "split", overrides, ["checkpoint.resume=latest"])
    _same_weights(tmp_path, [0, 1], tmp_path / "runs" / "split")

    exp = client.get_experiment_by_name("resume").experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    assert set(runs) == {"whole", "split"}  # the resumed run is the same MLflow run
    assert runs["split"].info.status == "FINISHED"
    losses = {n: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss")]
              for n, r in runs.items()}
    assert [s for s, _ in losses["split"]] == list(range(1, 13))  # one continuous history
    assert [v for _, v in losses["split"]] == pytest.approx([v for _, v in losses["whole"]], rel=1e-6)


@pytest.mark.launch
@pytest.mark.parametrize("scenario,overrides,saved,ds", SCENARIOS, ids=[f"{s[0]}-{s[3]}" for s in SCENARIOS])
def test_resumed_from_a_checkpoint_is_exact(scenario, overrides, saved, ds, shapes_root, tmp_path, teacher):
    """One launch per half: the whole run (`checkpoint.resume=latest` with nothing to resume
    yet) writes a checkpoint at step 5 on its way to 12; a second launch resumes from that checkpoint (in its own folder) and must end where the whole
    run ended. It continues the whole run's MLflow run, logging steps 6-12 a second time with
    the very same losses; no other run appears."""
    overrides = [o.format(teacher=teacher) for o in overrides] + [f"train.deepspeed=ds_configs/{ds}.json"]
    # `latest` with no checkpoint yet: a fresh start
    client = _train(shapes_root, tmp_path, "whole", overrides, ["checkpoint.every=5", "checkpoint.resume=latest"])
    ckpt = tmp_path / "runs" / "whole" / "checkpoints" / "step_00000005"
    _train(shapes_root, tmp_path, "whole", overrides,
           [f"checkpoint.resume={ckpt}", f"train.output_dir={tmp_path / 'resumed'}"])
    _same_weights(tmp_path, saved, tmp_path / "resumed" / "whole")

    exp = client.get_experiment_by_name("resume").experiment_id
    (run,) = client.search_runs([exp])
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    first = dict(history[:12])
    assert [s for s, _ in history] == list(range(1, 13)) + list(range(6, 13))
    assert [v for _, v in history[12:]] == pytest.approx([first[s] for s in range(6, 13)], rel=1e-6)


def test_a_resume_path_that_is_not_a_complete_checkpoint_is_an_error(tmp_path):
    from dbl_scale import checkpoint
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.resolve(tmp_path, str(tmp_path / "nowhere"))


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    from dbl_scale import checkpoint
    (tmp_path / "step_00000004").mkdir()
    (tmp_path / "step_00000004" / "COMPLETE").write_text("step 4")
    (tmp_path / "step_00000009.tmp").mkdir()  # a crash while saving
    (tmp_path / "step_00000008").mkdir()  # no COMPLETE marker
    assert checkpoint.resolve(tmp_path, "latest") == tmp_path / "step_00000004"
