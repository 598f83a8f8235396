"""Random access into shards (shard_index.py) keeps memory flat in the data: the index reads each
sample where the stream reads it; AOQ's negatives, read by random access, are the in-memory
sampler's bit for bit; the report reads only what it shows."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from dbl_scale.data import read_samples, sample_meta, split_shards
from dbl_scale.mining import Candidates, OfflineNegatives, top_candidates
from dbl_scale.preprocess import Tokenize, as_transform
from dbl_scale.shard_index import ShardIndex

from conftest import TINY


def _embeddings(n: int, k: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
            torch.nn.functional.normalize(torch.randn(k * n, d, generator=g), dim=1))


def test_shard_index_reads_what_the_stream_reads(shapes_root, tmp_path):
    """Every sample `read_samples` yields is at its offsets, byte for byte; a damaged shard is
    read up to the damage; remote shards are refused with a message."""
    urls = split_shards(shapes_root, "train")[0]
    index = ShardIndex(urls)
    seen = 0
    for sample in read_samples(urls):
        image_id, captions = sample_meta(sample)
        got = index.sample(image_id)
        assert got["jpg"] == sample["jpg"] and got["json"] == sample["json"] and index.captions(image_id) == captions
        seen += 1
    assert seen == len(index) == 128 and index.nbytes < 100 * len(index)
    with pytest.raises(KeyError):
        index.rows([10 ** 9])
    whole = open(urls[0], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    assert 0 < len(ShardIndex([str(cut)])) < 16
    with pytest.raises(Exception, match="local shard files"):
        ShardIndex(["pipe:cat x.tar"])


class InMemoryNegatives:
    """The sampler as it was: the split decoded into memory (N x 3 x S x S uint8) and every
    caption held. Kept as the reference the random-access sampler must match bit for bit."""

    def __init__(self, c: Candidates, root, split, size, n_max):
        self.c, self.k, self.t = c, c.captions_per_image, as_transform(size)
        self.n_range = min(n_max, c.k_captions)
        row_of = {int(i): r for r, i in enumerate(c.image_ids.tolist())}
        self.pixels = torch.empty(c.n_images, 3, size, size, dtype=torch.uint8)
        self.captions = [""] * (self.k * c.n_images)
        for s in read_samples(split_shards(root, split)[0]):
            image_id, caps = sample_meta(s)
            r = row_of[image_id]
            self.pixels[r] = torch.from_numpy(self.t.decode(s["jpg"]))
            self.captions[r * self.k:(r + 1) * self.k] = caps[:self.k]

    def sample(self, image_ids, caption_index, generator):
        c, k = self.c, self.k
        rows, cap = c.rows_of(image_ids).reshape(-1), caption_index.reshape(-1)
        n = torch.randint(0, self.n_range, (len(rows),), generator=generator)
        tneg = c.caption_candidates[rows, n].long()
        ineg = c.image_candidates[rows * k + cap % k, (n // k).clamp(max=c.k_images - 1)].long()
        tineg = ineg * k + torch.randint(0, k, (len(rows),), generator=generator)
        itneg = tneg // k
        return {"pixels_ineg": self.t.normalize(self.pixels[ineg].numpy()),
                "pixels_itneg": self.t.normalize(self.pixels[itneg].numpy()),
                "captions_tneg": [self.captions[i] for i in tneg.tolist()],
                "captions_tineg": [self.captions[i] for i in tineg.tolist()]}


def test_random_access_negatives_are_the_in_memory_ones_bit_for_bit(shapes_root):
    """Same candidates, same seed: the same negatives, pixels and captions, whether the cache
    holds everything or only two images (evicting all the time)."""
    ids = torch.tensor(sorted(sample_meta(s)[0] for s in read_samples(split_shards(shapes_root, "train")[0])))
    ids = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    img, txt = _embeddings(len(ids), 5, 8, seed=5)
    cands = Candidates(ids, 5, *top_candidates(img, txt, 40, 9), split="train")
    reference = InMemoryNegatives(cands, shapes_root, "train", 32, 30)
    for cache_mb in (64, 2 * 3 * 32 * 32 / 2**20):
        sampler = OfflineNegatives(cands, shapes_root, "train", 32, n_max=30, cache_mb=cache_mb)
        for trial in range(4):
            g = torch.Generator().manual_seed(trial)
            batch_ids, cap = ids[torch.randint(0, len(ids), (24,), generator=g)], torch.randint(0, 7, (24,), generator=g)
            want = reference.sample(batch_ids, cap, torch.Generator().manual_seed(100 + trial))
            got = sampler.sample(batch_ids, cap, torch.Generator().manual_seed(100 + trial))
            for key, value in want.items():
                assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
        assert sampler.memory_bytes <= sampler.index.nbytes + max(cache_mb * 2**20, 3 * 32 * 32)


def test_the_report_reads_only_what_it_shows(shapes_root, tokenizer, tmp_path, monkeypatch):
    """The HTML report of a split reads the images and captions of the queries it shows and of
    their top results, not the split; its ranks are the evaluation's."""
    from dbl_scale.branches import new_model
    from dbl_scale.config import load_config
    from dbl_scale.evaluation import evaluate, report

    cfg = load_config(TINY, [f"data.root={shapes_root}"])
    model = new_model(cfg, tokenizer, 0)
    ev = evaluate(model, shapes_root, "train", 32, Tokenize(tokenizer, cfg.model.text.max_length), 16)
    reads = []
    original = ShardIndex._read
    monkeypatch.setattr(ShardIndex, "_read", lambda self, *a: reads.append(a) or original(self, *a))

    class Tracker:
        def log_artifact(self, *a):
            pass

    report(ev, Tracker(), tmp_path, shapes_root, "train")
    html = (tmp_path / "train_retrieval.html").read_text()
    # per direction 10 queries, each read with its ground truth and its top 5 (one member each)
    assert 0 < len(reads) <= 10 * (1 + 1 + 5) * 2 < 2 * 128  # the split: 128 images and 128 jsons
    assert html.count('data-direction="i2t"') == 10
    first = html.split('data-direction="i2t" data-query="')[1]
    query, rank = int(first.split('"')[0]), int(first.split('data-rank="')[1].split('"')[0])
    assert rank == ev.ranks["i2t"][query] + 1
    with Image.open(io.BytesIO(ShardIndex(split_shards(shapes_root, "train")[0]).image(int(ev.image_ids[0])))) as im:
        assert im.size == (32, 32)
