"""Configuration: typed dataclasses, loaded from YAML plus dotted command-line overrides.

Every section is a dataclass, so the allowed keys and value types are the fields' own.
`load_config(path, overrides)` validates everything before any process group starts:
an unknown key or a bad value raises `ConfigError` naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .shards import is_shard_list


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


@dataclass
class VisionConfig:
    # precomp: pre-extracted region features (data convert precomp), `feature_dim` wide
    kind: Literal["clip_vision", "vit", "precomp"] = "clip_vision"
    # a local folder (save_pretrained) or a hub id in the local HF cache; None: build from config
    pretrained: Optional[str] = None
    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    # model: the checkpoint's own pooling and projection (CLIP: its pooled output and projection);
    # gpo and max: over the regions of a precomp tower (gpo: VSE-infinity's generalized pooling)
    pooling: Literal["cls", "mean", "model", "gpo", "max"] = "cls"
    feature_dim: int = 2048  # precomp: width of each region feature (bottom-up attention: 2048)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time


@dataclass
class TextConfig:
    kind: Literal["bert", "clip_text", "roberta"] = "bert"
    pretrained: Optional[str] = None  # folder or cached hub id (model and tokenizer); None: from config
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    max_length: int = 32
    pooling: Literal["cls", "mean", "model"] = "mean"  # model: as above (CLIP: the EOS token)
    gradient_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128


@dataclass
class ImageConfig:
    """How an encoded image becomes the vision tower's input. Left at None, each value comes from
    the vision checkpoint's image processor (preprocessor_config.json), else CLIP's statistics and
    a centre crop; the run's saved config.yaml records the values it used."""
    mean: Optional[tuple] = None  # per channel, on [0, 1] pixels
    std: Optional[tuple] = None
    # crop: the shorter side to model.vision.image_size, then a centre crop (aspect ratio kept);
    # squash: both sides to image_size
    resize: Optional[Literal["crop", "squash"]] = None
    # train-time augmentation, on uint8 images before normalising; evaluation never augments
    crop_scale: tuple = (1.0, 1.0)  # random resized crop: the share of the area kept; (1, 1): off
    hflip: bool = False  # off: captions say "left" and "right"


@dataclass
class DataConfig:
    # a folder with shards and dbl_index.json, or the training shards themselves as any
    # WebDataset URL: "shards/{00000..00099}.tar", "pipe:curl -s URL", "s3://bucket/{0..9}.tar"
    root: str = "data/shapes_captions"
    eval_root: Optional[str] = None  # folder whose index holds val/test; None: root
    samples_per_epoch: Optional[int] = None  # training samples per epoch; None: from the index
    train_split: str = "train"
    eval_split: str = "test"
    image: ImageConfig = field(default_factory=ImageConfig)
    batch_size: int = 32  # per rank
    workers: int = 1  # loader processes per rank
    shuffle_buffer: int = 1000  # samples; 0 turns sample shuffling off
    tokenizer: Optional[str] = None  # local HF tokenizer folder; None: <root>/tokenizer
    # ShapesCaptions, built under `root` when it is absent or empty (--build-data, the demo).
    build_train: int = 4000
    build_val: int = 250
    build_test: int = 500
    build_variant: Literal["standard", "dense"] = "standard"  # dense: 3 shapes, each solid or hollow


@dataclass
class DBLConfig:
    # how the anchor is obtained: EMA of the target, K branches trained together, or frozen
    scenario: Literal["momentum", "online", "offline"] = "momentum"
    branches: int = 2  # online: K branches; branch k is boosted against the mean over n < k
    anchor: Optional[str] = None  # offline: run folder of the trained anchor (config.yaml, model.pt)
    boost: Literal["relative", "absolute"] = "relative"
    # the boost's own reduction over negatives, at every step: "max" (the hardest negative; the
    # authors' code, the paper's l_RM / l_AM) or "sum" (l_RS / l_AS). Warm-ups never touch it.
    reduction: Literal["max", "sum"] = "max"
    alpha: float = 1.0  # weight of the boosting term
    beta: float = 1.0  # boosting margin = margin * beta
    gamma: float = 0.5  # absolute boosting: share of the margin for positives
    soft_adapt: bool = False  # margins shrink smoothly near the score bounds (our reading)
    momentum: float = 0.9995  # EMA start value m0; cosine schedule up to 1 at the last step
    # what m0 means depends on the run's length: the share of the anchor's random init left at
    # the last step (~ m0 ** (steps / 2)). When set, m0 is derived from it and train.steps.
    momentum_init_left: Optional[float] = None


