"""Reading `.pth` checkpoints without running code from them.

Training checkpoints hold more than weights: optimizer and scheduler state, loss-scaler state,
metadata such as mmsegmentation's class names, numpy scalars in its hook messages. All of it is
read through torch's restricted (`weights_only`) unpickler, which only rebuilds tensors and
plain containers, widened by an explicit allow-list of inert types: numpy arrays and scalars,
and `argparse.Namespace`. Anything else a file asks for (a function, a class of some training
framework) is refused with one line that names it; nothing is ever imported or called on the
file's behalf.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenscope.errors import CheckpointError


def _numpy_globals() -> list[Any]:
    """numpy's array/scalar reconstructors and dtype classes: they build data from bytes only."""
    found: list[Any] = [np.dtype, np.ndarray]
    for module_name in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            module = __import__(module_name, fromlist=["_reconstruct", "scalar"])
        except ImportError:
            continue
        for name in ("_reconstruct", "scalar"):
            obj = getattr(module, name, None)
            if obj is not None:
                found.append((obj, f"{module_name}.{name}"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found.extend(getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType"))
    found.extend([np.float64, np.float32, np.int64, np.int32, np.bool_])
    return found


SAFE_GLOBALS: list[Any] = [*_numpy_globals(), argparse.Namespace]
"""What tokenscope lets a checkpoint rebuild beyond tensors and plain Python containers."""

_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def read_pickled_checkpoint(path: str | Path) -> Any:
    """The object a `.pth` file holds, read without running any code from it.

    Raises CheckpointError (one line) for a missing, truncated or non-checkpoint file, and for a
    file that would need anything outside the allow-list to load.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL_RE.search(str(exc))
        if found is None:  # not a request to run code: the bytes are simply not a pickle torch can read
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", str(exc), re.S)
            reason = detail.group(1).strip().splitlines()[0][:120] if detail else "not a pickle"
            raise CheckpointError(f"{p}: not a readable PyTorch checkpoint ({reason})") from None
        what = found.group(1)
        raise CheckpointError(
            f"{p}: refused: loading it would import or call {what}, and tokenscope runs no code from a "
            f"checkpoint (only tensors, numbers, strings, containers and numpy data are read)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint ({first[:200]})") from None
