"""Embedding a split for evaluation and mining, streamed: every rank reads its share of the
split's shards (every W-th), decodes and embeds one batch at a time, and keeps only the
embeddings; all ranks then get all embeddings in image-id order. Memory per rank is one batch
of pixels plus the embeddings (N x (1 + K) x d floats), never the decoded split."""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from .. import distributed
from ..data import decode_sample, log, read_samples, split_shards
from ..preprocess import as_transform
from .single_modal import relevance_key

STANDARD_K = 5  # captions per image in the COCO / Flickr30K protocol


class Embedded(NamedTuple):
    img: torch.Tensor  # N x d, float32, ascending image id
    txt: torch.Tensor  # K*N x d: caption j of image row i at i * K + j
    image_ids: torch.Tensor  # N, int64, ascending
    captions_per_image: int  # K: 5, or the fewest captions any image of the split has (web data: often 1)
    image_keys: Optional[list] = None  # N relevance keys (`single_modal.relevance_key`, None: no key), if asked


@torch.no_grad()
def embed_split(model, data_root: str | Path, split: str, image, tokenize, batch_size: int,
                captions_per_image: int = STANDARD_K, image_relevance: Optional[str] = None) -> Embedded:
    """Embed a split with `model` (on `distributed.device()`); collective. Every rank runs the
    same number of forward calls (a rank that has run out embeds a dummy batch), so sharded
    (ZeRO-3) towers never wait on a rank that has finished. Samples that do not decode are
    skipped. Each image keeps its first `captions_per_image` captions; if some image has
    fewer, every image is scored with that many (logged). `image_relevance`: also read each
    image's relevance key under that spec from its json (`single_modal.relevance_key`)."""
    dev = distributed.device()
    transform = as_transform(image)
    urls, _ = split_shards(data_root, split)
    rank, world = distributed.rank(), distributed.world_size()
    dtype = next(model.parameters()).dtype
    samples = iter(read_samples(urls[rank::world]))
    ids, img_parts, txt_parts, counts, keys = [], [], [], [], []
    bar = distributed.progress(None, "embedding")
    while True:
        pixels, texts, batch_counts = [], [], []
        for sample in samples:
            try:
                p, caps, image_id = decode_sample(sample, transform)
            except Exception as exc:  # noqa: BLE001 - a bad sample is skipped, as in training
                log.warning("skipping eval sample %s: %s", sample.get("__key__"), exc)
                continue
            pixels.append(p), ids.append(image_id), batch_counts.append(min(len(caps), captions_per_image))
            if image_relevance:
                keys.append(relevance_key(json.loads(sample["json"]) if "json" in sample else {}, image_relevance))
            texts.extend(caps[:captions_per_image])
            if len(pixels) == batch_size:
                break
        # one round: one image batch and the same number of caption batches on every rank
        rounds = distributed.all_reduce_max_int(-(-len(texts) // batch_size) if pixels else -1)
        if rounds < 0:
            break
        if pixels:
            img_parts.append(model.encode_image(torch.stack(pixels).to(dev, dtype)).float().cpu())
        else:
            model.encode_image(torch.zeros(1, *transform.empty_shape, device=dev, dtype=dtype))
        for r in range(rounds):
            chunk = texts[r * batch_size:(r + 1) * batch_size] or [""]  # "" : a dummy batch
            enc = tokenize(chunk)
            out = model.encode_text(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))
            if r * batch_size < len(texts):
                txt_parts.append(out.float().cpu())
        counts.extend(batch_counts)
        bar.update(len(pixels))
    bar.close()
    d = _width(img_parts, txt_parts)
    local = (np.asarray(ids, dtype=np.int64), torch.cat(img_parts).numpy() if img_parts else np.zeros((0, d), np.float32),
             torch.cat(txt_parts).numpy() if txt_parts else np.zeros((0, d), np.float32),
             np.asarray(counts, dtype=np.int64), keys)
    parts = [local]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
    ids_all = np.concatenate([p[0] for p in parts])
    img_all = np.concatenate([p[1] for p in parts if len(p[0])])
    counts_all = np.concatenate([p[3] for p in parts])
    k = int(min(captions_per_image, counts_all.min())) if len(counts_all) else captions_per_image
    if k < captions_per_image and distributed.is_main():
        log.warning("some images of split '%s' have only %d caption(s): every image is scored with its first %d "
                    "(the COCO / Flickr30K protocol has 5)", split, k, k)
    # each image's first k captions, from the rows its captions occupy
    txt_all = np.concatenate([p[2] for p in parts if len(p[0])])
    starts = np.concatenate([[0], np.cumsum(counts_all)[:-1]])
    keep = (starts[:, None] + np.arange(k)[None, :]).reshape(-1)
    order = np.argsort(ids_all, kind="stable")
    txt_rows = keep.reshape(-1, k)[order].reshape(-1)
    keys_all = [key for p in parts for key in p[4]]
    return Embedded(torch.from_numpy(img_all[order]), torch.from_numpy(txt_all[txt_rows]),
                    torch.from_numpy(ids_all[order]), k, [keys_all[i] for i in order] if image_relevance else None)


def _width(*parts: list) -> int:
    d = next((p[0].shape[1] for p in parts if p), None)
    d = distributed.all_reduce_max_int(d if d is not None else -1)
    return max(d, 0)