@dataclass
class InfoNCEConfig:
    temperature: float = 0.07  # initial; learnable
    max_logit_scale: float = 100.0  # 1/temperature is clamped here, inside forward


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # run folder of the frozen teacher (config.yaml, model.pt)
    temperature: float = 0.1
    weight: float = 1.0


@dataclass
class MutualConfig:
    smooth: float = 10.0  # softmax sharpness on cosine scores
    weight: float = 1.0


@dataclass
class StructureConfig:
    """Structure-aware distillation (rebalanced retrieval)."""
    teacher: Optional[str] = None  # run folder whose towers give the per-modality teacher features
    # or frozen single-modal encoders: local Hugging Face folders (the text one with its tokenizer)
    teacher_vision: Optional[str] = None
    teacher_text: Optional[str] = None
    init_lambda: float = 0.5  # learnable text/image mix of the teacher relation
    temperature: float = 0.07  # tau_2, initial; learnable, clamped to the range below
    # every relation term scales with 1/tau_2, so training raises tau_2: the clamp bounds that
    temperature_min: float = 0.02
    temperature_max: float = 0.5
    mode: Literal["per_modality", "pair_mean"] = "per_modality"
    weight: float = 2.0  # L_sd (the authors' 2)
    consistency_weight: float = 1.0  # each teacher relation against the mixed one (trains lambda, tau_2)
    repr_weight_image: float = 1.0  # InfoNCE(student image -> projected teacher image feature)
    repr_weight_text: float = 2.0  # InfoNCE(student caption -> projected teacher caption feature)
    repr_temperature: float = 0.07  # initial; learnable


@dataclass
class CODERConfig:
    """CODER (our reading of the paper: no public code exists)."""
    momentum: float = 0.999  # key encoders: EMA of the query encoders (constant, as MoCo)
    queue_size: int = 16384  # FIFO of keys per modality, filled from all ranks
    temperature: float = 0.07
    beta: float = 1.0  # diversity weighting sharpness; 0 gives plain InfoNCE
    concepts: int = 256  # concept bank rows = pseudo-label clusters
    concept_file: Optional[str] = None  # C x d tensor (.pt / .npy) to start the bank from
    concept_temperature: float = 0.1
    concept_weight: float = 1.0
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3


@dataclass
class AOQConfig:
    """Adaptive offline quintuplet loss: hard negatives mined from the whole training set."""
    candidates: Optional[str] = None  # folder from `dbl-scale mine`; None: mine at start with the start model
    refresh_epochs: int = 0  # re-mine with the current target every N epochs; 0: never (the authors)
    k_captions: int = 2000  # mined caption candidates per image
    k_images: int = 400  # mined image candidates per caption
    n_max: int = 300  # the offline negative is drawn among the first n_max candidates
    cache_mb: float = 256.0  # decoded negatives kept per rank (read from the shards by random access)
    m_on: float = 0.2
    m_off: float = 0.0
    a: float = 0.3
    b: float = 1.5
    clamp_weights: bool = True  # False: the authors' unclamped adaptive weights


