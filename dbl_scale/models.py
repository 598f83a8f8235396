"""Dual encoder: a Hugging Face vision tower and text tower, pooled, projected, L2-normalised.

One `DualEncoder` is one branch (anchor or target): both towers live in one `nn.Module`,
so each branch is one DeepSpeed engine. Towers come from `AutoModel.from_config` (sizes in
the config) or `AutoModel.from_pretrained` on a local folder or a cached hub id; nothing is
downloaded. With `pooling: model` a tower keeps its checkpoint's own pooling (CLIP: the class
token for images, the EOS token for text) and its projection starts as the checkpoint's
(CLIP's visual / text projection), so an untrained run embeds exactly as the checkpoint does.
"""
from __future__ import annotations

import functools
import math
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, TextConfig, VisionConfig
from .hub import local_folder


class GPO(nn.Module):
    """VSE-infinity's generalized pooling operator: per dimension, the regions' values sorted in
    descending order and summed with weights that a small bidirectional GRU derives from the
    positions alone (softmax at temperature 0.1), so it learns anything from max to mean pooling."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def positions(self, n: int, device, dtype) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, self.d_pe, 2, device=device, dtype=torch.float32)
                         * (-math.log(10000.0) / self.d_pe))
        pe = torch.zeros(n, self.d_pe, device=device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return pe.to(dtype)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        b, n, _ = regions.shape
        out, _ = self.gru(self.positions(n, regions.device, regions.dtype).expand(b, n, self.d_pe))
        half = out.shape[-1] // 2
        weights = torch.softmax(self.score((out[..., :half] + out[..., half:]) / 2) / 0.1, dim=1)  # b x n x 1
        return (regions.sort(dim=1, descending=True).values * weights).sum(dim=1)


class PrecompTower(nn.Module):
    """A vision tower over pre-extracted region features (the SCAN / VSE-infinity `*_precomp`
    data: R regions x D): each region mapped to `hidden` (a linear layer plus a residual
    two-layer MLP, as VSE-infinity's precomp encoder, without its batch norm), then pooled over
    the regions (gpo, max or mean). Returns what a Hugging Face vision tower returns."""

    def __init__(self, feature_dim: int, hidden: int, pooling: str):
        super().__init__()
        self.fc = nn.Linear(feature_dim, hidden)
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, hidden))
        self.pooling = pooling
        self.gpo = GPO() if pooling == "gpo" else None

    def forward(self, pixel_values: torch.Tensor):
        from transformers.modeling_outputs import BaseModelOutputWithPooling  # light once transformers is in

        regions = self.fc(pixel_values) + self.mlp(pixel_values)
        if self.gpo is not None:
            pooled = self.gpo(regions)
        elif self.pooling == "max":
            pooled = regions.max(dim=1).values
        else:
            pooled = regions.mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=regions, pooler_output=pooled)


class Backbone(NamedTuple):
    tower: nn.Module
    width: int
    projection: Optional[nn.Module] = None  # the checkpoint's own projection (CLIP), when it has one


def build_vision_backbone(cfg: VisionConfig) -> Backbone:
    from transformers import AutoModel, CLIPVisionConfig, ViTConfig  # heavy (seconds): when a model is built

    if cfg.kind == "precomp":
        return Backbone(PrecompTower(cfg.feature_dim, cfg.hidden, cfg.pooling), cfg.hidden)
    if cfg.pretrained:
        full = AutoModel.from_pretrained(local_folder(cfg.pretrained, "model.vision.pretrained"))
        model = getattr(full, "vision_model", full)  # a full CLIP checkpoint: keep its vision half
        size = getattr(model.config, "image_size", None)
        if size and size != cfg.image_size:
            raise ValueError(f"config key 'model.vision.image_size': {cfg.image_size}, but {cfg.pretrained} "
                             f"takes {size} px images; set model.vision.image_size={size}")
        return Backbone(model, model.config.hidden_size, getattr(full, "visual_projection", None))
    common = dict(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  intermediate_size=cfg.hidden * cfg.mlp_ratio, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, num_channels=3)
    if cfg.kind == "clip_vision":
        return Backbone(AutoModel.from_config(CLIPVisionConfig(**common, attention_dropout=0.0)), cfg.hidden)
    return Backbone(AutoModel.from_config(ViTConfig(**common, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0), add_pooling_layer=False),
                    cfg.hidden)


def build_text_backbone(cfg: TextConfig, tokenizer) -> Backbone:
    from transformers import AutoModel, BertConfig, CLIPTextConfig, RobertaConfig  # heavy (seconds): as above

    if cfg.pretrained:
        full = AutoModel.from_pretrained(local_folder(cfg.pretrained, "model.text.pretrained"))
        model = getattr(full, "text_model", full)
        return Backbone(model, model.config.hidden_size, getattr(full, "text_projection", None))
    pad_token_id = tokenizer.pad_token_id
    common = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                  num_attention_heads=cfg.heads, intermediate_size=cfg.hidden * cfg.mlp_ratio,
                  pad_token_id=pad_token_id)
    if cfg.kind == "clip_text":
        config = CLIPTextConfig(**common, max_position_embeddings=cfg.max_length, attention_dropout=0.0,
                                bos_token_id=tokenizer.cls_token_id or tokenizer.bos_token_id,
                                eos_token_id=tokenizer.sep_token_id or tokenizer.eos_token_id)
        return Backbone(AutoModel.from_config(config), cfg.hidden)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if cfg.kind == "roberta":  # RoBERTa's positions start after the padding index
        config = RobertaConfig(**common, **no_dropout, max_position_embeddings=cfg.max_length + pad_token_id + 1)
    else:
        config = BertConfig(**common, **no_dropout, max_position_embeddings=cfg.max_length)
    return Backbone(AutoModel.from_config(config, add_pooling_layer=False), cfg.hidden)


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


def _projection(backbone: Backbone, embed_dim: int, pooling: str, key: str) -> nn.Linear:
    """The projection to the joint space; with `pooling: model` it starts as the checkpoint's own."""
    proj = nn.Linear(backbone.width, embed_dim, bias=False)
    if pooling == "model" and backbone.projection is not None:
        theirs = backbone.projection.weight
        if theirs.shape != proj.weight.shape:
            raise ValueError(f"config key 'model.embed_dim': {embed_dim}, but {key}'s checkpoint projects to "
                             f"{theirs.shape[0]}; set model.embed_dim={theirs.shape[0]} to keep its projection")
        with torch.no_grad():
            proj.weight.copy_(theirs)
    return proj


class DualEncoder(nn.Module):
    """Both towers of one branch. `temperature` adds a learnable logit scale (InfoNCE): stored
    as log(1/T) with shape (1,) (DeepSpeed cannot shard 0-dim parameters) and clamped inside
    `forward`, so the fp32 master copy under ZeRO never sees an in-place edit."""

    def __init__(self, cfg: ModelConfig, tokenizer, temperature: Optional[float] = None,
                 max_logit_scale: float = 100.0, heads: Optional[dict[str, nn.Module]] = None):
        super().__init__()
        vision, text = build_vision_backbone(cfg.vision), build_text_backbone(cfg.text, tokenizer)
        self.vision, self.text = vision.tower, text.tower
        self.vision_pooling, self.text_pooling = cfg.vision.pooling, cfg.text.pooling
        self.vision_proj = _projection(vision, cfg.embed_dim, cfg.vision.pooling, "model.vision")
        self.text_proj = _projection(text, cfg.embed_dim, cfg.text.pooling, "model.text")
        self.log_logit_scale = None
        if temperature is not None:
            self.log_logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))
            self.max_log_logit_scale = math.log(max_logit_scale)
        self.heads = nn.ModuleDict(heads or {})

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixel_values)
        if self.vision_pooling == "model":
            pooled = out.pooler_output
        elif self.vision_pooling == "mean":
            pooled = out.last_hidden_state.mean(dim=1)
        else:  # CLIP's pooler output is its layer-normed class token; ViT's class token is normed already
            pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None \
                else out.last_hidden_state[:, 0]
        return F.normalize(self.vision_proj(pooled), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        if self.text_pooling == "model":  # CLIP: the EOS token's state; BERT: its pooler
            pooled = out.pooler_output
            if pooled is None:
                raise ValueError("model.text.pooling=model: this text tower has no pooled output; use cls or mean")
        elif self.text_pooling == "mean":
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
        vision_path, text_path = local_folder(vision_path), local_folder(text_path)
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


def transformer_blocks(tower: nn.Module) -> list[nn.Module]:
    """A tower's repeated blocks: the first module list whose members share one class (BERT's,
    RoBERTa's and ViT's `encoder.layer`, CLIP's `encoder.layers`); empty when it has none."""
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            return list(module)
    return []


def compile_blocker(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run on `device` here, or None when it can: TorchDynamo disabled
    (TORCHDYNAMO_DISABLE=1), no C++ compiler for inductor's CPU kernels, no Triton for its GPU
    kernels. Where it says why, the towers stay eager."""
    import torch._dynamo  # heavy (seconds): only for runs that ask for compile

    if torch._dynamo.config.disable:
        return "TorchDynamo is disabled (TORCHDYNAMO_DISABLE=1)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton does not import (inductor writes its GPU kernels with it)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - inductor's search raises its own types
        return f"no C++ compiler for inductor's CPU kernels (set CXX, or install g++): {exc}".splitlines()[0]
    return None


def compile_towers(model: nn.Module) -> int:
    """torch.compile each transformer block's `forward` in `model`'s towers (`vision`, `text`),
    in place; a tower without blocks (precomp) is compiled whole. One compiled function per
    block class, bound to each block: blocks of a class share their graphs, module hooks
    (ZeRO's parameter fetches) stay outside the compiled code, parameter names and state dicts
    are unchanged, and a deep copy is compiled too (bound to the copy). Compilation happens at
    the first call. Returns the number of modules compiled."""
    compiled = 0
    for name in ("vision", "text"):
        tower = getattr(model, name, None)
        if tower is None:
            continue
        for module in transformer_blocks(tower) or [tower]:
            module.forward = types.MethodType(_compiled_forward(type(module)), module)
            compiled += 1
    return compiled


@functools.cache
def _compiled_forward(cls: type):
    return torch.compile(cls.forward)
