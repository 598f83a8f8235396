"""Branches: building the models a method trains or consults, and keeping them in step.

One `Branch` per role of the method's layout (`methods.Layout.roles`), the target last. A trained
branch is a DeepSpeed engine; an EMA or FROZEN branch is a module without gradient.
Under ZeRO-3 every branch is built partitioned (`partitioned`), and weights from finished
runs or `from_pretrained` folders are loaded straight into the shards.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from . import checkpoint, distributed
from .config import Config, load_config
from .methods import Method, build_method
from .roles import EMA, FROZEN, TARGET, TRAINED
from .models import DualEncoder, FrozenEncoders, compile_blocker, compile_towers
from .optim import deepspeed_config, is_zero3, lr_lambdas, param_groups

log = logging.getLogger("dbl_scale")


@dataclass
class Branch:
    """One branch: a DeepSpeed engine when it trains, else a plain module without gradient."""
    role: str  # TRAINED, EMA or FROZEN (methods.Layout.roles)
    module: torch.nn.Module
    engine: Any = None
    scheduler: Any = None
    partitioner: Any = None  # ZeRO-3 EMA anchor: the optimizer-less engine that shards `module`
    master: Optional[list] = None  # a bf16 EMA anchor's fp32 average (`ema_master`)

    def reset_master(self) -> None:
        """Start a bf16 EMA anchor's fp32 average from its current weights."""
        self.master = ema_master(self.module)

    def ema_state_dict(self) -> Optional[dict]:
        """An EMA anchor's weights on rank 0 (None elsewhere): in fp32 from its average when it
        has one. Collective under ZeRO-3 (shards are gathered one parameter at a time)."""
        if self.master is None:
            return checkpoint.full_state_dict(self.module)
        # buffers as they are; every parameter is replaced by its average below
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()} if distributed.is_main() else None
        averages = iter(self.master)
        for name, p in self.module.named_parameters():
            own = {slot: next(averages) for slot in _slots(p)}
            full = own.get("whole", own.get("data"))  # the whole copy: a plain or persisted parameter
            if full is None:  # only a shard here: every rank's, in order
                full = distributed.gather_no_grad(own["shard"])[:p.ds_numel]
            if state is not None:
                state[name] = full.reshape(p.ds_shape if hasattr(p, "ds_tensor") else p.shape).cpu().clone()
        return state

    def load_ema_state(self, state: dict) -> None:
        """Inverse of `ema_state_dict`: the weights, and the fp32 average where kept (from a
        bf16 file, as written before the average existed, it restarts from those weights)."""
        checkpoint.load_weights(self.module, state)
        if self.master is None:
            return
        averages = iter(self.master)
        for name, p in self.module.named_parameters():
            full = state[name].float().flatten()
            for slot in _slots(p):
                x = next(averages)
                if slot == "shard":  # this rank's slice, zero-padded
                    piece = full[distributed.rank() * x.numel():(distributed.rank() + 1) * x.numel()]
                    x.zero_().view(-1)[:piece.numel()].copy_(piece)
                else:
                    x.copy_(full.view_as(x))
        _write_average(self.module, self.master)


@contextlib.contextmanager
def partitioned(ds: Optional[dict]):
    """Under ZeRO-3, modules built inside are partitioned over the ranks as they are built:
    each layer is created, broadcast from rank 0 and cut into shards before the next one
    exists, so a model larger than one rank's memory can be built. transformers sees the
    same config (`HfDeepSpeedConfig`) and initialises its towers layer by layer (gathering
    one module at a time); `from_pretrained` loads straight into the shards. Elsewhere a no-op."""
    if not is_zero3(ds):
        yield
        return
    import deepspeed  # heavy (seconds): imported by the processes that build models
    import torch._dynamo  # noqa: F401  imported lazily by transformers; its import fails under zero.Init's patches
    from transformers.integrations import HfDeepSpeedConfig  # heavy, as deepspeed

    hf_config = HfDeepSpeedConfig(ds)  # transformers holds a weak reference: ZeRO-3 while it lives
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            yield
    finally:
        del hf_config


def new_model(cfg: Config, tokenizer, index: int, teacher_dims=None, ds: Optional[dict] = None) -> DualEncoder:
    """Branch `index`'s initial towers (and the method's heads): the same on every rank,
    different between branches. With a ZeRO-3 `ds` config the model is built partitioned."""
    method = build_method(cfg)
    torch.manual_seed(cfg.train.seed + 1000 * index)
    with partitioned(ds):
        heads = method.heads(teacher_dims)  # drawn before the towers: part of the seeded sequence
        model = DualEncoder(cfg.model, tokenizer, method.layout.logit_temperature, cfg.loss.infonce.max_logit_scale,
                            heads=heads)
    for tower, tower_cfg in ((model.vision, cfg.model.vision), (model.text, cfg.model.text)):
        if tower_cfg.gradient_checkpointing:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def read_run(run_dir: str | Path, what: str = "") -> tuple[Config, dict]:
    """A finished run's config and target weights (memory-mapped, not read into memory)."""
    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{what}{run_dir / name} not found: expected the folder of a finished run")
    return (load_config(run_dir / "config.yaml"),
            torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True, mmap=True))


