"""Embedding a split for evaluation and mining: every rank embeds its share, all ranks get
all embeddings in image-id order."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import distributed


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
    dtype = next(model.parameters()).dtype
    steps = {"images": distributed.all_reduce_max_int(math.ceil(len(pixels) / batch_size)),
             "captions": distributed.all_reduce_max_int(math.ceil(len(texts) / batch_size))}
    bar = distributed.progress(sum(steps.values()), "embedding")

    def run(kind, n_items, fn, dummy):
        out = []
        for i in range(steps[kind]):
            lo = i * batch_size
            if lo < n_items:
                out.append(fn(lo, min(lo + batch_size, n_items)).float().cpu())
            else:  # this rank has run out: keep step with the others
                dummy()
            bar.update()
        return torch.cat(out) if out else None

    def encode_texts(batch: list[str]):
        enc = tokenize(batch)
        return model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))

    img = run("images", len(pixels), lambda lo, hi: model.encode_image(pixels[lo:hi].to(dev, dtype)),
              lambda: model.encode_image(torch.zeros(1, *pixels.shape[1:], device=dev, dtype=dtype)))
    txt = run("captions", len(texts), lambda lo, hi: encode_texts(texts[lo:hi]), lambda: encode_texts([""]))
    bar.close()
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
