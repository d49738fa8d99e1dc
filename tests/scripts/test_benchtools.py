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


def test_bench_moefy_speed_only_refuses_another_clustering_than_its_report(tmp_path, monkeypatch, restore_threads):
    """--speed-only checked only the model: its speed table, MoEfied with another --clustering, replaced the one
    under the report's heading of the first clustering, its rows named by expert counts alone."""
    import json

    import bench_moefy

    out = tmp_path / "bench_moefy.json"
    out.write_text(json.dumps({"model": "smollm2-135m", "experts": 16, "clustering": "coactivation"}))
    monkeypatch.setattr(bench_moefy, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="measured coactivation clustering, not weights"):
        bench_moefy.main(["--speed-only", "--out", str(out), "--clustering", "weights", "--threads", "1"])
    with pytest.raises(pytest.fail.Exception, match="the model was loaded"):  # the same clustering: it runs
        bench_moefy.main(["--speed-only", "--out", str(out), "--threads", "1"])


MOEFY_OPTIONS = r"^--experts / --top-k / --tau / --speed-experts: "


@pytest.mark.parametrize("options, message", [
    (["--speed-repeats", "0"], r"^--speed-repeats must be >= 1, got 0$"),
    (["--top-k", "20"], MOEFY_OPTIONS + r"top_k must be in 1\.\.num_experts \(16\), got 20"),
    (["--top-k", "0"], MOEFY_OPTIONS + r"top_k must be in 1\.\.num_experts \(16\), got 0"),
    (["--tau", "1.5"], MOEFY_OPTIONS + r"tau \(dynamic-k share\) must be in \(0, 1\], got 1\.5"),
    (["--speed-experts", "1", "--speed-share", "1"], MOEFY_OPTIONS + r"num_experts must be >= 2, got 1")])
def test_bench_moefy_refuses_bad_options_before_loading_the_model(options, message, monkeypatch, restore_threads):
    """--speed-repeats 0 timed nothing (0 tok/s) and the report's speed ratios divided by zero after the hour of
    quality work; a top-k past --experts or a tau past 1 was accepted, measured as something else or failing late."""
    import bench_moefy

    monkeypatch.setattr(bench_moefy, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=message):
        bench_moefy.main([*options, "--threads", "1"])


@pytest.mark.parametrize("script, options", [
    ("bench_serve", ["--repeats", "0"]), ("bench_serve", ["--counts", "0", "10"]), ("bench_serve", ["--clients", "0"]),
    ("bench_compress", ["--repeats", "0"]), ("bench_compress", ["--new-tokens", "0"])])
def test_benchmarks_refuse_empty_timings_before_any_work(script, options, monkeypatch, restore_threads, capsys):
    """0 repeats timed nothing: throughput() reported 0 tok/s, and the tables' ratios divided by zero after all
    the work; bench_serve's 0 adapters or clients failed after the throughput part or at the very end."""
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(module, "set_threads", lambda threads: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as refused:
        module.main(options)
    assert refused.value.code == 2  # argparse's refusal, naming the option and its value
    assert f"error: must be >= 1: {options[0]} 0" in capsys.readouterr().err


def test_bench_moe_partition_refuses_experts_that_do_not_divide_the_ffn_before_collecting(monkeypatch):
    """An expert count that does not divide the FFN width (10 of SmolLM2's 1,536 neurons) passed the share check and
    failed in the first layer's partition, after the Brown activations of every layer were collected."""
    import bench_moe_partition

    from cpet.models import tiny_model

    monkeypatch.setattr(bench_moe_partition, "load_base", lambda *a, **k: tiny_model("llama"))  # 128 neurons
    for name in ("calibration_ids", "collect_ffn_activations"):
        monkeypatch.setattr(bench_moe_partition, name, lambda *a, **k: pytest.fail("the work began"))
    with pytest.raises(SystemExit, match=r"--experts \[6\] do not split the 128 FFN neurons"):
        bench_moe_partition.main(["--layers", "0", "--experts", "8", "6"])
    with pytest.raises(pytest.fail.Exception, match="the work began"):
        bench_moe_partition.main(["--layers", "0", "--experts", "8", "16"])
