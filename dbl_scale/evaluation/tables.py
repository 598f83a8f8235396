"""Metrics as text tables: the column heads, one table of runs, one evaluation."""
from __future__ import annotations

from .metrics import RECALL_KEYS, SINGLE_MODAL_KEYS

RECALL_HEADS = {"i2t_r1": "I2T R@1", "i2t_r5": "R@5", "i2t_r10": "R@10", "t2i_r1": "T2I R@1",
                "t2i_r5": "R@5", "t2i_r10": "R@10", "rsum": "rSum"}  # table column headers
SINGLE_MODAL_HEADS = {"t2t_r1": "T2T R@1", "t2t_r5": "R@5", "t2t_r10": "R@10",
                      "i2i_r1": "I2I R@1", "i2i_r5": "R@5", "i2i_r10": "R@10"}


def format_table(rows: dict[str, dict[str, float]], keys=RECALL_KEYS) -> str:
    """Rows of metrics as an aligned text table ("-" where a row lacks a key)."""
    heads = {**RECALL_HEADS, **SINGLE_MODAL_HEADS}
    width = max(len(name) for name in rows) + 2
    lines = ["".ljust(width) + "".join(f"{heads.get(k, k):>9}" for k in keys)]
    for name, m in rows.items():
        lines.append(name.ljust(width) + "".join(f"{m[k]:9.1f}" if k in m else f"{'-':>9}" for k in keys))
    return "\n".join(lines)


def format_evaluation(name: str, metrics: dict[str, float]) -> str:
    """One evaluation as text: the cross-modal recalls, the single-modal ones it has, and how
    many queries a tie decided (ties count against the query)."""
    text = format_table({name: metrics})
    single = [k for k in SINGLE_MODAL_KEYS if k in metrics]
    if single:
        queries = f" ({int(metrics['i2i_queries'])} image queries)" if "i2i_queries" in metrics else ""
        text += "\n" + format_table({name: metrics}, single) + queries
    tied = [f"{d.upper()} {int(metrics[f'{d}_tied'])}" for d in ("i2t", "t2i", "t2t", "i2i") if f"{d}_tied" in metrics]
    if tied:
        text += "\nqueries tied with a negative (counted against them): " + ", ".join(tied)
    return text
