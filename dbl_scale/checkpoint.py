"""Checkpoints: each trained branch's DeepSpeed state (module, optimizer, LR schedule) plus the
run's own state (step, anchor EMA, the method's state such as CODER's queues or AOQ's
candidates and sampler, RNG of every rank, the MLflow run id), so that a resumed run
continues as if never stopped. Also the weights-only files: a finished run's `model.pt`
(`save_model`), and loading weights into (ZeRO-3 partitioned) modules.

A checkpoint is written into `step_NNNNNNNN.tmp/` by all ranks, marked COMPLETE by rank 0
when every rank has finished, and only then renamed to `step_NNNNNNNN/`: a crash while
saving leaves a `.tmp` folder that is never read. The newest K complete ones are kept.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import distributed
from .roles import EMA

PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used (it is damaged, or holds more than data)."""


def rng_state() -> dict:
    """This rank's generators as tensors and plain data (loadable with weights_only=True). On a
    GPU only this rank's own device's generator: asking every visible device (`get_rng_state_all`)
    would open a CUDA context on each GPU of the node from every rank, and a resume with a
    different set of visible devices could not put them back."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # an older checkpoint: every visible device's, indexed by device
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)  # the current device: this rank's (`distributed.init_distributed`)


def _deepspeed_data_classes() -> list:
    """The plain-data classes DeepSpeed pickles into its optimizer states (loss scaler, ZeRO
    stage, parameter fragment addresses): allowed, by name, when its files are read with
    weights_only=True."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # heavy: only to resume
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location="cpu", mmap: bool = False):
    """`torch.load` with weights_only=True: tensors and plain data only, so a tampered file can
    never run code; anything else is refused with a CheckpointError that names the file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors and plain data, and "
                              f"loading it could run code ({reason})") from None


def verify_safe(folder: str | Path) -> None:
    """Read every .pt file under `folder` with `safe_load` (memory-mapped): before handing the
    folder to a DeepSpeed tool that reads it with weights_only=False."""
    for path in sorted(Path(folder).rglob("*.pt")):
        safe_load(path, mmap=True)


def _guard(engine) -> None:
    """Make DeepSpeed read this engine's checkpoint files through `safe_load` (its own reader
    uses weights_only=False)."""
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)


def _partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@torch.no_grad()
def full_state_dict(module: torch.nn.Module) -> Optional[dict]:
    """The module's state dict on CPU, on rank 0 (None elsewhere). A module ZeRO-3 partitioned
    is gathered one parameter at a time (collective: every rank calls it), so no rank ever
    holds more than one full parameter on its device."""
    if not _partitioned(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if distributed.is_main() else None
    import deepspeed  # heavy (seconds): only ZeRO-3 partitioned modules need it

    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}  # parameters: empty shards here
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            if distributed.is_main():
                state[name] = p.detach().cpu().clone()
    return state if distributed.is_main() else None


@torch.no_grad()
def load_weights(module: torch.nn.Module, state: dict, strict: bool = True) -> tuple[list, list]:
    """`module.load_state_dict(state)`, also for a module ZeRO-3 partitioned: there each
    parameter is gathered on its own, written from rank 0's `state` and re-sharded.
    Returns (missing, unexpected) keys."""
    if not _partitioned(module):
        result = module.load_state_dict(state, strict=strict)
        return result.missing_keys, result.unexpected_keys
    import deepspeed  # heavy (seconds): only ZeRO-3 partitioned modules need it

    own = set(module.state_dict().keys())
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if strict and (missing or unexpected):
        raise RuntimeError(f"load_weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in module.named_parameters():
        if name in state:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if distributed.is_main():
                    p.copy_(state[name])
    for name, b in module.named_buffers():
        if name in state:
            b.copy_(state[name])
    return missing, unexpected


def save_model(engine, path: Path) -> None:
    """A trained branch's weights (a finished run's `model.pt`), written atomically. Under
    ZeRO-3 the shards are gathered (collective: every rank calls this)."""
    tmp = path.with_name(path.name + ".tmp")
    engine.save_16bit_model(str(path.parent), tmp.name)
    if distributed.is_main():
        os.replace(tmp, path)
    distributed.barrier()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
             and (p / "COMPLETE").exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve(root: Path, resume: str) -> Optional[Path]:
    """`latest`: the newest complete checkpoint under root (None when there is none yet);
    anything else: that checkpoint folder, which must be complete."""
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no COMPLETE marker)")
    return path


def save(root: Path, step: int, branches, state: dict, rank_state: dict, keep: int) -> Path:
    """Collective: every rank calls it. `state` is the same on every rank (written by rank 0);
    `rank_state` is this rank's own (RNG, sampler generators)."""
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}.tmp"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        for k, br in enumerate(branches):
            if br.engine is not None:
                br.engine.save_checkpoint(str(tmp), tag=f"branch{k}", save_latest=False)
            elif br.role == EMA:
                state_k = br.ema_state_dict()  # fp32 when a bf16 anchor keeps an fp32 average
                if distributed.is_main():
                    torch.save(state_k, tmp / f"branch{k}_ema.pt")
        torch.save(rank_state, tmp / f"rank{distributed.rank():05d}.pt")
        if distributed.is_main():
            torch.save(state, tmp / "state.pt")
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as either, from torch.save's writer
        raise _write_failed(root, step, tmp, exc) from exc
    distributed.barrier()
    if distributed.is_main():
        (tmp / "COMPLETE").write_text(f"step {step}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _write_failed(root: Path, step: int, tmp: Path, exc: Exception) -> CheckpointError:
    """The error of a checkpoint this rank could not write (the launcher then stops the other
    ranks). Its half-written folder is removed, to give the space back; the previous
    checkpoints are untouched."""
    shutil.rmtree(tmp, ignore_errors=True)
    free = shutil.disk_usage(root).free / 2**20
    previous = complete_checkpoints(root)
    kept = f"the newest complete checkpoint, {previous[-1]}, is intact" if previous else "there is no earlier checkpoint"
    return CheckpointError(f"rank {distributed.rank()} could not write checkpoint step {step} into {root} "
                           f"({str(exc).strip().splitlines()[-1][:200]}; {free:.1f} MiB free there): nothing of it "
                           f"is kept, {kept}. Free some space, then continue with checkpoint.resume=latest")


def clean_partial(root: Path) -> list[Path]:
    """Remove the `.tmp` folders a crash left mid-save (never read); returns them."""
    stale = sorted(root.glob(f"{PREFIX}*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def layout(method_name: str, branches) -> dict:
    """What a checkpoint must match to be resumed: the method, its branches' roles, the number
    of ranks and each branch's parameter count (other tower sizes change it)."""
    sizes = [sum(getattr(p, "ds_numel", p.numel()) for p in br.module.parameters()) for br in branches]
    return {"method": method_name, "roles": [br.role for br in branches],
            "world_size": distributed.world_size(), "parameters": sizes}


def load(path: Path, branches, expected: Optional[dict] = None) -> tuple[dict, dict]:
    """Restore every branch from `path`; returns (run state, this rank's state). A checkpoint
    whose `layout` differs from `expected` is refused before anything is loaded, naming what
    differs."""
    state = safe_load(path / "state.pt", mmap=True)  # memory-mapped: AOQ's candidates are large and shared
    saved = state.get("layout")
    if expected is not None and saved is not None and saved != expected:
        diffs = "; ".join(f"{k}: {saved.get(k)} in the checkpoint, {v} in this run"
                          for k, v in expected.items() if saved.get(k) != v)
        raise CheckpointError(f"{path} was written by another kind of run ({diffs})")
    for k, br in enumerate(branches):
        if br.engine is not None:
            _guard(br.engine)
            loaded, _ = br.engine.load_checkpoint(str(path), tag=f"branch{k}")
            if loaded is None:
                raise RuntimeError(f"DeepSpeed could not load branch {k} from {path}")
        elif br.role == EMA:
            br.load_ema_state(safe_load(path / f"branch{k}_ema.pt", mmap=True))
    rank_file = path / f"rank{distributed.rank():05d}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(f"{rank_file} missing: was the checkpoint written with another number of ranks?")
    return state, safe_load(rank_file)
