"""`python -m benchmarks.gpu` (`make gpu-check`): the GPU path, run for real in one command.

GPU time is short and rare, so this is one prepared check that prints one table and writes
JSON; every part is guarded, so one that fails leaves the others' figures, and each part's
figures are written as soon as it is done.

  (a) the demo preset end to end on one rank: NCCL, bf16, zero2_gpu, the demo's steps at its
      global batch (2 ranks x 32 -> 1 x 64), then the evaluation; its loss curve and rSum
      against the CPU seeds recorded in presets/demo_seeds.json; MLflow's GPU system metrics.
  (b) throughput at real sizes: ViT-B/16 + BERT-base built from configs, 224 px, 32 tokens,
      bf16, the largest batch that fits; the triplet and DBL momentum, each as a bare PyTorch
      loop (the yardstick: pure bf16 weights, fused AdamW, the same loss, no host sync), under
      ZeRO-2 and under ZeRO-3; each eager and with `train.compile` (ZeRO-3: eager only), the
      two built together and timed in turn, repeat by repeat. Per row: step time min / median
      / max over 3 repeats, samples/s, MFU per trained sample (forward + backward of the
      trained branch; DBL's anchor forward, no gradient, in a column of its own), peak memory,
      the compile warm-up, and the ratios to the fastest bare loop, to eager, to the triplet.
  (c) the GPU-side parts: evaluation of 100K images x 500K captions (d = 128), compiled and
      eager, against the bare tiled product in the same run; mining of 100K x 500K.
  (d) CPU vs device: the same batch's losses and gradients in fp32 (TF32 off), per method.
  (e) the CUDA-only paths: the NCCL reduce-scatter backward of the gathered negatives, CUDA
      RNG state through a checkpoint, the loader's pinned uint8 batches copied on a side stream
      and normalised on the device (the same bits as on the host, while the device is busy),
      JPEGs decoded on the device (`data.decode=gpu`) against the CPU's decode.
  (f) end to end: `dbl-scale train` from JPEG shards on disk (photo-sized JPEGs written here
      first), the vitb16_bertbase preset at (b)'s batch, ZeRO-2, bf16, `train.compile`,
      `data.workers=auto`: samples/s against (b)'s synthetic step, GPU utilisation
      (nvidia-smi) and the loader's wait per step (the run's data/* metrics in MLflow).

MFU divides the FLOPs that torch's FlopCounterMode counts on the model by the chip's dense
bf16 peak, looked up by the exact device name (`PEAK_BF16_TFLOPS`; `--peak-tflops` for a chip
not in it). `--dry-run` (implied on a machine without CUDA): the same code with tiny towers and
sizes; on the CPU over gloo, the test suite runs it. Parts (b)-(e) run in one rank process
(`MODULE`), (a) and (f) as real `dbl-scale train` runs.

    make gpu-check                                  # on the GPU machine (wheels: make gpu-wheels)
    python -m benchmarks.gpu --json runs/gpu_check.json  # the same, in an environment that has everything
    python -m benchmarks.gpu --parts b f                 # throughput and end to end only
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

MODULE = "benchmarks.gpu_rank"  # the rank process of parts (b)-(e)
SEEDS_FILE = Path(__file__).resolve().parents[1] / "dbl_scale" / "presets" / "demo_seeds.json"

# Dense bf16 tensor-core peak in TFLOP/s (no sparsity), from the vendors' datasheets, by the
# exact name torch.cuda.get_device_name reports: an H100 PCIe or an H200 NVL is not an SXM part.
PEAK_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.4,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.4,  # H200 SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA GH200 480GB": 989.4,
    "NVIDIA H800": 989.4,  # SXM
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L40": 181.05,
    "NVIDIA L4": 121.0,
    "NVIDIA A10": 125.0,
    "NVIDIA B200": 2250.0,
}
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
RUNNERS = {"bare": "bare loop", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}  # --runners: name in the table
COMPILES = {"bare loop": True, "ZeRO-2": True, "ZeRO-3": False}  # train.compile is a config error under ZeRO-3
STEADY = ["loss.sum_warmup_steps=0"]  # every timed step is a steady-state step
TINY_TOWERS = ["model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden=32",
               "model.vision.layers=1", "model.vision.heads=2", "model.text.hidden=32", "model.text.layers=1",
               "model.text.heads=2", "model.embed_dim=32"]
PARTS = ("a", "b", "c", "d", "e", "f")
RANK_PARTS = ("b", "c", "d", "e")  # run in one rank process, in the order asked


class Sizes:
    """What each part runs: the real sizes on a GPU, tiny ones for the dry run."""

    def __init__(self, dry: bool, steps: Optional[int] = None, model: str = "vitb16_bertbase", repeats: int = 3,
                 runners: tuple = tuple(RUNNERS)):
        self.dry, self.model, self.runners = dry, model, [RUNNERS[r] for r in RUNNERS if r in runners]
        self.demo = ["train.steps=2", "data.batch_size=8", "train.log_every=1", "eval.batch_size=64"] if dry else \
            ["data.batch_size=64"]  # the CPU runs' global batch: 2 ranks x 32
        self.demo_data = ["data.build.train=128", "data.build.val=16", "data.build.test=40"] if dry else []
        # (b), (f): the vitb16_bertbase preset as it is (tiny towers in a dry run); `demo`: the demo
        # preset's towers at its per-rank batch, fp32 under the CPU configs as the demo trains them
        self.towers = TINY_TOWERS if dry and model == "vitb16_bertbase" else []
        self.batch_cap = 32 if model == "demo" else 8 if dry else 2048
        self.repeats = repeats
        self.warmup, self.timed = (1, 1) if dry and model == "vitb16_bertbase" else (3, 5)  # timed: per repeat
        if steps:
            self.timed = steps
        self.eval_images, self.eval_dim = (200, 64) if dry else (100_000, 128)
        self.mine_images, self.mine_dim = (500, 64) if dry else (100_000, 1024)
        self.parity_batch = 4 if dry else 16
        # (f): JPEGs of photo size, shards with a worker's share each, steps logged in intervals
        self.e2e_images, self.e2e_source, self.e2e_shard = (64, (160, 120), 8) if dry else (6_000, (640, 480), 200)
        self.e2e_steps, self.e2e_log_every = (4, 2) if dry else (40, 10)
        self.e2e_batch = 8 if dry else 512  # when (b) did not run to say


def peak_tflops(device_name: Optional[str], override: Optional[float] = None) -> tuple[Optional[float], str]:
    """(dense bf16 peak in TFLOP/s or None, where it comes from) for a device by its exact name."""
    if override:
        return override, "--peak-tflops"
    if device_name is None:
        return None, "no CUDA device: no MFU"
    if device_name in PEAK_BF16_TFLOPS:
        return PEAK_BF16_TFLOPS[device_name], f"datasheet, '{device_name}'"
    return None, (f"'{device_name}' is not in PEAK_BF16_TFLOPS (dbl_scale/cli/bench/gpu.py): no MFU; pass "
                  "--peak-tflops N (its dense bf16 TFLOP/s) or add it to the table")


# ----------------------------------------------------------------------------- the command

def cmd_bench_gpu(args) -> int:
    import torch

    from dbl_scale.config import load_config  # noqa: F401  config errors surface here, before any process
    from dbl_scale.cli.data import prepare_data
    from dbl_scale.cli.bench.common import machine_line

    dry = args.dry_run or not torch.cuda.is_available()
    sizes = Sizes(dry, args.steps, args.model, args.repeats, tuple(args.runners))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json or work / "gpu_check.json")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    peak, peak_source = peak_tflops(name, args.peak_tflops)
    result = {"machine": machine_line(dev), "device_name": name, "dry_run": dry, "model": sizes.model,
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(), "peak_tflops": peak,
              "peak_source": peak_source, "parts": {}}
    print(result["machine"], flush=True)
    print(f"bench gpu{' (dry run: tiny sizes)' if dry else ''}: parts {' '.join(args.parts)}; "
          f"work folder {work}; bf16 peak {peak or 'unknown'} TFLOP/s ({peak_source})", flush=True)
    t0 = time.time()
    prepare_data(demo_config(work, sizes))

    def save():
        result["wall_s"] = round(time.time() - t0, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=str))

    rank_parts = [p for p in args.parts if p in RANK_PARTS]
    if rank_parts:  # the rank process writes each part's figures as it finishes it: a crash keeps the earlier ones
        from dbl_scale.cli.launch import run_ranks

        out = json_path.with_name(json_path.stem + "_parts.json")
        out.unlink(missing_ok=True)
        # (b) keeps an eager and a compiled variant alive at the largest batch: segments that grow
        # keep their alternating activations from fragmenting the allocator's pool (the rank
        # process only: (f) trains as a user's run does)
        alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        rc = run_ranks(1, MODULE, ["--out", str(out), "--work", str(work), "--parts", *rank_parts,
                                   "--steps", str(sizes.timed), "--model", sizes.model, "--repeats",
                                   str(sizes.repeats), "--runners", *args.runners] + ["--dry-run"] * dry
                       + (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []))
        if alloc is None:
            del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
        parts = json.loads(out.read_text()) if out.exists() else {}
        for part in rank_parts:
            if part not in parts:
                parts[part] = {"error": f"not reached: the rank process failed (exit {rc})"}
        result["parts"].update(parts)
        save()
    for part, run in (("f", lambda: end_to_end(work, sizes, dry, result["parts"].get("b"))),
                      ("a", lambda: demo_on_device(work, sizes, dry))):
        if part in args.parts:
            t1 = time.time()
            result["parts"][part] = _guarded(run)
            result["parts"][part]["seconds"] = round(time.time() - t1, 1)
            save()
    save()
    print("\n" + format_result(result), flush=True)
    print(f"bench wall time: {time.time() - t0:.0f}s; results written to {json_path}", flush=True)
    failed = [k for k, v in result["parts"].items() if not isinstance(v, dict) or "error" in v]
    return 1 if failed else 0


def _commit() -> Optional[str]:
    from dbl_scale.run import where_tags

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
    from dbl_scale.config import load_config, resolve_config

    return load_config(resolve_config("demo"), [f"data.root={work / 'data'}", *sizes.demo_data, *extra])


# ----------------------------------------------------------------------------- (a) the demo on the device

def demo_on_device(work: Path, sizes: Sizes, dry: bool) -> dict:
    """The demo preset's triplet run, seed 0, on one rank of this machine (NCCL and bf16 under
    zero2_gpu on a GPU), then its evaluation; compared with the CPU seeds."""
    import torch
    from mlflow.tracking import MlflowClient  # heavy (seconds)

    from dbl_scale.config import resolve_config
    from dbl_scale.cli.launch import config_args, run_ranks
    from dbl_scale.cli.train import MODULE as TRAIN

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
    out = {"run": name, "backend": "nccl" if torch.cuda.is_available() else "gloo", "wall_s": round(wall, 1),
           "rsum": metrics["rsum"], "metrics": metrics, "loss_curve": curve,
           "samples_per_s": run.data.metrics.get("samples_per_s"),
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
    import torch

    from dbl_scale import distributed
    from dbl_scale.tokenizer import ensure_tokenizer

    distributed.init_distributed()
    dev = distributed.device()
    sizes = Sizes(args.dry_run, args.steps, args.model, args.repeats, tuple(args.runners))
    work = Path(args.work)
    cfg = demo_config(work, sizes)

    tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    parts = {}
    out = Path(args.out)
    steps = {"b": lambda: throughput(sizes, work, tokenizer, dev, args.peak_tflops),
             "c": lambda: gpu_side_parts(sizes, dev), "d": lambda: parity(sizes, work, tokenizer, dev),
             "e": lambda: cuda_paths(sizes, work, tokenizer, dev)}
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


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev) -> Optional[int]:
    import torch

    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None


def _allocated(dev) -> int:
    import torch

    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


def _seconds(step: Callable[[int], object], first: int, n: int, dev) -> float:
    """Wall seconds of steps first .. first+n-1, the device synchronised before and after."""
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(first, first + n):
        step(i)
    _sync(dev)
    return time.perf_counter() - t0


def _batch(b: int, image_size: int, length: int, vocab: int, step: int, dev) -> dict:
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    return {"pixel_values": torch.randn(b, 3, image_size, image_size, generator=g).to(dev),
            "input_ids": torch.randint(5, vocab, (b, length), generator=g).to(dev),
            "attention_mask": torch.ones(b, length, dtype=torch.long, device=dev),
            "image_ids": (torch.arange(b) + b * step).to(dev), "captions": None}


# --- (b) throughput

def throughput_config(sizes: Sizes, work: Path, method: list[str], stage: int, batch: int, compiled: bool = False):
    from dbl_scale.config import load_config, resolve_config

    ds = f"zero{stage}_gpu" if sizes.model == "vitb16_bertbase" else f"zero{stage}"
    return load_config(resolve_config(sizes.model),
                       [f"data.root={work / 'data'}", f"data.batch_size={batch}", f"train.deepspeed={ds}",
                        f"train.compile={str(compiled).lower()}", *STEADY, *method, *sizes.towers])


class BareLoop:
    """The yardstick: the same model and loss in plain PyTorch, as fast as it goes. Under a bf16
    config the weights are bf16 (no fp32 copy, no cast per step); on a GPU torch's fused AdamW
    updates them in place (elsewhere its multi-tensor form); the same gradient clipping; for DBL momentum the same anchor (its
    average kept in fp32, as the training step keeps it); no host sync in the step.
    `compiled`: the towers' blocks compiled as `train.compile` compiles them."""

    def __init__(self, cfg, tokenizer, dev, compiled: bool = False):
        import copy

        import torch

        from dbl_scale.branches import ema_master, new_model
        from dbl_scale.methods import build_method
        from dbl_scale.roles import EMA
        from dbl_scale.models import compile_towers
        from dbl_scale.optim import deepspeed_config

        self.method, self.dev, self.cfg = build_method(cfg), dev, cfg
        bf16 = deepspeed_config(cfg, 1).get("bf16", {}).get("enabled")
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        self.model = new_model(cfg, tokenizer, 0).to(dev, self.dtype).train()
        self.anchor = self.master = None
        if EMA in self.method.roles:
            self.anchor = copy.deepcopy(self.model).requires_grad_(False).eval()
            self.master = ema_master(self.anchor)
        cuda = dev.type == "cuda"  # one fused kernel on a GPU; multi-tensor ops elsewhere
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                     eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                     fused=cuda, foreach=not cuda)
        if compiled:
            for module in (self.model, self.anchor):
                if module is not None:
                    compile_towers(module)

    def step(self, batch: dict, step: int):
        import torch

        from dbl_scale.branches import ema_update
        from dbl_scale.roles import TARGET
        from dbl_scale.train import in_float32

        args = (batch["pixel_values"].to(self.dtype), batch["input_ids"], batch["attention_mask"])
        outs = []
        if self.anchor is not None:
            with torch.no_grad():
                outs.append(self.anchor(*args))
        outs.append(self.model(*args))
        # the losses in float32, as train_step takes them
        loss = self.method.losses([in_float32(o) for o in outs], batch["image_ids"], step)[TARGET]["loss"]
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.anchor is not None:
            ema_update(self.anchor, self.model, self.method.momentum(step + 1), self.master)

    def info(self) -> dict:
        return {"param_dtype": str(self.dtype)}

    def close(self) -> None:
        pass


