"""Invariant 7, what the project writes opens in the users' tools as it is: an exported run in
transformers alone (a process that cannot import dbl_scale), its MLflow model registered and
loaded with mlflow.pyfunc, our shards in an open_clip-style WebDataset pipeline."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.launch, pytest.mark.timeout(600)]  # every test here starts a process

LONG = "a small red circle above a large blue square " * 8  # far longer than the run's max_length (24)


def _raw_inputs(shapes_root, n=4):
    """n images of the test split as their encoded bytes, and captions (one too long to fit)."""
    from dbl_scale.data import read_samples, sample_meta, split_shards

    samples = [s for _, s in zip(range(n), read_samples(split_shards(shapes_root, "test")[0]))]
    return [s["jpg"] for s in samples], [sample_meta(s)[1][0] for s in samples[:3]] + [LONG]


def _run_embeddings(run, images, captions):
    """The run's own embeddings: its model, its evaluation transform, its tokenizer rule."""
    from PIL import Image

    from dbl_scale.branches import load_model
    from dbl_scale.config import load_config
    from dbl_scale.preprocess import Tokenize, image_transform
    from dbl_scale.tokenizer import ensure_tokenizer

    cfg = load_config(run / "config.yaml")
    tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    model = load_model(run, tokenizer).eval()
    enc = Tokenize(tokenizer, cfg.model.text.max_length)(captions)
    with torch.no_grad():
        img = model.encode_image(torch.stack([image_transform(cfg)(Image.open(io.BytesIO(b))) for b in images]))
        txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    return img.numpy(), txt.numpy()


TRANSFORMERS_ALONE = r"""
import io, json, sys
sys.modules["dbl_scale"] = None  # this process cannot import dbl_scale (nor data_tools)
sys.modules["data_tools"] = None
import numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, inputs, out = sys.argv[1:4]
images = [open(p, "rb").read() for p in json.load(open(inputs))["images"]]
captions = json.load(open(inputs))["captions"]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
with torch.no_grad():
    img = model.get_image_features(**processor(images=[Image.open(io.BytesIO(b)) for b in images], return_tensors="pt"))
    txt = model.get_text_features(**processor(text=captions, padding=True, truncation=True, return_tensors="pt"))
np.savez(out, img=img.numpy(), txt=txt.numpy(), max_length=processor.tokenizer.model_max_length)
"""


def test_an_exported_run_loads_with_transformers_alone(finished_run, shapes_root, tmp_path):
    from dbl_scale.export import export

    out = export(finished_run, tmp_path / "exported")
    assert {"config.json", "model.safetensors", "modeling_dbl.py", "README.md", "vision", "text"} <= {
        p.name for p in out.iterdir()}
    images, captions = _raw_inputs(shapes_root)
    for i, b in enumerate(images):
        (tmp_path / f"{i}.jpg").write_bytes(b)
    (tmp_path / "inputs.json").write_text(json.dumps({"images": [str(tmp_path / f"{i}.jpg") for i in range(len(images))],
                                                      "captions": captions}))
    proc = subprocess.run([sys.executable, "-c", TRANSFORMERS_ALONE, str(out), str(tmp_path / "inputs.json"),
                           str(tmp_path / "hf.npz")], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "hf.npz")
    want_img, want_txt = _run_embeddings(finished_run, images, captions)
    assert int(got["max_length"]) == 24  # the run's, so truncation works (not 1e30)
    np.testing.assert_allclose(got["img"], want_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["txt"], want_txt, atol=1e-5, rtol=0)
    assert np.allclose(np.linalg.norm(got["img"], axis=1), 1, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "loss.method=triplet" in card


def test_a_run_s_mlflow_model_registers_loads_and_predicts(finished_run, shapes_root, tmp_path):
    """`dbl-scale export --register NAME` logs the run's model to its MLflow run and registers
    it; mlflow.pyfunc loads `models:/NAME/1` and embeds images and captions as the run does."""
    import mlflow
    import pandas as pd

    uri = json.loads((finished_run / "run.json").read_text())["tracking_uri"]
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli.main", "export", "--run-dir", str(finished_run),
                           "--out", str(tmp_path / "exported"), "--register", "tiny-retrieval"],
                          cwd=finished_run.parent.parent, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered as models:/tiny-retrieval" in proc.stdout
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tiny-retrieval/1")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image", "caption"] and model.metadata.get_output_schema().inputs[0].shape == (-1, 64)
    images, captions = _raw_inputs(shapes_root)
    frame = pd.DataFrame({"image": images + [None] * len(captions), "caption": [None] * len(images) + captions})
    got = model.predict(frame)
    want_img, want_txt = _run_embeddings(finished_run, images, captions)
    np.testing.assert_allclose(got, np.concatenate([want_img, want_txt]), atol=1e-5, rtol=0)


def _open_clip_style(urls):
    """open_clip's WebDataset pipeline, in its shape: image and text by extension, samples
    without either dropped, decoded to PIL and str."""
    import webdataset as wds

    def has_caption_and_image(sample):
        return "txt" in sample and any(k in sample for k in ("png", "jpg", "jpeg", "webp"))

    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).select(has_caption_and_image)
                .decode("pilrgb").rename(image="jpg;png;jpeg;webp", text="txt").to_tuple("image", "text"))


def test_our_shards_read_in_an_open_clip_pipeline(shapes_root, tmp_path):
    """Every sample of ShapesCaptions and of a converted folder comes through, its caption the
    first of the json's list."""
    from dbl_scale.data import read_samples, sample_meta, split_shards

    from test_convert import _cli, _karpathy  # noqa: E402 (the tests' own Karpathy-format fixture)

    src = _karpathy(tmp_path / "coco")
    _cli("data", "convert", "karpathy", "--json", str(src), "--images", str(tmp_path / "coco" / "images"),
         "--out", str(tmp_path / "converted"), "--shard-size", "4")
    for root in (shapes_root, tmp_path / "converted"):
        urls, samples = split_shards(root, "train")
        pairs = _open_clip_style(urls)
        assert len(pairs) == samples > 0
        firsts = [sample_meta(s)[1][0] for s in read_samples(urls)]
        assert [text for _, text in pairs] == firsts and pairs[0][0].mode == "RGB"
