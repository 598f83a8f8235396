"""The WebDataset pipeline: exact epochs over ranks and workers, equal step counts,
clear errors, and bad data skipped and counted."""
from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from dbl_scale.config import load_config
from dbl_scale.data import DataError, TrainLoader
from conftest import TINY


def _loader(root, tokenizer, rank, world, workers, batch=8, shuffle=64, seed=0):
    cfg = load_config(TINY, [f"data.root={root}", f"data.workers={workers}", f"data.batch_size={batch}",
                             f"data.shuffle_buffer={shuffle}"])
    return TrainLoader(cfg.data, 32, tokenizer, 24, rank, world, seed)


def _epochs(root, tokenizer, start_epoch, n_epochs, world=2, workers=2):
    """Per epoch, per rank: the image ids of that rank's batches, read from one endless loader."""
    per_rank = []
    for rank in range(world):
        loader = _loader(root, tokenizer, rank, world, workers)
        assert loader.steps_per_epoch == 8  # 128 samples // (2 ranks x batch 8)
        batches = list(itertools.islice(loader.batches(start_epoch), n_epochs * loader.steps_per_epoch))
        for b in batches:
            assert b["pixel_values"].shape == (8, 3, 32, 32)
            assert b["input_ids"].shape == (8, 24) and b["attention_mask"].shape == (8, 24)
        ids = [b["image_ids"].tolist() for b in batches]
        per_rank.append([sum(ids[e * 8:(e + 1) * 8], []) for e in range(n_epochs)])
    return [[per_rank[r][e] for r in range(world)] for e in range(n_epochs)]


def test_two_ranks_two_workers_see_every_sample_once(shapes_root, tokenizer):
    # 128 samples in 8 shards of 16; 2 ranks x 2 workers; batch 8 -> 8 steps per rank per epoch
    epoch0, epoch1 = _epochs(shapes_root, tokenizer, start_epoch=0, n_epochs=2)
    for ranks in (epoch0, epoch1):
        assert [len(r) for r in ranks] == [64, 64]  # equal step counts on both ranks
        assert sorted(ranks[0] + ranks[1]) == list(range(128))  # every sample exactly once
    assert epoch1 != epoch0  # a new shard and sample order every epoch
    again = _epochs(shapes_root, tokenizer, start_epoch=0, n_epochs=1)[0]
    assert again == epoch0  # deterministic
    resumed = _epochs(shapes_root, tokenizer, start_epoch=1, n_epochs=1)[0]
    assert resumed == epoch1  # a stream started at epoch 1 (a resume) replays epoch 1 exactly


def test_uneven_shards_still_give_equal_steps(shapes_root, tokenizer, tmp_path):
    sizes = json.loads((shapes_root / "dbl_index.json").read_text())
    sizes["train"]["shards"] = sizes["train"]["shards"][:5]  # 5 shards over 2 ranks x 1 worker
    sizes["train"]["samples"] = 80
    root = _copy_root(shapes_root, tmp_path, sizes)
    loaders = [_loader(root, tokenizer, r, 2, 1) for r in range(2)]
    assert [lo.steps_per_epoch for lo in loaders] == [5, 5]
    for lo in loaders:  # the rank with 2 shards and the rank with 3 both deliver, epoch after epoch
        assert len(list(itertools.islice(lo.batches(), 15))) == 15


def test_rank_without_shards_is_an_error(shapes_root, tokenizer):
    with pytest.raises(DataError, match="every rank needs at least one shard"):
        _loader(shapes_root, tokenizer, 0, 9, 0)


def test_missing_index_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match="dbl_index.json not found"):
        _loader(tmp_path, tokenizer, 0, 1, 0)