class EngineRunner:
    """The training step itself: `train_step` on the branches `build_branches` makes (DeepSpeed
    engines; `train.compile` as the config says)."""

    def __init__(self, cfg, tokenizer):
        import torch

        from dbl_scale import distributed
        from dbl_scale.branches import build_branches
        from dbl_scale.methods import build_method
        from dbl_scale.roles import TARGET

        self.method = build_method(cfg)
        self.branches = build_branches(cfg, self.method, tokenizer, distributed.world_size())
        engine = self.branches[TARGET].engine
        inner = engine.optimizer
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        self._info = {"optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
                      "fused": bool(inner.defaults.get("fused")), "zero_stage": engine.zero_optimization_stage(),
                      "param_dtype": str(next(engine.module.parameters()).dtype)}

    def step(self, batch: dict, step: int):
        from dbl_scale.train import train_step

        train_step(self.method, self.branches, batch, step)

    def info(self) -> dict:
        return self._info

    def close(self) -> None:
        from dbl_scale.cli.bench.common import release

        release(self.branches)


def measure_variants(builders: dict[str, Callable[[], object]], batches: list[dict], sizes: Sizes, dev) -> dict:
    """Build every variant (eager, compiled) of one runner, warm each up (the compile happens
    there: timed apart), then time them in turn, repeat by repeat (A B A B A B), so a drift of
    the machine touches both alike. Per variant: seconds per step of each repeat, the warm-up's
    seconds, and its peak memory above the other variants' resident weights and states."""
    runners, resident, out = {}, {}, {}
    try:
        for name, build in builders.items():
            before = _allocated(dev)
            runners[name] = build()
            resident[name] = _allocated(dev) - before
        for name, runner in runners.items():
            out[name] = {"warmup_s": _seconds(lambda s, r=runner: r.step(batches[s % 2], s), 0, sizes.warmup, dev),
                         "step_s_repeats": [], "peak_bytes": None, **runner.info()}
        for rep in range(sizes.repeats):
            for name, runner in runners.items():
                if dev.type == "cuda":
                    import torch

                    torch.cuda.reset_peak_memory_stats(dev)
                first = sizes.warmup + rep * sizes.timed
                seconds = _seconds(lambda s, r=runner: r.step(batches[s % 2], s), first, sizes.timed, dev)
                out[name]["step_s_repeats"].append(seconds / sizes.timed)
                peak = _peak(dev)
                if peak is not None:
                    own = peak - sum(v for k, v in resident.items() if k != name)
                    out[name]["peak_bytes"] = max(out[name]["peak_bytes"] or 0, own)
        return out
    finally:
        for runner in runners.values():
            runner.close()
        runners.clear()


