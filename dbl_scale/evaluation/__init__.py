"""Evaluation: the ranking rule and its tiled kernel (`ranking`), the retrieval protocol
(`metrics`), text-to-text and image-to-image retrieval (`single_modal`), text tables
(`tables`), embedding a split on all ranks (`embed`), reports a person looks at (`report`),
and one evaluation run as training and `dbl-scale eval` call it (`run`)."""
from .embed import embed_split
from .metrics import (METRIC_KEYS, RECALL_KEYS, SINGLE_MODAL_KEYS, chance_metrics, embedding_metrics,
                      protocol_metrics, retrieval_metrics)
from .run import Evaluation, evaluate, report
from .tables import RECALL_HEADS, SINGLE_MODAL_HEADS, format_evaluation, format_table

__all__ = ["embed_split", "METRIC_KEYS", "RECALL_HEADS", "RECALL_KEYS", "SINGLE_MODAL_HEADS", "SINGLE_MODAL_KEYS",
           "chance_metrics", "embedding_metrics", "format_evaluation", "format_table", "protocol_metrics",
           "retrieval_metrics", "Evaluation", "evaluate", "report"]
