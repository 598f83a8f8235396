"""Tests for the built-in ShapesCaptions dataset (data_tools/shapes_captions.py)."""

import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_tools.shapes_captions import (
    build_if_missing,
    build_shapes_captions,
    image_facts,
    main,
    oracle_rsum,
    oracle_similarity,
)

SMALL = dict(n_train=60, n_val=10, n_test=120, image_size=64, shard_size=25)


def _read_samples(out_dir, shard):
    """{key: {ext: bytes}} for one shard, read with tarfile."""
    samples = collections.OrderedDict()
    with tarfile.open(os.path.join(out_dir, shard)) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _shard_bytes(out_dir, sizes):
    return {n: open(os.path.join(out_dir, n), "rb").read() for s in ("train", "val", "test") for n in sizes[s]["shards"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes_a"))
    return out, build_shapes_captions(out, seed=0, **SMALL)


def test_deterministic_and_seed_dependent(built, tmp_path):
    out_a, sizes_a = built
    out_b, out_c = str(tmp_path / "b"), str(tmp_path / "c")
    sizes_b = build_shapes_captions(out_b, seed=0, **SMALL)
    assert sizes_a == sizes_b
    assert _shard_bytes(out_a, sizes_a) == _shard_bytes(out_b, sizes_b)
    sizes_c = build_shapes_captions(out_c, seed=1, **SMALL)
    bytes_a, bytes_c = _shard_bytes(out_a, sizes_a), _shard_bytes(out_c, sizes_c)
    assert bytes_a.keys() == bytes_c.keys()
    assert all(bytes_a[n] != bytes_c[n] for n in bytes_a)
    assert not [n for n in os.listdir(out_b) if "tmp" in n]


def test_sizes_match_shards_and_samples_are_valid(built):
    out, sizes = built
    with open(os.path.join(out, "dbl_index.json")) as f:
        assert json.load(f) == sizes
    assert sizes["image_size"] == 64 and sizes["seed"] == 0 and sizes["generator"] == "shapes_captions v1"
    for split in ("train", "val", "test"):
        info = sizes[split]
        assert info["samples"] == SMALL[f"n_{split}"] and info["captions_per_image"] == 5
        ids = []
        for i, name in enumerate(info["shards"]):
            assert name == f"{split}-{i:05d}.tar"
            for key, sample in _read_samples(out, name).items():
                assert set(sample) == {"jpg", "json", "txt"}
                meta = json.loads(sample["json"])
                assert sample["txt"].decode() == meta["captions"][0]  # open_clip's pipelines read this one
                assert key == f"{split}{meta['image_id']:07d}"
                ids.append(meta["image_id"])
                caps = meta["captions"]
                assert len(caps) == 5 and len({c.rstrip(".") for c in caps}) == 5
                assert all(c == c.lower() and c.strip() == c for c in caps)
                assert len(meta["caption_facts"]) == 5
                objs = meta["objects"]
                assert 1 <= len(objs) <= 3
                assert len({tuple(o["cell"]) for o in objs}) == len(objs)
                for c in caps:  # every caption names every object's colour
                    assert all(o["colour"] in c for o in objs)
                img = Image.open(io.BytesIO(sample["jpg"]))
                img.load()
                assert img.mode == "RGB" and img.size == (64, 64)
        assert sorted(ids) == list(range(info["samples"]))


def _split_jsons(out, sizes, split):
    metas = [json.loads(s["json"]) for n in sizes[split]["shards"] for s in _read_samples(out, n).values()]
    return sorted(metas, key=lambda m: m["image_id"])


def test_oracle(built):
    out, sizes = built
    metas = _split_jsons(out, sizes, "test")
    caps = [f for m in metas for f in m["caption_facts"]]
    sim = oracle_similarity(metas, caps)
    assert sim.shape == (len(metas), 5 * len(metas)) and sim.dtype == np.float32
    for i, m in enumerate(metas):
        assert np.all(sim[i, 5 * i : 5 * i + 5] == 1.0)
        assert set().union(*map(set, m["caption_facts"])) <= image_facts(m["objects"])
    assert sim.min() >= 0.0 and sim.max() <= 1.0
    fact_sets = collections.Counter(frozenset(image_facts(m["objects"])) for m in metas)
    lookalikes = sum(c for c in fact_sets.values() if c > 1)
    rsum = oracle_rsum(metas, seed=0)
    print(f"\noracle rSum={rsum:.1f} on {len(metas)} test images; {lookalikes} have an exact look-alike")
    assert lookalikes <= len(metas) // 10
    assert rsum > 500.0
    assert oracle_rsum(metas, seed=0) == rsum


@pytest.mark.launch
def test_build_if_missing_and_cli(built, tmp_path, capsys):
    out, sizes = built
    mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    assert build_if_missing(out, seed=0, **SMALL) == sizes
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == mtimes
    out2 = str(tmp_path / "cli")
    assert main(["--out", out2, "--train", "7", "--val", "0", "--test", "5", "--shard-size", "4"]) == 0
    assert "train=7" in capsys.readouterr().out
    small = build_if_missing(out2, n_train=7, n_val=0, n_test=5, shard_size=4)
    assert small["train"]["shards"] == ["train-00000.tar", "train-00001.tar"] and small["val"]["shards"] == []
    rebuilt = build_if_missing(out2, n_train=3, n_val=0, n_test=5, shard_size=4)  # count differs: rebuild
    assert rebuilt["train"]["samples"] == 3
    assert sorted(n for n in os.listdir(out2) if n.endswith(".tar")) == ["test-00000.tar", "test-00001.tar", "train-00000.tar"]


def test_dense_variant_names_three_shapes_with_four_attributes(tmp_path):
    """The dense variant: every image has 3 shapes, each solid or hollow; every caption states
    each shape's style and that fact holds for its image; the oracle still finds each image."""
    sizes = build_shapes_captions(str(tmp_path), n_train=8, n_val=8, n_test=40, image_size=64, shard_size=8,
                                  variant="dense")
    assert sizes["variant"] == "dense"
    samples = _read_samples(str(tmp_path), sizes["test"]["shards"][0])
    styles = collections.Counter()
    for s in samples.values():
        meta = json.loads(s["json"])
        assert len(meta["objects"]) == 3
        facts = image_facts(meta["objects"])
        for caption, caption_facts in zip(meta["captions"], meta["caption_facts"]):
            assert set(caption_facts) <= facts
            assert sum(f.startswith("style:") for f in caption_facts) >= 2, caption
            assert any(w in caption for w in ("solid", "filled", "hollow", "outlined"))
        styles.update(o["style"] for o in meta["objects"])
    assert set(styles) == {"solid", "hollow"}
    from data_tools.shapes_captions import read_split_jsons
    assert oracle_rsum(read_split_jsons(str(tmp_path), "test")) > 590
    with pytest.raises(ValueError, match="variant"):
        build_shapes_captions(str(tmp_path / "x"), n_train=1, n_val=1, n_test=1, variant="sparse")


def test_occluded_variant_hides_one_shape_in_half_the_images(tmp_path):
    """The occluded variant: in about half the images the json names one covered object, whose
    grid cell is noise (neighbouring pixels differ far more than in a drawn cell); the captions still
    state every object's facts, and those facts hold for the scene as generated."""
    sizes = build_shapes_captions(str(tmp_path), n_train=8, n_val=8, n_test=80, image_size=64, shard_size=80,
                                  variant="occluded")
    assert sizes["variant"] == "occluded"
    covered, spreads_covered, spreads_drawn = 0, [], []
    for s in _read_samples(str(tmp_path), sizes["test"]["shards"][0]).values():
        meta = json.loads(s["json"])
        pixels = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L"), dtype=np.float32)
        for caption_facts in meta["caption_facts"]:
            assert set(caption_facts) <= image_facts(meta["objects"])
        for index, obj in enumerate(meta["objects"]):
            row, col = obj["cell"]
            cell = pixels[row * 64 // 3 + 2:(row + 1) * 64 // 3 - 2, col * 64 // 3 + 2:(col + 1) * 64 // 3 - 2]
            roughness = (np.abs(np.diff(cell, axis=1)) > 25).mean()  # sharp steps: most of noise, a shape's edges
            (spreads_covered if meta.get("occluded") == index else spreads_drawn).append(roughness)
        covered += "occluded" in meta
    assert 25 <= covered <= 55  # OCCLUDED_RATE = 0.5 of 80 images, far from 0 and from all
    assert min(spreads_covered) > 2 * max(spreads_drawn)  # noise, not a drawn shape (about 0.6 against 0.14)
