"""Evaluation reports a person looks at: a recall@K curve (PNG) and a page of sample queries (HTML).

Both come from the same scores and 0-based ranks as `metrics.retrieval_metrics`; the HTML page
lists each sampled query's top results by score, a tie putting negatives first (the ranking
rule), so what it shows agrees with the reported numbers. The page is self-contained
(thumbnails are inline data URIs) and can be logged to MLflow with `log_reports`.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .metrics import METRIC_KEYS, SINGLE_MODAL_KEYS, retrieval_metrics

ArrayLike = Union[np.ndarray, torch.Tensor]

THUMB_PX = 128
_METRIC_HEADS = {"i2t_r1": "I2T R@1", "i2t_r5": "I2T R@5", "i2t_r10": "I2T R@10", "t2i_r1": "T2I R@1",
                 "t2i_r5": "T2I R@5", "t2i_r10": "T2I R@10", "rsum": "rSum", "i2t_medr": "I2T medr",
                 "t2i_medr": "T2I medr", "i2t_meanr": "I2T meanr", "t2i_meanr": "T2I meanr",
                 "t2t_r1": "T2T R@1", "t2t_r5": "T2T R@5", "t2t_r10": "T2T R@10", "i2i_r1": "I2I R@1",
                 "i2i_r5": "I2I R@5", "i2i_r10": "I2I R@10", "i2i_queries": "I2I queries",
                 "i2t_tied": "I2T tied", "t2i_tied": "T2I tied", "t2t_tied": "T2T tied", "i2i_tied": "I2I tied"}


class EmbeddingScores:
    """The scores of image and caption embeddings, a row or a column at a time, read as a
    matrix is (`s[i]`, `s[:, c]`): what the page needs without the N x K*N matrix."""

    def __init__(self, img: torch.Tensor, txt: torch.Tensor):
        self.img, self.txt = img.float(), txt.float()
        self.shape = (img.shape[0], txt.shape[0])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            return (self.img @ self.txt[key[1]]).cpu().numpy()
        return (self.txt @ self.img[key]).cpu().numpy()


def _numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def recall_curve(ranks: np.ndarray, max_k: int) -> np.ndarray:
    """Recall@K in percent for K = 1..max_k, from 0-based ranks."""
    ranks = np.asarray(ranks)
    return 100.0 * np.array([np.count_nonzero(ranks < k) for k in range(1, max_k + 1)]) / len(ranks)


def recall_curve_png(ranks: dict, path: Union[str, Path], title: str = "Recall@K", max_k: int = 50) -> Path:
    """Recall@K for K = 1..max_k (capped at the number of candidates), both directions, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (seconds): when a plot is drawn
    from matplotlib.figure import Figure

    n_img, n_cap = len(ranks["i2t"]), len(ranks["t2i"])
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, no display needed
    ax = fig.add_subplot()
    for key, label, n_cand in (("i2t", "image -> text", n_cap), ("t2i", "text -> image", n_img)):
        ks = np.arange(1, min(max_k, n_cand) + 1)
        ax.plot(ks, recall_curve(ranks[key], len(ks)), marker="o", markersize=2.5,
                label=f"{label} ({len(ranks[key])} queries)")
    for k in (1, 5, 10):
        ax.axvline(k, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xscale("log")  # R@1, R@5 and R@10 get room; the tail is compressed
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= max_k]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _thumb_uri(image, px: int = THUMB_PX) -> str:
    """A PIL image or uint8 array (H x W, H x W x C or C x H x W) as a base64 PNG data URI."""
    if not isinstance(image, Image.Image):
        arr = _numpy(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        image = Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))
    image = image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()
    image.thumbnail((px, px))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table.metrics { border-collapse: collapse; margin-bottom: 1em; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.query { border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 12px 0; }
.query-head { display: flex; gap: 12px; align-items: center; margin-bottom: 8px; }
.query-head img, .result img { border: 1px solid #aaa; image-rendering: pixelated; }
ol.results { display: flex; flex-wrap: wrap; gap: 8px; padding: 0; margin: 0; list-style: none; }
.t2i ol.results li { width: 140px; }
.i2t ol.results { flex-direction: column; }
li.result { border: 2px solid; border-radius: 5px; padding: 4px 8px; }
li.correct { border-color: #2e7d32; background: #e8f5e9; }
li.wrong { border-color: #c62828; background: #ffebee; }
.mark { font-weight: bold; }
li.correct .mark { color: #2e7d32; }
li.wrong .mark { color: #c62828; }
.rank { font-weight: bold; }
.meta { color: #666; font-size: 0.9em; }
"""


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in METRIC_KEYS + SINGLE_MODAL_KEYS + ("i2i_queries",) if k in metrics]
    heads = "".join(f"<th>{_METRIC_HEADS.get(k, html.escape(k))}</th>" for k in keys)
    keys += [k for k in ("i2t_tied", "t2i_tied", "t2t_tied", "i2i_tied") if k in metrics and k not in keys]
    cells = "".join(f"<td>{metrics[k]}</td>" if isinstance(metrics[k], int) else f"<td>{metrics[k]:.1f}</td>"
                    for k in keys)
    return f'<table class="metrics"><tr>{heads}</tr><tr>{cells}</tr></table>'


def _mark(ok: bool) -> tuple[str, str]:
    return ("correct", "&#10003; correct") if ok else ("wrong", "&#10007; wrong")


def retrieval_html(path: Union[str, Path], images: Sequence, captions: Sequence[str], sims: ArrayLike,
                   ranks: Optional[dict] = None, n_queries: int = 10, k: int = 5, seed: int = 0,
                   title: str = "Retrieval samples", metrics: Optional[dict] = None) -> Path:
    """A self-contained HTML page of sampled queries and their top-`k` results, marked right or wrong.

    images: N PIL images or uint8 arrays; captions: K*N strings, caption c describes image
    c // K (both only indexed for what the page shows, so lazy sequences work); sims: the
    N x K*N similarity matrix, or scores made on demand (`EmbeddingScores`); ranks /
    metrics: from `retrieval_metrics(sims, K, return_ranks=True)` (computed here when not
    given). Each query shows its 1-based rank of the first correct result; `n_queries` queries
    per direction are drawn at random with `seed`.
    """
    s = sims if isinstance(sims, EmbeddingScores) else _numpy(sims)
    n_img, n_cap = s.shape
    if len(images) != n_img or len(captions) != n_cap or n_cap % n_img:
        raise ValueError(f"need N images and K*N captions for a {n_img} x {n_cap} sims matrix, "
                         f"got {len(images)} images and {len(captions)} captions")
    per = n_cap // n_img
    if ranks is None or metrics is None:
        metrics, ranks = retrieval_metrics(sims, captions_per_image=per, return_ranks=True)
    rng = np.random.default_rng(seed)
    img_q = np.sort(rng.choice(n_img, size=min(n_queries, n_img), replace=False))
    cap_q = np.sort(rng.choice(n_cap, size=min(n_queries, n_cap), replace=False))
    thumbs: dict[tuple[int, int], str] = {}

    def thumb(i: int, px: int = THUMB_PX) -> str:
        if (i, px) not in thumbs:
            thumbs[(i, px)] = _thumb_uri(images[i], px)
        return thumbs[(i, px)]

    def top(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:  # by score; a tie puts negatives first
        return np.lexsort((positive, -np.nan_to_num(scores, nan=np.inf)))[:k]

    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">{n_img} images x {per} captions; ranks are 1-based; results in score order.</p>',
             _metrics_table(metrics)]

    parts.append(f'<section class="direction i2t" id="i2t"><h2>Image &rarr; text: top {k} captions</h2>')
    for i in img_q:
        first = int(ranks["i2t"][i]) + 1
        truth = "".join(f"<li>{html.escape(captions[c])}</li>" for c in range(i * per, (i + 1) * per))
        parts.append(f'<div class="query i2t" data-direction="i2t" data-query="{i}" data-rank="{first}">'
                     f'<div class="query-head"><img src="{thumb(i)}" alt="image {i}">'
                     f'<div>query image {i}<br><span class="rank">rank of first correct caption: {first}</span>'
                     f'<details><summary class="meta">its {per} captions</summary><ul>{truth}</ul></details>'
                     f'</div></div><ol class="results">')
        row = s[i]
        for pos, c in enumerate(top(row, np.arange(n_cap) // per == i)):
            cls, mark = _mark(c // per == i)
            parts.append(f'<li class="result {cls}" data-index="{c}"><span class="mark">{mark}</span> '
                         f'<span class="meta">#{pos + 1} score {row[c]:.4f} (image {c // per})</span><br>'
                         f'<span class="caption">{html.escape(captions[c])}</span></li>')
        parts.append("</ol></div>")
    parts.append("</section>")

    parts.append(f'<section class="direction t2i" id="t2i"><h2>Text &rarr; image: top {k} images</h2>')
    for c in cap_q:
        own = c // per
        first = int(ranks["t2i"][c]) + 1
        parts.append(f'<div class="query t2i" data-direction="t2i" data-query="{c}" data-rank="{first}">'
                     f'<div class="query-head"><div>query caption {c}: '
                     f'<q class="caption">{html.escape(captions[c])}</q><br>'
                     f'<span class="rank">rank of first correct image: {first}</span></div>'
                     f'<div class="meta">ground truth<br><img src="{thumb(own, 64)}" alt="image {own}"></div>'
                     f'</div><ol class="results">')
        col = s[:, c]
        for pos, i in enumerate(top(col, np.arange(n_img) == own)):
            cls, mark = _mark(i == own)
            parts.append(f'<li class="result {cls}" data-index="{i}"><img src="{thumb(i)}" alt="image {i}"><br>'
                         f'<span class="mark">{mark}</span> <span class="meta">#{pos + 1} image {i} '
                         f'score {col[i]:.4f}</span></li>')
        parts.append("</ol></div>")
    parts.append("</section></body></html>\n")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def log_reports(tracker, out_dir: Union[str, Path], images: Sequence, captions: Sequence[str], sims: ArrayLike,
                metrics: Optional[dict] = None, ranks: Optional[dict] = None, split: str = "test",
                artifact_path: str = "reports", n_queries: int = 10, k: int = 5, seed: int = 0,
                name: Optional[str] = None) -> dict[str, Path]:
    """Write `<split>_recall_curve.png` and `<split>_retrieval.html` to out_dir and log both as
    artifacts of the tracker's run (a disabled tracker, as on ranks other than 0, logs nothing).
    `name` (e.g. the run's name and method) heads both titles."""
    if ranks is None or metrics is None:
        per = sims.shape[1] // len(images)
        metrics, ranks = retrieval_metrics(sims, captions_per_image=per, return_ranks=True)  # a matrix, then
    out, who = Path(out_dir), f"{name}: " if name else ""
    paths = {
        "png": recall_curve_png(ranks, out / f"{split}_recall_curve.png", title=f"{who}Recall@K on {split}"),
        "html": retrieval_html(out / f"{split}_retrieval.html", images, captions, sims, ranks, n_queries=n_queries,
                               k=k, seed=seed, title=f"{who}Retrieval samples on {split}", metrics=metrics),
    }
    for p in paths.values():
        tracker.log_artifact(p, artifact_path)
    return paths
