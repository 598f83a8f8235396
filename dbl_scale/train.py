"""One training run, top to bottom: shards -> towers -> embeddings -> gathered scores ->
losses -> DeepSpeed step -> (anchor update) -> MLflow; evaluation at the end.

Launch on one machine with 2 CPU ranks:
    torchrun --standalone --nproc_per_node 2 -m dbl_scale.train --config dbl_scale/presets/demo.yaml loss.method=dbl
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint, distributed
from .config import Config, flatten, load_config, save_config, to_dict
from .data import TrainLoader, ensure_tokenizer, load_eval_split
from .eval import embed_split, format_table, protocol_metrics
from .methods import KeyQueues, branch_roles, compute_losses, frozen_checkpoint, method_heads
from .models import DualEncoder, FrozenEncoders
from .tracking import Tracker

log = logging.getLogger("dbl_scale")


# ----------------------------------------------------------------------------- set-up pieces

def seed_everything(seed: int) -> None:
    """The same seed on every rank: towers start identical, as data parallelism requires."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_ds_config(path: str) -> Path:
    """A DeepSpeed JSON path, relative to the working directory or to the dbl_scale checkout."""
    for candidate in (Path(path), Path(__file__).resolve().parents[1] / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"train.deepspeed: no DeepSpeed config at '{path}'")


