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


def test_paused_resumes_every_process_and_keeps_the_benchmarks_own_error():
    """A paused process that ended meanwhile made the resume loop raise: the ones after it stayed stopped, and the
    benchmark's own error was replaced by ProcessLookupError."""
    import signal
    import subprocess
    import time

    from benchtools import paused

    def state(pid: int, settles_to=None) -> str:
        for _ in range(200):  # signals are delivered asynchronously
            now = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if settles_to is None or settles_to(now):
                break
            time.sleep(0.01)
        return now

    gone, kept = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    try:
        with pytest.raises(RuntimeError, match="the benchmark failed"):
            with paused([gone.pid, kept.pid]):
                assert state(kept.pid, lambda now: now == "T") == "T"
                gone.kill()
                gone.wait()
                raise RuntimeError("the benchmark failed")
        assert state(kept.pid, lambda now: now != "T") != "T"
    finally:
        for process in (gone, kept):
            process.send_signal(signal.SIGCONT) if process.poll() is None else None
            process.kill()
            process.wait()
