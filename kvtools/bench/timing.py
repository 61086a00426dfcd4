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


def _glibc() -> Any:
    """glibc, or None where the C library is another (its allocator calls are then skipped)."""
    try:
        import ctypes

        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand memory the C allocator keeps after ``free`` back to the system (glibc ``malloc_trim``; elsewhere a
    no-op), so the RSS is what is live: otherwise a phase's peak starts from what an earlier phase freed."""
    gc.collect()
    if (lib := _glibc()) is not None:
        lib.malloc_trim(0)


# glibc's M_MMAP_THRESHOLD (malloc.h): allocations at least this large get their own mapping, unmapped on free
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (default 128 KiB) so that every tensor-sized block is mapped on allocation and
    unmapped on free. glibc otherwise raises the threshold to the largest block freed so far, and later blocks
    of that size come from the heap, where freed ones stay resident: the RSS peak then depends on the order in
    which a forward allocates and frees, not on what is live (measured, random SmolLM2 shape at 8k: two
    forwards with the same live-tensor peak to within 1% differed by 17% / 43% in prefill / decode peak RSS;
    with the threshold pinned, by 1% / 2%). False where this is not glibc."""
    lib = _glibc()
    return lib is not None and bool(lib.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))


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
    process's peak RSS, with glibc's mmap threshold pinned (:func:`pin_mmap_threshold`) so it follows the live
    tensors. ``start()`` resets the peak and returns the memory in use then; ``peak()`` reads the
    peak since."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.kind = self.kind_of(self.device)
        if not self.cuda:
            pin_mmap_threshold()

    @staticmethod
    def kind_of(device: torch.device | str) -> str:
        """What a peak is on ``device``: ``cuda_max_allocated`` or ``cpu_peak_rss``."""
        return "cuda_max_allocated" if torch.device(device).type == "cuda" else "cpu_peak_rss"

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
