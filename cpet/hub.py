"""Whether the Hugging Face hub can be reached, asked once before a hub id is loaded.

Why not leave it to the libraries: on a machine without network, ``huggingface_hub`` retries every request five
times with back-off (about 23 s a file), so ``cpet info org/name`` waited about 50 s (two files) and a hub task
about 34 s before their error. One TCP connection with a short timeout answers the same question in
milliseconds; a model is then read from the local hub cache only (``local_files_only``), and a dataset is
refused with the way to read it from the cache.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    """The hub's base URL (``HF_ENDPOINT`` where set, else https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_offline_by_choice() -> bool:
    """True where the user set ``HF_HUB_OFFLINE=1``: the libraries then read their caches without asking.

    The environment is read now as well: huggingface_hub reads it once, at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host accepts a TCP connection within ``timeout`` seconds (False in offline mode)."""
    if hub_offline_by_choice():
        return False
    parts = urlsplit(hub_endpoint())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:  # no route, no DNS, refused, timed out: all mean the same to the user
        return False
    return True


def unreachable_reason() -> str:
    """How the hub is out of reach, for messages: offline mode, or the host that did not answer."""
    if hub_offline_by_choice():
        return "HF_HUB_OFFLINE is set"
    return f"{urlsplit(hub_endpoint()).hostname} cannot be reached from this machine"
