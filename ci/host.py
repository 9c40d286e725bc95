"""The host a benchmark ran on: what it is, and how fast it was at that moment.

A decode step's host time (scheduling, input preparation, the guard's hooks) scales with the
host's single-thread speed, so a figure measured on one host says little about another. Every
benchmark records :func:`host_info`: the CPU model, the cores the process may use, and a
calibration figure, the median time of a fixed single-thread workload (pure Python and a small
torch CPU op, both the kind of work a step's host side does), taken just before the measurement.
Two runs whose calibration differs by more than their spreads ran on hosts (or host states) that
cannot be compared directly.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

CALIBRATION_REPEATS = 7


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _calibration_once() -> float:
    start = time.perf_counter()
    total = 0
    for i in range(200_000):   # interpreter speed: a scheduler's loops and dict work
        total += i & 7
    small = torch.arange(64, dtype=torch.float32)
    for _ in range(2_000):     # dispatcher speed: the small host-side tensor ops of a step
        small = small.add(1.0)
    return time.perf_counter() - start


def calibrate(repeats: int = CALIBRATION_REPEATS) -> dict:
    """Median and spread (max - min over the median) of the fixed workload, in ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples = [_calibration_once() for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    median = statistics.median(samples)
    return {"calibration_ms": median * 1e3,
            "calibration_spread": (max(samples) - min(samples)) / median}


def host_info() -> dict:
    """CPU model, usable cores, Python, and the calibration figure, for a benchmark's JSON."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {"cpu_model": cpu_model(), "cores": cores, "python": platform.python_version(),
            **calibrate()}


def describe(host: dict) -> str:
    """One line for a report: the CPU, its cores and the calibration figure."""
    return (f"host: {host['cpu_model']}, {host['cores']} cores, calibration "
            f"{host['calibration_ms']:.1f} ms ± {host['calibration_spread']:.0%}")
