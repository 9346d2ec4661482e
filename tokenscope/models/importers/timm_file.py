"""timm ViT backbone files (.safetensors, .pth, JAX / big_vision .npz) as a backbone for a named model.

The file's own position grid is kept (the backbone is built at grid side x patch), foreign key
layouts go through timm's own `checkpoint_filter_fn`, `.npz` files through timm's JAX reader,
and pickled files through the restricted unpickler. Only the backbone is trained afterwards.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from tokenscope.errors import CheckpointError
from tokenscope.models.importers.tensors import _load_tensors, _strict_load
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import create_backbone


def npz_grid_side(path: Path) -> int | None:
    """The position grid side of a big_vision / JAX `.npz` ViT file (timm's npz layout), if it has one."""
    try:
        with np.load(path) as npz:
            for key in ("Transformer/posembed_input/pos_embedding", "pos_embedding"):
                if key in npz.files:
                    n = int(npz[key].shape[1])
                    for prefix in (1, 0):  # class token or none: the rest must be a square grid
                        side = int(round((n - prefix) ** 0.5))
                        if side * side == n - prefix:
                            return side
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable .npz weights file ({exc})") from None
    return None


def backbone_from_npz(cfg: StepConfig, path: Path) -> nn.Module:
    """A timm ViT from a big_vision / JAX `.npz` file, read by timm's own npz loader (never torch.load)."""
    from timm.models.vision_transformer import _load_weights

    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    vit = create_backbone(cfg)
    side = npz_grid_side(path)
    patch = int(vit.patch_embed.patch_size[0])
    if side is not None and side * patch != cfg.img_size:  # keep the file's grid: no resampling
        vit = create_backbone(StepConfig(**{**cfg.to_dict(), "img_size": side * patch}))
    try:
        _load_weights(vit, str(path))
    except Exception as exc:  # timm's npz reader raises KeyError/ValueError/RuntimeError on foreign files
        raise CheckpointError(f"{path}: not a timm ViT .npz file for {cfg.arch} ({type(exc).__name__}: {exc})") from None
    return vit


def backbone_from_file(cfg: StepConfig, path: Path, obj: Any = None) -> nn.Module:
    """A timm ViT with weights from a local file, adapted by timm's checkpoint filter.

    The file's position grid is kept as it is (the backbone is built at grid side x the model's
    patch size), so a /14 or /8 backbone's grid is never taken for 16-pixel patches."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if path.suffix.lower() == ".npz" and obj is None:
        return backbone_from_npz(cfg, path)
    state = _load_tensors(path, obj)
    pos = state.get("pos_embed")
    img_size = cfg.img_size
    vit = create_backbone(cfg)
    if pos is not None and pos.ndim == 3:
        n = pos.shape[1] - (0 if vit.no_embed_class else vit.num_prefix_tokens)
        side = int(round(n ** 0.5))
        if side * side == n:
            img_size = side * int(vit.patch_embed.patch_size[0])
    if img_size != cfg.img_size:
        vit = create_backbone(StepConfig(**{**cfg.to_dict(), "img_size": img_size}))
    try:
        state = checkpoint_filter_fn(state, vit)
    except Exception as exc:  # timm's filter raises on foreign layouts with various types
        raise CheckpointError(f"{path}: not a timm ViT checkpoint for {cfg.arch} ({exc})") from None
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    _strict_load(vit, state, str(path), f"timm backbone {cfg.arch}")
    return vit
