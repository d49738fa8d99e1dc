"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager


@contextmanager
def paused(pids: list[int]):
    """SIGSTOP ``pids`` for the duration (SIGCONT afterwards, also on errors, to every one still there); missing
    processes are skipped.

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
        for pid in stopped:  # each one, whatever happened to the others: none may stay stopped
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError as exc:  # it ended while stopped (killed by someone): nothing to resume
                print(f"[bench] process {pid} could not be resumed ({exc})", file=sys.stderr)


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


def add_threads_option(parser) -> None:
    """``--threads N``: torch's CPU threads while timing, set by :func:`set_threads` (recorded with the machine)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads while timing (default: every core this process may run on; a "
                             "benchmark times alone, with --pause stopping what shares the machine)")


def refuse_sizes_below_one(parser, sizes: dict[str, int]) -> None:
    """``parser.error`` (exit 2, before any work) naming every ``{option: value}`` of ``sizes`` below 1: a count of
    repeats, tokens or clients of 0 times nothing, and the ratios of the tables then divide by zero after all
    the work."""
    bad = [f"{option} {value}" for option, value in sizes.items() if value < 1]
    if bad:
        parser.error(f"must be >= 1: {', '.join(bad)}")


def set_threads(threads: int | None) -> int:
    """Set torch's thread count to ``threads``, or to every core this process may run on, and return it.

    Pinned on purpose, not left to torch's default nor to ``cpet.runtime.default_threads``: the first follows
    what torch detects (all cores of the machine in some containers), the second the load average, which
    counts the very processes ``--pause`` stops; either way two runs of one benchmark could time different
    thread counts without a word."""
    import torch

    from cpet.runtime import allowed_cores

    if threads is not None and threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {threads}")
    count = threads or allowed_cores()
    torch.set_num_threads(count)
    return count
