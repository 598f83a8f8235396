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

from .errors import ConfigError
from .shards import is_shard_list


def bounded(default, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """A field with the range its values must lie in, beside it: `validate` checks every field
    that has one (None, for an optional field, is always allowed)."""
    return field(default=default, metadata={"bounds": (low, low_open, high, high_open)})


def positive(default):
    return bounded(default, 0, low_open=True)


def at_least_0(default):
    return bounded(default, 0)



@dataclass
class VisionConfig:
    # precomp: pre-extracted region features (data convert precomp), `feature_dim` wide
    kind: Literal["clip_vision", "vit", "precomp"] = "clip_vision"
    # a local folder (save_pretrained) or a hub id in the local HF cache; None: build from config
    pretrained: Optional[str] = None
    image_size: int = positive(64)
    patch_size: int = positive(8)
    hidden: int = positive(128)
    layers: int = positive(2)
    heads: int = positive(4)
    mlp_ratio: int = positive(4)
    # model: the checkpoint's own pooling and projection (CLIP: its pooled output and projection);
    # gpo and max: over the regions of a precomp tower (gpo: VSE-infinity's generalized pooling)
    pooling: Literal["cls", "mean", "model", "gpo", "max"] = "cls"
    feature_dim: int = positive(2048)  # precomp: width of each region feature (bottom-up attention: 2048)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time


@dataclass
class TextConfig:
    kind: Literal["bert", "clip_text", "roberta"] = "bert"
    pretrained: Optional[str] = None  # folder or cached hub id (model and tokenizer); None: from config
    hidden: int = positive(128)
    layers: int = positive(2)
    heads: int = positive(4)
    mlp_ratio: int = positive(4)
    max_length: int = positive(32)
    pooling: Literal["cls", "mean", "model"] = "mean"  # model: as above (CLIP: the EOS token)
    gradient_checkpointing: bool = False


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = positive(128)


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
class BuildConfig:
    train: int = at_least_0(4000)  # images per split
    val: int = at_least_0(250)
    test: int = at_least_0(500)
    # dense: 3 shapes, each solid or hollow; occluded: one shape under noise in half the images
    variant: Literal["standard", "dense", "occluded"] = "standard"


@dataclass
class DataConfig:
    # a folder with shards and dbl_index.json, or the training shards themselves as any
    # WebDataset URL: "shards/{00000..00099}.tar", "pipe:curl -s URL", "s3://bucket/{0..9}.tar"
    root: str = "data/shapes_captions"
    eval_root: Optional[str] = None  # folder whose index holds val/test; None: root, when its index has them
    samples_per_epoch: Optional[int] = positive(None)  # training samples per epoch; None: from the index
    train_split: str = "train"
    eval_split: str = "test"
    image: ImageConfig = field(default_factory=ImageConfig)
    batch_size: int = positive(32)  # per rank
    # loader processes per rank; auto: the machine's cores shared by its local ranks, one core
    # of each left to its main process, at most one worker per shard the rank reads
    workers: Union[int, Literal["auto"]] = at_least_0(1)
    # where JPEGs are decoded: cpu (the loader workers, PIL) or gpu (nvJPEG through torchvision's
    # decode_jpeg on the rank's CUDA device; the workers only read the shards); gpu needs torchvision
    decode: Literal["cpu", "gpu"] = "cpu"
    shuffle_buffer: int = at_least_0(1000)  # samples; 0 turns sample shuffling off
    tokenizer: Optional[str] = None  # local HF tokenizer folder; None: <root>/tokenizer
    # ShapesCaptions to build under `root` when it is absent or empty (--build-data, the demo);
    # None: nothing is built (the demo and tiny presets set it)
    build: Optional[BuildConfig] = None


@dataclass
class DBLConfig:
    # how the anchor is obtained: EMA of the target, K branches trained together, or frozen
    scenario: Literal["momentum", "online", "offline"] = "momentum"
    branches: int = bounded(2, 2)  # online: K branches; branch k is boosted against the mean over n < k
    anchor: Optional[str] = None  # offline: run folder of the trained anchor (config.yaml, model.pt)
    boost: Literal["relative", "absolute"] = "relative"
    # the boost's own reduction over negatives, at every step: "max" (the hardest negative; the
    # authors' code, the paper's l_RM / l_AM) or "sum" (l_RS / l_AS). Warm-ups never touch it.
    reduction: Literal["max", "sum"] = "max"
    alpha: float = at_least_0(1.0)  # weight of the boosting term
    beta: float = positive(1.0)  # boosting margin = margin * beta
    gamma: float = bounded(0.5, 0, 1)  # absolute boosting: share of the margin for positives
    soft_adapt: bool = False  # margins shrink smoothly near the score bounds (our reading)
    momentum: float = bounded(0.9995, 0, 1, high_open=True)  # EMA start value m0; cosine schedule up to 1 at the last step
    # what m0 means depends on the run's length: the share of the anchor's random init left at
    # the last step (~ m0 ** (steps / 2)). When set, m0 is derived from it and train.steps.
    momentum_init_left: Optional[float] = bounded(None, 0, 1, low_open=True, high_open=True)


@dataclass
class InfoNCEConfig:
    temperature: float = positive(0.07)  # initial; learnable
    max_logit_scale: float = positive(100.0)  # 1/temperature is clamped here, inside forward


@dataclass
class DistillConfig:
    teacher: Optional[str] = None  # run folder of the frozen teacher (config.yaml, model.pt)
    temperature: float = positive(0.1)
    weight: float = at_least_0(1.0)


@dataclass
class MutualConfig:
    smooth: float = positive(10.0)  # softmax sharpness on cosine scores
    weight: float = at_least_0(1.0)


@dataclass
class StructureConfig:
    """Structure-aware distillation (rebalanced retrieval)."""
    teacher: Optional[str] = None  # run folder whose towers give the per-modality teacher features
    # or frozen single-modal encoders: local Hugging Face folders (the text one with its tokenizer)
    teacher_vision: Optional[str] = None
    teacher_text: Optional[str] = None
    init_lambda: float = 0.5  # learnable text/image mix of the teacher relation
    temperature: float = positive(0.07)  # tau_2, initial; learnable, clamped to the range below
    # every relation term scales with 1/tau_2, so training raises tau_2: the clamp bounds that
    temperature_min: float = positive(0.02)
    temperature_max: float = positive(0.5)
    mode: Literal["per_modality", "pair_mean"] = "per_modality"
    weight: float = 2.0  # L_sd (the authors' 2)
    consistency_weight: float = 1.0  # each teacher relation against the mixed one (trains lambda, tau_2)
    repr_weight_image: float = 1.0  # InfoNCE(student image -> projected teacher image feature)
    repr_weight_text: float = 2.0  # InfoNCE(student caption -> projected teacher caption feature)
    repr_temperature: float = positive(0.07)  # initial; learnable


@dataclass
class CODERConfig:
    """CODER (our reading of the paper: no public code exists)."""
    momentum: float = bounded(0.999, 0, 1, high_open=True)  # key encoders: EMA of the query encoders (constant, as MoCo)
    queue_size: int = at_least_0(16384)  # FIFO of keys per modality, filled from all ranks
    temperature: float = positive(0.07)
    beta: float = at_least_0(1.0)  # diversity weighting sharpness; 0 gives plain InfoNCE
    concepts: int = bounded(256, 1)  # concept bank rows = pseudo-label clusters
    concept_file: Optional[str] = None  # C x d tensor (.pt / .npy) to start the bank from
    concept_temperature: float = positive(0.1)
    concept_weight: float = 1.0
    sinkhorn_epsilon: float = positive(0.05)
    sinkhorn_iterations: int = bounded(3, 1)


@dataclass
class AOQConfig:
    """Adaptive offline quintuplet loss: hard negatives mined from the whole training set."""
    candidates: Optional[str] = None  # folder from `dbl-scale mine`; None: mine at start with the start model
    refresh_epochs: int = at_least_0(0)  # re-mine with the current target every N epochs; 0: never (the authors)
    k_captions: int = bounded(2000, 1)  # mined caption candidates per image
    k_images: int = bounded(400, 1)  # mined image candidates per caption
    n_max: int = bounded(300, 1)  # the offline negative is drawn among the first n_max candidates
    cache_mb: float = positive(256.0)  # decoded negatives kept per rank (read from the shards by random access)
    m_on: float = 0.2
    m_off: float = 0.0
    a: float = positive(0.3)
    b: float = 1.5
    clamp_weights: bool = True  # False: the authors' unclamped adaptive weights
    # what the offline negatives bring (their four terms, the weights' departure from 1); 0: the triplet
    offline_weight: float = at_least_0(1.0)


@dataclass
class LossConfig:
    method: Literal["triplet", "infonce", "dbl", "distill", "mutual", "structure", "coder", "aoq"] = "triplet"
    margin: float = positive(0.2)
    max_violation: bool = True
    # VSE-infinity's warm-up: sum over all negatives (VSE0) for this many steps, then the
    # hardest negative. Towers trained from scratch collapse under max-violation from step 0.
    sum_warmup_steps: int = at_least_0(0)
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
    lr: float = positive(5e-4)
    weight_decay: float = at_least_0(0.05)
    betas: tuple = (0.9, 0.98)
    eps: float = positive(1e-6)
    warmup_steps: int = at_least_0(50)
    schedule: Literal["cosine", "step", "constant"] = "cosine"  # after the linear warm-up
    step_milestones: tuple = ()  # "step": the LR is multiplied by step_gamma at each of these steps
    step_gamma: float = 0.1
    grad_clip: float = at_least_0(2.0)  # 0 turns clipping off
    backbone_lr_mult: float = at_least_0(1.0)  # LR of the vision and text towers relative to the heads
    freeze_towers_steps: int = at_least_0(0)  # towers get LR 0 for this many steps (the heads train alone)


@dataclass
class TrainConfig:
    steps: int = positive(600)
    init_from: Optional[str] = None  # run folder: trained branches start from its target's weights
    # micro-batches per optimizer step. Each micro-batch is its own contrastive batch (its
    # negatives are gathered across ranks, not across micro-batches); the gradient is the
    # mean of the micro-batches' gradients. `steps` counts optimizer steps.
    grad_accum: int = positive(1)
    # a DeepSpeed config by name, shipped with the package (zero0-3, zero2_bf16, zero3_bf16,
    # zero2_offload, zero3_offload), or a path to your own JSON
    deepspeed: str = "zero2"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # bf16: a named config's _bf16 twin; auto: as the file says
    seed: int = 0
    log_every: int = positive(10)
    output_dir: str = "runs"
    # a step whose loss is not finite on some rank is skipped on every rank (no update, no EMA,
    # no queue push); this many skips in a row stop the run with a checkpoint of the last good state
    max_nonfinite: int = positive(20)
    # how long a rank waits in a collective for the others before it fails (a rank that died or
    # hangs): NCCL's own default; raise it if rank 0 alone writes very large files
    collective_timeout_s: int = positive(600)
    # torch.compile each transformer block of the towers (inductor fuses norms, activations and
    # residual adds); ZeRO stages 0-2. Eager where TorchDynamo is disabled or no compiler is found
    compile: bool = False


@dataclass
class CheckpointConfig:
    every: int = at_least_0(0)  # steps between checkpoints (0: only at the end)
    at_end: bool = True
    keep: int = at_least_0(3)  # newest complete checkpoints kept
    resume: Optional[str] = None  # "latest" (the newest complete one, if any) or a checkpoint folder
    stop_at: Optional[int] = positive(None)  # checkpoint and exit after this step, to be resumed (time slices)


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (MLflow's own convention), else the embedded sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


@dataclass
class TrackingConfig:
    uri: str = field(default_factory=default_tracking_uri)
    experiment: str = "dbl_scale"
    run_name: Optional[str] = None
    flush_every: int = positive(50)  # steps between batched metric uploads
    # when MLflow does not answer: records wait in <run>/mlflow_spool.jsonl (at most spool_max_mb),
    # retried every 1, 2, 4 ... retry_max_s seconds; the run's end waits final_wait_s for it
    spool_max_mb: float = positive(256)
    retry_max_s: float = positive(60)
    final_wait_s: float = at_least_0(120)
    system_metrics_s: float = at_least_0(30)  # rank 0 samples CPU / memory / GPU into system/* every N s; 0: off
    log_model: bool = True  # a finished run exports its target to <run>/model and logs it as an MLflow model


@dataclass
class EvalConfig:
    batch_size: int = positive(128)
    at_end: bool = True  # on data.eval_split, with recall@K plot and HTML samples as MLflow artifacts
    every: int = at_least_0(0)  # validate on `val_split` every N steps; the best val rSum is kept in <run>/best/
    val_split: str = "val"
    protocol: Literal["standard", "coco1k"] = "standard"  # coco1k: mean over 5 folds of 1000 images
    # text-to-text and image-to-image retrieval beside the cross-modal metrics (on the whole split);
    # it scores (K*N)^2 + N^2 pairs more: turn it off for very large splits
    single_modal: bool = True
    # which images are relevant to each other: a json member, as it is or "MEMBER:field,field" for
    # a list of dicts (the demo's: the same shapes in the same colours); None: no image to image
    image_relevance: Optional[str] = None


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
    data = _merge(_renamed(data), parse_overrides(overrides or []))
    return config_from_dict(data)


RENAMED = {"build_train": "train", "build_val": "val", "build_test": "test", "build_variant": "variant"}


def _renamed(data: dict) -> dict:
    """A config saved before `data.build_*` became `data.build.*` (runs trained then), in today's keys."""
    old = {k: v for k, v in (data.get("data") or {}).items() if k in RENAMED}
    if not old:
        return data
    section = {k: v for k, v in data["data"].items() if k not in RENAMED}
    section["build"] = {**{RENAMED[k]: v for k, v in old.items()}, **(section.get("build") or {})}
    return {**data, "data": section}


def validate(cfg: Config) -> None:
    """Every field's bounds (declared beside it, `bounded`), then the rules that tie fields of
    different sections together. A method's own rules are its `Method.check`."""
    _check_bounds(cfg)
    if cfg.checkpoint.resume and not cfg.tracking.run_name:
        raise ConfigError("config key 'checkpoint.resume' needs 'tracking.run_name': the run to continue")
    if is_shard_list(cfg.data.root) and not cfg.data.eval_root and (cfg.eval.at_end or cfg.eval.every):
        raise ConfigError(f"config key 'data.eval_root': data.root '{cfg.data.root}' names training shards "
                          "only; set data.eval_root to a folder with the val/test splits (dbl-scale data "
                          "convert writes one), or eval.at_end=false and eval.every=0")
    vision = cfg.model.vision
    allowed = ("gpo", "max", "mean") if vision.kind == "precomp" else ("cls", "mean", "model")
    if vision.pooling not in allowed:
        raise ConfigError(f"config key 'model.vision.pooling': got {vision.pooling!r} for a {vision.kind} tower; "
                          f"allowed: {', '.join(allowed)}")
    if vision.image_size % vision.patch_size:
        raise ConfigError("config key 'model.vision.patch_size': must divide model.vision.image_size "
                          f"({vision.patch_size} does not divide {vision.image_size})")
    if cfg.data.decode == "gpu":
        image = cfg.data.image
        if vision.kind == "precomp":
            raise ConfigError("config key 'data.decode': 'gpu' decodes JPEGs; a precomp tower reads region "
                              "features: set data.decode=cpu")
        if image.crop_scale[0] < 1.0 or image.hflip:
            raise ConfigError("config key 'data.decode': 'gpu' does not augment; set data.decode=cpu, or "
                              "data.image.crop_scale=[1.0, 1.0] and data.image.hflip=false")
    for sec in ("vision", "text"):
        tower = getattr(cfg.model, sec)
        if tower.hidden % tower.heads:
            raise ConfigError(f"config key 'model.{sec}.heads': must divide model.{sec}.hidden "
                              f"({tower.heads} does not divide {tower.hidden})")


def _check_bounds(section, prefix: str = "") -> None:
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_bounds(value, key + ".")
            continue
        bounds = f.metadata.get("bounds")
        if bounds is None or value is None or isinstance(value, str):  # a named value ("auto"): no range
            continue
        low, low_open, high, high_open = bounds
        below = low is not None and (value < low or (low_open and value == low))
        above = high is not None and (value > high or (high_open and value == high))
        if below or above:
            raise ConfigError(f"config key '{key}': got {value}, expected {_describe_bounds(*bounds)}")


def _describe_bounds(low, low_open, high, high_open) -> str:
    if low == 0 and low_open and high is None:
        return "a positive number"
    parts = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
    parts += [f"{'<' if high_open else '<='} {high}"] if high is not None else []
    return " and ".join(parts)


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
