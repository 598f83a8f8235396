"""Quiet by default: a command prints our own progress lines and results, and the libraries'
notes, progress bars and warnings only with `--verbose` (`DBL_SCALE_VERBOSE=1`, which the
ranks inherit). `setup` runs once per process, before the heavy libraries are imported:
most of them read their settings from the environment at import, and the ranks inherit it.
Warnings whose cause is ours are fixed there (type hints, explicit dataset sources), not here.
"""
from __future__ import annotations

import logging
import os
import warnings

VERBOSE = "DBL_SCALE_VERBOSE"
DEBUG = "DBL_SCALE_DEBUG"
FORMAT, DATEFMT = "%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"  # one timestamp format everywhere

# read by each library when it is imported (here, and in every rank, which inherits them)
LIBRARY_ENV = {
    "TQDM_DISABLE": "1",  # bars a library draws with tqdm's defaults; ours pass `disable` themselves
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers: "Loading weights", "Writing model shards"
    "TRANSFORMERS_VERBOSITY": "error",  # e.g. "CLIPImageProcessor requires torchvision" (it falls back to PIL)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts"
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's records go through our handler, in our format
}
# loggers kept to warnings (or errors) unless --verbose: their INFO lines are notes for their developers
LOGGER_LEVELS = {"mlflow": logging.WARNING, "alembic": logging.WARNING, "DeepSpeed": logging.WARNING,
                 "matplotlib": logging.ERROR, "torch.distributed.elastic": logging.WARNING,
                 "huggingface_hub": logging.ERROR, "transformers": logging.ERROR}
# DeepSpeed's logger resets its own level when it is imported: a filter on the logger stays
DEEPSPEED_NOTES = ("Setting accelerator to CPU",)


def verbose() -> bool:
    return os.environ.get(VERBOSE) == "1"


def debug() -> bool:
    return os.environ.get(DEBUG) == "1"


def _deepspeed_filter(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING and not any(n in record.getMessage() for n in DEEPSPEED_NOTES)


def setup(loud: bool | None = None) -> None:
    """Quiet the libraries for this process and the ranks it starts, unless `loud` (default:
    `DBL_SCALE_VERBOSE=1`). Our own log lines use one format (`FORMAT`)."""
    loud = verbose() if loud is None else loud
    if loud:
        os.environ[VERBOSE] = "1"
        logging.getLogger("dbl_scale.export").setLevel(logging.DEBUG)  # what zero_to_fp32 printed
        return
    os.environ.pop(VERBOSE, None)
    for key, value in LIBRARY_ENV.items():
        os.environ.setdefault(key, value)
    for name, level in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    ds = logging.getLogger("DeepSpeed")
    if _deepspeed_filter not in ds.filters:
        ds.addFilter(_deepspeed_filter)
    # torch 2.13 marks a collective deprecated that DeepSpeed 0.19 calls on every step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def same_format() -> None:
    """Libraries that format their own records (DeepSpeed) print in ours. For the ranks, which
    import DeepSpeed anyway: its logger and handler exist once it is imported."""
    import deepspeed  # noqa: F401  (heavy: rank processes only)

    formatter = logging.Formatter(FORMAT, DATEFMT)
    for handler in logging.getLogger("DeepSpeed").handlers:
        handler.setFormatter(formatter)
