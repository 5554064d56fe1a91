"""Timing shared by the benchmarks, CUDA events on a GPU.

Two figures, as trtexec gives them: the latency of one run (each run waited for before the next
starts, so the host time a system spends launching counts) and the throughput of runs enqueued
back to back (the host works ahead of the GPU, as a serving loop or ``kiln bench`` runs).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: str, runs: int = 50, warmup: int = 10) -> float:
    """The median latency of ``runs`` runs of ``fn`` after ``warmup``, each waited for."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def runs_per_s(fn: Callable[[], object], device: str, runs: int = 50, warmup: int = 10) -> float:
    """Throughput of ``runs`` runs of ``fn`` enqueued back to back after ``warmup``."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        begin = time.perf_counter()
        for _ in range(runs):
            fn()
        return runs / (time.perf_counter() - begin)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    end.synchronize()
    return runs * 1e3 / start.elapsed_time(end)
