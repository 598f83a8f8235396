"""WebDataset input pipeline: shards -> (split by rank, by worker) -> samples -> batches.

A shard set is a folder of `{split}-NNNNN.tar` shards with an index (`dbl_index.json`, their
sample counts), or any WebDataset URL of training shards; img2dataset's and open_clip's shards
read as they are. A sample is one image with all its captions; training draws one per visit.
Epochs are exact: the shard order of epoch e is a permutation seeded by (seed, e), shared by
all ranks; rank r takes every W-th shard, worker k of those every K-th; every rank runs
`samples // (W * B)` steps, so ranks never disagree on the step count. Corrupt samples are
skipped and counted."""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
from webdataset.tariterators import tarfile_samples

from .preprocess import (ImageTransform, RegionFeatures, Tokenize, as_transform, check_gpu_decode,
                         decode_on_device, gpu_decodable)
from .shards import IMAGE_KEYS, INDEX, DataError, index_splits, is_shard_list, is_url, sample_meta, shard_url

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- shard sets

def join(root: str | Path, name: str) -> str:
    """A shard's URL under a root; `s3://b/x` must not become the path `s3:/b/x`."""
    root = str(root)
    return f"{root.rstrip('/')}/{name}" if is_url(root) else str(Path(root) / name)


def load_index(root: str | Path) -> dict:
    """The folder's index: `dbl_index.json` ({split: {"shards", "samples", ...}, ...})."""
    path = Path(root) / INDEX
    if path.exists():
        return json.loads(path.read_text())
    legacy = Path(root) / "sizes.json"  # what versions before 0.3 called the index
    if legacy.exists():
        sizes = json.loads(legacy.read_text())
        if index_splits(sizes):
            return sizes
    found = sorted(p.name for p in Path(root).iterdir())[:5] if Path(root).is_dir() else []
    raise DataError(f"{path} not found"
                    + (f" ({root} holds {', '.join(found)}, ...)" if found else "")
                    + ": convert your data first (dbl-scale data convert ...), point data.root at "
                    "the shards themselves (e.g. 'shards/{00000..00099}.tar'), or build ShapesCaptions "
                    f"(dbl-scale data build --out {root})")


def has_splits(root: str | Path) -> bool:
    """The root is a folder whose index names its splits (train, val, test, ...)."""
    if is_shard_list(str(root)):
        return False
    try:
        return bool(index_splits(load_index(root)))
    except (DataError, OSError, ValueError):
        return False


def plain_shard_folder(root: str | Path) -> bool:
    """A local folder of tar shards without our index (img2dataset's output, say): its shards
    are the training split, as a shard pattern's are."""
    path = Path(str(root))
    return (not is_shard_list(str(root)) and path.is_dir() and not has_splits(path)
            and any(p.suffix == ".tar" for p in path.iterdir()))


def eval_root(data_cfg) -> str:
    """Where the val and test splits live: data.eval_root, else data.root when its index has
    splits. Shards without splits (a pattern, a URL, a plain folder of tars) are training data
    only: evaluating on them would score the model on what it trained on."""
    if data_cfg.eval_root:
        return data_cfg.eval_root
    if has_splits(data_cfg.root):
        return data_cfg.root
    raise DataError(f"data.root {data_cfg.root} holds training shards only (no {INDEX} with val / test splits): "
                    f"add data.eval_root=FOLDER with a '{data_cfg.eval_split}' split (dbl-scale data convert writes "
                    "one), or train without evaluation: eval.at_end=false eval.every=0")


def split_shards(root: str | Path, split: str, samples_per_epoch: Optional[int] = None) -> tuple[list[str], int]:
    """(shard URLs, samples) of one split. Shards without an index (a pattern, a glob, a URL, a
    plain folder of tars) are their own only split."""
    root = str(root)
    if is_shard_list(root):
        return _listed_shards(root, samples_per_epoch)
    if plain_shard_folder(root):
        return _listed_shards(str(Path(root) / "*.tar"), samples_per_epoch)
    index = load_index(root)
    if split not in index_splits(index):
        raise DataError(f"split '{split}' not in {Path(root) / INDEX}; splits there: {index_splits(index)}")
    info = index[split]
    return [join(root, s) for s in info["shards"]], int(samples_per_epoch or info["samples"])