def model_flops(cfg, tokenizer, dev) -> dict:
    """FLOPs per sample, counted by torch's FlopCounterMode on the model at batch 2: forward +
    backward (a trained branch), forward alone (an anchor)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dbl_scale.branches import new_model

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


def largest_batch(sizes: Sizes, work: Path, tokenizer, dev) -> tuple[int, str]:
    """The largest batch (a multiple of 32, at most `batch_cap`) whose bare DBL-momentum step
    fits in 80% of the device's memory, from the peaks at batch 32 and 64 (memory is linear in
    the batch); the rest leaves room for the other variant's weights and states, and a
    configuration that still does not fit halves it itself."""
    import torch

    if sizes.model == "demo":
        return sizes.batch_cap, "the demo's per-rank batch"
    if dev.type != "cuda":
        return sizes.batch_cap, "dry run"
    cfg = throughput_config(sizes, work, THROUGHPUT["dbl momentum"], 2, 32)
    p32, p64 = _bare_peak(cfg, tokenizer, dev, 32), _bare_peak(cfg, tokenizer, dev, 64)
    per_sample = max(1, (p64 - p32) / 32)
    total = torch.cuda.get_device_properties(dev).total_memory
    fit = int((0.8 * total - (p32 - 32 * per_sample)) / per_sample) // 32 * 32
    return max(32, min(sizes.batch_cap, fit)), (f"peak {p32 / 2**30:.2f} GiB at 32, {p64 / 2**30:.2f} GiB at 64: "
                                                f"{per_sample / 2**20:.1f} MiB per sample")


def _builders(runner: str, overrides: list[str], b: int, sizes: Sizes, work: Path, tokenizer, dev,
              compiles: bool) -> dict[str, Callable[[], object]]:
    stage = 3 if runner == "ZeRO-3" else 2
    out = {}
    for compiled in (False, True) if compiles else (False,):
        cfg = throughput_config(sizes, work, overrides, stage, b, compiled)
        if runner == "bare loop":
            out["compiled" if compiled else "eager"] = lambda c=cfg, k=compiled: BareLoop(c, tokenizer, dev, k)
        else:
            out["compiled" if compiled else "eager"] = lambda c=cfg: EngineRunner(c, tokenizer)
    return out


def throughput(sizes: Sizes, work: Path, tokenizer, dev, peak_override: Optional[float] = None) -> dict:
    import torch

    from dbl_scale.models import compile_blocker

    batch, how = largest_batch(sizes, work, tokenizer, dev)
    cfg0 = throughput_config(sizes, work, THROUGHPUT["triplet"], 2, batch)
    flops = model_flops(cfg0, tokenizer, dev)
    peak, peak_source = peak_tflops(torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, peak_override)
    blocker = compile_blocker(dev)
    v, t = cfg0.model.vision, cfg0.model.text
    rows = []
    for runner in sizes.runners:  # ZeRO-3 last: a ZeRO-3 build leaves transformers' ZeRO-3 switch behind
        for method, overrides in THROUGHPUT.items():
            b = batch
            while True:
                batches = [_batch(b, v.image_size, t.max_length, len(tokenizer), s, dev) for s in range(2)]
                try:
                    measured = measure_variants(_builders(runner, overrides, b, sizes, work, tokenizer, dev,
                                                          COMPILES[runner] and blocker is None), batches, sizes, dev)
                    break
                except torch.cuda.OutOfMemoryError:
                    if b <= 32:
                        raise
                    del batches
                    b //= 2  # reported with the row: its batch differs from the others'
                    torch.cuda.empty_cache()
            for variant, m in measured.items():
                rows.append(_row(method, runner, variant, b, m, flops, peak))
                r = rows[-1]
                print(f"  (b) {r['name']}: {r['samples_per_s']:.0f} samples/s, step {1e3 * r['step_s']:.1f} ms "
                      f"[{1e3 * r['step_s_min']:.1f}, {1e3 * r['step_s_max']:.1f}], warm-up {r['warmup_s']:.1f} s",
                      flush=True)
            del batches
    _ratios(rows)
    return {"batch": batch, "batch_how": how, "flops_per_sample": flops, "peak_tflops": peak,
            "peak_source": peak_source, "compile": blocker or "torch.compile (inductor), per transformer block",
            "repeats": sizes.repeats, "steps_per_repeat": sizes.timed, "warmup_steps": sizes.warmup,
            "model": f"{v.kind} {v.image_size}px/{v.patch_size} x{v.layers} w{v.hidden} + "
                     f"{t.kind} x{t.layers} w{t.hidden}, {t.max_length} tokens", "rows": rows}


def _row(method: str, runner: str, variant: str, b: int, m: dict, flops: dict, peak: Optional[float]) -> dict:
    """One measured configuration: step time over the repeats, samples/s and MFU at the median.
    MFU counts the trained branch's forward and backward per sample (useful work); DBL's anchor
    forward (no gradient) is `anchor_mfu`, apart."""
    reps = m["step_s_repeats"]
    step = statistics.median(reps)
    anchor = method.startswith("dbl")
    row = {"name": f"{method}, {runner}" + (", compiled" if variant == "compiled" else ""), "method": method,
           "runner": runner, "compiled": variant == "compiled", "batch": b, "step_s": step, "step_s_min": min(reps),
           "step_s_max": max(reps), "samples_per_s": b / step,
           "tflops_per_s": flops["train"] * b / step / 1e12, **m}
    row["mfu"] = row["tflops_per_s"] / peak if peak else None
    row["anchor_mfu"] = flops["forward"] * b / step / 1e12 / peak if peak and anchor else None
    return row


def _ratios(rows: list[dict]) -> None:
    """Per row, time per sample against: the fastest bare loop of its method (`x_bare`), its own
    eager variant (`x_eager`, compiled rows: the median of the repeat-by-repeat ratios), and
    the triplet of the same runner and variant (`x_triplet`)."""
    def per_sample(r):
        return r["step_s"] / r["batch"]

    for r in rows:
        bare = [x for x in rows if x["method"] == r["method"] and x["runner"] == "bare loop"]
        r["x_bare"] = per_sample(r) / min(per_sample(x) for x in bare) if bare else None
        eager = next((x for x in rows if x["method"] == r["method"] and x["runner"] == r["runner"]
                      and not x["compiled"]), None)
        r["x_eager"] = (statistics.median(c / e for c, e in zip(r["step_s_repeats"], eager["step_s_repeats"]))
                        if r["compiled"] and eager else None)
        trip = next((x for x in rows if x["method"] == "triplet" and x["runner"] == r["runner"]
                     and x["compiled"] == r["compiled"]), None)
        r["x_triplet"] = per_sample(r) / per_sample(trip) if trip else None


# --- (c) evaluation and mining on the device

def _unit(n: int, d: int, dev, seed: int):
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=1)


def gpu_side_parts(sizes: Sizes, dev) -> dict:
    import torch

    from dbl_scale.evaluation.metrics import _rows, embedding_metrics
    from dbl_scale.evaluation.ranking import TileSource
    from dbl_scale.mining import top_candidates

    n, d = sizes.eval_images, sizes.eval_dim
    img, txt = _unit(n, d, dev, 1), _unit(5 * n, d, dev, 2)
    rows = _rows(dev, 5)
    embedding_metrics(img[:rows * 4], txt[:5 * rows * 4], 5, compile=True)  # the compile's warm-up

    def bare() -> None:  # every score made once in evaluation's tiles, nothing counted
        source = TileSource(img, txt, rows, 5 * rows)
        for t in range(-(-n // rows)):
            for u in range(-(-n // rows)):
                source.tile(t, u)

    times = {"product": [], "eval": [], "eval_eager": []}
    jobs = {"product": bare, "eval": lambda: embedding_metrics(img, txt, 5, compile=True),
            "eval_eager": lambda: embedding_metrics(img, txt, 5, compile=False)}
    for _ in range(3):  # interleaved, so a slow moment slows them alike
        for name, job in jobs.items():
            _sync(dev)
            t0 = time.perf_counter()
            out = job()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
            if name == "eval":
                metrics = out
    evaluation = {"images": n, "captions": 5 * n, "dim": d, "tile_rows": rows, "rsum": metrics["rsum"],
                  "i2t_tied": metrics["i2t_tied"], "t2i_tied": metrics["t2i_tied"],
                  **{f"{k}_s": statistics.median(v) for k, v in times.items()},
                  **{f"{k}_s_repeats": v for k, v in times.items()}}
    evaluation["x_product"] = evaluation["eval_s"] / evaluation["product_s"]
    evaluation["eager_x_product"] = evaluation["eval_eager_s"] / evaluation["product_s"]
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

def parity(sizes: Sizes, work: Path, tokenizer, dev) -> dict:
    """Per method: the demo's towers in fp32 on the CPU and on the device, the same weights and
    batch; every loss term and every trained branch's gradient compared (relative norm)."""
    import torch

    from dbl_scale.branches import new_model
    from dbl_scale.methods import build_method

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
    import torch

    total = torch.cat([r.flatten() for r in ref["grads"]]).double().norm().item()
    share = floor * total / len(ref["grads"]) ** 0.5
    worst, tiny = (0.0, None), 0
    for name, g, r in zip(ref["names"], got["grads"], ref["grads"]):
        if r.double().norm().item() < share:
            tiny += 1
        else:
            worst = max(worst, (_rel(g, r), name), key=lambda w: w[0])
    return {"tensor_rel_max": worst[0], "tensor_worst": worst[1], "tensors": len(ref["grads"]), "tensors_tiny": tiny}


