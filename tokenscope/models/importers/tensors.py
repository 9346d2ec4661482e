"""State dicts from files: safetensors directly, pickled files through the restricted unpickler,
and a strict load that names what is missing, unexpected or of the wrong shape in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from tokenscope.errors import CheckpointError
from tokenscope.models.importers.safe_pickle import read_pickled_checkpoint


def _load_tensors(path: Path, obj: Any = None) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a pickled file (read safely; `obj` if already read)."""
    if obj is None:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such weights file")
        if path.suffix == ".safetensors":
            try:
                return load_file(str(path))
            except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise CheckpointError(f"{path}: cannot read weights ({first})") from None
        obj = read_pickled_checkpoint(path)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    return obj


def _strict_load(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{source}: weights do not fit {what}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
