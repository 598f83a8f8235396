"""2-rank half of the distributed-loss test: each rank takes its slice of a fixed global
batch and runs the training code's losses with every trained branch in a DeepSpeed engine;
rank 0 saves, per variant and trained branch, the all-reduced loss and the full gradients
(safe_get_full_grad), for the test to compare with one process on the whole batch.
Usage: torchrun ... loss_parity.py OUT.pt TOKENIZER_DIR ZERO_STAGE"""
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from dbl_scale import distributed
from dbl_scale.config import load_config
from dbl_scale.optim import deepspeed_config
from parity_common import VARIANTS, compute_losses, forward_inputs, local_slice, make_batch, make_queues, models_for

out, tok_dir, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
distributed.init_distributed()
rank, world = distributed.rank(), distributed.world_size()
ds_cfg = load_config(None, ["data.batch_size=4", "optim.lr=1e-30", "optim.weight_decay=0.0", "optim.grad_clip=0.0",
                            f"train.deepspeed=ds_configs/zero{stage}.json"])
results = {}
for name in VARIANTS:
    cfg, roles, models, tokenizer = models_for(name, tok_dir)
    local = local_slice(make_batch(tokenizer, cfg), rank, world)
    engines = [deepspeed.initialize(model=m, model_parameters=list(m.parameters()),
                                    config=deepspeed_config(ds_cfg, world))[0] if role == "trained" else None
               for m, role in zip(models, roles)]
    outs = []
    for m, e in zip(models, engines):
        if e is not None:
            outs.append(e(local["pixel_values"], local["input_ids"], local["attention_mask"],
                          **forward_inputs(cfg, outs)))
        else:
            with torch.no_grad():
                outs.append(m(local["pixel_values"], local["input_ids"], local["attention_mask"]))
    terms = compute_losses(cfg, outs, local["image_ids"], queues=make_queues(cfg))
    results[name] = {}
    for k, (e, t) in enumerate(zip(engines, terms)):
        if t is None:
            continue
        e.backward(t["loss"] * world)
        grads = {n: safe_get_full_grad(p).clone() for n, p in e.module.named_parameters()}
        results[name][k] = {"loss": distributed.all_reduce_sum(t["loss"].detach()).item(), "grads": grads}
        e.step()  # lr ~ 0: clears the gradients, leaves the parameters as they were

# gradient accumulation: 2 micro-batches of 4 pairs (2 per rank), gradients averaged by DeepSpeed
cfg, roles, models, tokenizer = models_for("triplet", tok_dir)
gas_cfg = load_config(None, ["data.batch_size=2", "train.grad_accum=2", "optim.lr=1e-30", "optim.weight_decay=0.0",
                             "optim.grad_clip=0.0", f"train.deepspeed=ds_configs/zero{stage}.json"])
engine = deepspeed.initialize(model=models[0], model_parameters=list(models[0].parameters()),
                              config=deepspeed_config(gas_cfg, world))[0]
batch = make_batch(tokenizer)
losses = []
for mb in range(2):
    lo = mb * 4 + rank * 2
    local = {k: v[lo:lo + 2] for k, v in batch.items()}
    emb = engine(local["pixel_values"], local["input_ids"], local["attention_mask"])
    loss = compute_losses(cfg, [emb], local["image_ids"])[0]["loss"]
    engine.backward(loss * world)
    losses.append(distributed.all_reduce_sum(loss.detach()).item())
    if mb == 1:
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    engine.step()
results["triplet_grad_accum"] = {0: {"loss": sum(losses) / 2, "grads": grads}}
if rank == 0:
    torch.save(results, out)
