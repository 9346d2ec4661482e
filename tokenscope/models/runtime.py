"""Where models run: device choice and the synchronisation that honest timing needs."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from tokenscope.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(choice: str) -> torch.device:
    """`auto` takes the GPU when there is one; asking for `cuda` without one is an error."""
    if choice == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        # under torchrun, one GPU per process of a node
        return torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if "LOCAL_RANK" in os.environ else torch.device("cuda")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
        if choice == "cuda" and "LOCAL_RANK" in os.environ:
            return torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
        return torch.device(choice)
    raise ConfigError(f"unknown device {choice!r}; choose one of {', '.join(DEVICE_CHOICES)}")


KEEP_FREED_BYTES = 1 << 30
"""glibc's thresholds set by `keep_freed_memory`: blocks up to 1 GiB come from the heap and stay there."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_allocator_note: str | None = None


def keep_freed_memory() -> str:
    """Keep freed memory in the process on a glibc CPU machine, and say what was set (or why not).

    By default glibc hands every block of more than a few MB back to the system when a tensor is freed,
    so the next forward pass faults the same pages in again. A reduced forward allocates a different mix
    of sizes in every block (compaction, packing, merges) and paid for it most: the demo's STEP batch of
    8 took 257 ms with glibc's defaults and 216 ms with both thresholds at 1 GiB (the unreduced batch
    gains less). Timing commands set this once, before measuring; the peak memory of the process stays
    allocated. MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment take precedence."""
    global _allocator_note
    if _allocator_note is not None:
        return _allocator_note
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        _allocator_note = "glibc thresholds from the environment (MALLOC_*_THRESHOLD_)"
        return _allocator_note
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        done = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) == 1 and libc.mallopt(
            _M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1
    except (OSError, AttributeError):
        done = False
    _allocator_note = ("glibc: freed memory kept (mmap and trim thresholds 1 GiB)" if done
                       else "the system allocator's defaults (not glibc)")
    return _allocator_note


def allocator_note() -> str:
    """What `keep_freed_memory` set in this process, for the record beside timed numbers (nothing set: the
    allocator's own defaults)."""
    return _allocator_note or "the allocator's defaults (not changed by tokenscope)"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock time covers the computation itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds a piece of work took: on a GPU from a pair of CUDA events (the device's own clock,
    in stream order, so host-side waits in between do not count twice), on the CPU by wall time.
    `with Stopwatch(device) as sw: ...` then `sw.seconds`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.device.type == "cuda":
            self._start, self._stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self._stop.record()
            self._stop.synchronize()
            self.seconds = self._start.elapsed_time(self._stop) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


@contextmanager
def inference(device: torch.device, amp: bool = False) -> Iterator[None]:
    """No autograd, and bf16 autocast on CUDA when `amp` (gates still decide in float32)."""
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                                enabled=amp and device.type == "cuda"):
        yield
