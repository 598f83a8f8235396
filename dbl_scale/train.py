"""One training run, top to bottom: shards -> towers -> embeddings -> gathered scores ->
losses -> DeepSpeed step -> (anchor update) -> MLflow; evaluation at the end.

Launch on one machine with 2 CPU ranks:
    torchrun --standalone --nproc_per_node 2 -m dbl_scale.train --config configs/demo.yaml loss.method=dbl
"""
from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import Config, flatten, load_config, save_config, to_dict
from .data import TrainLoader, ensure_tokenizer, load_eval_split
from .eval import embed_split, format_table, retrieval_metrics
from .losses import Scores, boost_absolute, boost_relative, hinge_triplet
from .models import DualEncoder
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
    """Read the JSON of `train.deepspeed` and fill its "auto" values from our config."""
    ds = json.loads(resolve_ds_config(cfg.train.deepspeed).read_text())
    fills = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "train_batch_size": cfg.data.batch_size * world * ds.get("gradient_accumulation_steps", 1),
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fills.items():
        if ds.get(key) == "auto":
            ds[key] = value
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


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: Config):
    warmup, total = cfg.optim.warmup_steps, cfg.train.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def momentum_at(step: int, total: int, m0: float) -> float:
    """Cosine schedule of the EMA momentum, from m0 at step 0 up to 1 at the last step."""
    return 1.0 - (1.0 - m0) * (math.cos(math.pi * step / max(1, total)) + 1.0) / 2.0


@torch.no_grad()
def ema_update(anchor: torch.nn.Module, target: torch.nn.Module, m: float) -> None:
    """anchor <- m * anchor + (1 - m) * target, on full parameters (ZeRO 0-2)."""
    for a, t in zip(anchor.parameters(), target.parameters()):
        a.mul_(m).add_(t.detach().to(a.dtype), alpha=1.0 - m)


# ----------------------------------------------------------------------------- the step

def compute_losses(cfg: Config, img, txt, image_ids, anchor_img=None, anchor_txt=None,
                   step: int = 0) -> dict[str, torch.Tensor]:
    """Loss terms of this rank's queries against the candidates of all ranks.

    Each term is a sum over this rank's queries; summed over ranks it equals the
    single-process loss of the concatenated batch ("loss" is what is optimised).
    """
    lc = cfg.loss
    ids = image_ids if lc.mask_same_image else None
    max_violation = lc.max_violation and step >= lc.sum_warmup_steps
    scores = Scores.gathered(img, txt, ids, with_grad=True)
    raw = hinge_triplet(scores, lc.margin, max_violation)
    terms = {"loss/raw": raw, "loss": raw}
    if lc.method == "dbl":
        anchor = Scores.gathered(anchor_img, anchor_txt, ids, with_grad=False)
        if lc.dbl.boost == "relative":
            boost = boost_relative(scores, anchor, lc.margin, lc.dbl.beta, max_violation=max_violation)
        else:
            boost = boost_absolute(scores, anchor, lc.margin, lc.dbl.beta, lc.dbl.gamma,
                                   max_violation=max_violation)
        terms["loss/boost"] = boost
        terms["loss"] = raw + lc.dbl.alpha * boost
    return terms


def train_step(cfg: Config, engine, anchor, batch: dict, step: int) -> dict[str, torch.Tensor]:
    dev = engine.device
    pixels = batch["pixel_values"].to(dev, non_blocking=True)
    input_ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    img, txt = engine(pixels, input_ids, mask)
    anchor_img = anchor_txt = None
    if anchor is not None:
        with torch.no_grad():
            anchor_img, anchor_txt = anchor(pixels.to(_dtype(anchor)), input_ids, mask)
    terms = compute_losses(cfg, img, txt, batch["image_ids"].to(dev), anchor_img, anchor_txt, step)
    # Gradients are averaged over ranks by DeepSpeed; the loss is a per-rank share of a sum,
    # so scaling by the world size gives exactly the single-process gradient.
    engine.backward(terms["loss"] * distributed.world_size())
    engine.step()
    if anchor is not None:
        ema_update(anchor, engine.module, momentum_at(step + 1, cfg.train.steps, cfg.loss.dbl.momentum))
    return {k: v.detach() for k, v in terms.items()}


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# ----------------------------------------------------------------------------- evaluation

def evaluate(cfg: Config, model, tokenize, split: str) -> dict[str, float]:
    """Standard-protocol retrieval metrics of `model` on a split, computed on all ranks."""
    was_training = model.training
    model.eval()
    pixels, ids, captions = load_eval_split(cfg.data.root, split, cfg.model.vision.image_size,
                                            distributed.rank(), distributed.world_size())
    img, txt, _ = embed_split(model, pixels, captions, ids, tokenize, cfg.eval.batch_size)
    model.train(was_training)
    return retrieval_metrics(img @ txt.t(), captions_per_image=5)


