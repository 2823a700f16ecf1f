"""`push_dataset_to_hub`: the prepared (tokenized) DatasetDict uploaded after preprocessing."""

from __future__ import annotations

import logging
import os
from typing import Any

from newtune.errors import DataError

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True outside a launch and on the launch's first process (one upload per run)."""
    return os.environ.get("RANK", "0") == "0"


def push_prepared(repo: str, data: Any, fingerprint: str) -> None:
    """Push the prepared splits to the hub dataset `repo` (private; config name = fingerprint)."""
    if not is_main_process():
        return
    try:
        data.push_to_hub(repo, config_name=fingerprint, private=True)
    except Exception as exc:  # noqa: BLE001 - any hub failure: the prepared data is safe locally
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            f"`push_dataset_to_hub: {repo}`: pushing the prepared data failed "
            f"({type(exc).__name__}: {first}); it is saved locally. Check HF_TOKEN (or `hf "
            "auth login`), the network and the repo name, or remove push_dataset_to_hub"
        ) from exc
    log.info("pushed the prepared data to the hub dataset %s (config %s)", repo, fingerprint)
