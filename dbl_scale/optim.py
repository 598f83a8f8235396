"""The optimizer side of a trained branch: the DeepSpeed config with its "auto" values filled
from ours, parameter groups (towers vs heads, decay vs none), and LR schedules."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import Config, ConfigError, flatten


PACKAGED = Path(__file__).resolve().parent / "ds_configs"  # shipped with the package, found when installed


def resolve_ds_config(name_or_path: str, precision: str = "auto") -> Path:
    """`train.deepspeed`: a name shipped with the package (`zero2`; with `precision: bf16` it
    means `zero2_bf16`; `zero2_gpu` / `zero3_gpu` are bf16 and tuned for GPUs), or a path to a JSON (relative to the working directory; a checkout's
    `ds_configs/NAME.json` also resolves inside the installed package)."""
    if name_or_path.endswith(".json"):
        path = Path(name_or_path)
        packaged = PACKAGED / path.name if path.parent.name == "ds_configs" else None
        for candidate in (path, packaged):
            if candidate is not None and candidate.is_file():
                return candidate
        raise ConfigError(f"config key 'train.deepspeed': no DeepSpeed config at '{name_or_path}'")
    twin = PACKAGED / f"{name_or_path}_bf16.json"  # with precision bf16, `zero2` means `zero2_bf16`
    name = twin.stem if precision == "bf16" and twin.is_file() else name_or_path
    path = PACKAGED / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in PACKAGED.glob("*.json"))
        raise ConfigError(f"config key 'train.deepspeed': no DeepSpeed config named '{name}'; "
                          f"named ones: {', '.join(names)}; or give a path to a .json file")
    return path


def deepspeed_config(cfg: Config, world: int) -> dict:
    """Read the JSON of `train.deepspeed` (or, under `accelerate launch` with a DeepSpeed YAML,
    the file that YAML names) and fill its "auto" values from our config."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or cfg.train.deepspeed
    ds = json.loads(resolve_ds_config(path, cfg.train.precision).read_text())
    bf16 = bool(ds.get("bf16", {}).get("enabled"))
    if cfg.train.precision != "auto" and bf16 != (cfg.train.precision == "bf16"):
        raise ConfigError(f"{path}: bf16 is {'on' if bf16 else 'off'} there, but config key 'train.precision' is "
                          f"{cfg.train.precision}; name a config (train.deepspeed=zero2) or make them agree")
    fills = {
        "train_micro_batch_size_per_gpu": ("data.batch_size", cfg.data.batch_size),
        "gradient_accumulation_steps": ("train.grad_accum", cfg.train.grad_accum),
        "gradient_clipping": ("optim.grad_clip", cfg.optim.grad_clip),
    }
    for key, (ours, value) in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:  # two sources of truth that disagree: refuse rather than guess
            raise ConfigError(f"{path}: '{key}' is {ds[key]} but config key '{ours}' is {value}; "
                              f"set one of them to match, or '{key}' to \"auto\"")
    global_batch = cfg.data.batch_size * world * cfg.train.grad_accum
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = global_batch
    elif ds["train_batch_size"] != global_batch:
        raise ConfigError(f"{path}: 'train_batch_size' is {ds['train_batch_size']}, but data.batch_size "
                          f"{cfg.data.batch_size} x {world} ranks x train.grad_accum {cfg.train.grad_accum} is "
                          f"{global_batch}; set it to \"auto\" (or a multiple that the world size divides)")
    _check_zero_options(ds.get("zero_optimization", {}), path)
    if cfg.train.compile and is_zero3(ds):
        # ZeRO-3 hooks every layer to fetch its parameters; each hook breaks the compiled block
        # into pieces (dozens of small graphs, nothing fused): no faster than eager
        raise ConfigError(f"config key 'train.compile': true works under ZeRO stages 0-2, but {path} is stage 3, "
                          "whose per-layer parameter fetches split every compiled block; set train.compile=false "
                          "or train.deepspeed to a stage 0-2 config (zero2, zero2_gpu)")
    params = ds.get("optimizer", {}).get("params", {})
    offloaded = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    opt_fills = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                 "weight_decay": cfg.optim.weight_decay,
                 # torch's AdamW, except for an optimizer offloaded from GPUs (DeepSpeed's CPU Adam):
                 # DeepSpeed's own Adams JIT-compile C++ / CUDA for minutes on first use
                 "torch_adam": not (offloaded and torch.cuda.is_available())}
    for key, value in opt_fills.items():
        if params.get(key) == "auto":
            params[key] = value
    if params.get("torch_adam") is True and torch.cuda.is_available() and not offloaded:
        params.setdefault("fused", True)  # torch's fused CUDA AdamW: one kernel launch, nothing to compile
    leftover = [k for k, v in flatten(ds).items() if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: cannot fill 'auto' for {leftover}")
    return ds


STAGE3_ONLY = ("offload_param", "sub_group_size", "zero_hpz_partition_size")  # and every "stage3_*" key
STAGE12_ONLY = ("round_robin_gradients", "cpu_offload", "elastic_checkpoint")


def _check_zero_options(zero: dict, path: str) -> None:
    """Options that only one side of ZeRO-3 reads: DeepSpeed would ignore them silently."""
    stage = zero.get("stage", 0)
    wrong = ([k for k in zero if k in STAGE12_ONLY] if stage == 3 else
             [k for k in zero if k in STAGE3_ONLY or k.startswith("stage3_")])
    if wrong:
        needs = "stages 1-2" if stage == 3 else "stage 3"
        raise ConfigError(f"{path}: zero_optimization.stage is {stage}, but {wrong} only apply to ZeRO {needs}; "
                          "remove them or change the stage")


def is_zero3(ds: dict | None) -> bool:
    return bool(ds) and ds.get("zero_optimization", {}).get("stage") == 3


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Four groups: towers and heads (projections, logit scale, method heads), each with and
    without weight decay (none on biases, norms and other 1-D parameters). Towers run at
    `backbone_lr_mult` times the LR; the group order is what `lr_lambdas` follows."""
    groups = {(tower, decay): [] for tower in (True, False) for decay in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[(name.startswith(("vision.", "text.")), p.dim() >= 2)].append(p)
    out = []
    for (tower, decay), params in groups.items():
        if not params:
            continue
        group = {"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0, "tower": tower}
        if tower:
            group["lr"] = cfg.optim.lr * cfg.optim.backbone_lr_mult
        out.append(group)
    return out


def lr_factor(cfg: Config, step: int) -> float:
    """Linear warm-up, then cosine decay to 0, step decay, or constant."""
    o, total = cfg.optim, cfg.train.steps
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "step":
        return o.step_gamma ** sum(step >= m for m in o.step_milestones)
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambdas(cfg: Config, groups: list[dict]) -> list:
    """One LR multiplier per parameter group; towers are held at 0 for `freeze_towers_steps`
    (frozen: Adam's update is lr-scaled, so they do not move while the heads train)."""
    def for_group(tower: bool):
        def factor(step: int) -> float:
            if tower and step < cfg.optim.freeze_towers_steps:
                return 0.0
            return lr_factor(cfg, step)
        return factor
    return [for_group(g["tower"]) for g in groups]
