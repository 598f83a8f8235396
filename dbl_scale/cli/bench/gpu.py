"""`dbl-scale bench gpu` (`make gpu-check`): the GPU path, run for real in one command.

GPU time is short and rare, so this is one prepared check that prints one table and writes
JSON; every part is guarded, so one that fails leaves the others' figures.

  (a) the demo preset end to end on one rank: NCCL, bf16, zero2_gpu, the demo's steps at its
      global batch (2 ranks x 32 -> 1 x 64), then the evaluation; its loss curve and rSum
      against the CPU seeds recorded in presets/demo_seeds.json; MLflow's GPU system metrics.
  (b) throughput at real sizes: ViT-B/16 + BERT-base built from configs, 224 px, 32 tokens,
      bf16, the largest batch that fits; the triplet and DBL momentum under ZeRO-2 and ZeRO-3:
      samples/s, MFU (FLOPs counted on the model, against the chip's dense bf16 peak), peak
      memory, and the ratio to a bare PyTorch loop of the same model and loss (autocast bf16,
      fused AdamW) measured in the same run.
  (c) the GPU-side parts: evaluation of 5K images x 25K captions and mining of 100K x 500K.
  (d) CPU vs device: the same batch's losses and gradients in fp32 (TF32 off), per method.
  (e) the CUDA-only paths: the NCCL reduce-scatter backward of the gathered negatives, CUDA
      RNG state through a checkpoint, pinned uint8 batches normalised on the device (the same
      bits as on the host), torch's fused AdamW inside DeepSpeed.

`--dry-run` (implied on a machine without CUDA): the same code with tiny towers and sizes, 2
steps; on the CPU over gloo, the test suite runs it. Parts (b)-(e) run in one rank process (`MODULE`), part (a)
as a real `dbl-scale train` run.

    make gpu-check                                  # on the GPU machine (wheels: make gpu-wheels)
    dbl-scale bench gpu --json runs/gpu_check.json  # the same, in an environment that has everything
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from ... import distributed
from ...branches import build_branches, ema_update, new_model
from ...checkpoint import rng_state, safe_load, set_rng_state
from ...config import load_config, resolve_config
from ...data import TrainLoader
from ...preprocess import image_transform
from ...tokenizer import ensure_tokenizer
from ...evaluation.metrics import protocol_metrics
from ...methods import EMA, TARGET, TRAINED, build_method
from ...mining import top_candidates
from ...run import where_tags
from ...train import in_float32, train_step
from ..data import prepare_data
from ..launch import config_args, run_ranks
from ..train import MODULE as TRAIN
from .common import MIB, machine_line, release

MODULE = "dbl_scale.cli.bench.gpu"
SEEDS_FILE = Path(__file__).resolve().parents[2] / "presets" / "demo_seeds.json"

# dense bf16 peak of the chip by its name (vendors' datasheets; SXM parts), for MFU
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "H800": 989.4e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362.05e12, "B200": 2250e12}
PARITY_LIMIT = 1e-5  # relative: ||device - cpu|| / ||cpu||, losses and every gradient
PARITY_METHODS = {  # the losses of every branch layout that needs no outside state
    "triplet": ["loss.method=triplet"],
    "triplet sum": ["loss.method=triplet", "loss.max_violation=false"],
    "infonce": ["loss.method=infonce"],
    "dbl momentum": ["loss.method=dbl", "loss.dbl.scenario=momentum"],
    "dbl online": ["loss.method=dbl", "loss.dbl.scenario=online"],
    "mutual learning": ["loss.method=mutual"],
}
THROUGHPUT = {"triplet": ["loss.method=triplet"], "dbl momentum": ["loss.method=dbl", "loss.dbl.scenario=momentum"]}
STEADY = ["loss.sum_warmup_steps=0"]  # every timed step is a steady-state step
TINY_TOWERS = ["model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden=32",
               "model.vision.layers=1", "model.vision.heads=2", "model.text.hidden=32", "model.text.layers=1",
               "model.text.heads=2", "model.embed_dim=32"]


class Sizes:
    """What each part runs: the real sizes on a GPU, tiny ones for the dry run."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.demo = ["train.steps=2", "data.batch_size=8", "train.log_every=1", "eval.batch_size=64"] if dry else \
            ["data.batch_size=64"]  # the CPU runs' global batch: 2 ranks x 32
        self.demo_data = ["data.build_train=128", "data.build_val=16", "data.build_test=40"] if dry else []
        self.towers = TINY_TOWERS if dry else []  # (b): the vitb16_bertbase preset as it is
        self.batch_cap = 8 if dry else 2048
        self.warmup, self.timed = (1, 2) if dry else (3, 12)
        self.eval_images, self.eval_dim = (200, 64) if dry else (5000, 1024)
        self.mine_images, self.mine_dim = (500, 64) if dry else (100_000, 1024)
        self.parity_batch = 4 if dry else 16