# ----------------------------------------------------------------------------- the run

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

    model = DualEncoder(cfg.model, tokenizer)
    anchor = copy.deepcopy(model) if cfg.loss.method == "dbl" else None  # EMA starts at the target
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    if anchor is not None:
        if engine.zero_optimization_stage() == 3:
            raise NotImplementedError("the momentum anchor under ZeRO-3 is not supported yet; use ZeRO 0-2")
        anchor.to(engine.device, dtype=_dtype(engine.module)).eval().requires_grad_(False)

    loader = TrainLoader(cfg.data, cfg.model.vision.image_size, tokenizer, cfg.model.text.max_length,
                         rank, world, cfg.train.seed)

    def tokenize(texts):
        return loader.tokenize(texts)

    run_name = cfg.tracking.run_name or f"{cfg.loss.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.train.output_dir) / run_name
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, enabled=rank == 0)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "ds_config.json").write_text(json.dumps(engine.config, indent=2, default=str))
        tracker.start(run_name, flatten(to_dict(cfg)),
                      tags={"method": cfg.loss.method, "world_size": str(world),
                            "zero_stage": str(engine.zero_optimization_stage())})
        tracker.log_artifact(run_dir / "config.yaml")
        tracker.log_artifact(run_dir / "ds_config.json")
        log.info("run %s: %d ranks x batch %d, %d steps (%d per epoch), ZeRO-%d, MLflow %s run %s",
                 run_name, world, cfg.data.batch_size, cfg.train.steps, loader.steps_per_epoch,
                 engine.zero_optimization_stage(), cfg.tracking.uri, tracker.run_id)

    status = "FAILED"
    try:
        step = 0
        sums: dict[str, torch.Tensor] = {}
        t_start = t_log = time.time()
        steps_since_log = 0
        for batch in loader.batches(start_epoch=0):
            terms = train_step(cfg, engine, anchor, batch, step)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            step += 1
            steps_since_log += 1
            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                names = sorted(sums)
                # loss terms are per-rank shares of a sum: add over ranks, average over steps
                totals = distributed.all_reduce_sum(torch.stack([sums[k] for k in names]).float())
                skipped = int(distributed.all_reduce_sum(torch.tensor([float(loader.skipped)])).item())
                elapsed = time.time() - t_log
                metrics = {k: totals[i].item() / steps_since_log for i, k in enumerate(names)}
                metrics.update({"lr": scheduler.get_last_lr()[0], "epoch": step / loader.steps_per_epoch,
                                "samples_per_s": steps_since_log * world * cfg.data.batch_size / elapsed,
                                "data/skipped": skipped})
                if anchor is not None:
                    metrics["momentum"] = momentum_at(step, cfg.train.steps, cfg.loss.dbl.momentum)
                tracker.log_metrics(metrics, step)
                if step % cfg.tracking.flush_every < cfg.train.log_every:
                    tracker.flush()
                if rank == 0:
                    eta = (time.time() - t_start) / step * (cfg.train.steps - step)
                    parts = " ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in names if k != "loss")
                    print(f"[{run_name}] step {step}/{cfg.train.steps} | loss {metrics['loss']:.3f} ({parts}) "
                          f"| lr {metrics['lr']:.2e} | {metrics['samples_per_s']:.0f} samples/s "
                          f"| ETA {_fmt_seconds(eta)}", flush=True)
                sums, steps_since_log, t_log = {}, 0, time.time()
            if step >= cfg.train.steps:
                break
        train_seconds = time.time() - t_start

        results: dict = {}
        if cfg.eval.at_end:
            t_eval = time.time()
            results = evaluate(cfg, engine.module, tokenize, cfg.data.eval_split)
            split = cfg.data.eval_split
            tracker.log_metrics({f"{split}/{k}": v for k, v in results.items()}, step)
            tracker.log_metrics({"train_seconds": train_seconds, "eval_seconds": time.time() - t_eval}, step)
            if rank == 0:
                print(f"\n[{run_name}] retrieval on the {split} split\n"
                      + format_table({cfg.loss.method: results}), flush=True)
                (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
                tracker.log_artifact(run_dir / "metrics.json")
        status = "FINISHED"
        return results
    finally:
        tracker.finish(status)
        distributed.barrier()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbl_scale.train",
                                     description="Train one run (start it with torchrun, deepspeed or accelerate).")
    parser.add_argument("--config", help="YAML config (defaults apply to anything it leaves out)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.method=dbl data.batch_size=64")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a native crash prints the Python stack of every thread
    # DeepSpeed 0.19 calls a torch collective that torch 2.13 marks deprecated, on every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    cfg = load_config(args.config, args.overrides)  # validated before any process group starts
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
