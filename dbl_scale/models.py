"""Dual encoder: a Hugging Face vision tower and text tower, pooled, projected, L2-normalised.

One `DualEncoder` is one branch (anchor or target): both towers live in one `nn.Module`,
so each branch is one DeepSpeed engine. Towers come from `AutoModel.from_config` (sizes in
the config) or `AutoModel.from_pretrained` on a local folder; nothing is downloaded.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, TextConfig, VisionConfig


def build_vision_backbone(cfg: VisionConfig) -> tuple[nn.Module, int]:
    from transformers import AutoModel, CLIPVisionConfig, ViTConfig  # heavy (seconds): when a model is built

    if cfg.pretrained:
        model = AutoModel.from_pretrained(cfg.pretrained)
        model = getattr(model, "vision_model", model)  # a full CLIP checkpoint: keep its vision half
        return model, model.config.hidden_size
    common = dict(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  intermediate_size=cfg.hidden * cfg.mlp_ratio, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, num_channels=3)
    if cfg.kind == "clip_vision":
        return AutoModel.from_config(CLIPVisionConfig(**common, attention_dropout=0.0)), cfg.hidden
    return AutoModel.from_config(ViTConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                                 add_pooling_layer=False), cfg.hidden


def build_text_backbone(cfg: TextConfig, tokenizer) -> tuple[nn.Module, int]:
    from transformers import AutoModel, BertConfig, CLIPTextConfig, RobertaConfig  # heavy (seconds): as above

    if cfg.pretrained:
        model = AutoModel.from_pretrained(cfg.pretrained)
        model = getattr(model, "text_model", model)
        return model, model.config.hidden_size
    pad_token_id = tokenizer.pad_token_id
    common = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, intermediate_size=cfg.hidden * cfg.mlp_ratio,
                  pad_token_id=pad_token_id)
    if cfg.kind == "clip_text":
        config = CLIPTextConfig(**common, max_position_embeddings=cfg.max_length, attention_dropout=0.0,
                                bos_token_id=tokenizer.cls_token_id or tokenizer.bos_token_id,
                                eos_token_id=tokenizer.sep_token_id or tokenizer.eos_token_id)
        return AutoModel.from_config(config), cfg.hidden
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if cfg.kind == "roberta":  # RoBERTa's positions start after the padding index
        config = RobertaConfig(**common, **no_dropout, max_position_embeddings=cfg.max_length + pad_token_id + 1)
    else:
        config = BertConfig(**common, **no_dropout, max_position_embeddings=cfg.max_length)
    return AutoModel.from_config(config, add_pooling_layer=False), cfg.hidden


class Embeddings(NamedTuple):
    img: torch.Tensor  # (B, d), L2-normalised
    txt: torch.Tensor  # (B, d), L2-normalised
    logit_scale: Optional[torch.Tensor] = None  # (1,), 1/temperature, for contrastive losses
    heads: Optional[dict] = None  # outputs of a method's extra heads (structure, concepts)


class StructureHead(nn.Module):
    """Structure-aware distillation's learnables: the teacher-relation mix lambda, the relation
    temperature tau_2 (stored as its log, clamped to `tau_range` inside forward), the
    projections of the teacher's features into the joint space, and the representation
    terms' temperature (learnable, 1/T clamped at 100 as CLIP's)."""

    def __init__(self, embed_dim: int, teacher_dims: tuple[int, int], init_lambda: float, temperature: float,
                 tau_range: tuple[float, float], repr_temperature: float):
        super().__init__()
        self.lam = nn.Parameter(torch.tensor([init_lambda]))
        self.log_tau = nn.Parameter(torch.tensor([math.log(temperature)]))
        self.log_tau_range = (math.log(tau_range[0]), math.log(tau_range[1]))
        self.log_repr_scale = nn.Parameter(torch.tensor([math.log(1.0 / repr_temperature)]))
        self.proj_img = nn.Linear(teacher_dims[0], embed_dim)
        self.proj_txt = nn.Linear(teacher_dims[1], embed_dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, teacher: Optional["Embeddings"] = None) -> dict:
        out = {"lam": self.lam, "tau": self.log_tau.clamp(*self.log_tau_range).exp(),
               "repr_scale": self.log_repr_scale.clamp(max=math.log(100.0)).exp()}
        if teacher is not None:  # inside forward, so ZeRO-3 gathers the projections
            dtype = self.proj_img.weight.dtype
            out["teacher_img"] = F.normalize(self.proj_img(teacher.img.to(dtype)), dim=-1)
            out["teacher_txt"] = F.normalize(self.proj_txt(teacher.txt.to(dtype)), dim=-1)
        return out


class ConceptBank(nn.Module):
    """CODER's concept branch: C concept vectors queried by attention. Each embedding gets a
    concept-level descriptor (attention-weighted concepts) and logits over the concepts, which
    double as the prototypes of the online clustering."""

    def __init__(self, embed_dim: int, n_concepts: int, temperature: float, init: Optional[torch.Tensor] = None):
        super().__init__()
        bank = init.float() if init is not None else torch.randn(n_concepts, embed_dim) / math.sqrt(embed_dim)
        if bank.shape != (n_concepts, embed_dim):
            raise ValueError(f"concept file holds {tuple(bank.shape)}, expected ({n_concepts}, {embed_dim})")
        self.bank = nn.Parameter(bank)
        self.temperature = temperature

    def forward(self, img: torch.Tensor, txt: torch.Tensor, teacher=None) -> dict:
        bank = F.normalize(self.bank, dim=-1)
        out = {"prototypes": bank}
        for name, x in (("img", img), ("txt", txt)):
            logits = x @ bank.t() / self.temperature
            out[f"concept_logits_{name}"] = logits
            out[f"concept_{name}"] = F.normalize(torch.softmax(logits, dim=-1) @ bank, dim=-1)
        return out


class DualEncoder(nn.Module):
    """Both towers of one branch. `temperature` adds a learnable logit scale (InfoNCE): stored
    as log(1/T) with shape (1,) (DeepSpeed cannot shard 0-dim parameters) and clamped inside
    `forward`, so the fp32 master copy under ZeRO never sees an in-place edit."""

    def __init__(self, cfg: ModelConfig, tokenizer, temperature: Optional[float] = None,
                 max_logit_scale: float = 100.0, heads: Optional[dict[str, nn.Module]] = None):
        super().__init__()
        self.vision, v_width = build_vision_backbone(cfg.vision)
        self.text, t_width = build_text_backbone(cfg.text, tokenizer)
        self.vision_pooling, self.text_pooling = cfg.vision.pooling, cfg.text.pooling
        self.vision_proj = nn.Linear(v_width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(t_width, cfg.embed_dim, bias=False)
        self.log_logit_scale = None
        if temperature is not None:
            self.log_logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))
            self.max_log_logit_scale = math.log(max_logit_scale)
        self.heads = nn.ModuleDict(heads or {})

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixel_values)
        if self.vision_pooling == "mean":
            pooled = out.last_hidden_state.mean(dim=1)
        else:  # CLIP's pooler output is its layer-normed class token; ViT's class token is normed already
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None \
                else out.last_hidden_state[:, 0]
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.text_pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        else:
            pooled = hidden[:, 0]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def forward(self, pixel_values, input_ids, attention_mask, teacher: Optional[Embeddings] = None) -> Embeddings:
        """`teacher`: a frozen branch's embeddings of the same batch, for heads that read them."""
        scale = None
        if self.log_logit_scale is not None:
            scale = self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()
        img, txt = self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)
        heads = {}
        for head in self.heads.values():  # inside forward, so ZeRO-3 gathers their parameters
            heads.update(head(img, txt, teacher))
        return Embeddings(img, txt, scale, heads or None)