def deepspeed_config(cfg: Config, world: int) -> dict:
    """Read the JSON of `train.deepspeed` (or, under `accelerate launch` with a DeepSpeed YAML,
    the file that YAML names) and fill its "auto" values from our config."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or cfg.train.deepspeed
    ds = json.loads(resolve_ds_config(path).read_text())
    fills = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fills.items():
        if ds.get(key) == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":
        ds["train_batch_size"] = cfg.data.batch_size * world * ds["gradient_accumulation_steps"]
    params = ds.get("optimizer", {}).get("params", {})
    opt_fills = {"lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                 "weight_decay": cfg.optim.weight_decay,
                 "torch_adam": not torch.cuda.is_available()}  # DeepSpeed's CPU Adam JIT-compiles for minutes
    for key, value in opt_fills.items():
        if params.get(key) == "auto":
            params[key] = value
    leftover = [k for k, v in flatten(ds).items() if v == "auto"]
    if leftover:
        raise ValueError(f"{cfg.train.deepspeed}: cannot fill 'auto' for {leftover}")
    return ds


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


def momentum_at(step: int, total: int, m0: float) -> float:
    """Cosine schedule of the EMA momentum, from m0 at step 0 up to 1 at the last step."""
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / max(1, total)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(anchor: torch.nn.Module, target: torch.nn.Module, m: float) -> None:
    """anchor <- m * anchor + (1 - m) * target, as two fused multi-tensor ops. Under ZeRO-3 both
    modules are partitioned the same way, so each rank updates its own shards (`ds_tensor`)
    and nothing is gathered."""
    anchors, targets = [], []
    for a, t in zip(anchor.parameters(), target.parameters()):
        if hasattr(a, "ds_tensor"):
            anchors.append(a.ds_tensor)
            targets.append(t.ds_tensor)
            if getattr(a, "ds_persist", False):  # small parameters ZeRO-3 keeps whole on every rank
                anchors.append(a.data)
                targets.append(t.data)
        else:
            anchors.append(a.data)
            targets.append(t.detach())
    targets = [t if t.dtype == a.dtype else t.to(a.dtype) for a, t in zip(anchors, targets)]
    torch._foreach_mul_(anchors, m)
    torch._foreach_add_(anchors, targets, alpha=1.0 - m)


# ----------------------------------------------------------------------------- branches

@dataclass
class Branch:
    """One branch: a DeepSpeed engine when it trains, else a plain module without gradient."""
    role: str  # "trained", "ema" or "frozen" (methods.branch_roles)
    module: torch.nn.Module
    engine: Any = None
    scheduler: Any = None
    partitioner: Any = None  # ZeRO-3 EMA anchor: the optimizer-less engine that shards `module`


def is_zero3(ds: Optional[dict]) -> bool:
    return bool(ds) and ds.get("zero_optimization", {}).get("stage") == 3


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
    import deepspeed
    import torch._dynamo  # noqa: F401  imported lazily by transformers; its import fails under zero.Init's patches
    from transformers.integrations import HfDeepSpeedConfig

    hf_config = HfDeepSpeedConfig(ds)  # transformers holds a weak reference: ZeRO-3 while it lives
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds):
            yield
    finally:
        del hf_config


def new_model(cfg: Config, tokenizer, index: int, teacher_dims=None, ds: Optional[dict] = None) -> DualEncoder:
    """Branch `index`'s initial towers (and the method's heads): the same on every rank,
    different between branches. With a ZeRO-3 `ds` config the model is built partitioned."""
    torch.manual_seed(cfg.train.seed + 1000 * index)
    temperature = cfg.loss.infonce.temperature if cfg.loss.method == "infonce" else None
    with partitioned(ds):
        model = DualEncoder(cfg.model, tokenizer, temperature, cfg.loss.infonce.max_logit_scale,
                            heads=method_heads(cfg, teacher_dims))
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


def build_branches(cfg: Config, tokenizer, world: int) -> list[Branch]:
    """One Branch per role of the method (methods.branch_roles), the target last. Under ZeRO-3
    every branch is built partitioned (`partitioned`): the trained ones, the anchors and
    the teachers."""
    import deepspeed

    ds = deepspeed_config(cfg, world)
    roles = branch_roles(cfg.loss)
    frozen, teacher_dims = None, None
    sc = cfg.loss.structure
    if "frozen" in roles and cfg.loss.method == "structure" and not sc.teacher:
        with partitioned(ds):  # the HF folders load straight into ZeRO-3 shards
            frozen = FrozenEncoders(sc.teacher_vision, sc.teacher_text)
        teacher_dims = frozen.dims
    elif "frozen" in roles:
        frozen = load_model(frozen_checkpoint(cfg.loss), tokenizer, ds)
        teacher_dims = (frozen.vision_proj.out_features, frozen.text_proj.out_features)
    modules = []
    for k, role in enumerate(roles):
        if role == "frozen":
            modules.append(frozen)
        elif cfg.loss.method == "dbl" and cfg.loss.dbl.scenario == "offline" and role == "trained":
            modules.append(load_model(frozen_checkpoint(cfg.loss), tokenizer, ds))  # the target starts from the anchor
        else:  # an EMA is built as the target (index 0) and set equal to it below
            modules.append(new_model(cfg, tokenizer, k if "ema" not in roles else 0, teacher_dims, ds))
    if cfg.train.init_from:  # e.g. continue a baseline from the checkpoint an offline anchor uses
        _, start = read_run(cfg.train.init_from, "train.init_from: ")
        for role, module in zip(roles, modules):
            if role == "trained":  # towers must match; a method's own heads keep their init
                missing, unexpected = checkpoint.load_weights(module, start, strict=False)
                towers = [k for k in missing + unexpected if not k.startswith(("heads.", "log_logit_scale"))]
                if towers:
                    raise ValueError(f"train.init_from {cfg.train.init_from}: towers differ: {towers[:5]}")

    branches = []
    for role, module in zip(roles, modules):
        if role == "trained":
            groups = param_groups(module, cfg)
            engine, _, _, scheduler = deepspeed.initialize(
                model=module, model_parameters=groups, config=ds,
                lr_scheduler=lambda opt, g=groups: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, g)))
            branches.append(Branch(role, engine.module, engine, scheduler))
        else:
            branches.append(Branch(role, module))
    target = branches[-1].engine
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
            br.module.to(target.device, dtype=_dtype(target.module))
        if br.role == "ema":
            ema_update(br.module, target.module, 0.0)  # the EMA starts equal to the target
    return branches


class OfflineHardNegatives:
    """AOQ's loader side: mined candidates of the training split (from `loss.aoq.candidates`,
    or mined at start with the starting towers), refreshed with the current target every
    `refresh_epochs`; `extend` appends each pair's offline negatives to the batch."""

    def __init__(self, cfg: Config, model, tokenize, rank: int):
        from .mining import Candidates, OfflineNegatives

        self.cfg, self.tokenize = cfg, tokenize
        a = cfg.loss.aoq
        candidates = Candidates.load(a.candidates) if a.candidates else self._mine(model)
        self.sampler = OfflineNegatives(candidates, cfg.data.root, cfg.data.train_split,
                                        cfg.model.vision.image_size, a.n_max)
        self.generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)

    def _mine(self, model):
        from .mining import mine

        a = self.cfg.loss.aoq
        return mine(model, self.cfg.data.root, self.cfg.data.train_split, self.cfg.model.vision.image_size,
                    self.tokenize, self.cfg.eval.batch_size, a.k_captions, a.k_images)

    def refresh(self, model) -> None:
        t0 = time.time()
        self.sampler.update(self._mine(model))
        log.info("AOQ candidates re-mined with the current target in %.1fs", time.time() - t0)

    def state_dict(self) -> dict:
        return {"candidates": self.sampler.candidates}

    def load_state_dict(self, state: dict, generator_state: torch.Tensor) -> None:
        self.sampler.update(state["candidates"])
        self.generator.set_state(generator_state)

    def extend(self, batch: dict) -> dict:
        """Images become [I, I-, I_{T-}], captions [T, T-, T_{I-}] (3B each); ids stay B."""
        neg = self.sampler.sample(batch["image_ids"], batch["caption_index"], self.generator)
        t_neg, t_ineg = self.tokenize(neg["captions_tneg"]), self.tokenize(neg["captions_tineg"])
        out = dict(batch)
        out["pixel_values"] = torch.cat([batch["pixel_values"], neg["pixels_ineg"], neg["pixels_itneg"]])
        for key in ("input_ids", "attention_mask"):
            out[key] = torch.cat([batch[key], t_neg[key], t_ineg[key]])
        return out


