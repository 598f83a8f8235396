"""Export: a finished run's target as folders other tools open as they are (`dbl-scale export`).

OUT/ is the joint model for transformers alone (`AutoModel` / `AutoProcessor.from_pretrained(OUT,
trust_remote_code=True)`; `get_image_features` / `get_text_features` give the run's joint
embeddings), with a model card; OUT/vision/ and OUT/text/ hold each tower alone (with its image
processor or tokenizer), OUT/heads.pt the projections. Weights are consolidated to fp32 from
the run's final DeepSpeed checkpoint (any ZeRO stage, bf16 too), or read from its model.pt.
`log_model` logs an exported folder to MLflow as a `pyfunc` (images and/or captions in, joint
embeddings out), optionally registered under a name."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import modeling_dbl
from .branches import new_model
from .checkpoint import complete_checkpoints, safe_load, verify_safe
from .config import Config, load_config
from .preprocess import Tokenize, image_transform, preprocessor_config
from .tokenizer import ensure_tokenizer
from .methods import build_method
from .models import DualEncoder

log = logging.getLogger("dbl_scale.export")
PYFUNC = Path(__file__).with_name("mlflow_pyfunc.py")  # MLflow's "model from code": logged as it is


def fp32_target_state(run_dir: Path) -> dict:
    """The target's fp32 weights: from the newest checkpoint's ZeRO shards when there is one."""
    run_cfg = load_config(run_dir / "config.yaml")
    found = complete_checkpoints(run_dir / "checkpoints")
    target = len(build_method(run_cfg).roles) - 1
    branch = found[-1] / f"branch{target}" if found else None
    if branch is not None and list(branch.glob("*optim_states.pt")):  # ZeRO 1-3: fp32 master partitions
        # heavy (seconds): only runs with a DeepSpeed checkpoint need it
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_safe(branch)  # DeepSpeed's reader would unpickle anything
        printed = io.StringIO()  # the reader prints its progress: a debug note here, not the user's output
        with contextlib.redirect_stdout(printed):
            state = get_fp32_state_dict_from_zero_checkpoint(str(found[-1]), tag=f"branch{target}")
        log.debug("zero_to_fp32: %s", printed.getvalue().strip())
        return state
    if branch is not None and (branch / "mp_rank_00_model_states.pt").exists():  # ZeRO-0: the module itself
        return {k: v.float() for k, v in safe_load(branch / "mp_rank_00_model_states.pt")["module"].items()}
    return {k: v.float() for k, v in safe_load(run_dir / "model.pt").items()}


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write the joint model, the single towers, heads.pt and the model card into OUT (through a
    temporary folder renamed when complete); returns OUT."""
    run_dir, out = Path(run_dir), Path(out)
    run_cfg = load_config(run_dir / "config.yaml")
    if run_cfg.model.vision.kind == "precomp":
        raise ValueError(f"{run_dir}: a precomp tower (region features) has no Hugging Face form to export; "
                         "its weights are in model.pt (load_model reads it)")
    tokenizer = ensure_tokenizer(run_cfg.data, run_cfg.model.text)
    tokenizer.model_max_length = run_cfg.model.text.max_length  # the run truncates there; longer would not fit
    model = new_model(run_cfg, tokenizer, 0)
    model.load_state_dict(fp32_target_state(run_dir))
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    joint = joint_model(model)
    joint.save_pretrained(tmp)
    processor = _processor(run_cfg, tokenizer)
    processor.save_pretrained(tmp)
    model.vision.save_pretrained(tmp / "vision")
    model.text.save_pretrained(tmp / "text")
    tokenizer.save_pretrained(tmp / "text")
    (tmp / "vision" / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(image_transform(run_cfg)), indent=2) + "\n")
    torch.save({"vision_proj": model.vision_proj.state_dict(), "text_proj": model.text_proj.state_dict(),
                "vision_pooling": model.vision_pooling, "text_pooling": model.text_pooling},
               tmp / "heads.pt")
    _check_joint(model, joint, processor, run_cfg, tokenizer)
    (tmp / "README.md").write_text(model_card(run_dir, run_cfg, joint))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def joint_model(model: DualEncoder):
    """The run's towers, pooling and projections as one `modeling_dbl.DblDualEncoderModel`."""
    specs = {name: _tower_spec(getattr(model, name)) for name in ("vision", "text")}
    config = modeling_dbl.DblDualEncoderConfig(
        vision_config=specs["vision"][0], text_config=specs["text"][0], vision_kwargs=specs["vision"][1],
        text_kwargs=specs["text"][1], vision_pooling=model.vision_pooling, text_pooling=model.text_pooling,
        embed_dim=model.vision_proj.out_features, vision_width=model.vision_proj.in_features,
        text_width=model.text_proj.in_features, architectures=["DblDualEncoderModel"])
    modeling_dbl.DblDualEncoderConfig.register_for_auto_class()
    modeling_dbl.DblDualEncoderModel.register_for_auto_class("AutoModel")  # save_pretrained copies the file
    joint = modeling_dbl.DblDualEncoderModel(config)
    state = {f"{name}_model.{specs[name][2]}{k}": v for name in ("vision", "text")
             for k, v in getattr(model, name).state_dict().items()}
    state.update({"visual_projection.weight": model.vision_proj.weight, "text_projection.weight": model.text_proj.weight})
    joint.load_state_dict(state, strict=True)
    return joint.eval()