def _listed_shards(pattern: str, samples_per_epoch: Optional[int]) -> tuple[list[str], int]:
    from braceexpand import braceexpand

    urls = []
    for part in braceexpand(pattern):  # then a local glob: out/*.tar
        found = sorted(glob.glob(part)) if not is_url(part) and glob.has_magic(part) else [part]
        if not found:
            raise DataError(f"no shard matches {part}")
        urls.extend(found)
    if samples_per_epoch:
        return urls, int(samples_per_epoch)
    counts = {} if is_url(pattern) else _sidecar_counts(urls)
    missing = [u for u in urls if Path(u).name not in counts]
    if missing:
        raise DataError(f"no sample count for {len(missing)} of the {len(urls)} shards of {pattern} "
                        f"(e.g. {missing[0]}): no {INDEX}, img2dataset *_stats.json or open_clip sizes.json "
                        "beside them; set data.samples_per_epoch")
    return urls, sum(counts[Path(u).name] for u in urls)


def _sidecar_counts(urls: list[str]) -> dict[str, int]:
    """Sample counts per shard file name from the files other tools leave beside their shards:
    img2dataset's `NNNNN_stats.json` ({"successes"}) and open_clip's `sizes.json` ({name: n})."""
    counts: dict[str, int] = {}
    for folder in sorted({Path(u).parent for u in urls}):
        sizes = folder / "sizes.json"
        if sizes.exists():
            data = json.loads(sizes.read_text())
            counts.update({k: int(v) for k, v in data.items() if isinstance(v, int)})
        for stats in folder.glob("*_stats.json"):
            data = json.loads(stats.read_text())
            if "successes" in data:
                counts[stats.name[:-len("_stats.json")] + ".tar"] = int(data["successes"])
    return counts


def dataset_inputs(data_cfg) -> list[dict]:
    """The run's training and evaluation splits as MLflow dataset inputs: name, source, and a
    digest of what the index says of the split (its shards and sample count), so two runs on
    the same data show the same digest."""
    out = []
    for context, split in (("training", data_cfg.train_split), ("evaluation", data_cfg.eval_split)):
        try:
            root = data_cfg.root if context == "training" else eval_root(data_cfg)
            urls, samples = split_shards(root, split, data_cfg.samples_per_epoch if context == "training" else None)
        except (DataError, OSError):
            continue  # no evaluation data: nothing to name
        described = [Path(u).name for u in urls], samples
        digest = hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]
        out.append({"name": f"{Path(str(root).rstrip('/')).name or root}/{split}", "source": str(root),
                    "digest": digest, "context": context})
    return out


# ----------------------------------------------------------------------------- samples

class SkipCounter:
    """tarfile handler: a truncated or unreadable tar member is skipped and counted, never fatal."""

    def __init__(self):
        self.count = 0

    def __call__(self, exc) -> bool:
        log.warning("skipping unreadable tar content: %s", exc)
        self.count += 1
        return True

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def read_samples(urls: Iterable[str], errors: Optional[SkipCounter] = None) -> Iterator[dict]:
    """The samples of these shards, in order: raw dicts with the encoded image (whatever its
    format; region features too) under `jpg` and a `json` or `txt` entry; members of other
    samples are left out. Unreadable tar content is skipped and counted in `errors`. Every
    reader of shards goes through here."""
    errors = errors if errors is not None else SkipCounter()
    for url in urls:
        for sample in tarfile_samples([{"url": shard_url(url)}], handler=errors):
            image = next((k for k in IMAGE_KEYS if k in sample), None)
            if image and ("json" in sample or "txt" in sample):
                sample["jpg"] = sample[image]
                yield sample


