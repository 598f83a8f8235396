"""`dbl-scale bench memory`: what each ZeRO stage keeps on a rank for a model, and what each
way of obtaining the DBL anchor costs per training step (`DESCRIPTION` has the details)."""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ... import distributed
from ...branches import build_branches
from ...checkpoint import save_model
from ...config import load_config, resolve_config, save_config
from ...tokenizer import ensure_tokenizer
from ...methods import build_method
from ...roles import TARGET
from ...optim import resolve_ds_config
from ...train import train_step
from ..data import prepare_data
from ..launch import run_ranks
from .common import MIB, machine_line, release

DESCRIPTION = """`dbl-scale bench memory`: what each ZeRO stage keeps on a rank, and what each way of
obtaining the DBL anchor costs per training step.

It starts itself under torchrun on `--nproc` ranks (CPU ranks over gloo here, GPUs where
there are some) and trains on synthetic batches (random pixels and token ids: no data
loading in the figures), with the model and batch of `--config` plus any `key=value`
overrides (default: the demo preset with 4-layer towers of width 256, 6.6M parameters).

Part 1, ZeRO 0..3 (`ds_configs/zero{N}.json`, or their bf16 variants with --bf16): the
target branch alone (the triplet) takes two steps, then this rank's bytes are counted by role:
  params     the module's weights as this rank stores them (its shards under ZeRO-3)
  grads      gradient storage after the backward of a step: the parameters' .grad and the
             ZeRO optimizer's gradient partitions and reduce buckets
  optimizer  the torch optimizer's state (Adam's two moments) and the master weights that
             are not the module's own tensors (the fp32 partitions ZeRO keeps)
Every tensor is counted by its storage, once (views of one flat buffer share it). Ratios
are to ZeRO-0 in the same run.

Part 2, step time under `--stage` (default ZeRO-2): one step is the forward of every branch,
the losses, backward and optimizer step of every trained branch and the anchor update, as
`train.train_step` runs it. Scenarios: the triplet (one branch: the baseline), DBL momentum
(+ an EMA anchor), online (K trained branches, each its own engine) and offline (+ a frozen
anchor from a checkpoint). All are built at once and timed interleaved, one step of each per
round, medians over the rounds; each as a ratio to the baseline. Target: momentum <= 1.4x.

    dbl-scale bench memory --nproc 2 --rounds 20
"""  # the --help text

MODULE = "dbl_scale.cli.bench.memory"

MOMENTUM_TARGET = 1.4
SCENARIOS = {  # name -> overrides on top of the bench config
    "triplet (baseline)": ["loss.method=triplet"],
    "dbl momentum": ["loss.method=dbl", "loss.dbl.scenario=momentum"],
    "dbl online": ["loss.method=dbl", "loss.dbl.scenario=online"],
    "dbl offline": ["loss.method=dbl", "loss.dbl.scenario=offline"],
}
# without --config: the demo preset with both towers 4 layers of width 256 (6.6M parameters)
DEFAULT_MODEL = ["model.vision.hidden=256", "model.vision.layers=4", "model.vision.heads=4",
                 "model.text.hidden=256", "model.text.layers=4", "model.text.heads=4", "model.embed_dim=256"]
STEADY = ["loss.sum_warmup_steps=0"]  # every step is a steady-state step (no VSE-infinity warm-up)


# ----------------------------------------------------------------------------- counting bytes

def _tensors(value, depth: int = 3):
    """Tensors held in a value: a tensor, or lists / tuples / dicts of them (nested)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth - 1)
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth - 1)


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} of the tensors' storages (a view counts its whole storage once)."""
    out = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            out[s.data_ptr()] = s.nbytes()
    return out


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def param_storages(module: torch.nn.Module) -> dict[int, int]:
    return _storages(p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters())


def grad_storages(engine, exclude: dict[int, int]) -> dict[int, int]:
    """The parameters' .grad plus every tensor the ZeRO optimizer holds under an attribute
    named for gradients or reduce buckets ("grad", "ipg"), less storages counted elsewhere."""
    tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        for name, value in vars(opt).items():
            if "grad" in name.lower() or "ipg" in name.lower():
                tensors.extend(_tensors(value))
    return {k: v for k, v in _storages(tensors).items() if k not in exclude}


def optimizer_storages(engine, exclude: dict[int, int]) -> dict[int, int]:
    """The torch optimizer's state and parameters, plus the ZeRO optimizer's fp32 master
    copies (attributes named "fp32": ZeRO-3 empties the torch optimizer's parameter lists
    between steps), less storages counted elsewhere."""
    opt = _inner_optimizer(engine)
    tensors = [t for state in opt.state.values() for t in _tensors(state)]
    tensors += [p for group in opt.param_groups for p in group["params"]]
    if not isinstance(engine.optimizer, torch.optim.Optimizer):
        for name, value in vars(engine.optimizer).items():
            if "fp32" in name.lower():
                tensors.extend(_tensors(value))
    return {k: v for k, v in _storages(tensors).items() if k not in exclude}


# ----------------------------------------------------------------------------- the worker (one rank)

