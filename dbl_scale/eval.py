"""Retrieval evaluation: the standard image-text protocol, computed by counting.

`retrieval_metrics` follows the published VSE evaluation: an image query's rank is the best
rank among its K captions; a caption query's rank is that of its own image; R@K in percent,
rSum = the six recalls added, medr = floor(median 0-based rank) + 1, meanr = mean rank + 1.
A rank is the number of candidates that score strictly higher than the positive, so no row
is ever sorted, and rows are processed in chunks to bound memory.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

from . import distributed

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum",
               "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr")


def _ranks(sims: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_img, n_cap = sims.shape
    if n_cap != k * n_img:
        raise ValueError(f"sims must be N images x {k}*N captions, got {tuple(sims.shape)}")
    owner = torch.arange(n_cap, device=sims.device) // k
    i2t = torch.empty(n_img, dtype=torch.long)
    for lo in range(0, n_img, chunk):
        block = sims[lo:lo + chunk]
        best = block.view(block.shape[0], n_img, k)[torch.arange(block.shape[0]), torch.arange(lo, lo + block.shape[0])]
        best = best.max(dim=1).values
        i2t[lo:lo + chunk] = (block > best[:, None]).sum(dim=1).cpu()
    t2i = torch.empty(n_cap, dtype=torch.long)
    for lo in range(0, n_cap, chunk * k):
        block = sims[:, lo:lo + chunk * k]
        cols = torch.arange(lo, lo + block.shape[1], device=sims.device)
        pos = sims[owner[cols], cols]
        t2i[lo:lo + block.shape[1]] = (block > pos[None, :]).sum(dim=0).cpu()
    return i2t, t2i


def retrieval_metrics(sims: Union[torch.Tensor, np.ndarray], captions_per_image: int = 5,
                      chunk: int = 1024) -> dict[str, float]:
    """Metrics of an (N images x K*N captions) similarity matrix; caption c shows image c // K."""
    sims = torch.as_tensor(sims)
    i2t, t2i = _ranks(sims, captions_per_image, chunk)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).double().mean().item()
        out[f"{name}_medr"] = math.floor(float(np.median(ranks.numpy()))) + 1
        out[f"{name}_meanr"] = ranks.double().mean().item() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return {key: out[key] for key in METRIC_KEYS}


def chance_metrics(n_images: int, captions_per_image: int = 5) -> dict[str, float]:
    """Expected recalls of a random ranking (what the demo prints as chance level)."""
    n_cap = n_images * captions_per_image
    out = {}
    for k in (1, 5, 10):
        # P(at least one of the image's K captions in the top k of n_cap), exactly
        miss = math.comb(n_cap - captions_per_image, k) / math.comb(n_cap, k)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@torch.no_grad()
def embed_split(model, pixels: torch.Tensor, captions: list[list[str]], image_ids: torch.Tensor,
                tokenize, batch_size: int, captions_per_image: int = 5):
    """Embed this rank's images and captions, then gather all ranks' in image-id order.

    Every rank runs the same number of forward calls (padding with a dummy batch), so
    sharded (ZeRO-3) towers never wait on a rank that has finished. Returns
    (image embeddings N x d, caption embeddings K*N x d, image ids N), the same on all ranks.
    """
    dev = distributed.device()
    k = captions_per_image
    if any(len(c) < k for c in captions):
        raise ValueError(f"every evaluation image needs {k} captions")
    texts = [c for caps in captions for c in caps[:k]]

    def run(n_items, fn, dummy):
        steps = distributed.all_reduce_max_int(math.ceil(n_items / batch_size))
        out = []
        for i in range(steps):
            lo = i * batch_size
            if lo < n_items:
                out.append(fn(lo, min(lo + batch_size, n_items)).float().cpu())
            else:  # this rank has run out: keep step with the others
                dummy()
        return torch.cat(out) if out else None

    def img_fn(lo, hi):
        return model.encode_image(pixels[lo:hi].to(dev, _param_dtype(model)))

    def encode_texts(batch: list[str]):
        enc = tokenize(batch)
        return model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))

    img = run(len(pixels), img_fn, lambda: model.encode_image(
        torch.zeros(1, *pixels.shape[1:], device=dev, dtype=_param_dtype(model))))
    txt = run(len(texts), lambda lo, hi: encode_texts(texts[lo:hi]), lambda: encode_texts([""]))
    local = (image_ids.numpy(), None if img is None else img.numpy(), None if txt is None else txt.numpy())
    parts = [local]
    if distributed.world_size() > 1:
        parts = [None] * distributed.world_size()
        torch.distributed.all_gather_object(parts, local)
    ids = np.concatenate([p[0] for p in parts if p[1] is not None])
    img_all = np.concatenate([p[1] for p in parts if p[1] is not None])
    txt_all = np.concatenate([p[2].reshape(-1, k, p[2].shape[-1]) for p in parts if p[1] is not None])
    order = np.argsort(ids, kind="stable")
    return (torch.from_numpy(img_all[order]), torch.from_numpy(txt_all[order].reshape(-1, txt_all.shape[-1])),
            torch.from_numpy(ids[order]))


def _param_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def format_table(rows: dict[str, dict[str, float]], keys=("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5",
                                                              "t2i_r10", "rsum")) -> str:
    """Rows of metrics as an aligned text table."""
    heads = {"i2t_r1": "I2T R@1", "i2t_r5": "R@5", "i2t_r10": "R@10", "t2i_r1": "T2I R@1",
             "t2i_r5": "R@5", "t2i_r10": "R@10", "rsum": "rSum"}
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(f"{heads.get(k, k):>9}" for k in keys)]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[k]:9.1f}" if k in m else f"{'-':>9}" for k in keys))
    return "\n".join(lines)
