"""Latency the way benchmarks should take it: warm-up first, synchronised, median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from tokenscope.models.runtime import synchronize


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn()` for `repeats` calls after `warmup` untimed ones."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))
