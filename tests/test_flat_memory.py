"""Invariant 6, memory flat in the data: evaluation scores in tiles, never the N x K*N matrix,
and equals the full-matrix path (ties and NaNs included, on one rank and on two); embedding
streams the split; AOQ reads its negatives by random access and draws exactly what the
in-memory sampler drew; the report reads only what it shows."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dbl_scale.data import decode_sample, read_samples, sample_meta, split_shards
from dbl_scale.preprocess import Tokenize, as_transform
from dbl_scale.evaluation.metrics import TileScores, _ranks, embedding_metrics, embedding_ranks, retrieval_metrics
from dbl_scale.mining import Candidates, OfflineNegatives, top_candidates
from dbl_scale.shard_index import ShardIndex

from conftest import REPO, TINY, torchrun


def _tiles_matrix(img, txt, k, rows):
    sc = TileScores(img, txt, k, rows)
    return torch.cat([torch.cat([sc.tile(t, u) for u in range(sc.tiles)], 1) for t in range(sc.tiles)]).numpy()


def _embeddings(kind: str, n: int, k: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "float":
        return (torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1),
                torch.nn.functional.normalize(torch.randn(k * n, d, generator=g), dim=1))
    img = torch.randint(-2, 3, (n, d), generator=g).float()  # exact integer scores: many ties
    txt = torch.randint(-2, 3, (k * n, d), generator=g).float()
    if kind == "nan":
        img[n // 3, 0], txt[k * n // 2, 1] = float("nan"), float("nan")
    if kind == "overflow":  # finite embeddings whose products overflow: inf scores, and NaN where inf - inf
        img[n // 4, :2], txt[k * n // 3, :2] = torch.tensor([3e30, -3e30]), torch.tensor([3e30, 3e30])
    return img, txt


@pytest.mark.parametrize("kind", ["float", "ties", "nan", "overflow"])
@pytest.mark.parametrize("n,k,rows", [(300, 5, 64), (257, 2, 256), (50, 1, 16)])
def test_tiled_ranks_equal_the_full_matrix_path(kind, n, k, rows, caplog):
    """The tiles' ranks are the full-matrix path's (`retrieval_metrics`, the reference) on the
    matrix the tiles make, including partial last tiles, ties, NaNs and overflow; with exact
    (integer) scores that matrix is `img @ txt.T` itself. Tied queries are re-scored in stacks,
    and every re-made line matches its tiles (no fallback to the strips)."""
    img, txt = _embeddings(kind, n, k, 8, seed=n + k)
    ref = _ranks(_tiles_matrix(img, txt, k, rows), k, 7)
    stats: dict = {}
    with caplog.at_level("WARNING"):
        got = embedding_ranks(img, txt, k, rows, stats=stats)
    assert "did not match" not in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    if kind in ("ties", "nan", "overflow"):
        assert stats["rows_rescored"] > 0 and stats["cols_rescored"] > 0
    if kind != "float":
        assert all(np.array_equal(a, b) for a, b in zip(got, _ranks((img @ txt.t()).numpy(), k, 5)))
    assert embedding_metrics(img, txt, k, rows=rows) == retrieval_metrics(_tiles_matrix(img, txt, k, rows), k)


def test_tile_scores_read_as_the_matrix():
    img, txt = _embeddings("float", 70, 3, 128, seed=2)
    full, sc = _tiles_matrix(img, txt, 3, 32), TileScores(img, txt, 3, 32)
    assert sc.shape == full.shape
    assert np.array_equal(sc[41], full[41]) and np.array_equal(sc[:, 150], full[:, 150]) and sc[5, 7] == full[5, 7]
    buffers: dict = {}
    for t, u in ((0, 0), (2, 1), (0, 2), (2, 2), (0, 0)):  # into reused buffers: the same bits
        assert torch.equal(sc.tile(t, u, buffers), sc.tile(t, u))


@pytest.mark.parametrize("d", [8, 128, 768])
def test_a_product_element_does_not_depend_on_the_other_rows(d):
    """The rule tied queries are re-scored by (`metrics._tied_ranks`): in a product of one shape,
    an element's bits depend on its row and column of the operands and its place, not on the
    other rows or columns (zeros, other values, NaN), on one thread and on several."""
    g = torch.Generator().manual_seed(d)
    a, b = torch.randn(256, d, generator=g), torch.randn(1280, d, generator=g)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ref = TileScores.product(a, b.t())
            for fill in ("zeros", "random", "nan"):
                keep_r, keep_c = torch.rand(256, generator=g) < 0.3, torch.rand(1280, generator=g) < 0.3
                a2, b2 = torch.randn(256, d, generator=g), torch.randn(1280, d, generator=g)
                if fill != "random":
                    a2.fill_(0.0 if fill == "zeros" else float("nan")), b2.fill_(0.0 if fill == "zeros" else float("nan"))
                a2[keep_r], b2[keep_c] = a[keep_r], b[keep_c]
                assert torch.equal(TileScores.product(a2, b.t())[keep_r], ref[keep_r])
                assert torch.equal(TileScores.product(a, b2.t())[:, keep_c], ref[:, keep_c])
    finally:
        torch.set_num_threads(before)


def test_tied_queries_go_in_stacks_and_a_mismatch_falls_back(caplog):
    """Stacks hold one block size, one query per place, at most `limit`; and a re-made line that
    does not give pass 2's counts is ranked from its own block's strip instead (here the counts
    handed in are wrong on purpose: the ranks must still be the reference's)."""
    from dbl_scale.evaluation.metrics import _stacks, _tied_ranks

    queries = np.array([0, 16, 32, 1, 17, 40, 41, 42, 43, 44, 45])  # blocks of 16; 40..: the short last block of 46
    stacks = _stacks(queries, 16, 46, limit=3)
    assert sorted(q for s in stacks for q in s.values()) == sorted(queries.tolist())
    for s in stacks:
        assert len(s) <= 3 and all(q % 16 == place for place, q in s.items())
        assert len({min(16, 46 - q // 16 * 16) for q in s.values()}) == 1  # one block size
    anywhere = _stacks(queries, 16, 46, limit=4, any_place=True)  # places free: only sizes and the limit
    assert [sorted(s.values()) for s in anywhere] == [[0, 1, 16, 17], [32, 40, 41, 42], [43, 44, 45]]
    assert sorted(q for s in anywhere for q in s.values()) == sorted(queries.tolist())
    img, txt = _embeddings("ties", 40, 3, 8, seed=3)
    grid = TileScores(img, txt, 3, 16)
    ref_i2t, ref_t2i = _ranks(_tiles_matrix(img, txt, 3, 16), 3, 7)
    rows = np.arange(40)
    wrong = np.full(40, -1)
    with caplog.at_level("WARNING"):
        got = _tied_ranks(grid, rows, "row", np.zeros(120, np.float32), np.zeros(40, np.float32), wrong, wrong)
    assert np.array_equal(got, ref_i2t) and "did not match their tiles" in caplog.text
    cols = np.arange(120)
    got = _tied_ranks(grid, cols, "col", np.zeros(120, np.float32), np.zeros(120, np.float32), np.full(120, -1),
                      np.full(120, -1))
    assert np.array_equal(got, ref_t2i)


@pytest.mark.parametrize("layout", ["own places", "any place", "compact"])
def test_each_stack_layout_gives_the_reference_ranks(layout, monkeypatch):
    """However the tied queries' operands are laid out (own places in block-shaped operands, any
    place, or the queries alone), every tied row and column gets the reference's rank, on
    float embeddings (ties only where rounding makes them) and integer ones (ties everywhere);
    "any place" stacks ignore places and keep one block size, "compact" ones mix blocks."""
    from dbl_scale.evaluation import metrics

    monkeypatch.setattr(metrics, "_stack_layout", lambda grid, kind, heights: layout)
    monkeypatch.setattr(metrics, "RESCORE_BYTES", 4 * 120 * 7)  # 7 rows / 21 columns a stack: many stacks
    for kind in ("float", "ties"):
        img, txt = _embeddings(kind, 40, 3, 8, seed=4)
        grid = TileScores(img, txt, 3, 16)
        matrix = _tiles_matrix(img, txt, 3, 16)
        ref_i2t, ref_t2i = _ranks(matrix, 3, 7)
        best = np.array([matrix[i, 3 * i:3 * i + 3].max() for i in range(40)], np.float32)
        pos = matrix[np.arange(120) // 3, np.arange(120)].astype(np.float32)
        stats: dict = {}
        rows, cols = np.arange(40), np.arange(120)
        got = metrics._tied_ranks(grid, rows, "row", pos, best, (matrix > best[:, None]).sum(1),
                                  (matrix == best[:, None]).sum(1), stats=stats)
        assert np.array_equal(got, ref_i2t) and stats["row_layout"] == layout
        assert stats["row_stacks"] == (6 if layout == "compact" else 7)  # 40 rows by 7; by 7 in blocks of 16, 16, 8
        got = metrics._tied_ranks(grid, cols, "col", pos, pos, (matrix > pos).sum(0), (matrix == pos).sum(0), stats=stats)
        assert np.array_equal(got, ref_t2i) and stats["col_layout"] == layout


def test_the_layout_check_catches_a_product_that_depends_on_place_or_shape(monkeypatch):
    """`_stack_layout` finds "compact" for an exact product, and falls back for one whose bits
    depend on the place ("own places") or on the operand's height ("any place") by one ulp."""
    from dbl_scale.evaluation import metrics

    img, txt = _embeddings("float", 40, 3, 8, seed=5)
    grid = TileScores(img, txt, 3, 16)
    exact = lambda a, bt, out=None: (a.double() @ bt.double()).float()  # noqa: E731 (one rounding: exact here)
    monkeypatch.setattr(TileScores, "product", staticmethod(exact))
    for kind in ("row", "col"):
        assert metrics._stack_layout(grid, kind, {5, 16, 40}) == "compact"

    def by_place(a, bt, out=None):
        x = exact(a, bt)
        x[3] = torch.nextafter(x[3], torch.tensor(float("inf")))
        x[:, 5] = torch.nextafter(x[:, 5], torch.tensor(float("inf")))
        return x

    def by_height(a, bt, out=None):
        x = exact(a, bt)
        return torch.nextafter(x, torch.tensor(float("inf"))) if a.shape[0] not in (16, 8) else x

    monkeypatch.setattr(TileScores, "product", staticmethod(by_place))
    assert metrics._stack_layout(grid, "row", {5}) == metrics._stack_layout(grid, "col", {5}) == "own places"
    monkeypatch.setattr(TileScores, "product", staticmethod(by_height))
    assert metrics._stack_layout(grid, "row", {5}) == "any place"


def test_the_tie_order_is_argsorts(monkeypatch):
    """`tie_order` lists a line's tied block as `np.argsort(s)[::-1]` does: by argpartition where
    this numpy's pair shares its partitions (checked once; on x86 with AVX2 and numpy >= 2 it
    does), by argsort where not; on lines full of ties, long lines whose ties sit deep in the
    partitions, sorted lines (argsort's early return) and blocks above the 256-element network."""
    import platform

    from dbl_scale.evaluation import metrics

    rng = np.random.default_rng(7)
    lines = [(rng.standard_normal(n) * 0.09).astype(np.float32) for n in (300, 200_001)]  # float ties: rare
    lines += [(rng.integers(0, levels, n) / levels).astype(np.float32)
              for n, levels in ((2, 2), (40, 3), (257, 9), (5000, 4), (5000, 700), (100_000, 50), (100_000, 90_000))]
    lines += [np.sort(lines[-1]), np.full(1000, 0.5, np.float32), lines[-2][::-1].copy()]
    if platform.machine() in ("x86_64", "AMD64") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        assert metrics.partition_keeps_tie_order()
    for keeps in (True, False):
        monkeypatch.setattr(metrics, "partition_keeps_tie_order", lambda keeps=keeps: keeps)
        for s in lines:
            order = np.argsort(s)
            for v in np.unique(s)[np.linspace(0, len(np.unique(s)) - 1, 5).astype(int)]:
                above, equal = int(np.count_nonzero(s > v)), int(np.count_nonzero(s == v))
                want = order[len(s) - above - equal:len(s) - above][::-1]
                assert np.array_equal(metrics.tie_order(s, above, equal), want), (len(s), above, equal, keeps)


def test_two_ranks_score_their_own_rows_and_agree(tmp_path):
    """Two ranks each count their blocks of rows and merge: both end with one process's ranks."""
    import sys

    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from tiled_ranks import embeddings, image_groups

    from dbl_scale.evaluation.single_modal import within_ranks

    torchrun([str(REPO / "tests" / "workers" / "tiled_ranks.py"), str(tmp_path / "ranks.npz")], nproc=2, timeout=300)
    got = np.load(tmp_path / "ranks.npz")
    img, txt, k = embeddings()
    i2t, t2i = embedding_ranks(img, txt, k, rows=16)
    t2t, i2i = within_ranks(txt, np.arange(len(txt)) // k, size=16), within_ranks(img, image_groups(len(img)), size=16)
    ref = _ranks((img @ txt.t()).numpy(), k, 5)
    for r in range(2):
        assert np.array_equal(got[f"i2t{r}"], i2t) and np.array_equal(got[f"t2i{r}"], t2i)
        assert np.array_equal(got[f"t2t{r}"], t2t) and np.array_equal(got[f"i2i{r}"], i2i)  # single-modal too
    assert np.array_equal(i2t, ref[0]) and np.array_equal(t2i, ref[1])
    assert (t2t >= 0).all() and 0 < (i2i >= 0).sum() < len(i2i)


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


def _reference_embeddings(model, root, split, image, tokenize, batch):
    """The in-memory path: decode the whole split, then embed it in batches."""
    t = as_transform(image)
    decoded = [decode_sample(s, t) for s in read_samples(split_shards(root, split)[0])]
    decoded.sort(key=lambda x: x[2])
    pixels = torch.stack([p for p, _, _ in decoded])
    texts = [c for _, caps, _ in decoded for c in caps[:5]]
    with torch.no_grad():
        img = torch.cat([model.encode_image(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
        txt = torch.cat([model.encode_text(**{k: v for k, v in tokenize(texts[i:i + batch]).items()})
                         for i in range(0, len(texts), batch)])
    return img, txt, torch.tensor([i for _, _, i in decoded])


def test_streamed_embedding_equals_the_decoded_split(shapes_root, tokenizer):
    from dbl_scale.branches import new_model
    from dbl_scale.config import load_config
    from dbl_scale.evaluation.embed import embed_split

    cfg = load_config(TINY, [f"data.root={shapes_root}"])
    model = new_model(cfg, tokenizer, 0).eval()
    tokenize = Tokenize(tokenizer, cfg.model.text.max_length)
    got = embed_split(model, shapes_root, "test", 32, tokenize, 8)
    img, txt, ids = _reference_embeddings(model, shapes_root, "test", 32, tokenize, 8)
    # the test split is one shard per ... : the stream's batches are the reference's in id order
    assert torch.equal(got.image_ids, ids) and got.captions_per_image == 5
    torch.testing.assert_close(got.img, img, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.txt, txt, rtol=0, atol=1e-6)


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
    img, txt = _embeddings("float", len(ids), 5, 8, seed=5)
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


def test_the_c_counting_kernel_equals_numpy():
    """The tile counting in C (one pass) and in numpy (several) add the same counts, ties and
    NaNs included; where a C compiler exists the C one is built and used."""
    import shutil

    from dbl_scale.evaluation import counting

    rng = np.random.default_rng(0)
    for rows, cols in ((256, 1280), (7, 33), (1, 1)):
        s = rng.integers(-3, 4, (rows, cols)).astype(np.float32)  # integers: ties everywhere
        s[rng.random((rows, cols)) < 0.01] = np.nan
        row_t, col_t = rng.integers(-3, 4, rows).astype(np.float32), rng.integers(-3, 4, cols).astype(np.float32)
        outs = []
        for use_c in (True, False):
            acc = [np.full(rows, 5, np.int64), np.full(rows, 5, np.int64), np.full(cols, 5, np.int32),
                   np.full(cols, 5, np.int32), np.zeros(rows, np.uint8), np.zeros(cols, np.uint8)]
            counting.count_tile(s, row_t, col_t, *acc, use_c=use_c)
            outs.append(acc)
        assert all(np.array_equal(a, b) for a, b in zip(*outs))
        assert outs[1][0][0] == 5 + np.count_nonzero(s[0] > row_t[0])  # added to what was there
        # told there is no NaN (the C loop then does not look): the same counts on finite scores
        finite = np.nan_to_num(s, nan=0.5)
        for use_c in (True, False):
            acc = [np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros(cols, np.int32), np.zeros(cols, np.int32)]
            counting.count_tile(finite, row_t, col_t, *acc, use_c=use_c)
            assert np.array_equal(acc[0], np.count_nonzero(finite > row_t[:, None], axis=1))
            assert np.array_equal(acc[3], np.count_nonzero(finite >= col_t[None, :], axis=0))
        # the bound counter: a tile added at offset (rows, cols) counts as count_tile on those slices
        ref = [np.zeros(rows, np.int64), np.zeros(rows, np.int64), np.zeros(cols, np.int32), np.zeros(cols, np.int32),
               np.zeros(rows, np.uint8), np.zeros(cols, np.uint8)]
        counting.count_tile(s, row_t, col_t, *ref)
        lengths = (rows, rows, cols, cols, rows, cols)
        bound = [np.zeros(2 * n, a.dtype) for n, a in zip(lengths, ref)]
        counter = counting.TileCounter(np.r_[row_t, row_t], np.r_[col_t, col_t], *bound)
        counter.add(torch.from_numpy(s), rows, cols)
        assert all(np.array_equal(b[n:], r) and not b[:n].any() for b, r, n in zip(bound, ref, lengths))
        with pytest.raises(IndexError):
            counter.add(torch.from_numpy(s), rows + 1, 0)
        with pytest.raises(ValueError, match="expected int64"):  # a wrong width would be written past
            counting.TileCounter(row_t, col_t, row_t.astype(np.int32), *ref[1:])
    if shutil.which("cc") or shutil.which("gcc"):
        assert counting.native()


@pytest.mark.timeout(600)
def test_bench_scale_prints_its_figures(tmp_path):
    """`dbl-scale bench scale` at toy sizes: every part prints its figures and writes them; with
    aligned (trained-like) embeddings the evaluation is far above chance and no query ties."""
    import json
    import subprocess
    import sys

    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "bench", "scale", "--images", "700", "--dim", "16",
                           "--mine-images", "300", "--aoq-images", "40", "80", "--aoq-size", "32", "--aoq-batches", "2",
                           "--tmp", str(tmp_path), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["eval"]["bare_seconds"] > 0 and r["eval"]["rsum"] < 30  # random embeddings: near chance
    assert r["mining"]["output_bytes"] == 300 * 1495 * 4 + 1500 * 299 * 4  # top-k capped by the split, own pairs out
    assert [x["images"] for x in r["aoq"]] == [40, 80]
    assert "evaluation / bare product" in proc.stdout and "(3) AOQ's negatives" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dbl_scale.cli", "bench", "scale", "--images", "700", "--dim", "16",
                           "--embeddings", "aligned", "--parts", "eval", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["eval"]["rsum"] > 400 and r["eval"]["rows_rescored"] == 0 and "mining" not in r and r["aoq"] == []
    assert "(2) mining" not in proc.stdout