# ----------------------------------------------------------------------------- the step

def ema_momentum(cfg: Config, step: int) -> float:
    if cfg.loss.method == "coder":
        return cfg.loss.coder.momentum  # constant, as MoCo's key encoders
    return momentum_at(step, cfg.train.steps, cfg.loss.dbl.momentum)


def train_step(cfg: Config, branches: list[Branch], batch: dict, step: int,
               queues: Optional[KeyQueues] = None, boundary: bool = True) -> dict[str, torch.Tensor]:
    """Forward every branch, take each trained branch's loss, backward and step its engine
    (DeepSpeed applies the update at the last micro-batch of an accumulation, `boundary`)."""
    target = branches[-1]
    dev = target.engine.device
    pixels = batch["pixel_values"].to(dev, _dtype(target.module), non_blocking=True)
    input_ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    outs = []
    for br in branches:
        if br.engine is not None:
            outs.append(br.engine(pixels, input_ids, mask))
        elif isinstance(br.module, FrozenEncoders):  # reads the raw captions
            with torch.no_grad():
                outs.append(br.module(pixels, captions=batch["captions"]))
        else:
            with torch.no_grad():
                outs.append(br.module(pixels, input_ids, mask))
    terms = compute_losses(cfg, outs, batch["image_ids"].to(dev), step, queues)
    # Gradients are averaged over ranks by DeepSpeed; each loss is a per-rank share of a sum,
    # so scaling by the world size gives exactly the single-process gradient.
    for br, t in zip(branches, terms):
        if t is not None:
            br.engine.backward(t["loss"] * distributed.world_size())
    for br in branches:
        if br.engine is not None:
            br.engine.step()
    for br in branches:
        if br.role == "ema" and boundary:
            ema_update(br.module, target.module, ema_momentum(cfg, step + 1))
    if queues is not None:  # enqueue this step's keys of all ranks (gathered by the loss)
        queues.commit()
    logged = {}
    for k, t in enumerate(terms):
        if t is not None:  # the target's terms as they are, other trained branches' with a prefix
            prefix = "" if k == len(branches) - 1 else f"branch{k}/"
            logged.update({prefix + name: v.detach() for name, v in t.items()})
    if outs[-1].logit_scale is not None:
        # the same on every rank; the log step adds ranks up, so each contributes its share
        logged["logit_scale"] = outs[-1].logit_scale.detach().squeeze() / distributed.world_size()
    return logged


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def save_model(engine, path: Path) -> None:
    """The target's weights for `load_model` and export, written atomically. Under ZeRO-3 the
    shards are gathered (collective: every rank calls this)."""
    tmp = path.with_name(path.name + ".tmp")
    engine.save_16bit_model(str(path.parent), tmp.name)
    if distributed.is_main():
        os.replace(tmp, path)
    distributed.barrier()


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg: Config, model, tokenize, split: str, report_to: Optional[tuple] = None) -> dict[str, float]:
    """Retrieval metrics of `model` on a split (embedded on all ranks, in image-id order).
    `report_to=(tracker, folder)`: rank 0 also writes the recall@K plot and the HTML page of
    sample queries and logs them to the run."""
    was_training = model.training
    model.eval()
    pixels, ids, captions = load_eval_split(cfg.data.root, split, cfg.model.vision.image_size,
                                            distributed.rank(), distributed.world_size())
    img, txt, all_ids = embed_split(model, pixels, captions, ids, tokenize, cfg.eval.batch_size)
    model.train(was_training)
    protocol = cfg.eval.protocol if split == cfg.data.eval_split else "standard"
    metrics, ranks = protocol_metrics(img, txt, protocol, return_ranks=True)
    if report_to is not None and distributed.is_main():
        from .report import log_reports
        thumbs, caps = load_thumbnails(cfg.data.root, split, all_ids)
        log_reports(report_to[0], report_to[1], thumbs, caps, img @ txt.t(), metrics, ranks, split=split)
    return metrics