@dataclass
class LossConfig:
    method: Literal["triplet", "infonce", "dbl", "distill", "mutual", "structure", "coder", "aoq"] = "triplet"
    margin: float = 0.2
    max_violation: bool = True
    # VSE-infinity's warm-up: sum over all negatives (VSE0) for this many steps, then the
    # hardest negative. Towers trained from scratch collapse under max-violation from step 0.
    sum_warmup_steps: int = 0
    mask_same_image: bool = True  # pairs sharing an image id are never negatives
    dbl: DBLConfig = field(default_factory=DBLConfig)
    infonce: InfoNCEConfig = field(default_factory=InfoNCEConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    mutual: MutualConfig = field(default_factory=MutualConfig)
    structure: StructureConfig = field(default_factory=StructureConfig)
    coder: CODERConfig = field(default_factory=CODERConfig)
    aoq: AOQConfig = field(default_factory=AOQConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # after the linear warm-up
    step_milestones: tuple = ()  # "step": the LR is multiplied by step_gamma at each of these steps
    step_gamma: float = 0.1
    grad_clip: float = 2.0  # 0 turns clipping off
    backbone_lr_mult: float = 1.0  # LR of the vision and text towers relative to the heads
    freeze_towers_steps: int = 0  # towers get LR 0 for this many steps (the heads train alone)


@dataclass
class TrainConfig:
    steps: int = 600
    init_from: Optional[str] = None  # run folder: trained branches start from its target's weights
    # micro-batches per optimizer step. Each micro-batch is its own contrastive batch (its
    # negatives are gathered across ranks, not across micro-batches); the gradient is the
    # mean of the micro-batches' gradients. `steps` counts optimizer steps.
    grad_accum: int = 1
    # a DeepSpeed config by name, shipped with the package (zero0-3, zero2_bf16, zero3_bf16,
    # zero2_offload, zero3_offload), or a path to your own JSON
    deepspeed: str = "zero2"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16: a named config's _bf16 twin; auto: as the file says
    seed: int = 0
    log_every: int = 10
    output_dir: str = "runs"
    # a step whose loss is not finite on some rank is skipped on every rank (no update, no EMA,
    # no queue push); this many skips in a row stop the run with a checkpoint of the last good state
    max_nonfinite: int = 20
    # how long a rank waits in a collective for the others before it fails (a rank that died or
    # hangs): NCCL's own default; raise it if rank 0 alone writes very large files
    collective_timeout_s: int = 600


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end)
    at_end: bool = True
    keep: int = 3  # newest complete checkpoints kept
    resume: Optional[str] = None  # "latest" (the newest complete one, if any) or a checkpoint folder
    stop_at: Optional[int] = None  # checkpoint and exit after this step, to be resumed (time slices)


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (MLflow's own convention), else the embedded sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass
class TrackingConfig:
    uri: str = field(default_factory=default_tracking_uri)
    experiment: str = "dbl_scale"
    run_name: Optional[str] = None
    flush_every: int = 50  # steps between batched metric uploads
    # when MLflow does not answer: records wait in <run>/mlflow_spool.jsonl (at most spool_max_mb),
    # retried every 1, 2, 4 ... retry_max_s seconds; the run's end waits final_wait_s for it
    spool_max_mb: float = 256
    retry_max_s: float = 60
    final_wait_s: float = 120
    system_metrics_s: float = 30  # rank 0 samples CPU / memory / GPU into system/* every N s; 0: off
    log_model: bool = True  # a finished run exports its target to <run>/model and logs it as an MLflow model


@dataclass
class EvalConfig:
    batch_size: int = 128
    at_end: bool = True  # on data.eval_split, with recall@K plot and HTML samples as MLflow artifacts
    every: int = 0  # validate on `val_split` every N steps; the best val rSum is kept in <run>/best/
    val_split: str = "val"
    protocol: Literal["standard", "coco1k"] = "standard"  # coco1k: mean over 5 folds of 1000 images


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- building

def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key + ".")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; allowed keys under "
                f"'{prefix.rstrip('.') or '<top>'}': {', '.join(names)}")
        kwargs[key] = _coerce(prefix + key, hints[key], value)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.text.layers=4", "loss.method=dbl"]` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data or {})
    validate(cfg)
    return cfg


PRESETS = Path(__file__).parent / "presets"


