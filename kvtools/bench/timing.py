"""Timing and memory helpers shared by the benchmarks."""

from __future__ import annotations

import gc
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


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def release_freed_memory() -> None:
    """Hand memory the C allocator keeps after ``free`` back to the system (glibc ``malloc_trim``; elsewhere a
    no-op), so the RSS is what is live: otherwise a phase's peak starts from what an earlier phase freed."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's resident-memory high-water mark to its current RSS (Linux: ``/proc/self/clear_refs``);
    False where that is not possible (then :func:`peak_rss` is the peak since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's resident-memory high-water mark in bytes (since the last :func:`reset_peak_rss`)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class PeakMemory:
    """The peak memory of one phase (a prefill, a decode): CUDA max allocated on a CUDA device, else the
    process's peak RSS. ``start()`` resets the peak and returns the memory in use then; ``peak()`` reads the
    peak since."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "cpu_peak_rss"

    def start(self) -> int:
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        release_freed_memory()
        reset_peak_rss()
        return rss()

    def peak(self) -> int:
        sync(self.device)
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else peak_rss()
