"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager


@contextmanager
def paused(pids: list[int]):
    """SIGSTOP ``pids`` for the duration (SIGCONT afterwards, also on errors); missing processes are skipped.

    Lets a benchmark time its runs alone on the machine while e.g. an experiment grid shares it otherwise.
    """
    stopped = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
            except ProcessLookupError:
                print(f"[bench] process {pid} not found, not paused", file=sys.stderr)
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)


def write_report(out: str, report: dict, markdown) -> None:
    """Write ``report`` as JSON to ``out`` and ``markdown(report)`` beside it (``.md``), atomically; print the table."""
    import json
    from pathlib import Path

    from cpet.assets import write_text_atomic

    path = Path(out)
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
    write_text_atomic(path.with_suffix(".md"), markdown(report))
    print(markdown(report))


def git_commit() -> str:
    """The code commit a benchmark measures, abbreviated (``+dirty`` when ``cpet/`` or ``scripts/`` have uncommitted
    changes); ``unknown`` outside a git checkout."""
    from pathlib import Path

    from experiments.grid import code_commit  # the grid's reader: one definition of "the measured commit"

    try:
        commit = code_commit(Path(__file__).resolve().parent.parent, allow_dirty=True, measured=("cpet", "scripts"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    head, plus, dirty = commit.partition("+")
    return head[:7] + plus + dirty
