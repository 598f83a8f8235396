"""Single-modal retrieval: captions against captions (text to text) and images against images
(image to image) in the joint space, scored from the embeddings in tiles as the cross-modal
metrics are (memory flat in the split; collective, every rank counts its own query blocks).

What counts as relevant:
- text to text: the other captions of the same image;
- image to image: the other images whose `eval.image_relevance` key is equal. The key is a
  member of the sample's json, `MEMBER` (its value compared as it is; a list as a multiset)
  or `MEMBER:field,field` (a list of dicts, each reduced to those fields, as a multiset). For
  ShapesCaptions, `objects:shape,colour`: the same shapes in the same colours, wherever and
  however large they are drawn. Images without the member, or without another image of
  their key, are not queries.

The query itself is never a candidate. A query's rank is the number of non-relevant items that
score strictly higher than its best relevant one (so a tie counts for the query; a NaN score
never counts as higher, and a query whose relevant scores are all NaN ranks last). R@K is the
share of queries with rank < K, in percent. Both passes read the same tiles (`rows` x `rows`
blocks of the item list), so the best relevant score and the scores it is compared with are
the same products, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Optional

import numpy as np
import torch

from .. import distributed
from .metrics import _merge_rows

TILE = 1280  # items per tile side


def relevance_key(meta: dict, spec: str) -> Optional[int]:
    """The image's relevance key under `spec` (see the module), as a 63-bit hash; None when the
    json lacks the member. Raises ValueError for a spec a list of dicts cannot answer."""
    member, _, fields = spec.partition(":")
    if member not in meta:
        return None
    value = meta[member]
    if fields:
        names = fields.split(",")
        if not isinstance(value, list) or not all(isinstance(v, dict) and all(f in v for f in names) for v in value):
            raise ValueError(f"config key 'eval.image_relevance' = {spec!r}: '{member}' must be a list of objects "
                             f"that all have {names}")
        value = sorted(json.dumps([v[f] for f in names]) for v in value)
    elif isinstance(value, list):
        value = sorted(json.dumps(v, sort_keys=True) for v in value)
    digest = hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def image_groups(keys: list[Optional[int]]) -> np.ndarray:
    """Group ids from relevance keys: equal keys share a group; an image without a key gets a
    group of its own (no relevant image)."""
    groups, seen = np.empty(len(keys), np.int64), {}
    for i, key in enumerate(keys):
        groups[i] = seen.setdefault(key, len(seen)) if key is not None else -1 - i
    return groups


def _tile(emb: torch.Tensor, t: int, u: int, size: int) -> torch.Tensor:
    return emb[t * size:(t + 1) * size] @ emb[u * size:(u + 1) * size].t()


def _needed_tiles(groups: np.ndarray, size: int, n_tiles: int) -> list[set]:
    """For each row block, the column blocks that hold a relevant item of one of its queries."""
    blocks = np.arange(len(groups)) // size
    pairs = np.unique(np.stack([groups, blocks], 1), axis=0)  # (group, block), sorted by group
    needed = [{t} for t in range(n_tiles)]
    starts = np.flatnonzero(np.r_[True, pairs[1:, 0] != pairs[:-1, 0]])
    for a, b in zip(starts, np.r_[starts[1:], len(pairs)]):
        if b - a > 1:  # a group spread over several blocks
            for t in pairs[a:b, 1]:
                needed[t].update(pairs[a:b, 1].tolist())
    return needed


def within_ranks(emb: torch.Tensor, groups: np.ndarray, size: int = TILE) -> np.ndarray:
    """0-based rank of every item as a query among the other items (module rule); -1 for an
    item with no other item of its group (not a query). Collective when the process group is
    up: every rank passes the same embeddings and counts its own row blocks."""
    emb = emb.float()
    n, dev = emb.shape[0], emb.device
    n_tiles = math.ceil(n / size)
    g = torch.as_tensor(groups, device=dev)
    rank, world = distributed.rank(), distributed.world_size()
    lo, hi = n_tiles * rank // world, n_tiles * (rank + 1) // world
    needed = _needed_tiles(np.asarray(groups), size, n_tiles)
    out = np.full(n, -1, np.int64)
    for t in range(lo, hi):
        rows = slice(t * size, min((t + 1) * size, n))
        q_idx, gq = torch.arange(rows.start, rows.stop, device=dev), g[rows]
        best = torch.full((rows.stop - rows.start,), float("-inf"), device=dev)
        has = torch.zeros_like(best, dtype=torch.bool)
        for u in sorted(needed[t]):  # pass 1: the best relevant score of each query
            s = _tile(emb, t, u, size)
            c_idx = torch.arange(u * size, u * size + s.shape[1], device=dev)
            rel = (gq[:, None] == g[c_idx][None, :]) & (q_idx[:, None] != c_idx[None, :])
            has |= rel.any(1)
            best = torch.maximum(best, s.nan_to_num(nan=float("-inf")).masked_fill(~rel, float("-inf")).amax(1))
        count = torch.zeros_like(best, dtype=torch.long)
        for u in range(n_tiles):  # pass 2: the non-relevant items above it
            s = _tile(emb, t, u, size)
            c_idx = torch.arange(u * size, u * size + s.shape[1], device=dev)
            other = (gq[:, None] != g[c_idx][None, :]) & (q_idx[:, None] != c_idx[None, :])
            count += ((s > best[:, None]) & other).sum(1)
        count = torch.where(torch.isinf(best) & has, torch.full_like(count, n - 1), count)  # all NaN: last
        out[rows] = torch.where(has, count, torch.full_like(count, -1)).cpu().numpy()
    return _merge_rows(out, lo * size, min(hi * size, n))


def recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10 in percent over the queries (ranks >= 0); empty when there is none."""
    scored = ranks[ranks >= 0]
    if not len(scored):
        return {}
    return {f"{prefix}_r{k}": 100.0 * float((scored < k).sum()) / len(scored) for k in (1, 5, 10)}


def single_modal_metrics(img: torch.Tensor, txt: torch.Tensor, captions_per_image: int,
                         groups: Optional[np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Text-to-text and image-to-image recalls (collective) and every query's rank ("t2t", and
    "i2i" when `groups` is given: -1 where the image is not a query); `i2i_queries` counts the
    image queries."""
    t2t = within_ranks(txt, np.arange(txt.shape[0]) // captions_per_image)
    metrics, ranks = recalls(t2t, "t2t"), {"t2t": t2t}
    if groups is not None:
        i2i = within_ranks(img, groups)
        metrics.update(recalls(i2i, "i2i"))
        metrics["i2i_queries"] = float((i2i >= 0).sum())
        ranks["i2i"] = i2i
    return metrics, ranks