def _rel(got, ref) -> float:
    got, ref = got.double().cpu(), ref.double()
    scale = ref.norm().item()
    return (got - ref).norm().item() / scale if scale > 0 else (got - ref).norm().item()


def _losses_and_grads(method, modules: list, batch: dict, dev) -> dict:
    import copy

    import torch

    from dbl_scale.roles import TRAINED

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

def cuda_paths(sizes: Sizes, work: Path, tokenizer, dev) -> dict:
    import torch

    from dbl_scale import distributed
    from dbl_scale.checkpoint import rng_state, safe_load, set_rng_state
    from dbl_scale.data import TrainLoader
    from dbl_scale.preprocess import image_transform

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
    # pinned uint8 batches, copied on the loader's side stream and normalised on the device while
    # the compute stream is busy (a missing stream wait shows as other bits): the host's bits
    cfg = demo_config(work, sizes)
    image = image_transform(cfg, train=True)
    host = TrainLoader(cfg.data, image, tokenizer, cfg.model.text.max_length, 0, 1, 0)
    device = TrainLoader(cfg.data, image, tokenizer, cfg.model.text.max_length, 0, 1, 0, dev)
    busy = torch.randn(2048, 2048, device=dev) if dev.type == "cuda" else None
    same, diff, on = True, 0.0, None
    for a, b in zip(host.batches(), device.batches()):
        for _ in range(20 if busy is not None else 0):  # queued on the compute stream: the next copy overlaps it
            busy = torch.tanh(busy @ busy / 2048)
        same &= a["image_ids"].tolist() == b["image_ids"].tolist()
        diff = max(diff, (a["pixel_values"] - b["pixel_values"].cpu()).abs().max().item())
        on = str(b["pixel_values"].device)
        if device.wait.batches >= 4:
            break
    _, waited = device.wait.take()
    out["loader"] = {"pixels_on": on, "pinned": device.device is not None, "same_samples": same, "batches": 4,
                     "max_abs_diff": diff, "waited": waited, "ok": bool(same and diff == 0.0)}
    out["gpu_decode"] = gpu_decode_check(sizes, work, dev)
    return out