def _copy_root(src: Path, dst: Path, sizes: dict) -> Path:
    for shard in sizes["train"]["shards"] + sizes["test"]["shards"]:
        (dst / shard).write_bytes((src / shard).read_bytes())
    (dst / "dbl_index.json").write_text(json.dumps(sizes))
    return dst


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_corrupt_samples_are_skipped_and_counted(shapes_root, tokenizer, tmp_path):
    """A broken JPEG, a sample without captions, and a truncated tar: no crash, counted."""
    src = shapes_root / "train-00000.tar"
    members = []
    with tarfile.open(src) as t:
        for m in t.getmembers():
            members.append((m.name, t.extractfile(m).read()))
    bad = tmp_path / "bad-00000.tar"
    with tarfile.open(bad, "w") as t:
        for i, (name, data) in enumerate(members):
            if name.endswith(".jpg") and i < 2:
                data = b"not a jpeg"  # sample 0: corrupt image
            if name.endswith(".json") and 2 <= i < 4:
                data = json.dumps({"image_id": 999, "captions": []}).encode()  # sample 1: no caption
            _add(t, name, data)
    truncated = tmp_path / "bad-00001.tar"
    whole = (shapes_root / "train-00001.tar").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2 + 100])  # cut mid-member
    sizes = {"train": {"shards": [bad.name, truncated.name], "samples": 24, "captions_per_image": 5}}
    (tmp_path / "dbl_index.json").write_text(json.dumps(sizes))

    loader = _loader(tmp_path, tokenizer, 0, 1, 0, batch=4, shuffle=0)
    assert loader.steps_per_epoch == 6
    ids = [i for b in itertools.islice(loader.batches(), 12) for i in b["image_ids"].tolist()]
    assert len(ids) == 48
    assert 999 not in ids
    # the broken image and the caption-less sample (each epoch), and the truncated tar's tail
    assert loader.skipped >= 5


@pytest.mark.launch
def test_mlflow_counts_every_rank_s_skipped_samples(shapes_root, tokenizer, tmp_path):
    """`data/skipped` in MLflow is the sum over ranks of what their loaders skipped (replayed
    here, rank by rank, from the same seed), and not zero."""
    import shutil

    from mlflow.tracking import MlflowClient

    from conftest import torchrun

    root = tmp_path / "data"
    shutil.copytree(shapes_root, root)
    for shard in ("train-00000.tar", "train-00001.tar"):  # one shard of each rank's first pair
        with tarfile.open(shapes_root / shard) as t:
            members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
        with tarfile.open(root / shard, "w") as t:
            for i, (name, data) in enumerate(members):
                _add(t, name, b"not a jpeg" if name.endswith(".jpg") and i < 8 else data)  # 4 samples
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={root}", "train.steps=4",
              "train.log_every=4", "eval.at_end=false", "checkpoint.at_end=false", f"tracking.uri={uri}",
              "tracking.experiment=skips", f"train.output_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("skips").experiment_id])
    logged = client.get_metric_history(run.info.run_id, "data/skipped")[-1]

    cfg = load_config(TINY, [f"data.root={root}"])
    replayed = 0
    for rank in range(2):
        loader = TrainLoader(cfg.data, 32, tokenizer, 24, rank, 2, cfg.train.seed)
        list(itertools.islice(loader.batches(), 4))
        replayed += loader.skipped
    assert logged.step == 4 and replayed > 0
    assert logged.value == replayed


def _all_corrupt(src: Path, dst: Path) -> None:
    with tarfile.open(src) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(dst, "w") as t:
        for name, data in members:
            _add(t, name, b"not a jpeg" if name.endswith(".jpg") else data)


def test_a_split_with_no_usable_sample_is_an_error_not_a_hang(shapes_root, tokenizer, tmp_path):
    for i in range(2):
        _all_corrupt(shapes_root / f"train-0000{i}.tar", tmp_path / f"bad-0000{i}.tar")
    (tmp_path / "bad-00002.tar").write_bytes(b"")  # an empty file
    sizes = {"train": {"shards": ["bad-00000.tar", "bad-00001.tar", "bad-00002.tar", "gone-00003.tar"],
                       "samples": 48, "captions_per_image": 5}}
    (tmp_path / "dbl_index.json").write_text(json.dumps(sizes))
    loader = _loader(tmp_path, tokenizer, 0, 1, 0, batch=4)
    with pytest.raises(DataError, match="no usable sample in the last 8 shards.*empty, missing or every sample"):
        next(loader.batches())


def test_a_shard_that_disappears_mid_run_is_skipped_and_counted(shapes_root, tokenizer, tmp_path):
    sizes = json.loads((shapes_root / "dbl_index.json").read_text())
    _copy_root(shapes_root, tmp_path, sizes)
    loader = _loader(tmp_path, tokenizer, 0, 1, 0, batch=8, shuffle=0)
    batches = loader.batches()
    first = [next(batches) for _ in range(loader.steps_per_epoch)]  # one whole epoch, every shard read
    (tmp_path / sizes["train"]["shards"][3]).unlink()
    more = [next(batches) for _ in range(2 * loader.steps_per_epoch)]  # two more epochs, one shard short
    assert len(first) + len(more) == 3 * loader.steps_per_epoch
    assert loader.skipped >= 2  # the missing shard, once per epoch it was due