# ----------------------------------------------------------------------------- the command

def cmd_bench_gpu(args) -> int:
    dry = args.dry_run or not torch.cuda.is_available()
    sizes = Sizes(dry)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json or work / "gpu_check.json")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"machine": machine_line(dev), "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "commit": _commit(), "parts": {}}
    print(result["machine"], flush=True)
    print(f"bench gpu{' (dry run: tiny sizes)' if dry else ''}: parts {' '.join(args.parts)}; "
          f"work folder {work}", flush=True)
    t0 = time.time()
    demo_cfg = demo_config(work, sizes)
    prepare_data(demo_cfg)

    def save():
        result["wall_s"] = round(time.time() - t0, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=str))

    if "a" in args.parts:
        t1 = time.time()
        result["parts"]["a"] = _guarded(lambda: demo_on_device(work, sizes, dry))
        result["parts"]["a"]["seconds"] = round(time.time() - t1, 1)
        save()
    rest = [p for p in args.parts if p != "a"]
    if rest:  # the rank process writes each part's figures as it finishes it: a crash keeps the earlier ones
        out = json_path.with_name(json_path.stem + "_parts.json")
        out.unlink(missing_ok=True)
        rc = run_ranks(1, MODULE, ["--out", str(out), "--work", str(work), "--parts", *rest] + ["--dry-run"] * dry)
        parts = json.loads(out.read_text()) if out.exists() else {}
        for part in rest:
            if part not in parts:
                parts[part] = {"error": f"not reached: the rank process failed (exit {rc})"}
        result["parts"].update(parts)
    save()
    print("\n" + format_result(result), flush=True)
    print(f"bench wall time: {time.time() - t0:.0f}s; results written to {json_path}", flush=True)
    failed = [k for k, v in result["parts"].items() if not isinstance(v, dict) or "error" in v]
    return 1 if failed else 0


def _commit() -> Optional[str]:
    return where_tags().get("mlflow.source.git.commit")


