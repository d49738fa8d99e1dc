"""What a measurement records of the machine it ran on."""

from __future__ import annotations

import os

import torch

from cpet.runtime import describe_machine, machine_record


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
