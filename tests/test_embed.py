"""Embedding a split (evaluation/embed.py) streams it: the embeddings equal those of the whole
split decoded into memory first, in image-id order."""
from __future__ import annotations

import torch

from dbl_scale.data import decode_sample, read_samples, split_shards
from dbl_scale.preprocess import Tokenize, as_transform

from conftest import TINY


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