class FrozenEncoders(nn.Module):
    """Single-modal teacher encoders (structure-aware distillation) from local Hugging Face
    folders: pooled, L2-normalised per-modality features. The text encoder reads the raw
    captions with its own tokenizer; images are resized to the vision encoder's input size
    (normalised as the student's are)."""

    def __init__(self, vision_path: str, text_path: str, max_length: int = 64):
        from transformers import AutoModel, AutoTokenizer  # heavy (seconds): when a teacher is built

        super().__init__()
        vision = AutoModel.from_pretrained(vision_path)
        self.vision = getattr(vision, "vision_model", vision)
        text = AutoModel.from_pretrained(text_path)
        self.text = getattr(text, "text_model", text)
        self.tokenizer = AutoTokenizer.from_pretrained(text_path)
        self.image_size = getattr(self.vision.config, "image_size", None)
        self.max_length = max_length
        self.dims = (self.vision.config.hidden_size, self.text.config.hidden_size)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, captions=None) -> Embeddings:
        if captions is None:
            raise ValueError("FrozenEncoders needs the raw captions (its text encoder has its own tokenizer)")
        if self.image_size and pixel_values.shape[-1] != self.image_size:
            pixel_values = F.interpolate(pixel_values, size=self.image_size, mode="bilinear", align_corners=False)
        out = self.vision(pixel_values=pixel_values)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(pixel_values.device)
        hidden = self.text(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        txt = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return Embeddings(F.normalize(pooled.float(), dim=-1), F.normalize(txt.float(), dim=-1))
