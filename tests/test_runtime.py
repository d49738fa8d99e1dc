"""What a measurement records of the machine it ran on."""

from __future__ import annotations

import os

import pytest
import torch

from cpet.runtime import describe_machine, machine_record, resolve


def test_the_machine_record_reads_this_machine():
    record = machine_record()
    assert record["cpu"] and record["cpus"] == os.cpu_count()
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["threads"] == torch.get_num_threads() and record["torch"] == torch.__version__
    assert (record["accelerator"] is None) == (not torch.cuda.is_available())


def test_the_machine_line_names_the_cpu_its_kernels_and_any_accelerator():
    record = {"cpu": "AMD EPYC", "cpu_capability": "AVX512", "cpus": 2, "threads": 1, "torch": "2.13.0+cpu",
              "accelerator": None}
    assert describe_machine(record) == "AMD EPYC (AVX512), 2 CPUs, 1 threads, torch 2.13.0+cpu"
    assert describe_machine(dict(record, accelerator="NVIDIA H200")).endswith("torch 2.13.0+cpu, NVIDIA H200")


def test_default_threads_count_only_the_cores_this_process_may_use(monkeypatch):
    """os.cpu_count() sees the whole machine: a job pinned to 2 of 16 cores asked for up to 16 threads."""
    from cpet.runtime import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5}, raising=False)
    assert default_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (15.2, 0.0, 0.0))  # the machine is busy: one thread is left
    assert default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert default_threads() == 13


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_is_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    """bf16 on a GPU without it (T4, V100) is emulated many times slower: auto takes fp16 there."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        # as torch's own: a pre-Ampere GPU runs bf16 emulated, so only including_emulation=False tells it apart
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve("auto", "auto").dtype == expected
    assert resolve("auto", "float32").dtype == torch.float32  # what is asked for is kept
    assert resolve("cpu", "auto").dtype == torch.float32
