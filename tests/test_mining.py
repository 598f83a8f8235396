"""AOQ mining and sampling: top-k against brute force, sharding, a real 2-rank run, the sampler."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dbl_scale.cli.launch import torchrun_command
from dbl_scale.cli.mine import MODULE as MINE_MODULE
from dbl_scale.cli.mine import add_parser as add_mine_parser
from dbl_scale.cli.mine import forwarded
from dbl_scale.preprocess import Tokenize
from dbl_scale.mining import Candidates, OfflineNegatives, mine, shard_rows, top_candidates

from conftest import TINY, torchrun


def embeddings(n: int, k: int, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(k * n, d, generator=g), dim=1)
    return img, txt


def brute_force(img, txt, kc, ki):
    """The whole matrix in float64, own pairs removed, argsort per row."""
    n, k = img.shape[0], txt.shape[0] // img.shape[0]
    sims = (img.double() @ txt.double().t()).numpy()
    owner = np.arange(k * n) // k
    cc = np.stack([[c for c in np.argsort(-sims[r], kind="stable") if owner[c] != r][:kc] for r in range(n)])
    ic = np.stack([[i for i in np.argsort(-sims[:, c], kind="stable") if i != owner[c]][:ki] for c in range(k * n)])
    return cc, ic


@pytest.mark.parametrize("k", [5, 1])
def test_top_candidates_match_brute_force(k):
    n = 23
    img, txt = embeddings(n, k)
    kc, ki = 17, 9
    cc, ic = top_candidates(img, txt, kc, ki, chunk=4)  # chunks far smaller than the matrix
    ref_cc, ref_ic = brute_force(img, txt, kc, ki)
    assert cc.dtype == ic.dtype == torch.int32
    assert cc.shape == (n, kc) and ic.shape == (k * n, ki)
    np.testing.assert_array_equal(cc.numpy(), ref_cc)
    np.testing.assert_array_equal(ic.numpy(), ref_ic)
    assert not (cc.long() // k == torch.arange(n)[:, None]).any()  # never one of the image's own captions
    assert not (ic.long() == (torch.arange(k * n) // k)[:, None]).any()  # never the caption's own image


@pytest.mark.parametrize("k", [5, 1])
def test_k_is_capped_at_what_is_available(k):
    n = 6
    img, txt = embeddings(n, k, seed=1)
    cc, ic = top_candidates(img, txt, 10_000, 10_000, chunk=3)
    assert cc.shape == (n, k * (n - 1)) and ic.shape == (k * n, n - 1)
    ref_cc, ref_ic = brute_force(img, txt, k * (n - 1), n - 1)
    np.testing.assert_array_equal(cc.numpy(), ref_cc)
    np.testing.assert_array_equal(ic.numpy(), ref_ic)
    for r in range(n):  # every other image's captions exactly once
        assert sorted(cc[r].tolist()) == [c for c in range(k * n) if c // k != r]


def test_memory_budget_bounds_the_chunks():
    img, txt = embeddings(40, 5, seed=2)
    ref = top_candidates(img, txt, 30, 12)
    tiny = top_candidates(img, txt, 30, 12, memory_mb=1e-3)  # one row per chunk
    for a, b in zip(ref, tiny):
        assert torch.equal(a, b)


def test_sharded_over_two_ranks_equals_unsharded():
    n, k = 31, 5  # odd sizes: the ranks' blocks differ in length
    img, txt = embeddings(n, k, seed=3)
    full_cc, full_ic = top_candidates(img, txt, 40, 11, chunk=5)
    parts = [top_candidates(img, txt, 40, 11, chunk=5, rank=r, world=2) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_cc)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_ic)
    assert [shard_rows(n, r, 2) for r in range(2)] == [(0, 15), (15, 31)]


def test_candidates_save_load_and_rows(tmp_path):
    img, txt = embeddings(8, 5, seed=4)
    cc, ic = top_candidates(img, txt, 12, 4)
    ids = torch.tensor([70, 3, 9, 41, 12, 5, 100, 8])  # neither sorted nor contiguous
    cands = Candidates(ids, 5, cc, ic, split="train", run="runs/x", meta={"note": 1})
    path = tmp_path / "sub" / "cands"
    cands.save(path)
    cands.save(path)  # replaced whole
    assert [p.name for p in path.parent.iterdir()] == ["cands"]  # no temporary left behind
    back = Candidates.load(path)
    legacy = tmp_path / "legacy.pt"  # a version-1 file (one torch file) still loads
    torch.save({**cands.to_dict(), "version": 1}, legacy)
    assert torch.equal(Candidates.load(legacy).image_candidates, ic)
    assert torch.equal(back.image_ids, ids) and back.image_ids.dtype == torch.int64
    assert torch.equal(back.caption_candidates, cc) and torch.equal(back.image_candidates, ic)
    assert (back.split, back.run, back.meta, back.k_captions, back.k_images) == ("train", "runs/x", {"note": 1}, 12, 4)
    assert back.rows_of(torch.tensor([[100, 70], [8, 3]])).tolist() == [[6, 0], [7, 1]]
    with pytest.raises(KeyError):
        back.rows_of(torch.tensor([4]))


def test_mine_sub_command_builds_the_torchrun_line():
    import argparse

    parser = argparse.ArgumentParser()
    add_mine_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mine", "--run", "runs/a", "--data", "d", "--out", "c.pt", "--nproc", "3",
                              "--k-images", "50"])
    cmd = torchrun_command(args.nproc, MINE_MODULE, forwarded(args))
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", "-m"]
    assert cmd[6] == "dbl_scale.cli.mine"
    tail = cmd[7:]
    assert tail[tail.index("--run-dir") + 1] == "runs/a" and tail[tail.index("--k-images") + 1] == "50"
    assert tail[tail.index("--data") + 1] == "d" and "--split" not in tail


# ----------------------------------------------------------------------------- with data and towers

@pytest.fixture(scope="module")
def tiny_run(shapes_root, tokenizer, tmp_path_factory):
    """A "finished run" folder with untrained tiny towers."""
    from dbl_scale.config import load_config, save_config
    from dbl_scale.branches import new_model

    run = tmp_path_factory.mktemp("mining") / "run"
    run.mkdir()
    cfg = load_config(TINY, [f"data.root={shapes_root}"])
    save_config(cfg, run / "config.yaml")
    torch.save(new_model(cfg, tokenizer, 0).state_dict(), run / "model.pt")
    return run, cfg


@pytest.mark.launch
def test_two_rank_mining_matches_one_process(shapes_root, tokenizer, tiny_run):
    from dbl_scale.evaluation import embed_split
    from dbl_scale.branches import load_model

    run, cfg = tiny_run
    out = run.parent / "cands"
    proc = torchrun(["-m", "dbl_scale.cli.mine", "--run-dir", str(run), "--data", str(shapes_root), "--out", str(out),
                     "--k-captions", "1000", "--k-images", "30", "--batch-size", "16"], nproc=2, timeout=300)
    assert "128 images" in proc.stdout
    two = Candidates.load(out)

    model = load_model(run, tokenizer)
    tokenize = Tokenize(tokenizer, cfg.model.text.max_length)
    one = mine(model, shapes_root, "train", 32, tokenize, 16, run.parent / "one", k_captions=1000, k_images=30)
    # one folder of .npy files, memory-mapped by the readers (not copied into their memory)
    assert sorted(p.name for p in out.iterdir()) == ["caption_candidates.npy", "image_candidates.npy",
                                                     "image_ids.npy", "meta.json"]
    assert isinstance(np.load(out / "image_candidates.npy", mmap_mode="r"), np.memmap)

    n, k = 128, 5
    assert torch.equal(two.image_ids, one.image_ids) and torch.equal(one.image_ids, torch.arange(n))
    assert two.caption_candidates.shape == one.caption_candidates.shape == (n, k * (n - 1))  # capped
    assert two.image_candidates.shape == one.image_candidates.shape == (k * n, 30)
    assert (two.split, two.run) == ("train", str(run.resolve())) and two.meta["world"] == 2
    # Equal up to ties: generated captions repeat, and the same text embeds to the same vector,
    # so compare the scores of the chosen candidates (both best first) rather than the indices.
    img, txt = embed_split(model, shapes_root, "train", 32, tokenize, 16)[:2]
    sims = img @ txt.t()
    for cands in (one, two):
        assert not (cands.caption_candidates.long() // k == torch.arange(n)[:, None]).any()
        assert not (cands.image_candidates.long() == (torch.arange(k * n) // k)[:, None]).any()
    rows = torch.arange(n)[:, None]
    torch.testing.assert_close(sims[rows, two.caption_candidates.long()], sims[rows, one.caption_candidates.long()],
                               atol=1e-5, rtol=0)
    cols = torch.arange(k * n)[:, None]
    torch.testing.assert_close(sims.t()[cols, two.image_candidates.long()], sims.t()[cols, one.image_candidates.long()],
                               atol=1e-5, rtol=0)
    top = sims[rows, one.caption_candidates.long()]
    assert (top[:, :-1] >= top[:, 1:] - 1e-6).all()  # best first


def raw_split(root, split):
    """image id -> (decoded PIL image, captions), read straight from the shards."""
    from webdataset.tariterators import tarfile_samples

    from dbl_scale.data import split_shards

    out = {}
    for url in split_shards(root, split)[0]:
        for s in tarfile_samples([{"url": url}]):
            meta = json.loads(s["json"])
            out[int(meta["image_id"])] = (Image.open(io.BytesIO(s["jpg"])).convert("RGB"), meta["captions"])
    return out


def test_offline_negatives_follow_the_definitions(shapes_root):
    from dbl_scale.preprocess import ImageTransform

    raw = raw_split(shapes_root, "train")
    k = 5
    ids = torch.tensor(sorted(raw))[torch.randperm(len(raw), generator=torch.Generator().manual_seed(0))]
    img, txt = embeddings(len(ids), k, d=8, seed=5)
    cc, ic = top_candidates(img, txt, 40, 9)
    cands = Candidates(ids, k, cc, ic, split="train")  # rows in a shuffled id order
    t0 = time.time()
    cache_mb = 20 * 3 * 32 * 32 / 2**20  # room for 20 decoded images of the 128
    sampler = OfflineNegatives(cands, shapes_root, "train", 32, n_max=30, cache_mb=cache_mb)
    assert time.time() - t0 < 20

    b = 24
    g = torch.Generator().manual_seed(1)
    batch_ids = ids[torch.randint(0, len(ids), (b,), generator=g)]
    cap_idx = torch.randint(0, k, (b,), generator=g)
    out = sampler.sample(batch_ids, cap_idx, torch.Generator().manual_seed(7))
    again = sampler.sample(batch_ids, cap_idx, torch.Generator().manual_seed(7))
    assert torch.equal(out["pixels_ineg"], again["pixels_ineg"]) and out["captions_tneg"] == again["captions_tneg"]

    for key in ("pixels_ineg", "pixels_itneg"):
        assert out[key].dtype == torch.float32 and out[key].shape == (b, 3, 32, 32)
    for key in ("captions_tneg", "captions_tineg"):
        assert isinstance(out[key], list) and len(out[key]) == b and all(isinstance(t, str) for t in out[key])

    row_of = {int(i): r for r, i in enumerate(ids)}
    for p in range(b):
        r, j = row_of[int(batch_ids[p])], int(cap_idx[p])
        n, tneg, ineg = int(out["n"][p]), int(out["tneg"][p]), int(out["ineg"][p])
        tineg, itneg = int(out["tineg"][p]), int(out["itneg"][p])
        assert 0 <= n < 30
        assert cc[r, n] == tneg and tneg // k != r  # T-: I's n-th caption candidate
        assert ic[r * k + j, n // k] == ineg and ineg != r  # I-: T's (n // K)-th image candidate
        assert tineg // k == ineg  # T_{I-}: a caption of I-
        assert itneg == tneg // k  # I_{T-}: the image of T-
        ineg_id, itneg_id = int(ids[ineg]), int(ids[itneg])
        assert out["captions_tneg"][p] == raw[itneg_id][1][tneg % k]
        assert out["captions_tineg"][p] == raw[ineg_id][1][tineg % k]
        assert torch.equal(out["pixels_ineg"][p], ImageTransform(32)(raw[ineg_id][0]))
        assert torch.equal(out["pixels_itneg"][p], ImageTransform(32)(raw[itneg_id][0]))

    # what it holds is the shard offsets and at most its cache of decoded images
    assert sampler.memory_bytes <= sampler.index.nbytes + 20 * 3 * 32 * 32 < len(ids) * 3 * 32 * 32

    # n is capped by the candidate count, and T_{I-} is drawn over all of I-'s captions
    capped = OfflineNegatives(Candidates(ids, k, cc[:, :3], ic, split="train"), shapes_root, "train", 32)
    many = capped.sample(ids.repeat(10), torch.zeros(10 * len(ids), dtype=torch.long), torch.Generator().manual_seed(2))
    assert int(many["n"].max()) < 3 and set((many["tineg"] % k).tolist()) == set(range(k))

    # a refresh in another row order: the same images under the new rows
    order = torch.argsort(ids)
    new_ids = ids[order]
    sampler.update(Candidates(new_ids, k, *top_candidates(img[order], txt.view(-1, k, 8)[order].reshape(-1, 8), 40, 9)))
    fresh = sampler.sample(batch_ids, cap_idx, torch.Generator().manual_seed(3))
    for p in range(b):
        ineg_row, tneg = int(fresh["ineg"][p]), int(fresh["tneg"][p])  # rows of the new order
        assert torch.equal(fresh["pixels_ineg"][p], ImageTransform(32)(raw[int(new_ids[ineg_row])][0]))
        assert fresh["captions_tneg"][p] == raw[int(new_ids[tneg // k])][1][tneg % k]