def _guarded(fn: Callable[[], dict]) -> dict:
    """A part's figures, or its error (the last lines of the traceback): one failing part never
    costs the others' figures."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def demo_config(work: Path, sizes: Sizes, extra: tuple = ()):
    return load_config(resolve_config("demo"), [f"data.root={work / 'data'}", *sizes.demo_data, *extra])


# ----------------------------------------------------------------------------- (a) the demo on the device

def demo_on_device(work: Path, sizes: Sizes, dry: bool) -> dict:
    """The demo preset's triplet run, seed 0, on one rank of this machine (NCCL and bf16 under
    zero2_gpu on a GPU), then its evaluation; compared with the CPU seeds."""
    from mlflow.tracking import MlflowClient  # heavy (seconds)

    name = f"demo-triplet-{'dry' if dry else 'cuda'}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    overrides = [f"data.root={work / 'data'}", *sizes.demo_data, *sizes.demo, "loss.method=triplet", "train.seed=0",
                 "train.deepspeed=zero2_gpu", f"tracking.uri={uri}", "tracking.experiment=gpu_check",
                 f"tracking.run_name={name}", "tracking.system_metrics_s=2", f"train.output_dir={work / 'runs'}"]
    t0 = time.time()
    rc = run_ranks(1, TRAIN, config_args(resolve_config("demo"), overrides))
    wall = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"dbl-scale train exited with {rc}")
    run_dir = work / "runs" / name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    curve = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    system = sorted(k for k in run.data.metrics if k.startswith("system/"))
    out = {"run": name, "backend": "nccl" if torch.cuda.is_available() else "gloo", "wall_s": round(wall, 1), "rsum": metrics["rsum"], "metrics": metrics,
           "loss_curve": curve, "samples_per_s": run.data.metrics.get("samples_per_s"),
           "train_seconds": run.data.metrics.get("train_seconds"), "system_metrics": system,
           "gpu_system_metrics": [k for k in system if k.startswith("system/gpu")]}
    out.update(against_cpu_seeds(metrics["rsum"], curve))
    return out


def against_cpu_seeds(rsum: float, curve: dict[int, float], record: Optional[dict] = None) -> dict:
    """Where a run's rSum and loss curve sit among the CPU runs of the demo's triplet over seeds
    (`presets/demo_seeds.json`, "loss_curve": the curves and the rSums of the same runs):
    z = (value - mean) / std over the seeds, per log step."""
    record = record if record is not None else json.loads(SEEDS_FILE.read_text())
    cpu = record["loss_curve"]["triplet"]
    mean, std = statistics.mean(cpu["rsum"]), statistics.stdev(cpu["rsum"])
    zs = []
    for step, per_seed in zip(cpu["steps"], zip(*cpu["loss"])):
        if step in curve:
            m, s = statistics.mean(per_seed), statistics.stdev(per_seed)
            zs.append((curve[step] - m) / s if s > 0 else float("inf"))
    return {"cpu_rsum": cpu["rsum"], "rsum_z": (rsum - mean) / std, "loss_steps_compared": len(zs),
            "loss_z_max": max((abs(z) for z in zs), default=None), "loss_within_3std": sum(abs(z) <= 3 for z in zs)}


# ----------------------------------------------------------------------------- the rank process: (b)-(e)

def worker(args) -> int:
    distributed.init_distributed()
    dev = distributed.device()
    sizes = Sizes(args.dry_run)
    work = Path(args.work)
    cfg = demo_config(work, sizes)

    tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    parts = {}
    out = Path(args.out)
    steps = {"b": lambda: throughput(sizes, work, tokenizer, dev), "c": lambda: gpu_side_parts(sizes, dev),
             "d": lambda: parity(sizes, work, tokenizer, dev), "e": lambda: cuda_paths(sizes, work, tokenizer, dev)}
    for part in args.parts:
        t0 = time.time()
        parts[part] = _guarded(steps[part])
        parts[part]["seconds"] = round(time.time() - t0, 1)
        print(f"part ({part}) done in {parts[part]['seconds']:.0f}s", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(parts, indent=1, default=str))  # what is done survives a later crash
    distributed.shutdown()
    return 0


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def _timed(step: Callable[[int], object], warmup: int, timed: int, dev: torch.device) -> float:
    """Seconds per step: the mean over `timed` steps after `warmup` untimed ones."""
    for i in range(warmup):
        step(i)
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + timed):
        step(i)
    _sync(dev)
    return (time.perf_counter() - t0) / timed


def _batch(b: int, image_size: int, length: int, vocab: int, step: int, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {"pixel_values": torch.randn(b, 3, image_size, image_size, generator=g).to(dev),
            "input_ids": torch.randint(5, vocab, (b, length), generator=g).to(dev),
            "attention_mask": torch.ones(b, length, dtype=torch.long, device=dev),
            "image_ids": (torch.arange(b) + b * step).to(dev), "captions": None}


# --- (b) throughput

def throughput_config(sizes: Sizes, work: Path, method: list[str], stage: int, batch: int):
    return load_config(resolve_config("vitb16_bertbase"),
                       [f"data.root={work / 'data'}", f"data.batch_size={batch}", f"train.deepspeed=zero{stage}_gpu",
                        *STEADY, *method, *sizes.towers])


class BareLoop:
    """The same model and loss without DeepSpeed: fp32 weights, autocast bf16 (on a GPU), torch's
    fused AdamW, the same gradient clipping, and for DBL momentum the same anchor update."""

    def __init__(self, cfg, tokenizer, dev: torch.device):

        self.method, self.dev, self.cfg = build_method(cfg), dev, cfg
        self.model = new_model(cfg, tokenizer, 0).to(dev).train()
        self.anchor = None
        if EMA in self.method.roles:
            self.anchor = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                     eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                     fused=dev.type == "cuda")

    def step(self, batch: dict, step: int) -> torch.Tensor:
        args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.dev.type == "cuda"):
            outs = []
            if self.anchor is not None:
                with torch.no_grad():
                    outs.append(self.anchor(*args))
            outs.append(self.model(*args))
        # the losses in float32, as train_step takes them (outside autocast, which would run their products in bf16)
        loss = self.method.losses([in_float32(o) for o in outs], batch["image_ids"], step)[TARGET]["loss"]
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.anchor is not None:
            ema_update(self.anchor, self.model, self.method.momentum(step + 1))
        return loss.detach()


def model_flops(cfg, tokenizer, dev: torch.device) -> dict:
    """FLOPs per sample, counted by torch's FlopCounterMode on the model at batch 2: forward +
    backward (a trained branch), forward alone (an anchor)."""
    from torch.utils.flop_counter import FlopCounterMode


    model = new_model(cfg, tokenizer, 0).to(dev)
    v, t = cfg.model.vision, cfg.model.text
    batch = _batch(2, v.image_size, t.max_length, len(tokenizer), 0, dev)
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(*args)
    forward = counter.get_total_flops() / 2
    with FlopCounterMode(display=False) as counter:
        out = model(*args)
        (out.img.sum() + out.txt.sum()).backward()
    del model
    return {"forward": forward, "train": counter.get_total_flops() / 2}


def _bare_peak(cfg, tokenizer, dev, batch: int) -> int:
    _reset_peak(dev)
    loop = BareLoop(cfg, tokenizer, dev)
    v, t = cfg.model.vision, cfg.model.text
    for step in range(2):
        loop.step(_batch(batch, v.image_size, t.max_length, len(tokenizer), step, dev), step)
    _sync(dev)
    del loop
    return _peak(dev)


def largest_batch(sizes: Sizes, work: Path, tokenizer, dev: torch.device) -> tuple[int, str]:
    """The largest batch (a multiple of 32, at most `batch_cap`) whose bare DBL-momentum step
    fits in 80% of the device's memory, from the peaks at batch 32 and 64 (memory is linear in
    the batch); DeepSpeed's runs that still do not fit halve it themselves."""
    if dev.type != "cuda":
        return sizes.batch_cap, "dry run"
    cfg = throughput_config(sizes, work, THROUGHPUT["dbl momentum"], 2, 32)
    p32, p64 = _bare_peak(cfg, tokenizer, dev, 32), _bare_peak(cfg, tokenizer, dev, 64)
    per_sample = max(1, (p64 - p32) / 32)
    total = torch.cuda.get_device_properties(dev).total_memory
    fit = int((0.8 * total - (p32 - 32 * per_sample)) / per_sample) // 32 * 32
    return max(32, min(sizes.batch_cap, fit)), (f"peak {p32 / 2**30:.2f} GiB at 32, {p64 / 2**30:.2f} GiB at 64: "
                                                f"{per_sample / MIB:.1f} MiB per sample")