def load_thumbnails(root, split: str, ids: torch.Tensor, size: int = 96):
    """Small PIL images and the captions of a split, in the order of `ids` (for reports)."""
    import io

    from PIL import Image
    from webdataset.tariterators import tarfile_samples

    from .data import split_shards

    want = {int(i): n for n, i in enumerate(ids.tolist())}
    images, captions = [None] * len(want), [None] * len(want)
    for url in split_shards(root, split)[0]:
        for sample in tarfile_samples([{"url": url}]):
            meta = json.loads(sample["json"])
            row = want.get(int(meta["image_id"]))
            if row is not None:
                with Image.open(io.BytesIO(sample["jpg"])) as im:
                    images[row] = im.convert("RGB").resize((size, size))
                captions[row] = meta["captions"][:5]
    return images, [c for caps in captions for c in caps]


# ----------------------------------------------------------------------------- the run

class StepMeter:
    """Adds up each step's loss terms; at a log step sums them over ranks (each rank holds a
    share of the global loss), averages over the steps since the last log, and reports."""

    def __init__(self, cfg: Config, tracker: Tracker, run_name: str, world: int, loader, scheduler, branches):
        self.cfg, self.tracker, self.run_name, self.world = cfg, tracker, run_name, world
        self.loader, self.scheduler = loader, scheduler
        self.has_ema = any(br.role == "ema" for br in branches)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.t_last = 0, time.time()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def log(self, step: int, t_start: float, start_step: int = 0) -> None:
        cfg = self.cfg
        names = sorted(self.sums)
        totals = distributed.all_reduce_sum(torch.stack([self.sums[k] for k in names]).float())
        skipped = int(distributed.all_reduce_sum(torch.tensor([float(self.loader.skipped)])).item())
        elapsed = time.time() - self.t_last
        metrics = {k: totals[i].item() / self.steps for i, k in enumerate(names)}
        lrs = self.scheduler.get_last_lr()  # per group: towers first, heads last (param_groups)
        metrics.update({"lr": lrs[-1], "lr/towers": lrs[0], "epoch": step / self.loader.steps_per_epoch,
                        "samples_per_s": self.steps * self.world * cfg.data.batch_size / elapsed,
                        "data/skipped": skipped})
        if self.has_ema:
            metrics["momentum"] = ema_momentum(cfg, step)
        self.tracker.log_metrics(metrics, step)
        if step % cfg.tracking.flush_every < cfg.train.log_every:
            self.tracker.flush()
        if distributed.is_main():
            eta = (time.time() - t_start) / max(1, step - start_step) * (cfg.train.steps - step)
            parts = " ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in names if k.startswith("loss/"))
            print(f"[{self.run_name}] step {step}/{cfg.train.steps} | loss {metrics['loss']:.3f} ({parts}) "
                  f"| lr {metrics['lr']:.2e} | {metrics['samples_per_s']:.0f} samples/s "
                  f"| ETA {_fmt_seconds(eta)}", flush=True)
        self.sums, self.steps, self.t_last = {}, 0, time.time()


