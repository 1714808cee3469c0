r"""Measuring what an attribution costs: wall time and peak memory.

Peak memory on CUDA is ``torch.cuda.max_memory_allocated`` above what was allocated
before the call. On the CPU, ``tracemalloc`` cannot help: PyTorch allocates tensor
memory outside Python's allocator, so ``tracemalloc`` reports bytes where tensors take
megabytes. Instead, on Linux, the resident-set high-water mark (``VmHWM``) is reset
through ``/proc/self/clear_refs`` before the call and read after it. During the
measurement glibc's ``mmap`` threshold is lowered to 4 KiB and free heap pages are
returned to the system first (``malloc_trim``), so that tensor buffers, fresh or
reused, raise the resident set as they are touched; what a call allocates in pages
that were already resident and never freed is not counted. The threshold is
set back to glibc's default (128 KiB) afterwards. Elsewhere the peak is
reported as unavailable (None) rather than guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Tuple, TypeVar

import torch

__all__ = ["PeakMemory", "memory_method", "timed", "sync"]

T = TypeVar("T")
_MMAP_THRESHOLD = 4 * 1024
_DEFAULT_MMAP_THRESHOLD = 128 * 1024


def sync(device: torch.device) -> None:
    r"""Wait for queued CUDA work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> Tuple[T, float]:
    r"""``fn()`` and its wall time in seconds (CUDA synchronised on both ends)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def _read_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _linux_rss_available() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _read_status("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_mmap_threshold(value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, value)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: measure anyway
        pass


def memory_method(device: torch.device) -> Optional[str]:
    r"""How :class:`PeakMemory` measures on ``device`` (None: it cannot)."""
    if device.type == "cuda":
        return (
            "torch.cuda.max_memory_allocated above the allocation before the call, one call "
            "on the longest example"
        )
    if _linux_rss_available():
        return (
            "increase of the resident-set high-water mark (Linux VmHWM, reset through "
            "/proc/self/clear_refs) during one call on the longest example, after "
            "malloc_trim, glibc mmap threshold at 4 KiB while measuring"
        )
    return None


@dataclass
class PeakMemory:
    r"""Context manager: the peak memory (bytes) a block adds, in ``self.peak_bytes``.

    ``peak_bytes`` is None where no measurement is available (see the module doc).
    On the CPU it changes glibc's ``mmap`` threshold while it measures (and leaves it
    at glibc's default, no longer dynamic, afterwards): measure after timing.
    """

    device: torch.device
    peak_bytes: Optional[int] = None

    @contextlib.contextmanager
    def measure(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - before)
            return
        if not _linux_rss_available():
            yield self
            return
        _set_mmap_threshold(_MMAP_THRESHOLD)
        _malloc_trim()
        try:
            before = _read_status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            yield self
            self.peak_bytes = max(0, _read_status("VmHWM") - before)
        finally:
            _set_mmap_threshold(_DEFAULT_MMAP_THRESHOLD)
