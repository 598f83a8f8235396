"""AOQ offline hard negatives: mine them from a whole split, sample them for a batch.

`mine`: every rank embeds its share of the split, takes a block of query rows of each
direction and runs an exact chunked top-k (`torch.topk`, on the ranks' device) into one shared
folder of `.npy` files that every rank memory-maps (`Candidates`). `caption_candidates[r]`: the
kc captions closest to image row r, never its own; `image_candidates[c]`: the ki image rows
closest to caption c, never its own image c // K.
`OfflineNegatives` draws a pair's negatives (T-, I-, T_{I-}, I_{T-}; docs/methods.md) and reads
them from the shards by random access, through a decoded-image cache bounded in bytes;
`OfflineHardNegatives` is AOQ's loader side (mines at start, refreshes, extends each batch).
Memory per rank does not grow with N beyond the embeddings: candidates live on disk, mining
holds one chunk of scores (`memory_mb`), sampling the shard offsets and the cache.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import distributed
from .config import AOQConfig, DataConfig
from .data import DataError, split_shards
from .preprocess import ImageTransform, as_transform
from .evaluation.embed import embed_split
from .shard_index import ShardIndex

log = logging.getLogger(__name__)

FORMAT = "dbl_scale.mining.Candidates"
FORMAT_VERSION = 2  # 2: a folder of memory-mapped .npy files (1: one torch file)


# ----------------------------------------------------------------------------- candidates

@dataclass(eq=False)
class Candidates:
    """Offline hard-negative candidates of one split (rows are image rows, not image ids).

    image_ids (N,) int64: the image id of each row. caption c = row * K + j is caption j of
    image row `row` (the first K captions of each image, as `embed_split` orders them).
    caption_candidates (N, kc) int32: caption indices, best first, own captions excluded.
    image_candidates (K*N, ki) int32: image rows, best first, the caption's own image excluded.
    """
    image_ids: torch.Tensor
    captions_per_image: int
    caption_candidates: torch.Tensor
    image_candidates: torch.Tensor
    split: str = ""
    run: Optional[str] = None  # the run (folder) whose towers mined them
    meta: dict = field(default_factory=dict)  # anything else worth keeping (plain types)

    def __post_init__(self):
        self.image_ids = torch.as_tensor(self.image_ids, dtype=torch.long).reshape(-1)
        self.caption_candidates = torch.as_tensor(self.caption_candidates).to(torch.int32)
        self.image_candidates = torch.as_tensor(self.image_candidates).to(torch.int32)
        self.captions_per_image = int(self.captions_per_image)
        n, k = len(self.image_ids), self.captions_per_image
        if self.caption_candidates.dim() != 2 or self.caption_candidates.shape[0] != n:
            raise ValueError(f"caption_candidates must be ({n}, kc), got {tuple(self.caption_candidates.shape)}")
        if self.image_candidates.dim() != 2 or self.image_candidates.shape[0] != k * n:
            raise ValueError(f"image_candidates must be ({k * n}, ki), got {tuple(self.image_candidates.shape)}")
        self._sorted_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def k_captions(self) -> int:
        return self.caption_candidates.shape[1]

    @property
    def k_images(self) -> int:
        return self.image_candidates.shape[1]

    def rows_of(self, image_ids) -> torch.Tensor:
        """Image ids (any shape) -> candidate rows (int64, same shape); KeyError for unknown ids."""
        ids = torch.as_tensor(image_ids, dtype=torch.long)
        if self._sorted_ids is None:
            order = torch.argsort(self.image_ids)
            self._sorted_ids = (self.image_ids[order], order)
        sorted_ids, order = self._sorted_ids
        flat = ids.reshape(-1).cpu()
        pos = torch.searchsorted(sorted_ids, flat).clamp(max=max(len(sorted_ids) - 1, 0))
        ok = sorted_ids[pos] == flat if len(sorted_ids) else torch.zeros_like(flat, dtype=torch.bool)
        if not bool(ok.all()):
            missing = flat[~ok].unique()[:10].tolist()
            raise KeyError(f"image ids {missing} are not in the mined candidates ({self.split or 'split'})")
        return order[pos].reshape(ids.shape)

    def to_dict(self) -> dict:
        """Tensors and plain data only (a checkpoint loads it with weights_only=True)."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "image_ids": self.image_ids,
                "captions_per_image": self.captions_per_image,
                "caption_candidates": self.caption_candidates.contiguous(),
                "image_candidates": self.image_candidates.contiguous(),
                "k_captions": self.k_captions, "k_images": self.k_images,
                "split": self.split, "run": self.run, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: dict, source: str = "data") -> "Candidates":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not a saved {FORMAT}")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{source}: format version {data['version']} is newer than this code ({FORMAT_VERSION})")
        return cls(data["image_ids"], data["captions_per_image"], data["caption_candidates"],
                   data["image_candidates"], split=data.get("split", ""), run=data.get("run"),
                   meta=data.get("meta") or {})

    ARRAYS = ("image_ids", "caption_candidates", "image_candidates")

    def save(self, path: str | Path) -> None:
        """Write a folder of `.npy` files and `meta.json`, atomically (a temporary folder, then
        a rename)."""
        write_folder(path, {name: getattr(self, name).numpy() for name in self.ARRAYS}, self._meta())

    def _meta(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "captions_per_image": self.captions_per_image,
                "split": self.split, "run": self.run, "meta": dict(self.meta)}

    @classmethod
    def load(cls, path: str | Path) -> "Candidates":
        """A saved folder, memory-mapped (its pages are shared by every process that maps it);
        or a single file written by versions before 2 (read whole)."""
        path = Path(path)
        if path.is_file():
            return cls.from_dict(torch.load(path, map_location="cpu", weights_only=True), str(path))
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{path}: no saved candidates there (expected meta.json and .npy files "
                                    "from `dbl-scale mine`)")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} is not a saved {FORMAT} this code reads (version {meta.get('version')})")
        # copy-on-write maps: read-only in effect, and torch takes them without a warning
        arrays = {name: torch.from_numpy(np.load(path / f"{name}.npy", mmap_mode="c")) for name in cls.ARRAYS}
        return cls(arrays["image_ids"], meta["captions_per_image"], arrays["caption_candidates"],
                   arrays["image_candidates"], split=meta.get("split", ""), run=meta.get("run"),
                   meta=meta.get("meta") or {})