def decode_sample(sample: dict, image: "ImageTransform | int", rng: Optional[random.Random] = None
                  ) -> tuple[torch.Tensor, list[str], int]:
    image_id, captions = sample_meta(sample)
    if not captions:
        raise ValueError("sample has no caption")
    t = as_transform(image)
    return t.normalize(t.decode(sample["jpg"], rng)), captions, image_id


# ----------------------------------------------------------------------------- training stream

@dataclass
class StreamSpec:
    urls: list[str]
    rank: int
    world: int
    batch_size: int
    transform: ImageTransform
    shuffle_buffer: int
    seed: int
    encoded: bool = False  # JPEGs cross the worker boundary encoded, to be decoded on the GPU


class TrainStream(torch.utils.data.IterableDataset):
    """Endless stream of batches for one rank, starting at epoch `epoch`.

    Yields dicts: pixel_values (uint8 B x 3 x S x S; with `encoded`, a list of B uint8 tensors:
    a JPEG's bytes, or the decoded image where the GPU cannot take it), captions (one drawn per
    sample), image_ids, caption_index (which of the image's captions was drawn), skipped.
    Tokenisation happens in `TrainLoader.batches` (main process), so workers stay tokenizer-free.
    """

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.epoch = 0

    def _shard_passes(self) -> Iterator[tuple[int, str]]:
        """(pass, url) forever: pass p is epoch+p's permutation; the same on every rank."""
        for p in itertools.count():
            order = list(self.spec.urls)
            random.Random(self.spec.seed * 1_000_003 + self.epoch + p).shuffle(order)
            for url in order:
                yield self.epoch + p, url

    def __iter__(self):
        spec = self.spec
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)

        def pass_rng(pass_no: int) -> random.Random:  # per pass, so a resumed stream draws the same
            return random.Random(((spec.seed * 1_000_003 + pass_no) * 1_000_003 + spec.rank) * 1_000_003 + worker)

        shards = itertools.islice(self._shard_passes(), spec.rank, None, spec.world)  # node split
        shards = itertools.islice(shards, worker, None, workers)  # worker split
        skipped, tar_errors = 0, SkipCounter()
        batch: list = []
        health = _Health(2 * len(spec.urls), f"rank {spec.rank}, loader worker {worker}")
        for sample in _shuffle_within_pass(_tagged(shards, tar_errors, health), spec.shuffle_buffer, pass_rng):
            try:
                image_id, captions = sample_meta(sample)
                if not captions:
                    raise ValueError("sample has no caption")
                # the caption drawn for this visit (and its augmentation): a function of (seed,
                # pass, image), not of history
                draw = random.Random((spec.seed * 1_000_003 + sample["__pass__"]) * 1_000_003 + image_id)
                j = draw.randrange(len(captions))
                t = spec.transform
                if spec.encoded and gpu_decodable(sample["jpg"]):
                    pixels = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)
                else:  # uint8 across the worker boundary (4x fewer bytes than float); normalised per batch
                    pixels = torch.from_numpy(t.decode(sample["jpg"], draw if t.augments else None, fast=True))
            except Exception as exc:  # a corrupt image or json: skip it, count it
                log.warning("skipping sample %s: %s", sample.get("__key__"), exc)
                skipped += 1
                continue
            health.usable()
            batch.append((pixels, captions[j], image_id, j))
            if len(batch) == spec.batch_size:
                pixels = [b[0] for b in batch]
                yield {"pixel_values": pixels if spec.encoded else torch.stack(pixels),
                       "captions": [b[1] for b in batch],
                       "image_ids": torch.tensor([b[2] for b in batch], dtype=torch.long),
                       "caption_index": torch.tensor([b[3] for b in batch], dtype=torch.long),
                       "skipped": skipped + tar_errors.take()}
                batch, skipped = [], 0


