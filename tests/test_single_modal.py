"""Single-modal retrieval (evaluation/single_modal.py): the tiled ranks equal a loop over the
whole score matrix written from the rule (ties and NaNs against the query, groups spread over
tiles), the relevance keys, and the metrics on ShapesCaptions' own captions and facts. The
2-rank merge is checked in test_ranking.py (one worker run for every kind of rank)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from dbl_scale.evaluation.single_modal import (image_groups, recalls, relevance_key, single_modal_metrics,
                                               within_ranks)


def _reference(emb: torch.Tensor, groups: np.ndarray) -> np.ndarray:
    """The rule, one query at a time, on the matrix of one product (exact: integer embeddings)."""
    s = (emb.double() @ emb.double().t()).numpy()
    n, out = len(groups), np.full(len(groups), -1)
    for i in range(n):
        rel = [j for j in range(n) if j != i and groups[j] == groups[i]]
        if not rel:
            continue
        finite = [s[i, j] for j in rel if not np.isnan(s[i, j])]
        if not finite:
            out[i] = sum(1 for j in range(n) if groups[j] != groups[i])
            continue
        best = max(finite)
        out[i] = sum(1 for j in range(n) if groups[j] != groups[i] and (s[i, j] >= best or np.isnan(s[i, j])))
    return out


def _integer_embeddings(n: int, d: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).float()  # exact scores, many ties


@pytest.mark.parametrize("size", [3, 16, 1280])
def test_tiled_ranks_follow_the_rule(size):
    emb = _integer_embeddings(70)
    emb[5, 1] = float("nan")  # a query whose scores are all NaN, and a NaN candidate for the rest
    caption_groups = np.arange(70) // 5
    spread = (np.arange(70) * 11) % 23  # groups of 3-4 items in different tiles
    spread[[0, 1]] = [100, 101]  # two items with no relevant item: not queries
    for groups in (caption_groups, spread):
        got, want = within_ranks(emb, groups, size)[0], _reference(emb, groups)
        assert np.array_equal(got, want)
    assert got[0] == got[1] == -1 and got[5] == np.count_nonzero(groups != groups[5])
    assert len(set(want.tolist())) > 5  # ranks spread: the comparison is not between constants


def test_duplicates_rank_first_and_a_shuffle_does_not_change_ranks():
    """Each item duplicated in its group: every query finds its twin first (its twin scores as
    high as any item can). Permuting the items permutes the ranks."""
    emb = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    twins = torch.cat([emb, emb])
    groups = np.r_[np.arange(40), np.arange(40)]
    assert (within_ranks(twins, groups, 16)[0] == 0).all()
    perm = np.random.default_rng(0).permutation(80)
    base = within_ranks(twins + 0.3 * torch.randn(80, 8, generator=torch.Generator().manual_seed(4)), groups, 16)[0]
    shuffled = within_ranks((twins + 0.3 * torch.randn(80, 8, generator=torch.Generator().manual_seed(4)))[perm],
                            groups[perm], 16)[0]
    assert np.array_equal(shuffled, base[perm]) and base.max() > 0


def test_relevance_keys():
    a = {"objects": [{"shape": "star", "colour": "red", "size": "small", "cell": [0, 0]},
                     {"shape": "circle", "colour": "blue", "size": "large", "cell": [1, 2]}]}
    b = {"objects": [{"shape": "circle", "colour": "blue", "size": "small", "cell": [2, 2]},
                     {"shape": "star", "colour": "red", "size": "large", "cell": [0, 1]}]}
    c = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "cell": [2, 2]},
                     {"shape": "star", "colour": "blue", "size": "large", "cell": [0, 1]}]}
    spec = "objects:shape,colour"
    assert relevance_key(a, spec) == relevance_key(b, spec) != relevance_key(c, spec)  # same shapes, same colours
    assert relevance_key(a, "objects:shape") == relevance_key(c, "objects:shape")
    assert relevance_key(a, "objects") != relevance_key(b, "objects")  # whole objects: sizes and cells differ
    assert relevance_key({"labels": ["dog", "cat"]}, "labels") == relevance_key({"labels": ["cat", "dog"]}, "labels")
    assert relevance_key({"caption": "x"}, spec) is None
    with pytest.raises(ValueError, match="eval.image_relevance"):
        relevance_key({"objects": [{"shape": "star"}]}, spec)
    groups = image_groups([relevance_key(x, spec) for x in (a, b, c, {})])
    assert groups[0] == groups[1] and len(set(groups.tolist())) == 3


def test_metrics_on_shapes_captions(shapes_root):
    """On ShapesCaptions' test split, with a stand-in embedding that knows each caption's and
    image's facts (bag of facts), text to text and image to image are scored; the image queries
    are exactly the images with another image of the same shapes (the test fixture's 40 images
    have too few repeats of shapes and colours, the default key)."""
    import sys

    from conftest import REPO
    sys.path.insert(0, str(REPO))
    from data_tools.shapes_captions import image_facts, read_split_jsons

    metas = read_split_jsons(str(shapes_root), "test")
    facts = sorted({f for m in metas for fs in m["caption_facts"] for f in fs} | {f for m in metas
                                                                                  for f in image_facts(m["objects"])})
    index = {f: i for i, f in enumerate(facts)}

    def bag(items) -> torch.Tensor:
        v = torch.zeros(len(facts))
        v[[index[f] for f in items]] = 1.0
        return torch.nn.functional.normalize(v, dim=0)

    img = torch.stack([bag(image_facts(m["objects"])) for m in metas])
    txt = torch.stack([bag(fs) for m in metas for fs in m["caption_facts"][:5]])
    keys = [relevance_key(m, "objects:shape") for m in metas]
    metrics, ranks = single_modal_metrics(img, txt, 5, image_groups(keys))
    count = Counter(keys)
    assert metrics["i2i_queries"] == sum(1 for key in keys if count[key] > 1) > 0
    assert set(metrics) == {"t2t_r1", "t2t_r5", "t2t_r10", "i2i_r1", "i2i_r5", "i2i_r10", "i2i_queries",
                            "t2t_tied", "i2i_tied"}
    assert 0 < metrics["t2t_r1"] <= metrics["t2t_r5"] <= metrics["t2t_r10"] <= 100
    assert metrics == {**recalls(ranks["t2t"], "t2t"), **recalls(ranks["i2i"], "i2i"),
                       "i2i_queries": metrics["i2i_queries"], "t2t_tied": metrics["t2t_tied"],
                       "i2i_tied": metrics["i2i_tied"]}
    assert isinstance(metrics["i2i_queries"], int)
    assert ranks["t2t"].shape == (5 * len(metas),) and ranks["i2i"].shape == (len(metas),)
