"""Single-modal retrieval: captions against captions (text to text) and images against images
(image to image) in the joint space, ranked by `ranking`'s rule and tiles as the cross-modal
metrics are (the query itself is never a candidate; ties count against the query).

What counts as relevant:
- text to text: the other captions of the same image;
- image to image: the other images whose `eval.image_relevance` key is equal. The key is a
  member of the sample's json, `MEMBER` (its value compared as it is; a list as a multiset)
  or `MEMBER:field,field` (a list of dicts, each reduced to those fields, as a multiset).
  Images without the member, or without another image of their key, are not queries.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional, Union

import numpy as np
import torch

from .ranking import TILE_ROWS, TileSource, rank_tiles


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


def within_ranks(emb: torch.Tensor, groups: np.ndarray, rows: Optional[int] = None,
                 compile: Union[bool, str] = "auto") -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of every item as a query among the other items, and whether it tied (the
    module's rule); rank -1 for an item with no other item of its group (not a query).
    Collective when the process group is up: every rank passes the same embeddings."""
    rows = rows or TILE_ROWS.get(emb.device.type, TILE_ROWS["cuda"])
    g = torch.as_tensor(np.asarray(groups), dtype=torch.long)
    r = rank_tiles(TileSource(emb, emb, rows, 5 * rows), g, g, exclude_self=True, compile=compile)
    return r.rows, r.rows_tied


def recalls(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@1/5/10 in percent over the queries (ranks >= 0); empty when there is none."""
    scored = ranks[ranks >= 0]
    if not len(scored):
        return {}
    return {f"{prefix}_r{k}": 100.0 * float((scored < k).sum()) / len(scored) for k in (1, 5, 10)}


def single_modal_metrics(img: torch.Tensor, txt: torch.Tensor, captions_per_image: int,
                         groups: Optional[np.ndarray]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Text-to-text and image-to-image recalls (collective) and every query's rank ("t2t", and
    "i2i" when `groups` is given: -1 where the image is not a query); `t2t_tied` / `i2i_tied`
    count the tied queries, `i2i_queries` the image queries."""
    t2t, t2t_tied = within_ranks(txt, np.arange(txt.shape[0]) // captions_per_image)
    metrics, ranks = {**recalls(t2t, "t2t"), "t2t_tied": int(t2t_tied.sum())}, {"t2t": t2t}
    if groups is not None:
        i2i, i2i_tied = within_ranks(img, groups)
        metrics.update(recalls(i2i, "i2i"), i2i_tied=int(i2i_tied.sum()), i2i_queries=int((i2i >= 0).sum()))
        ranks["i2i"] = i2i
    return metrics, ranks