def resolve_config(name: Optional[str | Path]) -> Optional[str]:
    """A YAML path, or the name of a packaged preset (`demo`, `tiny`)."""
    if name is None or Path(name).exists():
        return None if name is None else str(name)
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file():
        return str(preset)
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    raise ConfigError(f"config '{name}' is neither a file nor a preset; presets: {', '.join(names)}")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults <- YAML file (or preset name) <- dotted overrides, then validated."""
    data: dict = {}
    path = resolve_config(path)
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express."""
    positive = {
        "data.batch_size": cfg.data.batch_size, "train.steps": cfg.train.steps, "train.grad_accum": cfg.train.grad_accum,
        "model.embed_dim": cfg.model.embed_dim, "model.vision.image_size": cfg.model.vision.image_size,
        "model.text.max_length": cfg.model.text.max_length, "train.log_every": cfg.train.log_every,
        "train.max_nonfinite": cfg.train.max_nonfinite, "train.collective_timeout_s": cfg.train.collective_timeout_s,
        "eval.batch_size": cfg.eval.batch_size, "tracking.flush_every": cfg.tracking.flush_every,
        "tracking.spool_max_mb": cfg.tracking.spool_max_mb, "tracking.retry_max_s": cfg.tracking.retry_max_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}': got {value}, expected a positive number")
    if cfg.checkpoint.every < 0 or cfg.checkpoint.keep < 0:
        raise ConfigError("config keys 'checkpoint.every' and 'checkpoint.keep' must be >= 0")
    if cfg.checkpoint.resume and not cfg.tracking.run_name:
        raise ConfigError("config key 'checkpoint.resume' needs 'tracking.run_name': the run to continue")
    if cfg.data.workers < 0:
        raise ConfigError(f"config key 'data.workers': got {cfg.data.workers}, expected >= 0")
    if is_shard_list(cfg.data.root) and not cfg.data.eval_root and (cfg.eval.at_end or cfg.eval.every):
        raise ConfigError(f"config key 'data.eval_root': data.root '{cfg.data.root}' names training shards "
                          "only; set data.eval_root to a folder with the val/test splits (dbl-scale data "
                          "convert writes one), or eval.at_end=false and eval.every=0")
    vc = cfg.model.vision
    allowed = ("gpo", "max", "mean") if vc.kind == "precomp" else ("cls", "mean", "model")
    if vc.pooling not in allowed:
        raise ConfigError(f"config key 'model.vision.pooling': got {vc.pooling!r} for a {vc.kind} tower; "
                          f"allowed: {', '.join(allowed)}")
    if cfg.model.vision.image_size % cfg.model.vision.patch_size:
        raise ConfigError("config key 'model.vision.patch_size': must divide model.vision.image_size "
                          f"({cfg.model.vision.patch_size} does not divide {cfg.model.vision.image_size})")
    for sec in ("vision", "text"):
        tower = getattr(cfg.model, sec)
        if tower.hidden % tower.heads:
            raise ConfigError(f"config key 'model.{sec}.heads': must divide model.{sec}.hidden "
                              f"({tower.heads} does not divide {tower.hidden})")
    if not 0.0 <= cfg.loss.dbl.momentum < 1.0:
        raise ConfigError(f"config key 'loss.dbl.momentum': got {cfg.loss.dbl.momentum}, expected 0 <= m < 1")
    left = cfg.loss.dbl.momentum_init_left
    if left is not None and not 0.0 < left < 1.0:
        raise ConfigError(f"config key 'loss.dbl.momentum_init_left': got {left}, expected 0 < share < 1")
    if not 0.0 <= cfg.loss.dbl.gamma <= 1.0:
        raise ConfigError(f"config key 'loss.dbl.gamma': got {cfg.loss.dbl.gamma}, expected 0 <= g <= 1")
    lc = cfg.loss  # settings one method needs are checked by that method (methods.Method.check)
    if not 0.0 <= lc.coder.momentum < 1.0:
        raise ConfigError(f"config key 'loss.coder.momentum': got {lc.coder.momentum}, expected 0 <= m < 1")
    sc = lc.structure
    if not 0.0 < sc.temperature_min <= sc.temperature <= sc.temperature_max:
        raise ConfigError("config keys 'loss.structure.temperature_min' <= 'loss.structure.temperature' <= "
                          f"'loss.structure.temperature_max' (all > 0): got {sc.temperature_min}, "
                          f"{sc.temperature}, {sc.temperature_max}")
    if lc.coder.queue_size < 0 or lc.coder.concepts < 1:
        raise ConfigError("config keys 'loss.coder.queue_size' (>= 0) and 'loss.coder.concepts' (>= 1)")
    if lc.aoq.refresh_epochs < 0 or lc.aoq.n_max < 1:
        raise ConfigError("config keys 'loss.aoq.refresh_epochs' (>= 0) and 'loss.aoq.n_max' (>= 1)")
    if lc.dbl.branches < 2:
        raise ConfigError(f"config key 'loss.dbl.branches': got {lc.dbl.branches}, expected >= 2")
    for key, value in (("loss.infonce.temperature", lc.infonce.temperature),
                       ("loss.distill.temperature", lc.distill.temperature), ("loss.mutual.smooth", lc.mutual.smooth)):
        if value <= 0:
            raise ConfigError(f"config key '{key}': got {value}, expected > 0")
    ranges = {  # key: (value, lowest allowed, whether the lowest is allowed)
        "optim.lr": (cfg.optim.lr, 0.0, False), "loss.margin": (lc.margin, 0.0, False),
        "optim.weight_decay": (cfg.optim.weight_decay, 0.0, True), "optim.grad_clip": (cfg.optim.grad_clip, 0.0, True),
        "loss.dbl.alpha": (lc.dbl.alpha, 0.0, True), "loss.dbl.beta": (lc.dbl.beta, 0.0, False),
        "loss.coder.temperature": (lc.coder.temperature, 0.0, False), "loss.aoq.a": (lc.aoq.a, 0.0, False), "loss.aoq.cache_mb": (lc.aoq.cache_mb, 0.0, False),
        "optim.warmup_steps": (cfg.optim.warmup_steps, 0, True),
        "tracking.final_wait_s": (cfg.tracking.final_wait_s, 0.0, True),
        "tracking.system_metrics_s": (cfg.tracking.system_metrics_s, 0.0, True),
    }
    for key, (value, low, inclusive) in ranges.items():
        if value < low or (value == low and not inclusive):
            raise ConfigError(f"config key '{key}': got {value}, expected {'>=' if inclusive else '>'} {low}")


def to_dict(cfg: Config) -> dict:
    def plain(x):
        if isinstance(x, tuple):
            return list(x)
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return plain(dataclasses.asdict(cfg))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"model.text.layers": 2, ...} (MLflow parameters)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
