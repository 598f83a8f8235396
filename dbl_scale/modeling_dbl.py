"""A dbl_scale dual encoder for transformers alone: `dbl-scale export` copies this file beside
the weights, and

    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder)
    img = model.get_image_features(**processor(images=images, return_tensors="pt"))
    txt = model.get_text_features(**processor(text=captions, padding=True, truncation=True, return_tensors="pt"))

gives the run's joint embeddings, L2-normalised (cosine similarity is `img @ txt.T`). It imports
only torch and transformers: the towers are transformers' own models, built from the configs
stored in config.json; pooling and projection are written out here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

MODEL_TYPE = "dbl_dual_encoder"


class DblDualEncoderConfig(PretrainedConfig):
    """The two towers' own configs (as dicts with their `model_type`), the keyword arguments
    their AutoModel takes (e.g. `add_pooling_layer`), how each tower's output is pooled
    ("cls", "mean" or "model": the tower's own pooled output), and the joint width."""

    model_type = MODEL_TYPE

    def __init__(self, vision_config: Optional[dict] = None, text_config: Optional[dict] = None,
                 vision_kwargs: Optional[dict] = None, text_kwargs: Optional[dict] = None,
                 vision_pooling: str = "cls", text_pooling: str = "mean", embed_dim: int = 256,
                 vision_width: int = 768, text_width: int = 768, **kwargs):
        super().__init__(**kwargs)
        self.vision_config, self.text_config = vision_config or {}, text_config or {}
        self.vision_kwargs, self.text_kwargs = vision_kwargs or {}, text_kwargs or {}
        self.vision_pooling, self.text_pooling = vision_pooling, text_pooling
        self.embed_dim, self.vision_width, self.text_width = embed_dim, vision_width, text_width


@dataclass
class DblDualEncoderOutput(ModelOutput):
    image_embeds: Optional[torch.FloatTensor] = None  # (images, embed_dim), L2-normalised
    text_embeds: Optional[torch.FloatTensor] = None  # (captions, embed_dim), L2-normalised
    logits_per_image: Optional[torch.FloatTensor] = None  # cosine similarities, images x captions


def _tower(config: dict, kwargs: dict) -> nn.Module:
    config = dict(config)
    return AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config), **kwargs)


class DblDualEncoderModel(PreTrainedModel):
    config_class = DblDualEncoderConfig
    base_model_prefix = "dbl"

    def __init__(self, config: DblDualEncoderConfig):
        super().__init__(config)
        self.vision_model = _tower(config.vision_config, config.vision_kwargs)
        self.text_model = _tower(config.text_config, config.text_kwargs)
        self.visual_projection = nn.Linear(config.vision_width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim, bias=False)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint; the towers init themselves
        pass

    def get_image_features(self, pixel_values: torch.Tensor, **unused) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values)
        pooling = self.config.vision_pooling
        if pooling == "model":
            pooled = out.pooler_output
        elif pooling == "mean":
            pooled = out.last_hidden_state.mean(dim=1)
        else:  # CLIP's pooled output is its layer-normed class token; ViT's class token is normed already
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return nn.functional.normalize(self.visual_projection(pooled), dim=-1)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          **unused) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooling = self.config.text_pooling
        if pooling == "model":
            pooled = out.pooler_output
        elif pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        else:
            pooled = out.last_hidden_state[:, 0]
        return nn.functional.normalize(self.text_projection(pooled), dim=-1)

    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **unused) -> DblDualEncoderOutput:
        img = self.get_image_features(pixel_values) if pixel_values is not None else None
        txt = self.get_text_features(input_ids, attention_mask) if input_ids is not None else None
        logits = img @ txt.t() if img is not None and txt is not None else None
        return DblDualEncoderOutput(image_embeds=img, text_embeds=txt, logits_per_image=logits)
