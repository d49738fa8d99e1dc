"""The benchmark scripts' shared helpers (scripts/benchtools.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchtools import add_threads_option, set_threads  # noqa: E402


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_pinned_to_what_was_asked_or_to_the_allowed_cores(restore_threads, monkeypatch):
    """Left to torch's default, two runs of one benchmark could time different thread counts without a word."""
    parser = argparse.ArgumentParser()
    add_threads_option(parser)
    assert set_threads(parser.parse_args(["--threads", "1"]).threads) == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))  # the load of paused jobs does not count
    assert set_threads(parser.parse_args([]).threads) == 2 and torch.get_num_threads() == 2
    with pytest.raises(SystemExit, match="--threads must be >= 1, got 0"):
        set_threads(0)
