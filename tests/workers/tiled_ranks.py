"""2 ranks rank the same embeddings (cross-modal both ways, text to text, image to image by
`image_groups`), each counting its own blocks of rows: rank 0 writes what every rank ends with,
for the test to compare with one process. Embeddings: integer-valued (exact scores, many ties)
with a NaN, several tiles."""
import sys

import numpy as np
import torch
import torch.distributed as dist

from dbl_scale import distributed
from dbl_scale.evaluation.ranking import TileSource, rank_tiles
from dbl_scale.evaluation.single_modal import within_ranks


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


def rank_all(img: torch.Tensor, txt: torch.Tensor, k: int) -> dict:
    r = rank_tiles(TileSource(img, txt, 16, 16 * k), torch.arange(len(img)), torch.arange(len(txt)) // k,
                   columns=True, compile=False)
    t2t, t2t_tied = within_ranks(txt, np.arange(len(txt)) // k, rows=16, compile=False)
    i2i, i2i_tied = within_ranks(img, image_groups(len(img)), rows=16, compile=False)
    return {"i2t": r.rows, "i2t_tied": r.rows_tied, "t2i": r.cols, "t2i_tied": r.cols_tied, "t2t": t2t,
            "t2t_tied": t2t_tied, "i2i": i2i, "i2i_tied": i2i_tied}


def main(out: str) -> int:
    distributed.init_distributed()
    mine = rank_all(*embeddings())
    parts = [None] * distributed.world_size()
    dist.all_gather_object(parts, mine)
    if distributed.rank() == 0:
        np.savez(out, **{f"{name}{r}": value for r, part in enumerate(parts) for name, value in part.items()})
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