def write_folder(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Arrays as `.npy` files and `meta` as `meta.json` in a new folder `path` (replacing one
    there), through a temporary folder renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- top-k search

def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block [lo, hi) of n rows; the blocks tile 0..n in rank order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return n * rank // world, n * (rank + 1) // world


def _rows_per_chunk(n_keys: int, k: int, chunk: Optional[int], memory_mb: float) -> int:
    # one chunk holds the scores (rows x n_keys float32) and topk's values + indices (rows x k x 12 B)
    budget = max(1, int(memory_mb * 2 ** 20 // (4 * n_keys + 12 * k)))
    return max(1, min(chunk, budget) if chunk else budget)


def _chunked_topk(queries: torch.Tensor, keys: torch.Tensor, lo: int, hi: int, k: int,
                  own_cols: Callable[[torch.Tensor], torch.Tensor], rows: int, what: str) -> torch.Tensor:
    """Top-k key indices (int32, CPU) of query rows [lo, hi), own pairs masked to -inf first."""
    out = torch.empty(hi - lo, k, dtype=torch.int32)
    if k == 0 or hi <= lo:
        return out
    keys_t = keys.t()
    for start in distributed.progress(range(lo, hi, rows), f"top-{k} {what}"):
        stop = min(start + rows, hi)
        scores = queries[start:stop] @ keys_t
        qrows = torch.arange(start, stop, device=scores.device)
        scores.scatter_(1, own_cols(qrows), float("-inf"))
        out[start - lo:stop - lo] = scores.topk(k, dim=1, sorted=True).indices.to(torch.int32).cpu()
    return out


@torch.no_grad()
def top_candidates(img: torch.Tensor, txt: torch.Tensor, k_captions: int, k_images: int,
                   chunk: Optional[int] = None, rank: int = 0, world: int = 1,
                   memory_mb: float = 256.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over inner products, both directions, for this rank's block of query rows.

    img (N, d) and txt (K*N, d) with caption c belonging to image row c // K. Returns
    (caption candidates (rows of image block) x kc, image candidates (rows of caption block) x ki),
    int32, best first, own pairs excluded; kc = min(k_captions, K*(N-1)), ki = min(k_images, N-1).
    The image block is `shard_rows(N, rank, world)`, the caption block `shard_rows(K*N, rank,
    world)`: concatenating all ranks' results in rank order gives the unsharded arrays.
    The score matrix is never materialised: each chunk holds at most `chunk` query rows
    (default: as many as fit in `memory_mb`). Runs on img's device; results are on the CPU.
    """
    n = img.shape[0]
    if n == 0 or txt.shape[0] % n:
        raise ValueError(f"txt must hold K captions per image: {txt.shape[0]} captions for {n} images")
    k = txt.shape[0] // n
    img = img.float()
    txt = txt.float().to(img.device)
    kc, ki = max(0, min(k_captions, k * (n - 1))), max(0, min(k_images, n - 1))
    own_k = torch.arange(k, device=img.device)

    lo, hi = shard_rows(n, rank, world)
    caption_cands = _chunked_topk(img, txt, lo, hi, kc, lambda r: r[:, None] * k + own_k[None, :],
                                  _rows_per_chunk(k * n, kc, chunk, memory_mb), "captions per image")
    lo, hi = shard_rows(k * n, rank, world)
    image_cands = _chunked_topk(txt, img, lo, hi, ki, lambda c: (c // k)[:, None],
                                _rows_per_chunk(n, ki, chunk, memory_mb), "images per caption")
    return caption_cands, image_cands


def mine(model, data_root: str | Path, split: str, image: "ImageTransform | int", tokenize, batch_size: int,
         out: str | Path, k_captions: int = 2000, k_images: int = 400, captions_per_image: int = 5,
         chunk: Optional[int] = None, memory_mb: float = 256.0, run: Optional[str] = None) -> Candidates:
    """Mine a split's candidates with `model` into the folder `out` (on a filesystem every rank
    sees) and return them memory-mapped; call on every rank (collective when the process group
    is initialised; without one it runs alone as world 1). `model` must sit on
    `distributed.device()` (where `embed_split` sends the inputs); it is put in eval mode for
    the embedding and back afterwards. Rows follow ascending image id. Images with fewer than
    `captions_per_image` captions lower it for every image (as evaluation does)."""
    rank, world = distributed.rank(), distributed.world_size()
    was_training = model.training
    model.eval()
    try:
        img, txt, ids, k, _ = embed_split(model, data_root, split, image, tokenize, batch_size, captions_per_image)
    finally:
        model.train(was_training)
    if len(ids) < 2:
        raise DataError(f"split '{split}' of {data_root}: {len(ids)} image(s), mining needs at least 2")
    if len(torch.unique(ids)) != len(ids):
        raise DataError(f"split '{split}' of {data_root} repeats image ids: candidates need unique ones")
    dev = distributed.device()
    caption_cands, image_cands = top_candidates(img.to(dev), txt.to(dev), k_captions, k_images, chunk=chunk,
                                                rank=rank, world=world, memory_mb=memory_mb)
    n = len(ids)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "captions_per_image": k, "split": split, "run": run,
            "meta": {"requested_k_captions": int(k_captions), "requested_k_images": int(k_images),
                     "embed_dim": int(img.shape[1]), "world": world, "data_root": str(data_root)}}
    shapes = {"image_ids": ((n,), np.int64), "caption_candidates": ((n, caption_cands.shape[1]), np.int32),
              "image_candidates": ((k * n, image_cands.shape[1]), np.int32)}
    blocks = {"image_ids": (0, ids.numpy()[:n if rank == 0 else 0]),  # rank 0 writes the ids
              "caption_candidates": (shard_rows(n, rank, world)[0], caption_cands.numpy()),
              "image_candidates": (shard_rows(k * n, rank, world)[0], image_cands.numpy())}
    write_shared(out, shapes, blocks, meta)
    return Candidates.load(out)


def write_shared(path: str | Path, shapes: dict[str, tuple], blocks: dict[str, tuple], meta: dict) -> None:
    """One folder of `.npy` arrays written by all ranks together (collective): rank 0 creates
    the files at their full `shapes` {name: (shape, dtype)} in a temporary folder, every rank
    writes its `blocks` {name: (first row, rows)} into them, and rank 0 renames the folder
    to `path` once all have finished. Nothing is gathered in any rank's memory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, (shape, dtype) in shapes.items():
            np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    distributed.barrier()
    for name, (start, rows) in blocks.items():
        if len(rows):
            array = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="r+")
            array[start:start + len(rows)] = rows
            array.flush()
            del array
    distributed.barrier()
    if distributed.is_main():
        _replace_folder(tmp, path)
    distributed.barrier()


# ----------------------------------------------------------------------------- sampling

class OfflineNegatives:
    """Draws each training pair's offline negatives (T-, I-, T_{I-}, I_{T-}) from `Candidates`.

    The negatives' images and captions are read by random access from the split's shards
    (`ShardIndex`), decoded and transformed as evaluation does it, and kept in an LRU cache of
    at most `cache_mb` of decoded images: memory per rank does not grow with the split. An
    image the candidates list but the shards lack is an error at start (candidates of another
    data set or split); one that no longer decodes, when it is drawn.
    """

    def __init__(self, candidates: Candidates, data_root: str | Path, split: str, image: "ImageTransform | int",
                 n_max: int = 300, cache_mb: float = 256.0):
        c = candidates
        if c.k_captions < 1 or c.k_images < 1:
            raise ValueError("the candidates are empty (kc or ki is 0): nothing to sample")
        if n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {n_max}")
        self.transform = as_transform(image)
        if not isinstance(self.transform, ImageTransform):
            raise DataError("AOQ's offline negatives are images; precomp region features are not supported")
        self.index = ShardIndex(split_shards(data_root, split)[0])
        self.where = f"split '{split}' of {data_root}"
        self.n_max = n_max
        # the cache: one block of slots allocated once (per-image arrays would fragment the heap,
        # and the process would grow past the cache's size), an LRU order of image id -> slot
        shape = (3, self.transform.size, self.transform.size)
        self._slots = np.empty((max(1, int(cache_mb * 2**20) // int(np.prod(shape))), *shape), np.uint8)
        self._lru: OrderedDict[int, int] = OrderedDict()
        self.update(candidates)

    def update(self, candidates: Candidates) -> None:
        """Use these candidates from now on (a refresh; nothing is decoded again)."""
        if candidates.k_captions < 1 or candidates.k_images < 1:
            raise ValueError("the candidates are empty (kc or ki is 0): nothing to sample")
        if hasattr(self, "candidates") and candidates.captions_per_image != self.k:
            raise ValueError(f"candidates have {candidates.captions_per_image} captions per image, not {self.k}")
        ids = candidates.image_ids.numpy()
        known = np.isin(ids, self.index.ids)
        if not known.all():
            raise DataError(f"{int((~known).sum())} mined image(s) are not in {self.where} (e.g. ids "
                            f"{ids[~known][:10].tolist()}): candidates from another data set?")
        self.candidates, self.k = candidates, candidates.captions_per_image
        self.n_range = min(self.n_max, candidates.k_captions)  # n ~ U[0, n_range)

    @property
    def memory_bytes(self) -> int:
        """Bytes this sampler holds: the shard offsets and the decoded-image cache (the
        candidates are memory-mapped files, shared with the other ranks)."""
        return self.index.nbytes + self._slots.nbytes

    def _pixels(self, image_id: int) -> np.ndarray:
        slot = self._lru.get(image_id)
        if slot is not None:
            self._lru.move_to_end(image_id)
            return self._slots[slot]
        try:
            pixels = self.transform.decode(self.index.image(image_id))
        except Exception as exc:
            raise DataError(f"image {image_id} was mined but does not decode now: {exc}") from exc
        slot = len(self._lru) if len(self._lru) < len(self._slots) else self._lru.popitem(last=False)[1]
        self._slots[slot] = pixels
        self._lru[image_id] = slot
        return self._slots[slot]

    def _caption(self, caption: int) -> str:
        image_id = int(self.candidates.image_ids[caption // self.k])
        caps = self.index.captions(image_id)  # the caption rule of training, so caption j means the same
        if len(caps) < self.k:
            raise DataError(f"image {image_id} has {len(caps)} captions, the candidates assume {self.k}")
        return caps[caption % self.k]

    def normalised(self, rows: torch.Tensor) -> torch.Tensor:
        """Float pixels of image rows, normalised as the training loader normalises them."""
        ids = self.candidates.image_ids[rows].tolist()
        batch = np.empty((len(ids), *self._slots.shape[1:]), np.uint8)
        for b, image_id in enumerate(ids):  # copied at once: a later miss may reuse the slot
            batch[b] = self._pixels(image_id)
        return self.transform.normalize(batch)

    def sample(self, image_ids: torch.Tensor, caption_index: torch.Tensor, generator: torch.Generator) -> dict:
        """The offline negatives of B pairs (I = image_ids[b], T = its caption caption_index[b]).

        Returns pixels_ineg (I-) and pixels_itneg (I_{T-}) as float (B, 3, S, S), captions_tneg
        (T-) and captions_tineg (T_{I-}) as lists of B strings, and for checks and logging the
        int64 (B,) tensors n, tneg / tineg (caption indices row*K + j), ineg / itneg (image rows).
        A caption_index >= K (a caption beyond the K that were mined) takes its image candidates
        from caption (caption_index mod K) of the same image, which are negatives all the same.
        """
        c, k = self.candidates, self.k
        rows = c.rows_of(torch.as_tensor(image_ids).cpu()).reshape(-1)
        cap = torch.as_tensor(caption_index, dtype=torch.long).cpu().reshape(-1)
        if cap.shape != rows.shape:
            raise ValueError(f"image_ids and caption_index differ in length: {len(rows)} vs {len(cap)}")
        b = len(rows)
        n = torch.randint(0, self.n_range, (b,), generator=generator)
        tneg = c.caption_candidates[rows, n].long()
        ineg = c.image_candidates[rows * k + cap % k, (n // k).clamp(max=c.k_images - 1)].long()
        tineg = ineg * k + torch.randint(0, k, (b,), generator=generator)
        itneg = tneg // k
        return {"pixels_ineg": self.normalised(ineg), "pixels_itneg": self.normalised(itneg),
                "captions_tneg": [self._caption(i) for i in tneg.tolist()],
                "captions_tineg": [self._caption(i) for i in tineg.tolist()],
                "n": n, "tneg": tneg, "ineg": ineg, "tineg": tineg, "itneg": itneg}


# ----------------------------------------------------------------------------- AOQ training

class OfflineHardNegatives:
    """AOQ's loader side: mined candidates of the training split (from `loss.aoq.candidates`,
    or mined at start with the starting towers into `<run>/aoq_candidates/`), refreshed with
    the current target on request; `extend` appends each pair's offline negatives to a batch."""

    def __init__(self, aoq: AOQConfig, data: DataConfig, image: ImageTransform, batch_size: int, seed: int,
                 model, tokenize, rank: int, workdir: str | Path):
        self.aoq, self.root, self.split, self.image = aoq, data.root, data.train_split, image
        self.batch_size, self.tokenize = batch_size, tokenize  # mining embeds the split in batches of this size
        self.folder, self.mined = Path(workdir) / "aoq_candidates", None
        candidates = Candidates.load(aoq.candidates) if aoq.candidates else self._mine(model, 0)
        self.sampler = OfflineNegatives(candidates, self.root, self.split, image, aoq.n_max, aoq.cache_mb)
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)

    def _mine(self, model, consumed: int) -> Candidates:
        """Mine into `<run>/aoq_candidates/batch_N/` (N: loader batches so far), and remove the
        folder mined before (the maps of it that are still open stay valid; a checkpoint keeps
        its own copy)."""
        out = self.folder / f"batch_{consumed:09d}"
        candidates = mine(model, self.root, self.split, self.image, self.tokenize, self.batch_size, out,
                          self.aoq.k_captions, self.aoq.k_images)
        self._forget_mined()
        self.mined = out
        return candidates

    def _forget_mined(self) -> None:
        if self.mined is not None and distributed.is_main():
            shutil.rmtree(self.mined, ignore_errors=True)
        self.mined = None

    def refresh(self, model, consumed: int) -> None:
        t0 = time.time()
        self.sampler.update(self._mine(model, consumed))
        log.info("AOQ candidates re-mined with the current target in %.1fs", time.time() - t0)

    def state_dict(self) -> dict:
        return {"candidates": self.sampler.candidates.to_dict()}

    def load_state_dict(self, state: dict, generator_state: torch.Tensor) -> None:
        """The checkpoint's candidates (memory-mapped from it) replace those mined at start."""
        self.sampler.update(Candidates.from_dict(state["candidates"], "the checkpoint's AOQ candidates"))
        self.generator.set_state(generator_state)
        self._forget_mined()

    def extend(self, batch: dict) -> dict:
        """Images become [I, I-, I_{T-}], captions [T, T-, T_{I-}] (3B each); ids stay B."""
        neg = self.sampler.sample(batch["image_ids"], batch["caption_index"], self.generator)
        t_neg, t_ineg = self.tokenize(neg["captions_tneg"]), self.tokenize(neg["captions_tineg"])
        out = dict(batch)
        pixels = batch["pixel_values"]  # on a GPU rank the batch is already there (TrainLoader)
        out["pixel_values"] = torch.cat([pixels, neg["pixels_ineg"].to(pixels.device), neg["pixels_itneg"].to(pixels.device)])
        for key in ("input_ids", "attention_mask"):
            out[key] = torch.cat([batch[key], t_neg[key], t_ineg[key]])
        return out
