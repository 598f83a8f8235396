"""Weights loaded into a model built partitioned under ZeRO-3 are the weights of the file:
(1) `load_model` of a finished run (checkpoint.load_weights, one parameter gathered at a time) and
(2) towers from local `from_pretrained` folders (transformers loads into the shards).
Gathers every parameter back and writes the largest difference to OUT.rankN as JSON, then
ends as every rank does (`distributed.exit_process`: ZeRO-3 keeps the process group alive past
`shutdown`, and a teardown with its threads running can abort the rank after its report).

    torchrun --nproc_per_node 2 zero3_load.py TOKENIZER RUN_DIR VISION_DIR TEXT_DIR OUT
"""
from __future__ import annotations

import json
import sys

import deepspeed
import torch
from transformers import AutoModel, AutoTokenizer

from dbl_scale import distributed
from dbl_scale.config import load_config
from dbl_scale.branches import load_model, new_model
from dbl_scale.optim import deepspeed_config


def max_diff(model: torch.nn.Module, reference: dict[str, torch.Tensor], prefix: str = "") -> tuple[float, int]:
    worst, compared = 0.0, 0
    for name, p in model.named_parameters():
        assert hasattr(p, "ds_tensor") and p.numel() == 0, f"{name} is not partitioned"
        with deepspeed.zero.GatheredParameters([p]):
            want = reference[name[len(prefix):]] if name.startswith(prefix) else None
            if want is not None:
                worst = max(worst, (p.detach().float() - want.float()).abs().max().item())
                compared += 1
    return worst, compared


def measure(tokenizer_dir: str, run_dir: str, vision_dir: str, text_dir: str) -> dict:
    """The largest difference of each loaded part to its weights on disk. The partitioned
    models (each parameter holds the process group) are gone when this returns."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = load_config(None, ["train.deepspeed=ds_configs/zero3.json", "model.embed_dim=32",
                             "model.vision.image_size=32",
                             f"model.vision.pretrained={vision_dir}", f"model.text.pretrained={text_dir}"])
    ds = deepspeed_config(cfg, distributed.world_size())

    run_model = load_model(run_dir, tokenizer, ds)
    saved = torch.load(f"{run_dir}/model.pt", map_location="cpu", weights_only=True)
    run_diff, run_n = max_diff(run_model, saved)

    model = new_model(cfg, tokenizer, 0, ds=ds)
    vision = dict(AutoModel.from_pretrained(vision_dir).named_parameters())
    text = dict(AutoModel.from_pretrained(text_dir).named_parameters())
    v_diff, v_n = max_diff(model, vision, "vision.")
    t_diff, t_n = max_diff(model, text, "text.")
    return {"run": [run_diff, run_n, len(saved)], "vision": [v_diff, v_n, len(vision)],
            "text": [t_diff, t_n, len(text)]}


def main() -> int:
    tokenizer_dir, run_dir, vision_dir, text_dir, out = sys.argv[1:6]
    distributed.init_distributed()
    rank = distributed.rank()
    report = measure(tokenizer_dir, run_dir, vision_dir, text_dir)
    distributed.shutdown()
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
