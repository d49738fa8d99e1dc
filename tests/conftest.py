"""Shared fixtures: tiny models per family and the real registry assets (skipped when unavailable)."""

from __future__ import annotations

import pytest

from cpet.assets import AssetError, fetch_asset
from cpet.models import TINY_FAMILIES, tiny_model


@pytest.fixture(params=TINY_FAMILIES)
def tiny(request):
    """A tiny random model of each supported family (parametrized)."""
    return tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def real_asset(name: str):
    """Path of a verified registry asset, fetching it if possible; skips the test otherwise."""
    try:
        return fetch_asset(name)
    except AssetError as exc:  # offline machine without the cache
        pytest.skip(f"registry asset {name} unavailable: {exc}")
