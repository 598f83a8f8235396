"""The variants, tower sizes and fixed global batch of the parity test (tests/workers/step_parity.py)."""
import torch

from dbl_scale.methods import KeyQueues

GLOBAL_BATCH = 8
# ids repeat inside a rank's slice and across the two slices: masking must see both
IMAGE_IDS = [0, 1, 1, 2, 3, 4, 4, 0]

VARIANTS = {
    "triplet": ["loss.method=triplet"],
    "triplet_sum": ["loss.method=triplet", "loss.max_violation=false"],
    "triplet_nomask": ["loss.method=triplet", "loss.mask_same_image=false"],
    "infonce": ["loss.method=infonce"],
    "dbl_momentum_relative": ["loss.method=dbl", "loss.dbl.boost=relative"],
    "dbl_absolute_soft": ["loss.method=dbl", "loss.dbl.boost=absolute", "loss.dbl.alpha=0.5",
                          "loss.dbl.soft_adapt=true"],
    "dbl_online_3": ["loss.method=dbl", "loss.dbl.scenario=online", "loss.dbl.branches=3"],
    "distill": ["loss.method=distill", "loss.distill.teacher=unused", "loss.distill.temperature=0.2"],
    "mutual": ["loss.method=mutual"],
    "structure": ["loss.method=structure", "loss.structure.teacher=unused"],
    "structure_pair_mean": ["loss.method=structure", "loss.structure.teacher=unused",
                            "loss.structure.mode=pair_mean"],
    "coder": ["loss.method=coder", "loss.coder.concepts=8", "loss.coder.beta=2.0"],
    "aoq": ["loss.method=aoq"],
    "aoq_unclamped": ["loss.method=aoq", "loss.aoq.clamp_weights=false", "loss.aoq.a=0.05"],
}
# variants that change only the loss's arithmetic, not what ZeRO partitions or gathers: run
# under ZeRO-2 only (their math is checked against references in test_loss_gradients.py)
LOSS_ONLY = {"triplet_sum", "triplet_nomask", "dbl_absolute_soft", "structure_pair_mean", "aoq_unclamped"}
MODEL = ["model.vision.image_size=16", "model.vision.patch_size=8", "model.vision.hidden=32",
         "model.vision.layers=1", "model.vision.heads=2", "model.text.hidden=32",
         "model.text.layers=1", "model.text.heads=2", "model.text.max_length=12", "model.embed_dim=16"]


def make_queues(cfg):
    """A CODER queue half full of fixed keys (the same in both halves of the test); some carry
    the ids of images in the batch, so the masking of a query's own image's keys is compared too."""
    if cfg.loss.method != "coder":
        return None
    g = torch.Generator().manual_seed(3)
    queues = KeyQueues(32, cfg.model.embed_dim)
    norm = torch.nn.functional.normalize
    ids = torch.arange(1000, 1020)
    ids[:6] = torch.tensor(IMAGE_IDS[:6])
    queues.push(norm(torch.randn(20, 16, generator=g), dim=1), norm(torch.randn(20, 16, generator=g), dim=1), ids)
    return queues


def make_batch(tokenizer, cfg=None):
    """The global batch; for AOQ each pair's two offline negative images and captions follow
    the pairs (3 blocks of GLOBAL_BATCH rows), as OfflineHardNegatives.extend lays them out."""
    blocks = 3 if cfg is not None and cfg.loss.method == "aoq" else 1
    g = torch.Generator().manual_seed(2)
    words = ["red", "blue", "circle", "square", "left", "small", "large", "star"]
    n = GLOBAL_BATCH * blocks
    captions = [" ".join(words[(i * 3 + k) % len(words)] for k in range(2 + i % 4)) for i in range(n)]
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "image_ids": torch.tensor(IMAGE_IDS)}


def local_slice(batch, rank, world):
    """Rank `rank`'s share: its rows of every block (pairs, then offline negatives)."""
    per = GLOBAL_BATCH // world
    out = {}
    for key, value in batch.items():
        blocks = value.split(GLOBAL_BATCH)
        out[key] = torch.cat([b[rank * per:(rank + 1) * per] for b in blocks])
    return out
