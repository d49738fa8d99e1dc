"""Where and how a command runs: device, dtype, CPU threads and the global seed; what machine it runs on.

Defaults: CUDA when a device is there, else the CPU; fp32 on the CPU (bf16 matmuls are far slower than fp32
on the CPUs measured here), bf16 on CUDA; CPU threads from :func:`default_threads`.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass

import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """The resolved settings: ``device`` ("cpu"/"cuda"), ``dtype`` (a torch dtype), ``threads``, ``seed``."""

    device: str
    dtype: torch.dtype
    threads: int
    seed: int | None


def allowed_cores() -> int:
    """The CPU cores this process may run on (``taskset``, a container's cpuset), where the system tells;
    else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_threads() -> int:
    """CPU threads for torch: the cores not already busy (1-minute load average), at least one.

    On a machine where another job keeps the cores busy, torch's default (one thread per core) makes both
    jobs slow: a 20-example evaluation took 24.7 s with 2 threads beside another job, 6.8 s with one.
    Only the cores this process may run on count (``taskset``, a container's cpuset): torch's default and
    ``os.cpu_count()`` sees every core of the machine, so a job pinned to 2 of 16 cores asked for up to 16.
    """
    cores = os.cpu_count() or 1
    allowed = allowed_cores()
    try:
        busy = int(os.getloadavg()[0] + 0.5)  # machine-wide, like os.cpu_count()
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(allowed, cores - busy))


def resolve(device: str = "auto", dtype: str = "auto", threads: int | None = None, seed: int | None = None
            ) -> Runtime:
    """Check and resolve the settings (nothing is changed yet).

    Raises:
        ValueError: an unknown device or dtype, CUDA asked for where there is none, or threads < 1.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device (or torch is a CPU build); use --device cpu")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    resolved = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    chosen = DTYPES[dtype] or (_cuda_half() if resolved == "cuda" else torch.float32)
    return Runtime(resolved, chosen, threads or default_threads(), seed)


def _cuda_half() -> torch.dtype:
    """The half precision ``--dtype auto`` picks on CUDA: bf16 (fp32's range), or fp16 on GPUs without native bf16
    (before Ampere: T4, V100), where bf16 is emulated many times slower."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def apply(runtime: Runtime) -> Runtime:
    """Set torch's CPU threads and, when given, seed Python's and torch's generators."""
    torch.set_num_threads(runtime.threads)
    if runtime.seed is not None:
        random.seed(runtime.seed)
        torch.manual_seed(runtime.seed)
    return runtime


def machine_record() -> dict:
    """What a measurement depends on beyond code and seed: the CPU model, the kernel level torch dispatches to
    on it, the CPUs and torch threads, torch's version and any CUDA device.

    Timings differ a lot between CPU types, and float rounding differs too (MKL and oneDNN pick their kernels
    by CPU), so a result that records where it ran can be compared with one from elsewhere.
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # no /proc (macOS, Windows): platform's answer stands
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def describe_machine(record: dict | None = None) -> str:
    """One line for a report: ``"AMD EPYC (AVX512), 2 CPUs, 2 threads, torch 2.13.0+cpu"`` (+ the CUDA device)."""
    r = record or machine_record()
    line = f"{r['cpu']} ({r['cpu_capability']}), {r['cpus']} CPUs, {r['threads']} threads, torch {r['torch']}"
    return line + (f", {r['accelerator']}" if r.get("accelerator") else "")