def _batch(cfg, vocab: int, rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    b, s, length = cfg.data.batch_size, cfg.model.vision.image_size, cfg.model.text.max_length
    return {"pixel_values": torch.randn(b, 3, s, s, generator=g),
            "input_ids": torch.randint(5, vocab, (b, length), generator=g),
            "attention_mask": torch.ones(b, length, dtype=torch.long),
            "image_ids": torch.arange(b) + b * rank + 100000 * step}


def _ds_file(stage: int, bf16: bool, folder: Path) -> str:
    """ds_configs/zero{stage}.json, with bf16 switched on for --bf16 (written into `folder`)."""
    path = resolve_ds_config(f"zero{stage}")
    if not bf16:
        return str(path)
    ds = json.loads(path.read_text())
    ds["bf16"] = {"enabled": True}
    out = folder / f"zero{stage}_bf16.json"
    out.write_text(json.dumps(ds))
    return str(out)


def zero_memory(args, tokenizer, rank: int, world: int, folder: Path) -> list[dict]:
    rows = []
    for stage in (0, 1, 2, 3):
        ds = _ds_file(stage, args.bf16, folder)
        cfg = load_config(args.config, [*args.overrides, "loss.method=triplet", f"train.deepspeed={ds}"])
        method = build_method(cfg)
        branches = build_branches(cfg, method, tokenizer, world)
        engine = branches[TARGET].engine
        train_step(method, branches, _batch(cfg, len(tokenizer), rank, 0), 0)
        batch = _batch(cfg, len(tokenizer), rank, 1)
        dtype = next(engine.module.parameters()).dtype
        dev = engine.device
        out = engine(batch["pixel_values"].to(dev, dtype), batch["input_ids"].to(dev), batch["attention_mask"].to(dev))
        loss = method.losses([out], batch["image_ids"].to(dev), 1)[0]["loss"]
        engine.backward(loss * world)
        params = param_storages(engine.module)
        grads = grad_storages(engine, params)
        engine.step()
        params = param_storages(engine.module)
        opt = optimizer_storages(engine, {**params, **grads})
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        rows.append({"stage": stage, "config": f"zero{stage}" + "_bf16" * args.bf16, "n_params": n_params, "params": sum(params.values()),
                     "grads": sum(grads.values()), "optimizer": sum(opt.values())})
        del out, loss, engine
        release(branches)
    return rows


def step_times(args, tokenizer, rank: int, world: int, folder: Path, anchor_dir: Path) -> dict:
    ds = _ds_file(args.stage, args.bf16, folder)
    common = [*args.overrides, f"train.deepspeed={ds}", f"train.steps={args.rounds + args.warmup + 1}"]
    built = {}
    for name, extra in SCENARIOS.items():
        if name.split()[-1] not in args.scenarios and name != "triplet (baseline)":
            continue
        if name == "dbl offline":  # the anchor: the baseline's towers, saved as a finished run
            cfg0 = built["triplet (baseline)"][0].cfg
            if rank == 0:
                anchor_dir.mkdir()
            distributed.barrier()
            save_model(built["triplet (baseline)"][1][TARGET].engine, anchor_dir / "model.pt")
            if rank == 0:
                save_config(cfg0, anchor_dir / "config.yaml")
            distributed.barrier()
            extra = extra + [f"loss.dbl.anchor={anchor_dir}"]
        method = build_method(load_config(args.config, common + extra))
        built[name] = (method, build_branches(method.cfg, method, tokenizer, world))
    times = {name: [] for name in built}
    dev = built["triplet (baseline)"][1][TARGET].engine.device
    for step in range(args.warmup + args.rounds):
        batch = _batch(built["triplet (baseline)"][0].cfg, len(tokenizer), rank, step)
        for name, (method, branches) in built.items():
            distributed.barrier()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            terms = train_step(method, branches, batch, step)
            float(terms["loss"])  # waits for the step
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    # a step takes as long as its slowest rank
    med = {name: statistics.median(t) for name, t in times.items()}
    slowest = distributed.all_reduce_max(torch.tensor([med[n] for n in built], dtype=torch.float64))
    branches_of = {name: ",".join(br.role for br in b) for name, (_, b) in built.items()}
    return {name: {"ms": 1e3 * slowest[i].item(), "branches": branches_of[name]} for i, name in enumerate(built)}


def worker(args) -> int:
    faulthandler.enable()  # a native crash prints the Python stack of every thread
    warnings.filterwarnings("ignore", category=FutureWarning)
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = load_config(args.config, args.overrides)
    tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    result = {"world": world, "stage": args.stage, "bf16": args.bf16}
    folder = Path(args.out).parent / f"rank{rank}"  # this rank's DeepSpeed files (one machine: the launcher's)
    folder.mkdir(exist_ok=True)
    if not args.skip_memory:
        result["memory"] = zero_memory(args, tokenizer, rank, world, folder)
    if not args.skip_time:  # the offline anchor is written once, by rank 0
        result["time"] = step_times(args, tokenizer, rank, world, folder, Path(args.out).parent / "rank0" / "anchor")
    distributed.barrier()
    if rank == 0:
        Path(args.out).write_text(json.dumps(result, indent=1))
    distributed.shutdown()
    return 0


# ----------------------------------------------------------------------------- the command

def format_memory(rows: list[dict]) -> str:
    base = rows[0]
    total0 = base["params"] + base["grads"] + base["optimizer"]
    lines = [f"{'':8}{'params MiB':>11}{'grads MiB':>11}{'optim MiB':>11}{'total MiB':>11}"
             f"{'params':>9}{'grads':>8}{'optim':>8}{'total':>8}   (ratios to ZeRO-0)"]
    for r in rows:
        total = r["params"] + r["grads"] + r["optimizer"]
        ratio = [r[k] / base[k] if base[k] else float("nan") for k in ("params", "grads", "optimizer")]
        lines.append(f"ZeRO-{r['stage']:<3}{r['params'] / MIB:11.1f}{r['grads'] / MIB:11.1f}"
                     f"{r['optimizer'] / MIB:11.1f}{total / MIB:11.1f}"
                     f"{ratio[0]:9.2f}{ratio[1]:8.2f}{ratio[2]:8.2f}{total / total0:8.2f}")
    return "\n".join(lines)


def format_times(times: dict) -> str:
    base = times["triplet (baseline)"]["ms"]
    lines = [f"{'scenario':<20}{'branches':<26}{'ms/step':>9}{'x baseline':>12}"]
    for name, r in times.items():
        lines.append(f"{name:<20}{r['branches']:<26}{r['ms']:9.1f}{r['ms'] / base:12.2f}")
    return "\n".join(lines)


def cmd_bench_memory(args) -> int:
    overrides = STEADY + (DEFAULT_MODEL if args.config is None else []) + list(args.overrides)
    args.config = resolve_config(args.config or "demo")
    cfg = load_config(args.config, overrides)  # a bad key fails here, before any process starts
    prepare_data(cfg)  # the tokenizer comes from the dataset's captions
    print(machine_line(torch.device("cuda" if torch.cuda.is_available() else "cpu")), flush=True)
    print(f"bench memory: {args.nproc} ranks, model {args.config} + {' '.join(overrides)}, "
          f"batch {cfg.data.batch_size} per rank, {'bf16' if args.bf16 else 'fp32'}", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        flags = ["--out", str(out), "--stage", str(args.stage), "--rounds", str(args.rounds),
                 "--warmup", str(args.warmup), "--scenarios", *args.scenarios]
        flags += ["--bf16"] * args.bf16 + ["--skip-memory"] * args.skip_memory + ["--skip-time"] * args.skip_time
        rc = run_ranks(args.nproc, MODULE, [*flags, "--config", args.config, "--", *overrides])
        if rc != 0:
            print(f"bench memory: the ranks failed (exit {rc})", file=sys.stderr)
            return rc
        result = json.loads(out.read_text())
    if "memory" in result:
        n = result["memory"][0]["n_params"]
        print(f"\nper-rank bytes after a training step, ZeRO 0-3, {result['world']} ranks, "
              f"{n / 1e6:.2f}M parameters (target branch alone)")
        print(format_memory(result["memory"]))
    if "time" in result:
        print(f"\nstep time under ZeRO-{args.stage}, median of {args.rounds} interleaved rounds "
              f"(the slowest rank's)")
        print(format_times(result["time"]))
        if "dbl momentum" in result["time"]:
            ratio = result["time"]["dbl momentum"]["ms"] / result["time"]["triplet (baseline)"]["ms"]
            verdict = "met" if ratio <= MOMENTUM_TARGET else "NOT met"
            print(f"momentum / baseline = {ratio:.2f} (target <= {MOMENTUM_TARGET}: {verdict})")
    print(f"bench wall time: {time.time() - t0:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"results written to {args.json}")
    return 0


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="preset name or YAML (default: the demo preset with 4-layer towers of width 256)")
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage of the step-time part")
    p.add_argument("--rounds", type=int, default=20, help="timed steps per scenario")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per scenario first")
    p.add_argument("--bf16", action="store_true", help="bf16 (each ZeRO stage's config with bf16 enabled)")
    p.add_argument("--scenarios", nargs="+", choices=("momentum", "online", "offline"),
                   default=["momentum", "online", "offline"],
                   help="DBL scenarios to time beside the baseline (all are built at once: fewer for big models)")
    p.add_argument("--skip-memory", action="store_true", help="only the step times")
    p.add_argument("--skip-time", action="store_true", help="only the ZeRO memory table")


EXAMPLES = """examples:
  dbl-scale bench memory --nproc 2 --rounds 20
  dbl-scale bench memory --config vitb16_bertbase --bf16 --nproc 8 --skip-time   your model's ZeRO memory"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("memory", help="per-rank bytes of ZeRO 0-3 and the step time of each DBL scenario",
                              description=DESCRIPTION, epilog=EXAMPLES)
    _add_arguments(p)
    p.add_argument("--nproc", type=int, default=2, help="ranks")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=64")
    p.set_defaults(func=cmd_bench_memory)


def main(argv=None) -> int:
    """Rank side: measure on this rank; rank 0 writes the result file."""
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("--out", required=True)
    _add_arguments(parser)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