def _tower_spec(tower: torch.nn.Module) -> tuple[dict, dict, str]:
    """(its config as a dict, the AutoModel keyword arguments that rebuild it, where it sits
    inside what AutoModel builds: "" or e.g. "vision_model." for CLIP's inner transformer)."""
    from transformers import AutoModel  # heavy (seconds): when a model is exported

    kwargs = {"add_pooling_layer": False} if getattr(tower, "pooler", "absent") is None else {}
    built = AutoModel.from_config(tower.config, **kwargs)
    inner = next(name for name, m in built.named_modules() if type(m) is type(tower))
    return tower.config.to_dict(), kwargs, f"{inner}." if inner else ""


def _processor(cfg: Config, tokenizer):
    import transformers  # heavy, as above
    from transformers.utils import is_torchvision_available

    settings = {k: v for k, v in preprocessor_config(image_transform(cfg)).items() if k != "image_processor_type"}
    # in transformers 5 CLIPImageProcessor is the torchvision backend; without torchvision (it
    # does not import beside the CPU torch) its PIL twin runs instead: named so, loading it warns of nothing
    name = "CLIPImageProcessor" if is_torchvision_available() else "CLIPImageProcessorPil"
    image_processor = getattr(transformers, name, transformers.CLIPImageProcessor)(**settings)
    return transformers.VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _check_joint(model: DualEncoder, joint, processor, cfg: Config, tokenizer) -> None:
    """The exported model gives the run's embeddings: two images and two captions (one longer
    than max_length) through both, before anything is written to OUT."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((61, 40), (32, 77))]
    captions = ["a test caption", " ".join(["word"] * (3 * cfg.model.text.max_length))]
    transform, enc = image_transform(cfg), Tokenize(tokenizer, cfg.model.text.max_length)(captions)
    with torch.no_grad():
        want = (model.encode_image(torch.stack([transform(im) for im in images])),
                model.encode_text(enc["input_ids"], enc["attention_mask"]))
        inputs = processor(text=captions, images=images, padding=True, truncation=True, return_tensors="pt")
        got = joint.get_image_features(inputs["pixel_values"]), joint.get_text_features(inputs["input_ids"],
                                                                                        inputs["attention_mask"])
    err = max((g - w).abs().max().item() for g, w in zip(got, want))
    if err > 1e-5:
        raise RuntimeError(f"the exported model's embeddings differ from the run's by {err:.2e}: not exported")


def model_card(run_dir: Path, cfg: Config, joint) -> str:
    """README.md of an exported folder: what was trained on what, its metrics, how to load it."""
    metrics = {}
    for name in ("metrics.json", "best_metrics.json"):
        if (run_dir / name).exists():
            metrics[name] = json.loads((run_dir / name).read_text())
    rows = "\n".join(f"| {which} | {m.get('rsum', float('nan')):.1f} | {m.get('i2t_r1', float('nan')):.1f} | "
                     f"{m.get('t2i_r1', float('nan')):.1f} |" for which, m in
                     (("final model" if n == "metrics.json" else "best on validation", m) for n, m in metrics.items()))
    c = joint.config
    return f"""---
