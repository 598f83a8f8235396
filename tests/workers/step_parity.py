"""Invariant 1 through the production training step: every variant's branches are built by
`build_branches` and take one `train.train_step` on this rank's slice of a fixed global
batch. The optimizer is plain SGD with a large learning rate and nothing else (no decay,
clipping, warm-up), so each parameter's change is -lr x its gradient: whatever the step does
to the gradient (the world-size scale, DeepSpeed's averaging, accumulation) shows in it.
Rank 0 saves, per variant, the all-reduced loss, every trained branch's gradient (change /
-lr) and every EMA anchor's new weights. Run under 1 and 2 ranks; the test compares.
Usage: torchrun --nproc_per_node W step_parity.py OUT.pt DATA_ROOT ZERO_STAGE"""
import json
import sys
from pathlib import Path

import torch

from dbl_scale import distributed
from dbl_scale.branches import build_branches, new_model
from dbl_scale.checkpoint import full_state_dict
from dbl_scale.config import load_config, save_config
from dbl_scale.tokenizer import ensure_tokenizer
from dbl_scale.methods import build_method
from dbl_scale.train import train_step
from parity_common import GLOBAL_BATCH, LOSS_ONLY, MODEL, VARIANTS, local_slice, make_batch, make_queues

LR = 1000.0
STEP = ["optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup_steps=0", "optim.schedule=constant",
        f"optim.lr={LR}"]
EXTRA = {"dbl_offline": ["loss.method=dbl", "loss.dbl.scenario=offline", "loss.dbl.anchor={run}"]}

out, data_root, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
distributed.init_distributed()
rank, world = distributed.rank(), distributed.world_size()
work = Path(out).parent
sgd = work / f"sgd-zero{stage}-w{world}-r{rank}.json"  # each rank its own copy: no race on one file
sgd.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                           "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                           "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
                           "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
                           "steps_per_print": 10 ** 9}))
common = MODEL + STEP + [f"data.root={data_root}", f"train.deepspeed={sgd}"]

# a finished run of the parity towers' size: the frozen anchor / teacher of the variants that need one
run = work / f"finished-w{world}"
with distributed.rank_zero_first():
    if rank == 0 and not (run / "model.pt").exists():
        run.mkdir(exist_ok=True)
        run_cfg = load_config(None, common)
        save_config(run_cfg, run / "config.yaml")
        torch.save(new_model(run_cfg, ensure_tokenizer(run_cfg.data, run_cfg.model.text), 7).state_dict(),
                   run / "model.pt")


def trained_and_ema(branches):
    """Full parameters (gathered from the shards under ZeRO-3; collective) of the trained and
    EMA branches, on rank 0 (None elsewhere)."""
    out = {}
    for k, br in enumerate(branches):
        if br.role in ("trained", "ema"):
            state = full_state_dict(br.module)
            names = {n for n, _ in br.module.named_parameters()}
            out[k] = state and {n: v.float().clone() for n, v in state.items() if n in names}  # a snapshot
    return out


def step(name, overrides, micro_batches=1):
    cfg = load_config(None, common + [o.replace("=unused", f"={run}").format(run=run) for o in overrides]
                      + [f"data.batch_size={GLOBAL_BATCH // micro_batches // world}",
                         f"train.grad_accum={micro_batches}"])
    method = build_method(cfg)
    tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
    branches = build_branches(cfg, method, tokenizer, world)
    if method.name == "coder":
        method.start(branches[-1].module, None, 1, rank, None)
        method.queues = make_queues(cfg)
    before = trained_and_ema(branches)
    batch = make_batch(tokenizer, cfg)
    loss = 0.0
    for mb in range(micro_batches):  # micro-batch mb: rows mb*B..(mb+1)*B of the global batch, per rank
        rows = GLOBAL_BATCH // micro_batches
        part = {k: v[mb * rows:(mb + 1) * rows] for k, v in batch.items()} if micro_batches > 1 else batch
        local = local_slice(part, rank, world) if micro_batches == 1 else \
            {k: v[rank * rows // world:(rank + 1) * rows // world] for k, v in part.items()}
        terms = train_step(method, branches, local, 0, boundary=mb == micro_batches - 1)
        loss += distributed.all_reduce_sum(terms["loss"].detach().float()).item() / micro_batches
    after = trained_and_ema(branches)
    result = {"loss": loss, "grads": {}, "ema": {}, "ema_formula": {}}
    if rank == 0:
        for k, br in enumerate(branches):
            if br.role == "trained":
                result["grads"][k] = {n: (before[k][n] - p) / LR for n, p in after[k].items()}
            elif br.role == "ema":  # and what m * anchor + (1 - m) * target says it must be
                m, target = method.momentum(1), after[len(branches) - 1]
                result["ema"][k] = after[k]
                result["ema_formula"][k] = {n: m * before[k][n] + (1 - m) * target[n] for n in after[k]}
    for br in branches:
        for engine in (br.engine, br.partitioner):
            if engine is not None:
                engine.destroy()
    return result


results = {name: step(name, overrides) for name, overrides in {**VARIANTS, **EXTRA}.items()
           if stage == 2 or name not in LOSS_ONLY}
results["triplet_grad_accum"] = step("triplet_grad_accum", VARIANTS["triplet"], micro_batches=2)
if rank == 0:
    torch.save(results, out)
distributed.shutdown()
