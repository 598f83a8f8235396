"""Where a pretrained checkpoint lives: `model.*.pretrained` is a local folder or a Hugging
Face hub id, and a hub id is looked up in the local HF cache only (`HF_HUB_CACHE` / `HF_HOME`).
Nothing is ever downloaded at run time; a missing id is an error that says how to fetch it."""
from __future__ import annotations

from pathlib import Path


class NotCached(RuntimeError):
    """A hub id that the local Hugging Face cache does not hold."""


def local_folder(name: str, key: str = "pretrained") -> str:
    """The local folder of `name`: itself when it is a folder, else its snapshot in the HF cache."""
    if Path(name).is_dir():
        return str(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise NotCached(f"config key '{key}': folder {name} does not exist")
    from huggingface_hub import snapshot_download  # light, but only hub ids need it
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as exc:
        raise NotCached(
            f"config key '{key}': '{name}' is neither a local folder nor in the Hugging Face cache at "
            f"{HF_HUB_CACHE} (runs never download). On a machine with network: `hf download {name}` "
            f"(or `huggingface-cli download {name}`), then copy that cache here or set HF_HUB_CACHE / "
            f"HF_HOME to it; or give a folder written by save_pretrained") from exc
