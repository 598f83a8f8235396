"""2-rank half of the distributed-loss test: each rank takes its slice of a fixed global
batch, runs the training code's loss under a DeepSpeed engine, and rank 0 saves the
all-reduced loss and the full gradients (safe_get_full_grad) for the test to compare with
one process on the whole batch.  Usage: torchrun ... loss_parity.py OUT.pt TOKENIZER STAGE"""
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from dbl_scale import distributed
from dbl_scale.config import load_config
from dbl_scale.train import compute_losses, deepspeed_config
from parity_common import VARIANTS, make_batch, make_models

out, tok_dir, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
distributed.init_distributed()
rank, world = distributed.rank(), distributed.world_size()
target, anchor, tokenizer = make_models(tok_dir)
batch = make_batch(tokenizer)
per = batch["pixel_values"].shape[0] // world
local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}

cfg = load_config(None, [f"data.batch_size={per}", "optim.lr=1e-30", "optim.weight_decay=0.0",
                         "optim.grad_clip=0.0", f"train.deepspeed=ds_configs/zero{stage}.json"])
engine, *_ = deepspeed.initialize(model=target, model_parameters=[p for p in target.parameters()],
                                  config=deepspeed_config(cfg, world))
results = {}
for name, overrides in VARIANTS.items():
    vcfg = load_config(None, overrides)
    img, txt = engine(local["pixel_values"], local["input_ids"], local["attention_mask"])
    with torch.no_grad():
        a_img, a_txt = anchor(local["pixel_values"], local["input_ids"], local["attention_mask"])
    terms = compute_losses(vcfg, img, txt, local["image_ids"], a_img, a_txt)
    engine.backward(terms["loss"] * world)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    total = distributed.all_reduce_sum(terms["loss"].detach()).item()
    engine.step()  # lr ~ 0: clears the gradients, leaves the parameters as they were
    results[name] = {"loss": total, "grads": grads}
if rank == 0:
    torch.save(results, out)