def gpu_decode_check(sizes: Sizes, work: Path, dev) -> dict:
    """A photo-sized JPEG decoded and resized on the device (`data.decode=gpu`) against the CPU
    path's decode of the same file: mean and largest difference in uint8 levels. Where the
    device cannot decode (no CUDA, no torchvision) it says why."""
    import torch

    from dbl_scale.config import ConfigError
    from dbl_scale.preprocess import ImageTransform, check_gpu_decode, decode_on_device
    from benchmarks.data import make_source

    try:
        check_gpu_decode(dev)
    except ConfigError as exc:
        return {"available": False, "why": str(exc), "ok": None}
    path = make_source(work / "decode_check", 1, (640, 480), seed=5)[0]
    encoded = path.read_bytes()
    size = 32 if sizes.dry else 224
    transform = ImageTransform(size)
    cpu = torch.from_numpy(transform.decode(encoded, fast=True)).int()
    gpu, bad = decode_on_device([torch.frombuffer(bytearray(encoded), dtype=torch.uint8)], transform, dev)
    d = (gpu[0].cpu().int() - cpu).abs().float()
    return {"available": True, "size": size, "mean_abs_diff": d.mean().item(), "max_abs_diff": d.max().item(),
            "ok": not bad and d.mean().item() < 3.0}


