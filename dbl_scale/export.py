"""Export: a finished run's target towers as Hugging Face folders (`dbl-scale export`).

    OUT/vision/       save_pretrained of the vision tower  (AutoModel.from_pretrained works), with
                      preprocessor_config.json: the run's image transform, for AutoImageProcessor
    OUT/text/         save_pretrained of the text tower, with the tokenizer
    OUT/heads.pt      the projections to the joint space and the pooling rules, to rebuild the
                      run's embeddings exactly (`load_exported`)

Weights come from the run's final DeepSpeed checkpoint, consolidated to fp32 from the ZeRO
shards (also after bf16 or ZeRO-3 training), or from its model.pt when it has no checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .branches import new_model
from .checkpoint import complete_checkpoints, safe_load, verify_safe
from .config import load_config
from .data import ensure_tokenizer, image_transform, preprocessor_config
from .methods import build_method
from .models import DualEncoder


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
        return get_fp32_state_dict_from_zero_checkpoint(str(found[-1]), tag=f"branch{target}")
    if branch is not None and (branch / "mp_rank_00_model_states.pt").exists():  # ZeRO-0: the module itself
        return {k: v.float() for k, v in safe_load(branch / "mp_rank_00_model_states.pt")["module"].items()}
    return {k: v.float() for k, v in safe_load(run_dir / "model.pt").items()}


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write OUT/vision, OUT/text (with the tokenizer) and OUT/heads.pt; returns OUT."""
    run_dir, out = Path(run_dir), Path(out)
    run_cfg = load_config(run_dir / "config.yaml")
    if run_cfg.model.vision.kind == "precomp":
        raise ValueError(f"{run_dir}: a precomp tower (region features) has no Hugging Face form to export; "
                         "its weights are in model.pt (load_model reads it)")
    tokenizer = ensure_tokenizer(run_cfg.data, run_cfg.model.text)
    model = new_model(run_cfg, tokenizer, 0)
    model.load_state_dict(fp32_target_state(run_dir))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.vision.save_pretrained(tmp / "vision")
    model.text.save_pretrained(tmp / "text")
    tokenizer.save_pretrained(tmp / "text")
    (tmp / "vision" / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(image_transform(run_cfg)), indent=2) + "\n")
    torch.save({"vision_proj": model.vision_proj.state_dict(), "text_proj": model.text_proj.state_dict(),
                "vision_pooling": model.vision_pooling, "text_pooling": model.text_pooling},
               tmp / "heads.pt")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


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
