"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls of ``fn`` (device-synchronised), and the last output."""
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def rss() -> int:
    """This process's resident set size in bytes."""
    import psutil

    return int(psutil.Process().memory_info().rss)