# --- (f) end to end from JPEG shards

def photo_shards(folder: Path, sizes: Sizes) -> Path:
    """Photo-sized JPEGs (`bench data`'s generator) written as training shards, each kept as it
    is (no re-encoding), once: a folder that holds them already is reused."""
    from data_tools import convert

    from dbl_scale.cli.bench.common import cpu_count
    from benchmarks.data import make_source

    shards = folder / "shards"
    if (shards / "dbl_index.json").exists():
        return shards
    make_source(folder / "source", sizes.e2e_images, sizes.e2e_source, processes=cpu_count())
    convert.write_shards(convert.folder(str(folder / "source")),
                         convert.Options(out=str(shards), shard_size=sizes.e2e_shard, max_side=0,
                                         processes=cpu_count(), progress=False))
    return shards


class GpuUtilisation:
    """nvidia-smi's utilisation.gpu sampled every 200 ms in the background: (time, percent)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200", "-i", "0"], stdout=subprocess.PIPE, text=True,
                                         stderr=subprocess.DEVNULL)
        except OSError:
            self.proc = None
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:
                pass

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def mean(self, start: float, end: float) -> Optional[float]:
        inside = [p for t, p in self.samples if start <= t <= end]
        return statistics.mean(inside) if inside else None


def end_to_end(work: Path, sizes: Sizes, dry: bool, b: Optional[dict]) -> dict:
    """`dbl-scale train` from JPEG shards on disk: the vitb16_bertbase preset (ViT-B/16 + BERT-base
    from configs, bf16, zero2_gpu), the triplet, `train.compile`, `data.workers=auto`, at (b)'s
    batch. Throughput from the run's logged samples/s after its first log interval (compile,
    worker start-up), against (b)'s synthetic step of the same configuration; the loader's wait
    per step and the device's idle time from the run's data/* metrics; GPU utilisation from
    nvidia-smi over the same interval."""
    import torch
    from mlflow.tracking import MlflowClient  # heavy (seconds)

    from dbl_scale.config import resolve_config
    from dbl_scale.data import loader_plan, usable_cores
    from dbl_scale.cli.launch import config_args, run_ranks
    from dbl_scale.cli.train import MODULE as TRAIN

    rows = {r["name"]: r for r in (b or {}).get("rows", [])}
    synthetic = rows.get("triplet, ZeRO-2, compiled") or rows.get("triplet, ZeRO-2")
    batch = synthetic["batch"] if synthetic else sizes.e2e_batch
    compiled = synthetic is None or synthetic["compiled"]
    t0 = time.time()
    shards = photo_shards(work / "photos", sizes)
    data_s = time.time() - t0
    index = json.loads((shards / "dbl_index.json").read_text())
    cores, local = usable_cores()
    plan = loader_plan("auto", len(index["train"]["shards"]), batch * 3 * 224 * 224, cores, local)
    name = f"e2e-{'dry' if dry else 'cuda'}-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = f"sqlite:///{work / 'mlflow.db'}"
    overrides = [f"data.root={shards}", f"data.batch_size={batch}", "data.workers=auto", "loss.method=triplet",
                 f"train.steps={sizes.e2e_steps}", f"train.log_every={sizes.e2e_log_every}",
                 f"train.compile={str(compiled).lower()}", "eval.at_end=false", "checkpoint.at_end=false",
                 "tracking.log_model=false", f"tracking.uri={uri}", "tracking.experiment=gpu_check_e2e",
                 f"tracking.run_name={name}", f"train.output_dir={work / 'runs'}", *STEADY, *sizes.towers]
    util = GpuUtilisation() if torch.cuda.is_available() else None
    t1 = time.time()
    try:
        rc = run_ranks(1, TRAIN, config_args(resolve_config("vitb16_bertbase"), overrides))
    finally:
        if util is not None:
            util.stop()
    if rc != 0:
        raise RuntimeError(f"dbl-scale train exited with {rc}")
    run_id = json.loads((work / "runs" / name / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(uri)

    def history(key: str) -> list:
        return sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)

    rate = history("samples_per_s")
    steady = rate[1:] or rate  # the first interval holds the compile and the workers' start
    start, end = steady[0].timestamp / 1e3 - sizes.e2e_log_every * batch / steady[0].value, steady[-1].timestamp / 1e3

    def steady_mean(key: str) -> Optional[float]:
        values = [m.value for m in history(key) if m.step >= steady[0].step]
        return statistics.mean(values) if values else None

    # samples over seconds across the steady intervals (each interval is the same number of steps)
    samples_per_s = len(steady) / sum(1 / m.value for m in steady)
    return {"run": name, "batch": batch, "compiled": compiled, "images": index["train"]["samples"],
            "shards": len(index["train"]["shards"]), "source": list(sizes.e2e_source), "data_prep_s": round(data_s, 1),
            "loader_plan": plan.why, "train_wall_s": round(time.time() - t1, 1), "steps": sizes.e2e_steps,
            "steady_from_step": steady[0].step, "samples_per_s": samples_per_s,
            "synthetic_samples_per_s": synthetic["samples_per_s"] if synthetic else None,
            "x_synthetic": samples_per_s / synthetic["samples_per_s"] if synthetic else None,
            "wait_s": steady_mean("data/wait_s"), "wait_share": steady_mean("data/wait_share"),
            "device_idle_s": steady_mean("data/device_idle_s"),
            "gpu_utilisation": util.mean(start, end) if util is not None else None}


# ----------------------------------------------------------------------------- the table

def format_result(result: dict) -> str:
    p = result["parts"]
    dry = ", DRY RUN (tiny sizes)" if result.get("model", "vitb16_bertbase") != "demo" else ", on the CPU"
    lines = [f"bench gpu: {result['machine']}", f"device {result.get('device_name')}; commit {result.get('commit')}, "
             f"{result['date']}" + (dry if result["dry_run"] else "")]

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
        lines.extend(format_throughput(p["b"]))
    if not failed("c"):
        e, m = p["c"]["eval"], p["c"]["mining"]
        lines.append(f"(c) evaluation {e['images']} x {e['captions']} (d {e['dim']}, tiles of {e['tile_rows']}): "
                     f"{e['eval_s']:.2f} s compiled, {e['eval_eager_s']:.2f} s eager; the bare tiled product "
                     f"{e['product_s']:.2f} s: {e['x_product']:.2f}x compiled, {e['eager_x_product']:.2f}x eager "
                     f"(medians of 3, interleaved); tied queries {e['i2t_tied']} / {e['t2i_tied']}")
        peak = m["peak_above_inputs_bytes"]
        lines.append(f"    mining {m['images']} x {m['captions']} (d {m['dim']}, top {m['k_captions']} / "
                     f"{m['k_images']}): {m['seconds']:.1f} s, {m['pairs_per_s'] / 1e9:.1f} G pairs/s"
                     + (f", peak {peak / 2**20:.0f} MiB above the embeddings" if peak is not None else "")
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
                     f"{e['loader']['batches']} batches on {e['loader']['pixels_on']}"
                     + (" (pinned, copied on a side stream while the device is busy)" if e['loader']['pinned'] else "")
                     + f" equal the host's: {_ok(e['loader'])}")
        g = e["gpu_decode"]
        lines.append(f"    JPEG decode on the device (data.decode=gpu): " + (
            f"{g['size']} px from 640x480, mean |diff| {g['mean_abs_diff']:.2f} levels (max {g['max_abs_diff']:.0f}) "
            f"against the CPU's decode: {_ok(g)}" if g["available"] else f"not available: {g['why']}"))
    if not failed("f"):
        f = p["f"]
        ratio = f" = {f['x_synthetic']:.2f}x the synthetic step's {f['synthetic_samples_per_s']:.0f}" \
            if f.get("x_synthetic") else " (no synthetic step measured in this run: part b)"
        util = f"{f['gpu_utilisation']:.0f}%" if f.get("gpu_utilisation") is not None else "n/a"
        idle = f"{1e3 * f['device_idle_s']:.1f} ms" if f.get("device_idle_s") is not None else "n/a"
        lines.append(f"(f) dbl-scale train from {f['images']} JPEGs of {f['source'][0]}x{f['source'][1]} in "
                     f"{f['shards']} shards, batch {f['batch']}, {'compiled' if f['compiled'] else 'eager'}, "
                     f"{f['loader_plan']}")
        lines.append(f"    {f['samples_per_s']:.0f} samples/s from step {f['steady_from_step']}{ratio}; GPU "
                     f"utilisation {util}; loader wait {1e3 * (f['wait_s'] or 0):.1f} ms per step "
                     f"({100 * (f['wait_share'] or 0):.1f}% of the time), device idle for it {idle} per step")
    return "\n".join(lines)


def format_throughput(b: dict) -> list[str]:
    peak = f"{b['peak_tflops']:.0f} TFLOP/s ({b['peak_source']})" if b["peak_tflops"] else b["peak_source"]
    lines = [f"(b) {b['model']}; batch {b['batch']} ({b['batch_how']}); "
             f"{b['flops_per_sample']['train'] / 1e9:.3g} GFLOP per trained sample, "
             f"{b['flops_per_sample']['forward'] / 1e9:.3g} per anchor forward; bf16 peak {peak}",
             f"    MFU: per trained sample (forward + backward); 'anchor': DBL's anchor forward (no gradient), as a "
             f"share of the peak, not counted in MFU. ms/step: min / median / max of {b['repeats']} repeats of "
             f"{b['steps_per_repeat']} steps, variants interleaved; compile: {b['compile']}",
             f"    {'':34}{'MFU':>6}{'anchor':>7}{'samples/s':>10}{'batch':>6}{'ms/step min / med / max':>25}"
             f"{'peak GiB':>9}{'warm-up s':>10}{'x bare':>7}{'x eager':>8}{'x triplet':>10}"]

    def num(x, fmt: str, scale: float = 1.0) -> str:
        return "-" if x is None else format(x * scale, fmt)

    for r in b["rows"]:
        times = f"{1e3 * r['step_s_min']:.1f} / {1e3 * r['step_s']:.1f} / {1e3 * r['step_s_max']:.1f}"
        lines.append(f"    {r['name']:<34}{num(r['mfu'], '.1%'):>6}{num(r['anchor_mfu'], '.1%'):>7}"
                     f"{r['samples_per_s']:>10.0f}{r['batch']:>6}{times:>25}{num(r['peak_bytes'], '.1f', 2 ** -30):>9}"
                     f"{r['warmup_s']:>10.1f}{num(r['x_bare'], '.2f'):>7}{num(r['x_eager'], '.2f'):>8}"
                     f"{num(r['x_triplet'], '.2f'):>10}")
    zero = [r for r in b["rows"] if r["runner"] != "bare loop" and "optimizer" in r]
    if zero:
        lines.append(f"    optimizer inside DeepSpeed: {zero[0]['optimizer']} (fused: {zero[0]['fused']}), "
                     f"weights {zero[0]['param_dtype']}; ZeRO-3 runs eager only (train.compile is a config "
                     "error there)")
    return lines


def _ok(check: dict) -> str:
    return "ok" if check.get("ok") else "FAILED"


# ----------------------------------------------------------------------------- argparse

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("gpu", help="the GPU path end to end: throughput and MFU, the loader, parity",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/gpu_check", help="folder for its data, runs and MLflow store")
    p.add_argument("--json", default=None, metavar="PATH", help="results (default: WORK/gpu_check.json)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["b", "e", "d", "c", "f", "a"],
                   help="which parts (default: all); b-e run first, in this order, in one rank process, then f, then a")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="N",
                   help="the device's dense bf16 peak, for a device not in PEAK_BF16_TFLOPS")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="timed steps per repeat in (b) (default 5)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="repeats of each variant in (b)")
    p.add_argument("--runners", nargs="+", choices=tuple(RUNNERS), default=list(RUNNERS),
                   help="(b)'s runners: the bare loop, ZeRO-2, ZeRO-3 (default: all)")
    p.add_argument("--model", choices=("vitb16_bertbase", "demo"), default="vitb16_bertbase",
                   help="(b)'s towers: the vitb16_bertbase preset (tiny in a dry run), or the demo preset's at its "
                        "per-rank batch, fp32 under the CPU ZeRO configs (compile on the CPU: `--parts b --model demo`)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what the test suite runs)")
    p.set_defaults(func=cmd_bench_gpu)


def rank_main(argv=None) -> int:
    """Rank side (`benchmarks.gpu_rank`): parts (b)-(e) in one process; writes their results to
    --out as it goes."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--parts", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--model", default="vitb16_bertbase")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runners", nargs="+", default=list(RUNNERS))
    parser.add_argument("--dry-run", action="store_true")
    return worker(parser.parse_args(argv))


if __name__ == "__main__":
    import benchmarks

    sys.exit(benchmarks.run(add_parser))