def throughput(sizes: Sizes, work: Path, tokenizer, dev: torch.device) -> dict:

    batch, how = largest_batch(sizes, work, tokenizer, dev)
    cfg0 = throughput_config(sizes, work, THROUGHPUT["triplet"], 2, batch)
    flops = model_flops(cfg0, tokenizer, dev)
    peak = next((v for k, v in PEAK_BF16.items() if dev.type == "cuda" and k in torch.cuda.get_device_name(dev)), None)
    v, t = cfg0.model.vision, cfg0.model.text
    rows = []

    def measure(name: str, stage: Optional[int], method_overrides: list[str], b: int) -> dict:
        cfg = throughput_config(sizes, work, method_overrides, stage or 2, b)
        batches = [_batch(b, v.image_size, t.max_length, len(tokenizer), s, dev) for s in range(2)]
        _reset_peak(dev)
        if stage is None:
            loop = BareLoop(cfg, tokenizer, dev)
            seconds = _timed(lambda s: loop.step(batches[s % 2], s), sizes.warmup, sizes.timed, dev)
            extra = {}
            del loop
        else:
            method = build_method(cfg)
            branches = build_branches(cfg, method, tokenizer, distributed.world_size())
            engine = branches[TARGET].engine
            inner = engine.optimizer
            while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
                inner = inner.optimizer
            extra = {"optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
                     "fused": bool(inner.defaults.get("fused")), "zero_stage": engine.zero_optimization_stage(),
                     "param_dtype": str(next(engine.module.parameters()).dtype)}
            seconds = _timed(lambda s: train_step(method, branches, batches[s % 2], s), sizes.warmup, sizes.timed, dev)
            release(branches)
        per_sample = flops["train"] + (flops["forward"] if EMA in build_method(cfg).roles else 0)
        row = {"name": name, "batch": b, "step_s": seconds, "samples_per_s": b / seconds,
               "tflops_per_s": per_sample * b / seconds / 1e12, "peak_bytes": _peak(dev), **extra}
        row["mfu"] = row["tflops_per_s"] * 1e12 / peak if peak else None
        return row

    # ZeRO-3 last: a ZeRO-3 build leaves transformers' ZeRO-3 switch behind in this process
    for stage in (None, 2, 3):
        for method, overrides in THROUGHPUT.items():
            name = f"{method}, {'bare loop' if stage is None else f'ZeRO-{stage}'}"
            b = batch
            while True:
                try:
                    rows.append(measure(name, stage, overrides, b))
                    break
                except torch.cuda.OutOfMemoryError:
                    if b <= 32:
                        raise
                    b //= 2  # reported with the row: its batch differs from the others'
                    torch.cuda.empty_cache()
            print(f"  (b) {name}: {rows[-1]['samples_per_s']:.0f} samples/s", flush=True)
    return {"batch": batch, "batch_how": how, "flops_per_sample": flops, "peak_flops": peak,
            "model": f"{v.kind} {v.image_size}px/{v.patch_size} x{v.layers} w{v.hidden} + "
                     f"{t.kind} x{t.layers} w{t.hidden}, {t.max_length} tokens", "rows": rows}


