"""Methods trained end to end from the command line on 2 CPU ranks (DeepSpeed ZeRO-2), logging
their loss terms; the frozen-checkpoint ones (offline DBL, structure distillation) start from
a finished run. Every method's step, distillation and mutual learning included, also runs
through the production `train_step` on 1 and 2 ranks in test_distributed_losses.py."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import TINY, torchrun


def _run(shapes_root, tmp_path, name, *overrides, steps=4):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={shapes_root}", f"train.steps={steps}",
              "train.log_every=1", "eval.at_end=false", f"tracking.uri={uri}", "tracking.experiment=methods",
              f"tracking.run_name={name}", f"train.output_dir={tmp_path / 'runs'}", *overrides], cwd=tmp_path)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("methods").experiment_id],
                             f"tags.mlflow.runName = '{name}'")[0]
    assert run.info.status == "FINISHED"
    assert (tmp_path / "runs" / name / "model.pt").is_file()
    _run.output = proc.stdout + proc.stderr
    return client, run


@pytest.fixture(scope="module")
def teacher(finished_run):
    return finished_run


@pytest.mark.launch
@pytest.mark.parametrize("method,overrides,keys", [
    ("infonce", [], ["loss/infonce", "logit_scale"]),
    ("dbl-online", ["loss.method=dbl", "loss.dbl.scenario=online", "loss.dbl.branches=3"],
     ["loss/raw", "loss/boost", "branch0/loss/raw", "branch1/loss/boost"]),
])
def test_method_trains(method, overrides, keys, shapes_root, tmp_path):
    overrides = overrides or [f"loss.method={method}"]
    client, run = _run(shapes_root, tmp_path, method, *overrides)
    for key in keys + ["loss"]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4], key
    if method == "infonce":
        scale = client.get_metric_history(run.info.run_id, "logit_scale")[0].value
        assert scale == pytest.approx(1 / 0.07, rel=0.01)  # starts at 1/T, the same on both ranks


@pytest.mark.launch
def test_offline_dbl_without_its_boost_is_the_triplet_continued(shapes_root, tmp_path, teacher):
    """Null test of the branch and anchor plumbing: DBL offline with alpha = 0 trains, bit for
    bit, what the triplet continued from the same checkpoint with the same seed trains. The
    target starts as the anchor: at step 1 every query's hardest boosting violation is exactly
    margin * beta, so the (logged, unweighted) boost is 2 directions x 16 queries x 0.2."""
    client, run = _run(shapes_root, tmp_path, "null-dbl", "loss.method=dbl", "loss.dbl.scenario=offline",
                       f"loss.dbl.anchor={teacher}", "loss.dbl.alpha=0")
    first = client.get_metric_history(run.info.run_id, "loss/boost")[0]
    assert first.step == 1 and first.value == pytest.approx(2 * 16 * 0.2, rel=1e-5)
    _run(shapes_root, tmp_path, "null-triplet", "loss.method=triplet", f"train.init_from={teacher}")
    dbl, triplet, start = (torch.load(path / "model.pt", weights_only=True)
                           for path in (tmp_path / "runs" / "null-dbl", tmp_path / "runs" / "null-triplet", teacher))
    assert dbl.keys() == triplet.keys()
    assert all(torch.equal(dbl[k], triplet[k]) for k in dbl)
    assert not all(torch.equal(dbl[k], start[k]) for k in dbl)  # both trained away from the checkpoint


@pytest.mark.slow
@pytest.mark.launch
def test_dbl_momentum_without_its_boost_is_the_triplet(shapes_root, tmp_path):
    """Null test of DBL momentum: with alpha = 0 the EMA anchor still runs beside the target
    (its scores, the boost and its diagnostics are computed and logged) but the target trains,
    bit for bit, what the triplet from scratch with the same seed trains."""
    client, run = _run(shapes_root, tmp_path, "null-momentum", "loss.method=dbl", "loss.dbl.scenario=momentum",
                       "loss.dbl.alpha=0")
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "loss/boost"))
    _run(shapes_root, tmp_path, "null-triplet", "loss.method=triplet")
    dbl, triplet = (torch.load(tmp_path / "runs" / name / "model.pt", weights_only=True)
                    for name in ("null-momentum", "null-triplet"))
    assert dbl.keys() == triplet.keys()
    assert all(torch.equal(dbl[k], triplet[k]) for k in dbl)
    boosted = _run(shapes_root, tmp_path, "boosted", "loss.method=dbl", "loss.dbl.scenario=momentum")[1]
    assert boosted.info.status == "FINISHED"
    trained = torch.load(tmp_path / "runs" / "boosted" / "model.pt", weights_only=True)
    assert not all(torch.equal(trained[k], triplet[k]) for k in trained)  # alpha > 0 does train otherwise


@pytest.mark.launch
def test_structure_aware_distillation_from_a_finished_run(shapes_root, tmp_path, teacher):
    client, run = _run(shapes_root, tmp_path, "structure", "loss.method=structure",
                       f"loss.structure.teacher={teacher}")
    for key in ("loss/structure", "loss/repr_image", "loss/repr_text"):
        assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, key)), key


@pytest.mark.launch
def test_structure_with_frozen_single_modal_encoders(shapes_root, tmp_path, tokenizer):
    """The teacher is a local ViT folder and a local BERT folder with its own tokenizer, under
    ZeRO-3 loaded into shards and run through its own partitioned forward (ZeRO-3 only: the
    stage with the most to go wrong; ZeRO 0-2 build the same teacher whole)."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel
    ViTModel(ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                       image_size=48, patch_size=16)).save_pretrained(tmp_path / "vit")
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=40, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=80)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    client, run = _run(shapes_root, tmp_path, "structure-hf", "loss.method=structure",
                       f"loss.structure.teacher_vision={tmp_path / 'vit'}",
                       f"loss.structure.teacher_text={tmp_path / 'bert'}",
                       "train.deepspeed=ds_configs/zero3.json", steps=3)
    assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, "loss/repr_text"))


@pytest.mark.launch
def test_coder_fills_its_queues(shapes_root, tmp_path):
    client, run = _run(shapes_root, tmp_path, "coder", "loss.method=coder", "loss.coder.queue_size=24",
                       "loss.coder.concepts=16", steps=4)
    dcl = [m.value for m in client.get_metric_history(run.info.run_id, "loss/dcl")]
    # the queue holds 0, 16, 24, 24 keys at steps 1-4: more negatives, a larger loss
    assert dcl[1] > dcl[0] and len(dcl) == 4
    assert client.get_metric_history(run.info.run_id, "momentum")[0].value == pytest.approx(0.999)


@pytest.mark.launch
def test_aoq_mines_trains_and_refreshes(shapes_root, tmp_path, teacher):
    # 128 images / (2 ranks x 8) = 8 steps per epoch: candidates mined at start, re-mined at step 8
    client, run = _run(shapes_root, tmp_path, "aoq", "loss.method=aoq", f"train.init_from={teacher}",
                       "loss.aoq.refresh_epochs=1", "loss.aoq.k_captions=50", "loss.aoq.k_images=20",
                       "loss.aoq.n_max=10", steps=10)
    history = client.get_metric_history(run.info.run_id, "loss/aoq")
    assert len(history) == 10 and all(m.value > 0 for m in history)
    assert _run.output.count("AOQ candidates re-mined") == 1


def test_missing_checkpoint_is_a_clear_error(shapes_root, tmp_path):
    from dbl_scale.branches import load_model
    with pytest.raises(FileNotFoundError, match="model.pt not found: expected the folder of a finished run"):
        (tmp_path / "config.yaml").write_text("{}")
        load_model(tmp_path, None)
