"""Fail fast when the Hugging Face Hub cannot be reached.

Without this, `datasets` and `transformers` retry for half a minute and end in a
traceback. One TCP connect with a short timeout tells us within seconds.
"""

from __future__ import annotations

import os
import re
import socket

from llmctl.errors import LlmctlError

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """The user asked for the local Hugging Face cache only."""
    return any(os.environ.get(v, "0").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host_port = re.sub(r"^https?://", "", endpoint).split("/")[0]
    host, _, port = host_port.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def require_hub(what: str, local_alternative: str) -> None:
    """Raise one actionable line when `what` must come from an unreachable Hub."""
    if hub_offline() or hub_reachable():
        return
    raise LlmctlError(f"cannot reach the Hugging Face Hub to fetch {what}; {local_alternative}, "
                      f"or set HF_HUB_OFFLINE=1 to use a populated Hugging Face cache")