def load_model(run_dir: str | Path, tokenizer, ds: Optional[dict] = None) -> DualEncoder:
    """The target towers a finished run saved (its config.yaml and model.pt); partitioned
    under a ZeRO-3 `ds` config."""
    run_cfg, state = read_run(run_dir)
    model = new_model(run_cfg, tokenizer, 0, ds=ds)
    checkpoint.load_weights(model, state)
    return model


def _frozen(method: Method, tokenizer, ds: dict) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The method's frozen branch and its feature widths (vision, text)."""
    folders = method.layout.teacher_folders
    if folders:
        with partitioned(ds):  # the HF folders load straight into ZeRO-3 shards
            frozen = FrozenEncoders(*folders)
        return frozen, frozen.dims
    frozen = load_model(method.layout.frozen_source, tokenizer, ds)
    return frozen, (frozen.vision_proj.out_features, frozen.text_proj.out_features)


def _init_from(run_dir: str, roles: list[str], modules: list[torch.nn.Module]) -> None:
    """Trained branches start from a finished run's target (towers must match; a method's own
    heads keep their init)."""
    _, start = read_run(run_dir, "train.init_from: ")
    for role, module in zip(roles, modules):
        if role == TRAINED:
            missing, unexpected = checkpoint.load_weights(module, start, strict=False)
            towers = [k for k in missing + unexpected if not k.startswith(("heads.", "log_logit_scale"))]
            if towers:
                raise ValueError(f"train.init_from {run_dir}: towers differ: {towers[:5]}")


def build_branches(cfg: Config, method: Method, tokenizer, world: int) -> list[Branch]:
    """One Branch per role of the method, the target last. Under ZeRO-3 every branch is built
    partitioned: the trained ones, the anchors and the teachers."""
    import deepspeed  # heavy (seconds): imported by the processes that train

    ds = deepspeed_config(cfg, world)
    roles = method.roles
    frozen, teacher_dims = _frozen(method, tokenizer, ds) if FROZEN in roles else (None, None)
    modules = []
    for k, role in enumerate(roles):
        if role == FROZEN:
            modules.append(frozen)
        elif role == TRAINED and method.layout.target_starts_from_frozen:
            modules.append(load_model(method.layout.frozen_source, tokenizer, ds))
        else:  # an EMA is built as the target (index 0) and set equal to it below
            modules.append(new_model(cfg, tokenizer, k if EMA not in roles else 0, teacher_dims, ds))
    if cfg.train.init_from:  # e.g. continue a baseline from the checkpoint an offline anchor uses
        _init_from(cfg.train.init_from, roles, modules)

    branches = []
    for role, module in zip(roles, modules):
        if role == TRAINED:
            groups = param_groups(module, cfg)
            engine, _, _, scheduler = deepspeed.initialize(
                model=module, model_parameters=groups, config=ds,
                lr_scheduler=lambda opt, g=groups: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, g)))
            branches.append(Branch(role, engine.module, engine, scheduler))
        else:
            branches.append(Branch(role, module))
    target = branches[TARGET].engine
    for br in branches:
        if br.engine is not None:
            continue
        br.module.eval().requires_grad_(False)
        if is_zero3(ds):
            # an optimizer-less engine runs its partitioned forward (gathering layer by layer);
            # an EMA is partitioned exactly as the target, so its update runs shard by shard
            no_opt = {k: v for k, v in ds.items() if k not in ("optimizer", "scheduler")}
            br.partitioner = deepspeed.initialize(model=br.module, config=no_opt)[0]
            br.module = br.partitioner.module
        else:
            br.module.to(target.device, dtype=param_dtype(target.module))
        if br.role == EMA:
            ema_update(br.module, target.module, 0.0)  # the EMA starts equal to the target
            br.reset_master()
    if cfg.train.compile:
        compile_branches(branches, target.device)
    return branches


def compile_branches(branches: list[Branch], device: torch.device) -> None:
    """`train.compile`: every branch's transformer blocks compiled (`models.compile_towers`), or
    all eager, with the reason logged, where torch.compile cannot run here."""
    blocker = compile_blocker(device)
    if blocker is not None:
        log.warning("train.compile=true, but %s: the towers run eager", blocker)
        return
    blocks = sum(compile_towers(br.module) for br in branches)
    log.info("train.compile: %d transformer blocks compiled (at their first call)", blocks)


def _slots(p: torch.nn.Parameter) -> tuple[str, ...]:
    """What a rank holds of a parameter, as an EMA keeps it: its "data"; under ZeRO-3 its
    "shard" (`ds_tensor`) and, for the small parameters ZeRO-3 persists whole, that "whole"
    copy too. A whole copy exists only once DeepSpeed has fetched it (at the module's first
    forward), but its slot is there from the start, so an fp32 average keeps one layout."""
    if not hasattr(p, "ds_tensor"):
        return ("data",)
    return ("shard", "whole") if getattr(p, "ds_persist", False) else ("shard",)


