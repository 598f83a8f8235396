"""2 ranks score the same embeddings with `embedding_ranks` (each its own blocks of image rows,
merged) and the single-modal `within_ranks` (text to text; image to image by `GROUPS`): rank 0
writes the ranks it ends with, and rank 1's, for the test to compare with one process.
Embeddings: integer-valued (exact scores, many ties) with a NaN, several tiles."""
import sys

import numpy as np
import torch
import torch.distributed as dist

from dbl_scale import distributed
from dbl_scale.evaluation.metrics import embedding_ranks
from dbl_scale.evaluation.single_modal import within_ranks

NAMES = ("i2t", "t2i", "t2t", "i2i")


def embeddings(n: int = 90, k: int = 3, d: int = 6):
    g = torch.Generator().manual_seed(11)
    img = torch.randint(-2, 3, (n, d), generator=g).float()
    txt = torch.randint(-2, 3, (k * n, d), generator=g).float()
    img[17, 2] = float("nan")
    txt[100, 0] = float("nan")
    return img, txt, k


def image_groups(n: int = 90) -> np.ndarray:
    """Groups of 2 to 4 images, spread over the tiles (image i in group (i * 7) % 31), and every
    ninth image alone in a group of its own (not a query)."""
    groups = (np.arange(n) * 7) % 31
    groups[::9] = 100 + np.arange(n)[::9]
    return groups


def main(out: str) -> int:
    distributed.init_distributed()
    img, txt, k = embeddings()
    i2t, t2i = embedding_ranks(img, txt, k, rows=16)
    t2t = within_ranks(txt, np.arange(txt.shape[0]) // k, size=16)
    i2i = within_ranks(img, image_groups(len(img)), size=16)
    parts = [None] * distributed.world_size()
    dist.all_gather_object(parts, (i2t, t2i, t2t, i2i))
    if distributed.rank() == 0:
        np.savez(out, **{f"{name}{r}": part[j] for r, part in enumerate(parts) for j, name in enumerate(NAMES)})
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