def _fmt_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 60}m{s % 60:02d}s"


def train(cfg: Config) -> dict:
    """Train one run; returns the final evaluation metrics (on every rank)."""
    import deepspeed

    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    seed_everything(cfg.train.seed)

    if rank == 0:
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)  # builds it once when missing
    distributed.barrier()
    if rank != 0:
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)

    branches = build_branches(cfg, tokenizer, world)
    engine, scheduler = branches[-1].engine, branches[-1].scheduler  # the target
    queues = None
    if cfg.loss.method == "coder":
        queues = KeyQueues(cfg.loss.coder.queue_size, cfg.model.embed_dim, engine.device)

    loader = TrainLoader(cfg.data, cfg.model.vision.image_size, tokenizer, cfg.model.text.max_length,
                         rank, world, cfg.train.seed)

    def tokenize(texts):
        return loader.tokenize(texts)

    offline = OfflineHardNegatives(cfg, engine.module, tokenize, rank) if cfg.loss.method == "aoq" else None

    run_name = cfg.tracking.run_name or f"{cfg.loss.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.output_dir) / run_name
    ckpt_root = run_dir / "checkpoints"
    resume_from = checkpoint.resolve(ckpt_root, cfg.checkpoint.resume) if cfg.checkpoint.resume else None
    start_step, resumed_best_val = 0, float("-inf")
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, enabled=rank == 0)
    if resume_from is not None:
        state, rank_state = checkpoint.load(resume_from, branches)
        start_step, resumed_best_val = state["step"], state.get("best_val", float("-inf"))
        checkpoint.set_rng_state(rank_state["rng"])
        if queues is not None:
            queues.load_state_dict(state["queues"])
        if offline is not None:
            offline.load_state_dict(state["aoq"], rank_state["aoq_generator"])
        tracker.resume(state["mlflow_run_id"])
        log.info("resumed %s from %s (step %d)", run_name, resume_from, start_step)
    elif rank == 0:
        if cfg.checkpoint.resume:
            log.info("no checkpoint under %s yet: starting %s from step 0", ckpt_root, run_name)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(engine.config, indent=2, default=str))
        tracker.start(run_name, flatten(to_dict(cfg)),
                      tags={"method": cfg.loss.method, "world_size": str(world),
                            "zero_stage": str(engine.zero_optimization_stage()),
                            "branches": ",".join(br.role for br in branches)})
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "ds_config.json")
        (run_dir / "run.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id,
                                                      "tracking_uri": cfg.tracking.uri}) + "\n")
    if rank == 0:
        log.info("run %s: %d ranks x batch %d, %d steps (%d per epoch), ZeRO-%d, MLflow %s run %s",
                 run_name, world, cfg.data.batch_size, cfg.train.steps, loader.steps_per_epoch,
                 engine.zero_optimization_stage(), cfg.tracking.uri, tracker.run_id)

    def save_checkpoint(step: int) -> None:
        tracker.flush()  # the metric history up to this step is in MLflow before the checkpoint exists
        state = {"step": step, "mlflow_run_id": tracker.run_id, "best_val": best_val,
                 "queues": queues.state_dict() if queues is not None else None,
                 "aoq": offline.state_dict() if offline is not None else None}
        rank_state = {"rng": checkpoint.rng_state(),
                      "aoq_generator": offline.generator.get_state() if offline is not None else None}
        path = checkpoint.save(ckpt_root, step, branches, state, rank_state, cfg.checkpoint.keep)
        if rank == 0:
            log.info("checkpoint %s", path)

    def validate(step: int, best: float) -> float:
        """Validation rSum; a new best is saved to <run>/best/ (the model selected on val)."""
        val = evaluate(cfg, engine.module, tokenize, cfg.eval.val_split)
        tracker.log_metrics({f"val/{k}": v for k, v in val.items()}, step)
        if val["rsum"] > best:
            best = val["rsum"]
            if rank == 0:
                (run_dir / "best").mkdir(exist_ok=True)
                save_config(cfg, run_dir / "best" / "config.yaml")
                (run_dir / "best" / "step.txt").write_text(f"{step}\n")
            save_model(engine, run_dir / "best" / "model.pt")
            tracker.log_metrics({"val/best_rsum": best}, step)
        return best

    best_val = resumed_best_val
    meter = StepMeter(cfg, tracker, run_name, world, loader, scheduler, branches)
    status = "FAILED"
    try:
        step = start_step
        t_start = time.time()
        spe, gas = loader.steps_per_epoch, cfg.train.grad_accum
        micro = step * gas  # loader batches consumed so far
        # a resumed stream starts at its epoch and skips the batches already trained on
        batches = itertools.islice(loader.batches(start_epoch=micro // spe), micro % spe, None)
        for batch in batches:
            if step >= cfg.train.steps:
                break
            if offline is not None:
                if micro and cfg.loss.aoq.refresh_epochs and micro % (spe * cfg.loss.aoq.refresh_epochs) == 0:
                    offline.refresh(engine.module)
                batch = offline.extend(batch)
            micro += 1
            boundary = micro % gas == 0
            meter.add(train_step(cfg, branches, batch, step, queues, boundary))
            if not boundary:
                continue
            step += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                meter.log(step, t_start, start_step)
            if cfg.eval.every and step % cfg.eval.every == 0:
                best_val = validate(step, best_val)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                save_checkpoint(step)
            if cfg.checkpoint.stop_at is not None and step == cfg.checkpoint.stop_at < cfg.train.steps:
                if not (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    save_checkpoint(step)
                status = "KILLED"  # stopped on purpose, to be resumed
                distributed.barrier()
                return {}
        train_seconds = time.time() - t_start
        if cfg.checkpoint.at_end:
            save_checkpoint(step)
        save_model(engine, run_dir / "model.pt")

        results: dict = {}
        if cfg.eval.at_end:
            t_eval = time.time()
            results = evaluate(cfg, engine.module, tokenize, cfg.data.eval_split, (tracker, run_dir / "reports"))
            split = cfg.data.eval_split
            tracker.log_metrics({f"{split}/{k}": v for k, v in results.items()}, step)
            if (run_dir / "best" / "model.pt").exists():  # the model chosen on validation, on test
                best_model = load_model(run_dir / "best", tokenizer).to(engine.device)
                best = evaluate(cfg, best_model, tokenize, split)
                tracker.log_metrics({f"best/{split}/{k}": v for k, v in best.items()}, step)
            tracker.log_metrics({"train_seconds": train_seconds, "eval_seconds": time.time() - t_eval}, step)
            if rank == 0:
                print(f"\n[{run_name}] retrieval on the {split} split\n"
                      + format_table({cfg.loss.method: results}), flush=True)
                (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
                tracker.log_artifact(run_dir / "metrics.json")
        status = "FINISHED"
        distributed.barrier()
        return results
    finally:  # no collective here: after a failure on one rank the launcher stops the others
        tracker.finish(status)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbl_scale.train",
                                     description="Train one run (start it with torchrun, deepspeed or accelerate).")
    parser.add_argument("--config", help="YAML config (defaults apply to anything it leaves out)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.method=dbl data.batch_size=64")
    # the `deepspeed` launcher appends --local_rank=N; the LOCAL_RANK environment variable says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    faulthandler.enable()  # a native crash prints the Python stack of every thread
    # DeepSpeed 0.19 calls a torch collective that torch 2.13 marks deprecated, on every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = load_config(args.config, args.overrides)  # validated before any process group starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