def _slot_tensor(p: torch.nn.Parameter, slot: str) -> Optional[torch.Tensor]:
    """The tensor of a slot, or None for a persisted whole copy not fetched yet."""
    if slot == "shard":
        return p.ds_tensor
    if slot == "whole" and not p.data.numel():
        return None
    return p.data


def _slot_pairs(anchor: torch.nn.Module, target: torch.nn.Module) -> list[tuple]:
    """(anchor parameter, target parameter, slot) for every slot of the anchor. Both modules are
    partitioned the same way, so the slots match."""
    return [(a, t, slot) for a, t in zip(anchor.parameters(), target.parameters()) for slot in _slots(a)]


def ema_master(anchor: torch.nn.Module) -> Optional[list[torch.Tensor]]:
    """fp32 copies of a low-precision anchor's slots, in which `ema_update` accumulates (None
    for an fp32 anchor). With m close to 1 a step adds (1 - m)(t - a), far below bf16's
    resolution, so an anchor updated in bf16 would stay put. Collective under ZeRO-3 when a
    persisted whole copy has not been fetched yet (it is gathered once, here)."""
    params = list(anchor.parameters())
    if all(_slot_tensor(p, _slots(p)[0]).dtype == torch.float32 for p in params):
        return None
    with _gathered([p for p in params if "whole" in _slots(p) and _slot_tensor(p, "whole") is None]):
        return [_slot_tensor(a, slot).to(torch.float32, copy=True) for a, _, slot in _slot_pairs(anchor, anchor)]


def _write_average(anchor: torch.nn.Module, master: list[torch.Tensor]) -> None:
    """The anchor's weights become the rounding of its fp32 average (the slots it holds now; a
    whole copy fetched later is gathered from the shards, which hold the same values)."""
    pairs = [(_slot_tensor(a, slot), x) for (a, _, slot), x in zip(_slot_pairs(anchor, anchor), master)]
    held = [(mine, x) for mine, x in pairs if mine is not None]
    torch._foreach_copy_([mine for mine, _ in held], [x for _, x in held])


@torch.no_grad()
def ema_update(anchor: torch.nn.Module, target: torch.nn.Module, m: float,
               master: Optional[list[torch.Tensor]] = None) -> None:
    """anchor <- m * anchor + (1 - m) * target, as two fused multi-tensor ops over each rank's
    own tensors (under ZeRO-3: shards, nothing is gathered). With `master` (`ema_master`) the
    average is kept in fp32 over every slot and the anchor's weights are its rounding; without
    one, the slots the anchor holds now are updated in place."""
    pairs = _slot_pairs(anchor, target)
    if master is None:
        pairs = [(a, t, slot) for a, t, slot in pairs if _slot_tensor(a, slot) is not None]
    # a persisted whole copy the target does not hold right now: gathered (rare)
    with _gathered([t for _, t, slot in pairs if slot == "whole" and _slot_tensor(t, slot) is None]):
        average = [_slot_tensor(a, slot) for a, _, slot in pairs] if master is None else master
        targets = [_slot_tensor(t, slot) for _, t, slot in pairs]
        targets = [t if t.dtype == x.dtype else t.to(x.dtype) for x, t in zip(average, targets)]
        torch._foreach_mul_(average, m)
        torch._foreach_add_(average, targets, alpha=1.0 - m)
    if master is not None:
        _write_average(anchor, master)


def _gathered(params: list):
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # heavy (seconds): only ZeRO-3 persisted parameters need it

    return deepspeed.zero.GatheredParameters(params)


@torch.no_grad()
def relative_distance(anchor: torch.nn.Module, target: torch.nn.Module) -> float:
    """||anchor - target|| / ||target|| over all parameters: how far an EMA anchor trails its
    target. Under ZeRO-3 each rank sums its own shards and the sums are added over ranks
    (collective: every rank calls it)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for a, t in zip(anchor.parameters(), target.parameters()):
        a_data, t_data = (a.ds_tensor, t.ds_tensor) if hasattr(a, "ds_tensor") else (a.data, t.data)
        t_data = t_data.double()
        sums += torch.stack([(a_data.double() - t_data).square().sum().cpu(), t_data.square().sum().cpu()])
    if any(hasattr(p, "ds_tensor") for p in target.parameters()):
        sums = distributed.all_reduce_sum(sums.to(distributed.device())).cpu()
    return float(sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30))


def anchor_metrics(branches: list[Branch]) -> dict[str, float]:
    """Logged with every metric line of a run with an EMA anchor: its distance to the target."""
    ema = [br for br in branches if br.role == EMA]
    return {"anchor/distance": relative_distance(ema[0].module, branches[TARGET].module)} if ema else {}


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype

