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
import urllib.request
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


def _probe_address() -> tuple[str, int | None, str]:
    """``(host, port, what)`` that a hub request connects to first: the proxy the environment sets for the hub's
    scheme, or for every scheme (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY``, any case, as requests and httpx
    read them), unless ``NO_PROXY`` exempts the hub's host; else the hub itself. Behind a proxy the hub's host is
    often not reachable directly at all, so a direct probe called a working hub unreachable. ``port`` is None
    where the proxy's port is not a number."""
    parts = urlsplit(hub_endpoint())
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        try:
            port = proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80)
        except ValueError:  # "http://proxy:abc"
            return (proxy_parts.hostname or "", None,
                    f"the proxy {proxy!r} set in the environment (its port is not a number)")
        return proxy_parts.hostname or "", port, f"the proxy {proxy_parts.hostname}:{port} set in the environment"
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80), parts.hostname or ""


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's host (or the proxy in front of it) accepts a TCP connection within ``timeout`` seconds
    (False in offline mode)."""
    if hub_offline_by_choice():
        return False
    host, port, _ = _probe_address()
    if port is None:
        return False
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:  # no route, no DNS, refused, timed out: all mean the same to the user
        return False
    return True


def unreachable_reason() -> str:
    """How the hub is out of reach, for messages: offline mode, or the host (or proxy) that did not answer."""
    if hub_offline_by_choice():
        return "HF_HUB_OFFLINE is set"
    return f"{_probe_address()[2]} cannot be reached from this machine"