# --- (c) evaluation and mining on the device

def _unit(n: int, d: int, dev: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1)


def gpu_side_parts(sizes: Sizes, dev: torch.device) -> dict:

    n, d = sizes.eval_images, sizes.eval_dim
    img, txt = _unit(n, d, dev, 1), _unit(5 * n, d, dev, 2)
    times = {"product": [], "eval": []}
    for _ in range(3):
        _sync(dev)
        t0 = time.perf_counter()
        sims = img @ txt.t()
        _sync(dev)
        times["product"].append(time.perf_counter() - t0)
        del sims
        t0 = time.perf_counter()
        metrics = protocol_metrics(img, txt, "standard", 5)
        times["eval"].append(time.perf_counter() - t0)
    evaluation = {"images": n, "captions": 5 * n, "dim": d, "rsum": metrics["rsum"],
                  "product_s": statistics.median(times["product"]), "eval_s": statistics.median(times["eval"])}
    del img, txt
    n, d = sizes.mine_images, sizes.mine_dim
    img, txt = _unit(n, d, dev, 3), _unit(5 * n, d, dev, 4)
    _reset_peak(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    t0 = time.perf_counter()
    caption_cands, image_cands = top_candidates(img, txt, 2000, 400)
    _sync(dev)
    seconds = time.perf_counter() - t0
    peak = _peak(dev)
    own_images, own_captions = torch.arange(n)[:, None], torch.arange(5 * n)[:, None] // 5
    mining = {"images": n, "captions": 5 * n, "dim": d, "k_captions": caption_cands.shape[1],
              "k_images": image_cands.shape[1], "seconds": seconds, "pairs_per_s": 2 * n * 5 * n / seconds,
              "peak_above_inputs_bytes": None if peak is None else peak - base,
              "own_pairs_excluded": bool((caption_cands[:, :1] // 5 != own_images).all()
                                         and (image_cands[:, :1] != own_captions).all())}
    return {"eval": evaluation, "mining": mining}


# --- (d) CPU vs device parity

def parity(sizes: Sizes, work: Path, tokenizer, dev: torch.device) -> dict:
    """Per method: the demo's towers in fp32 on the CPU and on the device, the same weights and
    batch; every loss term and every trained branch's gradient compared (relative norm)."""

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    rows = {}
    try:
        for name, overrides in PARITY_METHODS.items():
            cfg = demo_config(work, sizes, (*overrides, *STEADY))
            method = build_method(cfg)
            modules = [new_model(cfg, tokenizer, k) for k in range(len(method.roles))]  # anchors differ from the target
            v, t = cfg.model.vision, cfg.model.text
            batch = _batch(sizes.parity_batch, v.image_size, t.max_length, len(tokenizer), 0, torch.device("cpu"))
            ref = _losses_and_grads(method, modules, batch, torch.device("cpu"))
            got = _losses_and_grads(method, modules, batch, dev)
            loss_err = max(_rel(g, r) for g, r in zip(got["terms"], ref["terms"]))
            grad_err = _rel(torch.cat([g.flatten() for g in got["grads"]]), torch.cat([r.flatten() for r in ref["grads"]]))
            rows[name] = {"loss": ref["terms"][0].item(), "loss_rel": loss_err, "grad_rel": grad_err,
                          **_worst_tensor(got, ref), "ok": loss_err <= PARITY_LIMIT and grad_err <= PARITY_LIMIT}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    return {"device": str(dev), "limit": PARITY_LIMIT, "methods": rows, "ok": all(r["ok"] for r in rows.values())}


def _worst_tensor(got: dict, ref: dict, floor: float = 1e-4) -> dict:
    """The gradient tensor that differs most, relative to its own size, among those whose size is
    at least `floor` of the whole gradient's per-tensor share; the others (e.g. attention key
    biases, whose gradient is zero in exact arithmetic) are counted, not ranked."""
    total = torch.cat([r.flatten() for r in ref["grads"]]).double().norm().item()
    share = floor * total / len(ref["grads"]) ** 0.5
    worst, tiny = (0.0, None), 0
    for name, g, r in zip(ref["names"], got["grads"], ref["grads"]):
        if r.double().norm().item() < share:
            tiny += 1
        else:
            worst = max(worst, (_rel(g, r), name), key=lambda w: w[0])
    return {"tensor_rel_max": worst[0], "tensor_worst": worst[1], "tensors": len(ref["grads"]), "tensors_tiny": tiny}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double()
    scale = ref.norm().item()
    return (got - ref).norm().item() / scale if scale > 0 else (got - ref).norm().item()


def _losses_and_grads(method, modules: list, batch: dict, dev: torch.device) -> dict:
    models = [copy.deepcopy(m).to(dev) for m in modules]
    args = (batch["pixel_values"].to(dev), batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
    outs = []
    for role, model in zip(method.roles, models):
        with torch.set_grad_enabled(role == TRAINED):
            outs.append(model(*args, **method.forward_inputs(outs)))
    terms = method.losses(outs, batch["image_ids"].to(dev), 10_000)
    values = [v.detach().reshape(-1).cpu() for t in terms if t is not None for v in t.values()]
    for model, t in zip(models, terms):
        if t is not None:
            t["loss"].backward(retain_graph=True)
    named = [(f"branch{k}.{n}", p.grad.detach().cpu()) for k, (m, role) in enumerate(zip(models, method.roles))
             if role == TRAINED for n, p in m.named_parameters() if p.grad is not None]
    return {"terms": values, "names": [n for n, _ in named], "grads": [g for _, g in named]}


# --- (e) the CUDA-only paths

def cuda_paths(sizes: Sizes, work: Path, tokenizer, dev: torch.device) -> dict:

    out = {}
    # the gathered negatives' backward: NCCL's reduce-scatter on a GPU (gloo's all-reduce elsewhere)
    x = torch.randn(6, 5, device=dev, requires_grad=True)
    w = torch.randn(6 * distributed.world_size(), 5, device=dev)
    y = distributed._GatherWithGrad.apply(x)
    (y * w).sum().backward()
    r = distributed.rank()
    out["gather_backward"] = {"backend": torch.distributed.get_backend(),
                              "ok": bool(torch.equal(y[r * 6:(r + 1) * 6], x) and torch.equal(x.grad, w[r * 6:(r + 1) * 6]))}
    # RNG state through a checkpoint file read with weights_only=True
    path = work / "rng_state.pt"
    torch.save(rng_state(), path)
    first = torch.rand(8, device=dev)
    set_rng_state(safe_load(path))
    out["rng_restored"] = {"device": str(dev), "ok": bool(torch.equal(first, torch.rand(8, device=dev)))}
    # pinned uint8 batches, normalised on the device: the same bits as on the host
    cfg = demo_config(work, sizes)
    image = image_transform(cfg, train=True)
    host = TrainLoader(cfg.data, image, tokenizer, cfg.model.text.max_length, 0, 1, 0)
    device = TrainLoader(cfg.data, image, tokenizer, cfg.model.text.max_length, 0, 1, 0, dev)
    a, b = next(host.batches()), next(device.batches())
    diff = (a["pixel_values"] - b["pixel_values"].cpu()).abs().max().item()
    out["loader"] = {"pixels_on": str(b["pixel_values"].device), "pinned": device.device is not None,
                     "same_samples": a["image_ids"].tolist() == b["image_ids"].tolist(), "max_abs_diff": diff,
                     "ok": bool(torch.equal(a["pixel_values"], b["pixel_values"].cpu()))}
    return out


# ----------------------------------------------------------------------------- the table

def format_result(result: dict) -> str:
    p = result["parts"]
    lines = [f"bench gpu: {result['machine']}", f"commit {result.get('commit')}, {result['date']}"
             + (", DRY RUN (tiny sizes)" if result["dry_run"] else "")]

    def failed(key: str) -> bool:
        if key in p and isinstance(p[key], dict) and "error" in p[key]:
            lines.append(f"({key}) FAILED: {p[key]['error']}")
            return True
        return key not in p

    if not failed("a"):
        a = p["a"]
        lines.append(f"(a) demo preset, 1 rank ({a['backend']}), "
                     f"zero2_gpu bf16: rSum {a['rsum']:.2f} (CPU seeds {', '.join(f'{x:.2f}' for x in a['cpu_rsum'])}; "
                     f"z {a['rsum_z']:+.2f}); {a['samples_per_s'] or 0:.0f} samples/s at the last log step; "
                     f"run {a['wall_s']:.0f} s")
        if a.get("loss_steps_compared"):
            lines.append(f"    loss curve: {a['loss_within_3std']} of {a['loss_steps_compared']} log steps within 3 std "
                         f"of the CPU seeds (max |z| {a['loss_z_max']:.2f})")
        lines.append(f"    MLflow system metrics: {len(a['system_metrics'])}, of which GPU: "
                     f"{', '.join(k.split('/')[-1] for k in a['gpu_system_metrics']) or 'none'}")
    if not failed("b"):
        b = p["b"]
        lines.append(f"(b) {b['model']}; batch {b['batch']} ({b['batch_how']}); "
                     f"{b['flops_per_sample']['train'] / 1e9:.3g} GFLOP per trained sample, "
                     f"{b['flops_per_sample']['forward'] / 1e9:.3g} per anchor forward; "
                     f"peak {b['peak_flops'] / 1e12 if b['peak_flops'] else float('nan'):.0f} TFLOP/s")
        lines.append(f"    {'':28}{'batch':>6}{'samples/s':>11}{'ms/step':>9}{'MFU':>7}{'peak GiB':>10}{'x bare':>8}"
                     f"{'x triplet':>10}")
        by_name = {r["name"]: r for r in b["rows"]}
        for r in b["rows"]:
            method, how = r["name"].split(", ")
            bare = by_name.get(f"{method}, bare loop")
            trip = by_name.get(f"triplet, {how}")
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            peak = f"{r['peak_bytes'] / 2**30:.1f}" if r.get("peak_bytes") else "n/a"
            lines.append(f"    {r['name']:<28}{r['batch']:>6}{r['samples_per_s']:>11.0f}{1e3 * r['step_s']:>9.1f}{mfu:>7}"
                         f"{peak:>10}{r['step_s'] / bare['step_s'] * bare['batch'] / r['batch']:>8.2f}"
                         f"{r['step_s'] / trip['step_s'] * trip['batch'] / r['batch']:>10.2f}")
        zero = [r for r in b["rows"] if "ZeRO" in r["name"]]
        if zero and "optimizer" in zero[0]:
            lines.append(f"    optimizer inside DeepSpeed: {zero[0]['optimizer']} (fused: {zero[0]['fused']}), "
                         f"weights {zero[0]['param_dtype']}")
    if not failed("c"):
        e, m = p["c"]["eval"], p["c"]["mining"]
        lines.append(f"(c) evaluation {e['images']} x {e['captions']} (d {e['dim']}): {e['eval_s']:.2f} s, "
                     f"the product alone {e['product_s'] * 1e3:.1f} ms ({e['eval_s'] / e['product_s']:.0f}x)")
        peak = m["peak_above_inputs_bytes"]
        lines.append(f"    mining {m['images']} x {m['captions']} (d {m['dim']}, top {m['k_captions']} / "
                     f"{m['k_images']}): {m['seconds']:.1f} s, {m['pairs_per_s'] / 1e9:.1f} G pairs/s"
                     + (f", peak {peak / MIB:.0f} MiB above the embeddings" if peak is not None else "")
                     + f"; own pairs excluded: {m['own_pairs_excluded']}")
    if not failed("d"):
        d = p["d"]
        rows = d["methods"]
        worst = max(rows.items(), key=lambda kv: kv[1]["grad_rel"])
        tensor = max(rows.values(), key=lambda r: r["tensor_rel_max"])
        lines.append(f"(d) CPU vs {d['device']}, fp32: {'all within' if d['ok'] else 'NOT all within'} "
                     f"{d['limit']:g} ({len(rows)} methods; worst gradient {worst[1]['grad_rel']:.1e} ({worst[0]}), "
                     f"worst loss {max(r['loss_rel'] for r in rows.values()):.1e})")
        lines.append(f"    per tensor: worst {tensor['tensor_rel_max']:.1e} ({tensor['tensor_worst']}); "
                     f"{tensor['tensors_tiny']} of {tensor['tensors']} tensors with a gradient ~0 not ranked")
    if not failed("e"):
        e = p["e"]
        lines.append(f"(e) gathered backward over {e['gather_backward']['backend']}: {_ok(e['gather_backward'])}; "
                     f"RNG through a checkpoint on {e['rng_restored']['device']}: {_ok(e['rng_restored'])}; "
                     f"batches on {e['loader']['pixels_on']} (pinned: {e['loader']['pinned']}) equal the host's: "
                     f"{_ok(e['loader'])}")
    return "\n".join(lines)


def _ok(check: dict) -> str:
    return "ok" if check.get("ok") else "FAILED"


# ----------------------------------------------------------------------------- argparse

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gpu", help="the GPU path end to end: demo, throughput, eval/mining, parity",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/gpu_check", help="folder for its data, runs and MLflow store")
    p.add_argument("--json", default=None, metavar="PATH", help="results (default: WORK/gpu_check.json)")
    p.add_argument("--parts", nargs="+", choices=("a", "b", "c", "d", "e"), default=["a", "b", "d", "e", "c"],
                   help="which parts, in this order (default: a b d e c)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.set_defaults(func=cmd_bench_gpu)


def main(argv=None) -> int:
    """Rank side: parts (b)-(e) in one process; writes their results to --out as it goes."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--parts", nargs="+", required=True)
    parser.add_argument("--dry-run", action="store_true")
    return worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
