"""`train.compile` through the production training step: on each rank `build_branches` makes
the branches (ZeRO-2, towers' blocks compiled) and `train.train_step` takes one step on this
rank's slice of a fixed global batch. The optimizer is plain SGD at a large learning rate and
nothing else, so each parameter's change is -lr x its gradient. Rank 0 saves, per variant, the
all-reduced loss, the target's gradient and how many graphs TorchDynamo compiled; the test
compares them with an eager single-process step on the whole batch.
Usage: torchrun --nproc_per_node W compile_step.py OUT.pt DATA_ROOT"""
import json
import sys
from pathlib import Path

import torch

from dbl_scale import distributed
from dbl_scale.branches import build_branches
from dbl_scale.checkpoint import full_state_dict
from dbl_scale.config import load_config
from dbl_scale.methods import build_method
from dbl_scale.roles import TARGET
from dbl_scale.tokenizer import ensure_tokenizer
from dbl_scale.train import train_step
from parity_common import MODEL, local_slice, make_batch

LR = 1000.0
STEP = ["optim.weight_decay=0", "optim.grad_clip=0", "optim.warmup_steps=0", "optim.schedule=constant",
        f"optim.lr={LR}", "loss.sum_warmup_steps=0", "train.compile=true"]
VARIANTS = {"triplet": ["loss.method=triplet"], "dbl_momentum": ["loss.method=dbl", "loss.dbl.scenario=momentum"]}


def main(out: str, data_root: str) -> None:
    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    sgd = Path(out).parent / f"sgd-r{rank}.json"
    sgd.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                               "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                               "optimizer": {"type": "SGD", "params": {"lr": "auto", "weight_decay": "auto"}},
                               "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 2},
                               "steps_per_print": 10 ** 9}))
    results = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(None, MODEL + STEP + overrides + [f"data.root={data_root}", f"train.deepspeed={sgd}",
                                                            "data.batch_size=4"])
        tokenizer = ensure_tokenizer(cfg.data, cfg.model.text)
        method = build_method(cfg)
        branches = build_branches(cfg, method, tokenizer, world)
        target = branches[TARGET]
        state = full_state_dict(target.module)  # collective under ZeRO-3; here every rank calls it alike
        before = {n: v.float().clone() for n, v in state.items()} if rank == 0 else None
        batch = local_slice(make_batch(tokenizer), rank, world)
        logged = train_step(method, branches, batch, 0)
        loss = distributed.all_reduce_sum(logged["loss"].detach().reshape(1)).item()
        after = full_state_dict(target.module)
        if rank == 0:
            names = {n for n, _ in target.module.named_parameters()}
            grads = {n: (before[n] - after[n].float()) / LR for n in names}
            compiled = sum("forward" in vars(m) for m in target.module.modules())
            results[name] = {"loss": loss, "grads": grads, "blocks_compiled": compiled}
        for br in branches:
            for engine in (br.engine, br.partitioner):
                if engine is not None:
                    engine.destroy()
    if rank == 0:
        from torch._dynamo.utils import counters

        torch.save({"variants": results, "graphs": int(counters["stats"]["unique_graphs"])}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
