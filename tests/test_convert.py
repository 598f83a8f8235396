"""Converters from a user's data into training shards, each fed inputs generated here: a
Karpathy JSON with an image folder, CSV / JSONL / Parquet tables, a folder with .txt captions,
img2dataset-style tars. Each is converted, verified, trained for a few steps on 2 ranks and
evaluated on its converted test split; interrupted conversions resume; bad input gets errors
that name the file and the sample."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_tools import convert
from data_tools.inspect_shards import samples, stats, verify, preview
from dbl_scale.config import ConfigError, load_config
from conftest import REPO, TINY, torchrun

pytestmark = pytest.mark.timeout(300)
WORDS = ["red", "green", "blue", "small", "large", "circle", "square", "left", "right", "dog", "cat", "tree"]


def _image(path: Path, n: int, size=None) -> None:
    """A distinct picture per n, of varying aspect ratio (wide, tall, square)."""
    w, h = size or [(48, 32), (32, 48), (40, 40), (80, 60)][n % 4]
    img = Image.new("RGB", (w, h), ((37 * n) % 256, (91 * n) % 256, (53 * n) % 256))
    for k in range(3):
        img.paste(((n * 17 + k * 80) % 256, 255 - (n * 13) % 256, (k * 90) % 256), (k * 10, k * 7, k * 10 + 9, k * 7 + 9))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=92)


def _caption(n: int, j: int) -> str:
    return " ".join(WORDS[(n * 7 + j * 3 + k) % len(WORDS)] for k in range(5)) + f" number {n}"


def _karpathy(root: Path, n_train=32, n_val=8, n_test=8, n_restval=4) -> Path:
    images, entries = [], []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test + ["restval"] * n_restval
    for n, split in enumerate(splits):
        folder = "val2014" if split in ("val", "test", "restval") else "train2014"
        name = f"COCO_{folder}_{n:012d}.jpg"
        _image(root / "images" / folder / name, n)
        sentences = [{"raw": _caption(n, j), "tokens": []} for j in range(6 if n == 0 else 5)]
        entries.append({"filepath": folder, "filename": name, "cocoid": 1000 + n, "split": split,
                        "sentences": sentences})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def _cli(*args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli.main", *args], capture_output=True, text=True,
                          timeout=240, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _train_and_eval(data: Path, tmp: Path, *extra: str) -> dict:
    """A few steps on 2 ranks, then the evaluation on the converted test split."""
    torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={data}", "train.steps=3",
              f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.run_name=r", f"train.output_dir={tmp / 'runs'}",
              "data.tokenizer=" + str(tmp / "tok"), *extra], cwd=tmp)
    return json.loads((tmp / "runs" / "r" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def tok(tmp_path_factory, shapes_root):
    """The ShapesCaptions tokenizer (any tokenizer serves these captions)."""
    return shapes_root / "tokenizer"


@pytest.mark.launch
def test_karpathy_converts_verifies_trains_and_evaluates(tmp_path, tok):
    src = _karpathy(tmp_path / "coco")
    out = tmp_path / "shards"
    proc = _cli("data", "convert", "karpathy", "--json", str(src), "--images", str(tmp_path / "coco" / "images"),
                "--out", str(out), "--shard-size", "8", "--max-side", "64", "--processes", "2")
    assert "train=36 images" in proc.stdout  # 32 train + 4 restval, the 113K protocol's way
    index = json.loads((out / "dbl_index.json").read_text())
    assert {s: index[s]["samples"] for s in ("train", "val", "test")} == {"train": 36, "val": 8, "test": 8}
    assert len(index["train"]["shards"]) == 5 and index["test"]["captions"] == 40
    by_id = {s.meta["image_id"]: s for shard in index["train"]["shards"] for s in samples(str(out / shard))}
    assert len(by_id[1000].meta["captions"]) == 5  # the 6th caption is dropped: 5 per image
    with Image.open(io.BytesIO(by_id[1003].image)) as im:  # 80x60 -> longer side 64, aspect kept
        assert im.size == (64, 48)
    with Image.open(io.BytesIO(by_id[1001].image)) as im:  # small enough: kept as it is
        assert im.size == (32, 48)
    assert by_id[1001].image == (tmp_path / "coco/images/train2014/COCO_train2014_000000000001.jpg").read_bytes()
    v = _cli("data", "verify", str(out))
    assert "train=36, val=8, test=8 samples; 0 error(s)" in v.stdout and v.stdout.rstrip().endswith("ok")
    s = stats(str(out), str(tmp_path / "stats.png"))
    assert "test: 8 images, 40 captions (captions per image: 5: 8)" in s and (tmp_path / "stats.png").stat().st_size > 0
    assert "image longer side (px): min 40, median 48, 95% 64, max 64" in s
    assert preview(str(out), str(tmp_path / "p.html"), "val", n=5) == 5
    assert (tmp_path / "p.html").read_text().count("<img") == 5

    (tmp_path / "tok").symlink_to(tok)
    assert _train_and_eval(out, tmp_path)["rsum"] > 0


@pytest.mark.launch
def test_tables_group_rows_by_image_and_draw_splits_by_image(tmp_path, tok):
    rows = []
    for n in range(40):
        _image(tmp_path / "img" / f"{n:03d}.jpg", n)
        for j in range(2 + n % 2):  # 2 or 3 rows (captions) per image, rows interleaved below
            rows.append({"path": f"{n:03d}.jpg", "text": _caption(n, j)})
    rows = rows[::2] + rows[1::2]
    import csv

    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "text"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")

    results = {}
    for ext in ("csv", "jsonl", "parquet"):
        splits = convert.table(str(tmp_path / f"t.{ext}"), "path", "text", str(tmp_path / "img"),
                               val_frac=0.2, test_frac=0.2)
        results[ext] = {s: sorted((it.name, tuple(sorted(it.captions))) for it in items) for s, items in splits.items()}
    assert results["csv"] == results["jsonl"] == results["parquet"]  # same table, same images and splits
    names = [n for items in results["csv"].values() for n, _ in items]
    assert sorted(names) == [f"{n:03d}.jpg" for n in range(40)]  # each image once, in one split
    assert all(len(caps) == 2 + int(n[:3]) % 2 for items in results["csv"].values() for n, caps in items)
    assert set(results["csv"]) == {"train", "val", "test"}

    out = tmp_path / "shards"
    _cli("data", "convert", "table", "--file", str(tmp_path / "t.csv"), "--image-col", "path", "--caption-col", "text",
         "--images-root", str(tmp_path / "img"), "--val-frac", "0.2", "--test-frac", "0.2", "--out", str(out),
         "--shard-size", "4")
    assert verify(str(out)).errors == []
    (tmp_path / "tok").symlink_to(tok)
    assert _train_and_eval(out, tmp_path)["rsum"] > 0

    bad = _cli("data", "convert", "table", "--file", str(tmp_path / "t.csv"), "--image-col", "image",
               "--caption-col", "text", "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "t.csv: no column 'image'; its columns: path, text" in bad.stderr


@pytest.mark.launch
def test_folder_with_sidecar_captions(tmp_path, tok):
    for n in range(24):
        _image(tmp_path / "pics" / f"sub{n % 2}" / f"p{n:02d}.png", n)
        if n != 5:
            (tmp_path / "pics" / f"sub{n % 2}" / f"p{n:02d}.txt").write_text(f"{_caption(n, 0)}\n\n{_caption(n, 1)}\n")
    out = tmp_path / "shards"
    proc = _cli("data", "convert", "folder", "--images", str(tmp_path / "pics"), "--test-frac", "0.25",
                "--out", str(out), "--shard-size", "4")
    index = json.loads((out / "dbl_index.json").read_text())
    assert index["train"]["samples"] + index["test"]["samples"] == 23  # p05 has no captions
    assert any("p05.png (no p05.txt): no caption: image skipped" in p["sample"] + ": " + p["problem"]
               for p in index["problems"])
    assert "sub1/p05.png (no p05.txt): no caption" in proc.stdout
    assert all(len(s.meta["captions"]) == 2 for shard in index["test"]["shards"] for s in samples(str(out / shard)))
    assert verify(str(out)).errors == []
    strict = _cli("data", "verify", str(out), "--strict", check=False)
    assert strict.returncode == 1 and "(--strict: a failure)" in strict.stdout
    (tmp_path / "tok").symlink_to(tok)
    assert _train_and_eval(out, tmp_path)["rsum"] > 0


def _img2dataset(folder: Path, n_shards=4, per_shard=8) -> None:
    """img2dataset's layout: NNNNN.tar with key.jpg / key.txt / key.json, and NNNNN_stats.json."""
    folder.mkdir(parents=True)
    n = 0
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for _ in range(per_shard):
                key = f"{s:05d}{n:04d}"
                buf = io.BytesIO()
                _image(folder / "tmp.jpg", n)
                buf.write((folder / "tmp.jpg").read_bytes())
                for ext, data in (("jpg", buf.getvalue()), ("txt", _caption(n, 0).encode()),
                                  ("json", json.dumps({"key": key, "caption": _caption(n, 0), "status": "success",
                                                       "url": f"http://x/{n}.jpg"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                n += 1
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    (folder / "tmp.jpg").unlink()


@pytest.mark.slow
@pytest.mark.launch
def test_img2dataset_shards_train_as_they_are_and_convert(tmp_path, tok, shapes_root):
    _img2dataset(tmp_path / "web")
    pattern = str(tmp_path / "web" / "{00000..00003}.tar")
    (tmp_path / "tok").symlink_to(tok)
    with pytest.raises(ConfigError, match="data.eval_root"):
        load_config(TINY, [f"data.root={pattern}"])
    # as they are: counts from *_stats.json, one caption per sample, string keys as ids;
    # evaluated on another folder's test split
    metrics = _train_and_eval(pattern, tmp_path, f"data.eval_root={shapes_root}")
    assert metrics["rsum"] > 0
    # the folder itself, or a glob, is the same shard set; without evaluation data the launcher
    # stops before any rank starts, in one line that says what to add
    from dbl_scale.data import split_shards

    folder, glob = tmp_path / "web", str(tmp_path / "web" / "*.tar")
    assert split_shards(folder, "train") == split_shards(glob, "train") == split_shards(pattern, "train")
    assert split_shards(folder, "train")[1] == 32
    proc = _cli("train", "--nproc", "2", "--config", TINY, f"data.root={folder}", f"data.tokenizer={tmp_path / 'tok'}",
                check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "add data.eval_root=FOLDER" in proc.stderr
    (tmp_path / "runs").rename(tmp_path / "runs_pattern")
    assert _train_and_eval(folder, tmp_path, f"data.eval_root={shapes_root}")["rsum"] > 0

    out = tmp_path / "shards"
    _cli("data", "convert", "wds", "--shards", pattern, "--out", str(out), "--shard-size", "4", "--test-frac", "0.25")
    index = json.loads((out / "dbl_index.json").read_text())
    assert index["train"]["samples"] + index["test"]["samples"] == 32 and not index["problems"]
    assert verify(str(out)).errors == []
    (tmp_path / "runs").rename(tmp_path / "runs_web")
    assert _train_and_eval(out, tmp_path)["rsum"] > 0


def test_wds_groups_samples_of_one_image(tmp_path):
    """Rows of the same image (same json image_id) become one sample with all their captions."""
    tar = tmp_path / "in.tar"
    _image(tmp_path / "a.jpg", 1)
    with tarfile.open(tar, "w") as tf:
        for k in range(6):
            for ext, data in (("jpg", (tmp_path / "a.jpg").read_bytes()),
                              ("json", json.dumps({"image_id": f"img{k // 3}", "caption": f"caption {k}"}).encode())):
                info = tarfile.TarInfo(f"row{k}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    splits = convert.wds(str(tar))
    assert [sorted(it.captions) for it in splits["train"]] == [["caption 0", "caption 1", "caption 2"],
                                                               ["caption 3", "caption 4", "caption 5"]]


@pytest.mark.launch
def test_bad_input_is_named_counted_and_strict_fails(tmp_path):
    src = _karpathy(tmp_path / "coco", n_train=8, n_val=0, n_test=0, n_restval=0)
    images = tmp_path / "coco" / "images" / "train2014"
    (images / "COCO_train2014_000000000002.jpg").unlink()  # a missing image
    (images / "COCO_train2014_000000000003.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # unreadable
    data = json.loads(src.read_text())
    data["images"][4]["sentences"][1]["raw"] = "   "  # an empty caption
    src.write_text(json.dumps(data))
    args = ["data", "convert", "karpathy", "--json", str(src), "--images", str(tmp_path / "coco" / "images"),
            "--shard-size", "4"]
    proc = _cli(*args, "--out", str(tmp_path / "a"))
    index = json.loads((tmp_path / "a" / "dbl_index.json").read_text())
    assert index["train"]["samples"] == 6 and index["train"]["skipped"] == 2
    assert "3 problem(s)" in proc.stdout
    assert "COCO_train2014_000000000002.jpg (id 1002): missing image" in proc.stdout
    assert "COCO_train2014_000000000003.jpg (id 1003): unreadable image" in proc.stdout
    assert "COCO_train2014_000000000004.jpg (id 1004): 1 empty caption(s) dropped" in proc.stdout

    strict = _cli(*args, "--out", str(tmp_path / "b"), "--strict", check=False)
    assert strict.returncode == 2 and "3 problem(s) in the input (--strict)" in strict.stderr
    assert not (tmp_path / "b" / "dbl_index.json").exists()

    data["images"][5]["cocoid"] = 1001  # a duplicate id
    src.write_text(json.dumps(data))
    with pytest.raises(convert.ConvertError, match=r"duplicate image id 1001: COCO_train2014_000000000001.jpg "
                                                   r"\(id 1001\) and COCO_train2014_000000000005.jpg \(id 1001\)"):
        convert.write_shards(convert.karpathy(str(src), str(tmp_path / "coco" / "images")),
                             convert.Options(out=str(tmp_path / "c"), progress=False))

    (tmp_path / "a" / "train-00001.tar").write_bytes(b"garbage")  # verify names the broken shard
    v = _cli("data", "verify", str(tmp_path / "a"), check=False)
    assert v.returncode == 1 and "train-00001.tar: unreadable tar" in v.stdout


@pytest.mark.launch
def test_an_interrupted_conversion_resumes(tmp_path):
    """The conversion is killed for real while a worker is stuck on an image (a FIFO nobody
    writes); the re-run keeps the finished shards and writes the rest, with the same result as
    an uninterrupted conversion."""
    src = _karpathy(tmp_path / "coco", n_train=24, n_val=0, n_test=0, n_restval=0)
    images = tmp_path / "coco" / "images" / "train2014"
    stuck = images / "COCO_train2014_000000000013.jpg"  # in the 4th shard of 6
    stuck.unlink()
    os.mkfifo(stuck)
    args = ["data", "convert", "karpathy", "--json", str(src), "--images", str(tmp_path / "coco" / "images"),
            "--shard-size", "4", "--processes", "1"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dbl_scale.cli.main", *args, "--out", str(out)], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while len(list((out / "_convert").glob("*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    finished = sorted(p.name for p in out.glob("train-*.tar"))
    assert finished == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    assert not (out / "dbl_index.json").exists()
    before = {n: (out / n).stat().st_mtime_ns for n in finished}

    stuck.unlink()
    _image(stuck, 13)
    again = _cli(*args, "--out", str(out))
    assert "resuming: 3 shard(s) already written, 3 to go" in again.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == before  # kept, not rewritten
    convert.write_shards(convert.karpathy(str(src), str(tmp_path / "coco" / "images")),
                         convert.Options(out=str(tmp_path / "whole"), shard_size=4, processes=1, progress=False))
    for n in ["train-%05d.tar" % i for i in range(6)]:
        assert (out / n).read_bytes() == (tmp_path / "whole" / n).read_bytes()
    assert verify(str(out)).errors == []


@pytest.mark.launch
def test_precomp_region_features_convert_and_train_a_precomp_tower(tmp_path, tok):
    """SCAN's layout: {split}_ims.npy (R x D per image; the test file with 5 identical rows per
    image, as some are) and {split}_caps.txt (5 lines per image)."""
    import numpy as np

    src = tmp_path / "f30k_precomp"
    src.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"train": 32, "dev": 8, "test": 8}
    for split, n in sizes.items():
        feats = rng.standard_normal((n, 6, 16)).astype(np.float32)
        if split == "test":
            feats = np.repeat(feats, 5, axis=0)
        np.save(src / f"{split}_ims.npy", feats)
        (src / f"{split}_caps.txt").write_text("".join(f"{_caption(i, j)}\n" for i in range(n) for j in range(5)))
    out = tmp_path / "shards"
    _cli("data", "convert", "precomp", "--dir", str(src), "--out", str(out), "--shard-size", "8")
    index = json.loads((out / "dbl_index.json").read_text())
    assert {s: index[s]["samples"] for s in ("train", "val", "test")} == {"train": 32, "val": 8, "test": 8}
    test = [s for shard in index["test"]["shards"] for s in samples(str(out / shard))]
    first = np.load(io.BytesIO(test[1].image))
    assert first.shape == (6, 16) and np.array_equal(first, np.load(src / "test_ims.npy")[5])  # row 5 = image 1
    assert test[1].meta["captions"] == [_caption(1, j) for j in range(5)]
    assert verify(str(out)).errors == []
    assert preview(str(out), str(tmp_path / "p.html"), "test", n=2) == 2
    (tmp_path / "tok").symlink_to(tok)
    metrics = _train_and_eval(out, tmp_path, "model.vision.kind=precomp", "model.vision.feature_dim=16",
                              "model.vision.pooling=gpo")
    assert metrics["rsum"] > 0
    with pytest.raises(ConfigError, match="'model.vision.pooling': got 'gpo' for a clip_vision tower"):
        load_config(TINY, ["model.vision.pooling=gpo"])