class _Health:
    """Guards a stream against reading forever: when `limit` shards in a row (twice as many as
    the split has: more than a whole pass, with its shuffle buffer drained) give this reader no
    usable sample, its shards are empty, gone or all corrupt, and waiting longer would only
    hang every rank."""

    def __init__(self, limit: int, who: str):
        self.limit, self.who, self.barren = limit, who, []  # shards opened since the last usable sample

    def usable(self) -> None:
        self.barren = []

    def opened(self, url: str) -> None:
        self.barren.append(url)
        if len(self.barren) > self.limit:
            shown = ", ".join(sorted(set(self.barren))[:5])
            raise DataError(f"{self.who}: no usable sample in the last {len(self.barren) - 1} shards it read "
                            f"({shown}, ...): they are empty, missing or every sample is corrupt "
                            "(see the warnings above); fix or remove them")


def _tagged(shards: Iterator[tuple[int, str]], errors: SkipCounter, health: Optional[_Health] = None) -> Iterator[dict]:
    """The samples of (pass, url) shards, each tagged with its pass."""
    for pass_no, url in shards:
        if health is not None:
            health.opened(url)
        for sample in read_samples([url], errors):
            sample["__pass__"] = pass_no
            yield sample


def _shuffle_within_pass(src: Iterator[dict], bufsize: int, pass_rng) -> Iterator[dict]:
    """Buffered shuffle that never lets a sample of the next pass overtake one of this pass;
    each pass shuffles with its own generator `pass_rng(pass)`."""
    buf: list = []
    current, rng = None, None
    for sample in src:
        if sample["__pass__"] != current:
            if rng is not None:
                rng.shuffle(buf)
            yield from buf
            buf, current = [], sample["__pass__"]
            rng = pass_rng(current)
        buf.append(sample)
        if len(buf) > bufsize:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    if rng is not None:
        rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------- the loader

@dataclass(frozen=True)
class LoaderPlan:
    workers: int  # loader processes per rank
    prefetch: int  # batches each worker may have ready ahead (DataLoader's prefetch_factor)
    why: str  # how it was chosen, for the log


def usable_cores() -> tuple[int, int]:
    """(CPU cores this rank's node share is drawn from, local ranks sharing them): torchrun's
    LOCAL_WORLD_SIZE ranks share the process's CPU set; a Slurm task bound to its own
    SLURM_CPUS_PER_TASK cores (srun without torchrun) has them to itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if "LOCAL_WORLD_SIZE" not in os.environ and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return min(cores, int(os.environ["SLURM_CPUS_PER_TASK"])), 1
    return cores, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader_plan(workers: "int | str", shards_per_rank: int, batch_bytes: int, cores: int, local_ranks: int,
                shm_bytes: Optional[int] = None) -> LoaderPlan:
    """Workers and prefetch for one rank. `auto`: the cores shared by the node's ranks, one per
    rank kept for its main process (the step, tokenising, the copies), and no more workers than
    the rank has shards (each worker reads its own). Prefetch keeps at least 4 batches in flight
    (2 per worker from 2 workers on), fewer where their uint8 pixels would fill more than half
    of `shm_bytes` (the shared memory they cross in) shared by the local ranks."""
    if workers == "auto":
        per_rank = cores // local_ranks
        n = max(1, min(per_rank - 1, shards_per_rank))
        capped = f"; capped by the {shards_per_rank} shards each rank reads" if per_rank - 1 > shards_per_rank else ""
        why = (f"data.workers=auto: {n} per rank ({cores} cores / {local_ranks} local rank(s), one kept for each "
               f"main process{capped})")
    else:
        n, why = int(workers), f"data.workers={workers}"
    prefetch = max(2, -(-4 // max(n, 1)))
    if n and shm_bytes:
        while prefetch > 1 and n * prefetch * batch_bytes * local_ranks > shm_bytes // 2:
            prefetch -= 1
    return LoaderPlan(n, prefetch, f"{why}, prefetch {prefetch} batches per worker" if n else why)


def _shm_bytes() -> Optional[int]:
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize
    except OSError:
        return None


class LoaderWait:
    """How long the step waited for its batches since the last `take`: host seconds spent
    asking for the next batch (read, tokenised, sent to the device), and, on CUDA, how long the
    device sat idle meanwhile: from the end of the work queued before the batch was asked for
    to the batch being ready on the device (CUDA events, read at `take`, when the step has
    synchronised anyway). Host wait overstates a GPU's starvation (the backward may still run
    while the host waits); the device's idle time is the starvation itself."""

    def __init__(self, device: Optional[torch.device]):
        self.device = device
        self.seconds, self.batches, self.events = 0.0, 0, []

    def asked(self):
        """Marks the moment the consumer asks for a batch (an event on CUDA)."""
        return self._event()

    def ready(self, seconds: float, asked) -> None:
        self.seconds += seconds
        self.batches += 1
        if asked is not None:
            self.events.append((asked, self._event()))

    def _event(self):
        if self.device is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def take(self) -> tuple[int, dict[str, float]]:
        """(batches, total seconds) since the last take: `wait_s` (host) and, on CUDA,
        `device_idle_s`."""
        out = {"wait_s": self.seconds}
        if self.device is not None:
            out["device_idle_s"] = 0.0
            for asked, ready in self.events:
                ready.synchronize()
                out["device_idle_s"] += asked.elapsed_time(ready) / 1e3
        batches = self.batches
        self.seconds, self.batches, self.events = 0.0, 0, []
        return batches, out