def test_fewer_shards_than_ranks_times_workers_is_an_error_at_start(shapes_root, tokenizer):
    """8 shards for 2 ranks x 8 workers: some worker would wait for a shard it never gets;
    the loader says so when it is built, before any batch is asked for."""
    with pytest.raises(DataError, match=r"8 'train' shard\(s\) for 2 ranks x 8 loader worker\(s\).*"
                                        r"data.workers=4"):
        _loader(shapes_root, tokenizer, 0, 2, 8)
    assert _loader(shapes_root, tokenizer, 0, 2, 4).workers == 4


def test_build_data_writes_only_into_an_absent_or_empty_folder(tmp_path):
    """--build-data and the demo build ShapesCaptions into data.root only when it is absent or
    empty; a folder with anything in it but no index is someone's data: an error that says what
    it holds, and nothing is written."""
    from dbl_scale.cli.data import prepare_data

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "IMG_0001.jpg").write_bytes(b"my photo")
    cfg = load_config(TINY, [f"data.root={mine}", "data.build.train=16", "data.build.val=4", "data.build.test=4"])
    with pytest.raises(DataError, match=r"dbl_index.json not found \(.*mine holds IMG_0001.jpg, \.\.\.\)"):
        prepare_data(cfg)
    assert [p.name for p in mine.iterdir()] == ["IMG_0001.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = load_config(TINY, [f"data.root={empty}", "data.build.train=16", "data.build.val=4", "data.build.test=4"])
    assert prepare_data(cfg)["train"]["samples"] == 16 and (empty / "dbl_index.json").exists()


def test_any_webdataset_url_is_a_training_root(shapes_root, tokenizer):
    """data.root may name the shards themselves: a brace pattern behind `pipe:` reads like the
    folder does (same samples, same equal steps); s3:// keeps its scheme and goes through the
    AWS CLI; a URL without a count asks for data.samples_per_epoch."""
    from dbl_scale.data import join, split_shards
    from dbl_scale.shards import shard_url

    pattern = f"pipe:cat {shapes_root}/train-{{00000..00007}}.tar"
    with pytest.raises(DataError, match="set data.samples_per_epoch"):
        split_shards(pattern, "train")
    urls, n = split_shards(pattern, "train", samples_per_epoch=128)
    assert len(urls) == 8 and n == 128 and urls[3] == f"pipe:cat {shapes_root}/train-00003.tar"
    cfg = load_config(TINY, [f"data.root={pattern}", "data.samples_per_epoch=128", f"data.eval_root={shapes_root}",
                             "data.workers=0", "data.batch_size=8"])
    loaders = [TrainLoader(cfg.data, 32, tokenizer, 24, r, 2, 0) for r in range(2)]
    ids = [i for lo in loaders for b in itertools.islice(lo.batches(), lo.steps_per_epoch) for i in b["image_ids"].tolist()]
    assert [lo.steps_per_epoch for lo in loaders] == [8, 8] and sorted(ids) == list(range(128))
    assert join("s3://bucket/coco", "train-00000.tar") == "s3://bucket/coco/train-00000.tar"
    assert shard_url("s3://bucket/coco/train-00000.tar") == "pipe:aws s3 cp s3://bucket/coco/train-00000.tar -"


def test_one_caption_rule_for_training_conversion_and_inspection():
    """Our json captions list wins over .txt / json caption; empty or non-string captions are
    dropped; the training reader and the shard inspector read the same captions."""
    from data_tools.inspect_shards import Sample
    from dbl_scale.shards import string_id
    from dbl_scale.data import sample_meta

    cases = [({"image_id": 7, "captions": [" a red ball ", "", 3]}, "ignored", ["a red ball"]),
             ({"caption": "json one"}, "txt one", ["txt one"]),
             ({"caption": " json one "}, None, ["json one"]),
             ([1, 2], "txt only", ["txt only"])]  # a json that is not an object
    for meta, txt, expected in cases:
        raw = {"__key__": "k1", "json": json.dumps(meta).encode()}
        if txt is not None:
            raw["txt"] = txt.encode()
        image_id, captions = sample_meta(raw)
        assert captions == expected
        inspected = Sample("s.tar", "k1", None, meta if isinstance(meta, dict) else {}, txt)
        assert [c.strip() for c in inspected.captions if isinstance(c, str) and c.strip()] == expected
        assert image_id == (7 if isinstance(meta, dict) and "image_id" in meta else string_id("k1"))