library_name: transformers
tags: [image-text-retrieval, dual-encoder, dbl_scale]
---
# {run_dir.name}

A dual encoder for image-text retrieval trained with dbl_scale: `loss.method={cfg.loss.method}`
on `{cfg.data.root}` ({cfg.train.steps} steps, batch {cfg.data.batch_size} per rank).
Towers: {c.vision_config.get('model_type')} ({cfg.model.vision.image_size} px, pooling `{c.vision_pooling}`) and
{c.text_config.get('model_type')} (pooling `{c.text_pooling}`, at most {cfg.model.text.max_length} tokens), projected to
{c.embed_dim} dimensions and L2-normalised.

| model | rSum | image to text R@1 | text to image R@1 |
|---|---|---|---|
{rows or '| (not evaluated) | | | |'}

(on the `{cfg.data.eval_split}` split of `{cfg.data.eval_root or cfg.data.root}`, the standard protocol.)

## Use

```python
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
image_embeds = model.get_image_features(**processor(images=images, return_tensors="pt"))
text_embeds = model.get_text_features(**processor(text=captions, padding=True, truncation=True,
                                                  return_tensors="pt"))
similarity = image_embeds @ text_embeds.T  # cosine: both are L2-normalised
```

The processor resizes the shorter side to {cfg.model.vision.image_size} px, crops the centre, and normalises
as the run did; the tokenizer truncates at {cfg.model.text.max_length} tokens. `modeling_dbl.py` imports only torch
and transformers. `vision/` and `text/` hold each tower alone (`AutoModel.from_pretrained`), with
`heads.pt` holding the projections; pool their `last_hidden_state` as above (a tower built
without a pooler gets an untrained one from AutoModel: its `pooler_output` means nothing).
"""


# ----------------------------------------------------------------------------- MLflow

def log_model(folder: str | Path, tracking_uri: str, run_id: str, register: Optional[str] = None) -> str:
    """Log an exported folder to an MLflow run as a `pyfunc` model (its `predict` takes a
    DataFrame with an "image" column of encoded images and/or a "caption" column and returns
    each row's joint embedding), with a signature and an input example; register it under
    `register` when given. Returns the logged model's URI."""
    import mlflow  # heavy (seconds): only when a model is logged
    import pandas as pd
    import transformers
    from PIL import Image

    folder = Path(folder)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, format="PNG")
    # rows may hold an image, a caption or both (the image is embedded then); the example holds both
    example = pd.DataFrame({"image": [buf.getvalue()], "caption": ["a red circle"]})
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    dim = json.loads((folder / "config.json").read_text())["embed_dim"]
    signature = ModelSignature(inputs=Schema([ColSpec("binary", "image", required=False),
                                              ColSpec("string", "caption", required=False)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC), artifacts={"model": str(folder)}, signature=signature,
            input_example=example,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", f"transformers>={transformers.__version__}",
                              "pillow", "numpy", "pandas"],
            registered_model_name=register)
    return info.model_uri


def load_exported(folder: str | Path):
    """A DualEncoder rebuilt from an exported folder (towers via AutoModel.from_pretrained)."""
    from transformers import AutoModel, AutoTokenizer  # heavy (seconds): imported when used

    folder = Path(folder)
    heads = torch.load(folder / "heads.pt", map_location="cpu", weights_only=True)
    model = DualEncoder.__new__(DualEncoder)
    torch.nn.Module.__init__(model)
    model.vision = AutoModel.from_pretrained(folder / "vision")
    model.text = AutoModel.from_pretrained(folder / "text")
    model.vision_pooling, model.text_pooling = heads["vision_pooling"], heads["text_pooling"]
    for name in ("vision_proj", "text_proj"):
        w = heads[name]["weight"]
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.load_state_dict(heads[name])
        setattr(model, name, layer)
    model.log_logit_scale, model.heads = None, torch.nn.ModuleDict()
    return model.eval(), AutoTokenizer.from_pretrained(folder / "text")