class TrainLoader:
    """Tokenised batches for one rank (the raw captions stay in "captions"); every rank runs
    `steps_per_epoch` steps per epoch. With a CUDA `device`, pixels cross to it as uint8 from
    pinned memory (a quarter of float32's bytes) on a side stream, so the copy overlaps the
    step still running, and are normalised there (`data.decode=gpu`: decoded there too);
    elsewhere they are normalised on the host. `wait` measures what the step waits for."""

    def __init__(self, data_cfg, image: "ImageTransform | int", tokenizer, max_length: int, rank: int, world: int,
                 seed: int, device: Optional[torch.device] = None):
        urls, samples = split_shards(data_cfg.root, data_cfg.train_split, data_cfg.samples_per_epoch)
        if len(urls) < world:
            raise DataError(f"{len(urls)} '{data_cfg.train_split}' shard(s) for {world} ranks: every rank "
                            "needs at least one shard (write more, smaller shards)")
        self.steps_per_epoch = samples // (world * data_cfg.batch_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{samples} samples cannot fill one batch of {data_cfg.batch_size} on each of "
                            f"{world} ranks")
        transform = as_transform(image)
        cores, local_ranks = usable_cores()
        batch_bytes = data_cfg.batch_size * int(np.prod(transform.empty_shape)) * (
            4 if isinstance(transform, RegionFeatures) else 1)
        self.plan = loader_plan(data_cfg.workers, len(urls) // world, batch_bytes, cores, local_ranks, _shm_bytes())
        workers = self.plan.workers
        if len(urls) < world * max(workers, 1):
            raise DataError(f"{len(urls)} '{data_cfg.train_split}' shard(s) for {world} ranks x "
                            f"{max(workers, 1)} loader worker(s): every worker needs a shard of its own, or "
                            f"it waits for data that never comes; write smaller shards (dbl-scale data "
                            f"convert --shard-size) or set data.workers={max(1, len(urls) // world)}")
        if len(urls) % (world * max(workers, 1)):
            log.warning("%d shards do not divide evenly over %d ranks x %d workers: epochs stay equal in "
                        "length but a few samples may repeat or wait for the next epoch",
                        len(urls), world, max(workers, 1))
        if rank == 0:
            log.info("loader: %s", self.plan.why)
        self.device = device if device is not None and torch.device(device).type == "cuda" else None
        decode_on_gpu = data_cfg.decode == "gpu"
        if decode_on_gpu:
            check_gpu_decode(self.device)
        self.stream = TrainStream(StreamSpec(urls, rank, world, data_cfg.batch_size, transform,
                                             data_cfg.shuffle_buffer, seed, encoded=decode_on_gpu))
        self.workers = workers
        self.tokenize = Tokenize(tokenizer, max_length)
        self.skipped = 0
        self.wait = LoaderWait(self.device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device is not None else None

    def batches(self, start_epoch: int = 0) -> Iterator[dict]:
        """Tokenised batches without end, from the first batch of `start_epoch` on; epoch e
        is batches [e * steps_per_epoch, (e + 1) * steps_per_epoch). The loader workers are
        started once, not once per epoch."""
        self.stream.epoch = start_epoch
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=self.workers,
                                             prefetch_factor=self.plan.prefetch if self.workers else None,
                                             persistent_workers=False, pin_memory=self.device is not None)
        source = iter(loader)
        while True:
            t0, asked = time.perf_counter(), self.wait.asked()
            batch = next(source, None)
            if batch is None:
                return
            self.skipped += batch.pop("skipped")
            batch.update(self.tokenize(batch["captions"]))
            batch = self._on_device(batch) if self.device is not None else self._on_host(batch)
            self.wait.ready(time.perf_counter() - t0, asked)
            yield batch

    def _on_host(self, batch: dict) -> dict:
        batch["pixel_values"] = self.stream.spec.transform.normalize(batch["pixel_values"])
        return batch

    def _on_device(self, batch: dict) -> dict:
        """The batch's pixels on the device, copied (decoded) and normalised on the side stream;
        the compute stream waits for them, and they stay allocated until it is done with them.
        Tokens and ids stay on the host (a method may extend the batch there, as AOQ does; the
        step moves them: a few hundred KB)."""
        transform, dev = self.stream.spec.transform, self.device
        with torch.cuda.stream(self._copy_stream):
            pixels = batch["pixel_values"]
            if isinstance(pixels, list):  # data.decode=gpu
                pixels, bad = decode_on_device(pixels, transform, dev)
                if bad:
                    batch, pixels = _replace_samples(batch, pixels, bad)
                    self.skipped += len(bad)
            else:
                pixels = pixels.to(dev, non_blocking=True)
            batch["pixel_values"] = transform.normalize(pixels)
        compute = torch.cuda.current_stream(dev)
        compute.wait_stream(self._copy_stream)
        batch["pixel_values"].record_stream(compute)
        return batch

    def batches_from(self, consumed: int) -> Iterator[dict]:
        """The stream after its first `consumed` batches: a resumed run starts at the epoch it
        stopped in and skips the batches it already trained on."""
        spe = self.steps_per_epoch
        return itertools.islice(self.batches(start_epoch=consumed // spe), consumed % spe, None)


def _replace_samples(batch: dict, pixels: torch.Tensor, bad: list[int]) -> tuple[dict, torch.Tensor]:
    """A batch whose samples `bad` could not be decoded, each replaced by a whole good sample of
    the same batch (pixels, caption, tokens, ids): the batch keeps its size, which every rank's
    gathers rely on, and no image is paired with another's caption. The duplicate shares its
    image id, so it is never its own negative."""
    good = [i for i in range(len(batch["captions"])) if i not in set(bad)]
    if not good:
        raise DataError("no image of a whole batch could be decoded on the GPU or the CPU")
    src = torch.arange(len(batch["captions"]))
    for j, i in enumerate(bad):
        src[i] = good[j % len(good)]
    for k in ("input_ids", "attention_mask", "image_ids", "caption_index"):
        batch[k] = batch[k][src]
    batch["captions"] = [batch["captions"][i] for i in src.tolist()]
    log.warning("%d image(s) of a batch could not be decoded on the GPU or the CPU: replaced by other samples of "
                "the batch and counted as skipped", len(bad))
    return batch, pixels[src.to(pixels.device)]
