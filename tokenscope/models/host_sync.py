"""Counting host synchronisations: the points where the CPU waits for the device to finish.

On a GPU every such wait stalls the queue of kernels, so a forward that synchronises once per block
runs slower than its FLOPs say. `count_host_syncs()` counts them during a block of code:

- on CUDA with torch's own sync debug mode (each synchronising call warns once; the warnings are
  counted and swallowed);
- everywhere, by counting the calls that hand a tensor's values to Python or NumPy (`item`, `tolist`,
  `numpy`, `cpu`, `bool(t)`, `int(t)`, `float(t)`, `nonzero`): on a CPU they cost nothing, but they
  are exactly the calls that synchronise on a GPU, so the count a CPU gives is the count to expect
  there (data-dependent shapes in torch's own kernels, such as boolean-mask indexing, are not seen
  on the CPU).

It patches methods of `torch.Tensor` while active (one thread at a time); the code inside is not
changed otherwise.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

HOST_CALLS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero")
_LOCK = threading.Lock()


@dataclass
class SyncCount:
    """What one counted block of code did."""

    calls: dict[str, int] = field(default_factory=dict)
    """Calls handing values to the host, by name."""
    cuda_syncs: int = 0
    """Synchronisations torch's CUDA sync debug mode reported (0 on the CPU)."""

    @property
    def total(self) -> int:
        """Host synchronisations: torch's own count on CUDA, else the counted calls."""
        return self.cuda_syncs if self.cuda_syncs else sum(self.calls.values())


@contextmanager
def count_host_syncs(device: torch.device | str | None = None) -> Iterator[SyncCount]:
    """Count the host synchronisations of the code inside (see the module docstring)."""
    count = SyncCount()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_CALLS if hasattr(torch.Tensor, name)}

    def counted(name: str, original):  # noqa: ANN001, ANN202
        def call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            count.calls[name] = count.calls.get(name, 0) + 1
            return original(self, *args, **kwargs)
        return call

    cuda = torch.device(device).type == "cuda" if device is not None else False
    with _LOCK:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(name, original))
        try:
            if cuda:
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode(1)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        yield count
                    finally:
                        torch.cuda.set_sync_debug_mode(previous)
                count.cuda_syncs = sum("synchroniz" in str(w.message) for w in caught)
            else:
                yield count
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
