"""Weights: tokenscope checkpoints (safetensors + JSON) and timm backbone files.

A tokenscope checkpoint is two files with one stem: `NAME.safetensors` (the StepViT state
dict) and `NAME.json` (format tag, version, `StepConfig`, which parts are trained, metrics).
Foreign ViT weights go through timm's own `checkpoint_filter_fn`, never through special cases
in the model. Nothing here touches the network unless hub weights were asked for by name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.hashing import file_sha256
from tokenscope.models.importers.eomt import describe_eomt, eomt_architecture_state, holds_eomt, read_eomt_checkpoint
from tokenscope.models.importers.safe_pickle import read_pickled_checkpoint
from tokenscope.models.importers.segmenter import (
    ImportedSegmenter,
    _SideInfo,
    architecture_state,
    describe,
    holds_segmenter,
    read_segmenter_checkpoint,
)
from tokenscope.models.published import PUBLISHED, PublishedModel, ensure_published, suggestions
from tokenscope.models.registry import StepConfig, resolve_config
from tokenscope.models.step_vit import StepViT, create_backbone
from tokenscope.storage import storage_error, writing

CHECKPOINT_FORMAT = "tokenscope-checkpoint"
CHECKPOINT_VERSION = 1
PARTS = ("backbone", "decoder", "exits", "policy")
BUILTIN_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
IMPORTED = ("imported Segmenter weights: encoder and decoder are trained, the exit gates and the dCTS policy are not "
            "(merges come from --policy uniform/oracle/budget; fine-tune both with `tokenscope train --init`)")
IMPORTED_TRAINED = {"backbone": True, "decoder": True, "exits": False, "policy": False}
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
BACKBONE_ONLY = ("only the backbone is trained: the decoder and exit gates are random, so class predictions are "
                 "noise; merges from --policy uniform/oracle are real")


@dataclass
class LoadedModel:
    """A model ready to run, and what the user must know about where its weights came from."""

    model: StepViT
    config: StepConfig
    trained: dict[str, bool]
    weights_id: str
    """Short digest of the weights file, or how the weights were made (e.g. random-init)."""
    source: str
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def default_policy(self) -> str:
        return "learned" if self.trained.get("policy") else "uniform"

    def default_exits(self) -> bool:
        return bool(self.trained.get("exits"))


def file_digest(path: Path) -> str:
    """The short id of a weights file shown in traces and run folders."""
    return file_sha256(path)[:16]


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(tensors, meta) paths of a checkpoint given either file or their common stem."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def is_tokenscope_checkpoint(path: str | os.PathLike[str]) -> bool:
    tensors, meta = checkpoint_paths(path)
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save_checkpoint(model: StepViT, path: str | os.PathLike[str], trained: dict[str, bool],
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write `NAME.safetensors` + `NAME.json` atomically (temp files, then rename)."""
    tensors, meta = checkpoint_paths(path)
    with writing(tensors.parent):
        tensors.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    doc = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.cfg.to_dict(),
        "trained": {p: bool(trained.get(p, False)) for p in PARTS},
        "metadata": metadata or {},
    }
    with writing(tensors), tempfile.TemporaryDirectory(dir=tensors.parent, prefix=".checkpoint-") as tmp:
        t_tmp, m_tmp = Path(tmp) / tensors.name, Path(tmp) / meta.name
        try:
            save_file(state, str(t_tmp))
        except SafetensorError as exc:  # safetensors reports the OS refusal in its own type
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else errno.EIO
            raise storage_error(OSError(code, os.strerror(code)), tensors) from None
        m_tmp.write_text(json.dumps(doc, indent=2))
        for tmp in (t_tmp, m_tmp):
            os.chmod(tmp, 0o644)
        os.replace(t_tmp, tensors)
        os.replace(m_tmp, meta)
    return tensors


def _load_meta(meta: Path) -> dict[str, Any]:
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{meta}: not a readable checkpoint description ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta}: not a tokenscope checkpoint description (format tag missing)")
    if int(doc.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{meta}: checkpoint version {doc.get('version')} is newer than this tokenscope supports")
    return doc


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


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedModel:
    """Rebuild a StepViT from a tokenscope checkpoint."""
    tensors, meta = checkpoint_paths(path)
    doc = _load_meta(meta)
    try:
        cfg = StepConfig.from_dict(doc["config"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{meta}: invalid model config ({exc})") from None
    _check_sizes(cfg, meta)
    state = _load_tensors(tensors)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{tensors}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]}): the "
                              "weights are unusable (a diverged training?)")
    model = StepViT(cfg)
    _strict_load(model, state, str(tensors), f"model {cfg.name} ({cfg.arch})")
    trained = {p: bool(doc.get("trained", {}).get(p, False)) for p in PARTS}
    metadata = doc.get("metadata", {})
    warnings = [IMPORTED] if metadata.get("imported_from") and not (trained["policy"] or trained["exits"]) else []
    return LoadedModel(model.eval(), cfg, trained, file_digest(tensors), str(tensors), warnings, metadata)


SIZE_LIMITS = {"num_classes": (1, 65535), "img_size": (16, 16384), "embed_dim": (1, 16384), "depth": (1, 512),
               "num_heads": (1, 1024), "patch_size": (1, 1024), "queries": (0, 4096), "query_blocks": (0, 512)}
"""What a checkpoint description may ask for before anything is allocated (label maps are 16-bit)."""


def _check_sizes(cfg: StepConfig, meta: Path) -> None:
    values = {"num_classes": cfg.num_classes, "img_size": cfg.img_size, "queries": cfg.queries,
              "query_blocks": cfg.query_blocks,
              **{k: v for k, v in cfg.timm_kwargs.items() if k in SIZE_LIMITS}}
    for key, value in values.items():
        low, high = SIZE_LIMITS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise CheckpointError(f"{meta}: {key} {value!r} is outside {low}..{high}; not a usable checkpoint description")


def _convert_published(raw: Path, out: Path, entry: PublishedModel) -> None:
    if entry.family == "eomt":
        import_eomt(raw, out, name=entry.name, overrides=entry.overrides)
    else:
        import_segmenter(raw, out, name=entry.name, overrides=entry.overrides)


def import_eomt(path: str | os.PathLike[str], out: str | os.PathLike[str], name: str | None = None,
                overrides: dict[str, Any] | None = None) -> Path:
    """Convert an EoMT checkpoint once into a tokenscope checkpoint (`out`.json + .safetensors)."""
    src = Path(path)
    _, meta = checkpoint_paths(out)
    imp = read_eomt_checkpoint(src, name or meta.stem, overrides)
    return save_checkpoint(imp.build(), out, IMPORTED_TRAINED, metadata={
        "imported_from": src.name, "layout": imp.layout, "source_sha256": file_sha256(src), "notes": imp.notes})


def published_architecture(entry: PublishedModel) -> StepConfig:
    """The config a published model converts to, derived from its architecture alone (no download):
    the importer describes shape-only tensors, so this cannot drift from a real import."""
    dim, depth, patch = entry.architecture
    if entry.family == "eomt":
        state = eomt_architecture_state(dim, depth, patch, entry.crop // patch, entry.classes, entry.queries,
                                        entry.query_blocks)
        return describe_eomt(state, entry.name, entry.name, [], entry.overrides)
    state = architecture_state(dim, depth, patch, entry.crop // patch, entry.classes, entry.decoder)
    info = _SideInfo(dataset_hint=entry.dataset)
    return describe(state, info, "mmseg", entry.name, entry.overrides, entry.name, [])


def load_published(name: str) -> LoadedModel:
    """A published model by name: from the cache, or downloaded, checked and converted on first use."""
    return load_checkpoint(ensure_published(name, _convert_published))


def loaded_from_import(imp: ImportedSegmenter, path: Path) -> LoadedModel:
    """A ready model from a Segmenter checkpoint read in place (nothing written)."""
    return LoadedModel(imp.build(), imp.config, dict(IMPORTED_TRAINED), file_digest(path), str(path),
                       warnings=[IMPORTED, *imp.notes], metadata={"layout": imp.layout, "notes": imp.notes})


def import_segmenter(path: str | os.PathLike[str], out: str | os.PathLike[str], side_file: str | os.PathLike[str] | None = None,
                     name: str | None = None, overrides: dict[str, Any] | None = None) -> tuple[Path, ImportedSegmenter]:
    """Convert a Segmenter/mmseg checkpoint once into a tokenscope checkpoint (`out`.json + .safetensors).

    Later runs load the converted files and never unpickle anything.
    """
    src = Path(path)
    _, meta = checkpoint_paths(out)
    imp = read_segmenter_checkpoint(src, side_file, name or meta.stem, overrides)
    model = imp.build()
    tensors = save_checkpoint(model, out, IMPORTED_TRAINED, metadata={
        "imported_from": src.name, "layout": imp.layout, "source_sha256": file_sha256(src), "notes": imp.notes})
    return tensors, imp


def _npz_grid_side(path: Path) -> int | None:
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


def _backbone_from_npz(cfg: StepConfig, path: Path) -> nn.Module:
    """A timm ViT from a big_vision / JAX `.npz` file, read by timm's own npz loader (never torch.load)."""
    from timm.models.vision_transformer import _load_weights

    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    vit = create_backbone(cfg)
    side = _npz_grid_side(path)
    patch = int(vit.patch_embed.patch_size[0])
    if side is not None and side * patch != cfg.img_size:  # keep the file's grid: no resampling
        vit = create_backbone(StepConfig(**{**cfg.to_dict(), "img_size": side * patch}))
    try:
        _load_weights(vit, str(path))
    except Exception as exc:  # timm's npz reader raises KeyError/ValueError/RuntimeError on foreign files
        raise CheckpointError(f"{path}: not a timm ViT .npz file for {cfg.arch} ({type(exc).__name__}: {exc})") from None
    return vit


def _backbone_from_file(cfg: StepConfig, path: Path, obj: Any = None) -> nn.Module:
    """A timm ViT with weights from a local file, adapted by timm's checkpoint filter.

    The file's position grid is kept as it is (the backbone is built at grid side x the model's
    patch size), so a /14 or /8 backbone's grid is never taken for 16-pixel patches."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if path.suffix.lower() == ".npz" and obj is None:
        return _backbone_from_npz(cfg, path)
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


def new_model(cfg: StepConfig, backbone_weights: str | os.PathLike[str] | None = None, obj: Any = None) -> StepViT:
    """An untrained StepViT for `cfg`, its backbone optionally from a local timm ViT file."""
    if backbone_weights is None:
        return StepViT(cfg)
    vit = _backbone_from_file(cfg, Path(backbone_weights), obj)
    cfg = StepConfig(**{**cfg.to_dict(), "img_size": int(vit.patch_embed.img_size[0])})
    return StepViT(cfg, vit)


def build_model(name: str, weights: str | os.PathLike[str] | None = None, random_init: bool = False,
                seed: int = 0, num_classes: int | None = None) -> LoadedModel:
    """Resolve `--model`, `--weights` and `--random-init` into a model, or a clear error.

    - a tokenscope checkpoint (`--weights NAME.json|NAME.safetensors`) defines everything;
    - any other weights file is taken as a timm ViT backbone for the named model;
    - `--weights hub` downloads timm's pretrained backbone (the only network access);
    - `--random-init` builds untrained weights for architecture and speed studies.
    """
    if name == "demo" and weights is None and not random_init:
        demo = BUILTIN_WEIGHTS_DIR / "demo.json"
        if not demo.is_file():
            raise CheckpointError("the demo model's weights are not installed with this tokenscope; pass --model and --weights")
        return load_checkpoint(demo)
    if weights is not None and random_init:
        raise ConfigError("--weights and --random-init exclude each other; pick one")
    if name in PUBLISHED and weights is None:
        if not random_init:
            return load_published(name)
        torch.manual_seed(seed)
        cfg = published_architecture(PUBLISHED[name])
        return LoadedModel(StepViT(cfg).eval(), cfg, {p: False for p in PARTS}, f"random-init(seed={seed})", "random-init",
                           warnings=[f"{name} uses RANDOM weights (--random-init): its architecture, token counts, FLOPs "
                                     "and timings are real; predictions are noise"])
    if weights is not None and str(weights) != "hub" and is_tokenscope_checkpoint(weights):
        return load_checkpoint(weights)
    pickled: Any = None
    if weights is not None and Path(str(weights)).suffix.lower() in PICKLE_SUFFIXES and not random_init:
        pickled = read_pickled_checkpoint(Path(str(weights)))
        if holds_segmenter(pickled):
            return loaded_from_import(read_segmenter_checkpoint(Path(str(weights)), obj=pickled), Path(str(weights)))
        if holds_eomt(pickled):
            return loaded_from_import(read_eomt_checkpoint(Path(str(weights)), obj=pickled), Path(str(weights)))
    cfg = resolve_config(name)
    if num_classes is not None:
        cfg = StepConfig(**{**cfg.to_dict(), "num_classes": num_classes})
    if weights is None and not random_init:
        published = suggestions(name)
        hint = f"; trained segmentation models by name: --model {', --model '.join(published)}" if published else ""
        raise CheckpointError(
            f"model {name} has no weights here: pass --weights PATH (a tokenscope checkpoint, a Segmenter/mmseg "
            f"checkpoint or a timm {cfg.arch} file), --weights hub to download timm's backbone, or --random-init for "
            f"speed/architecture studies{hint}"
        )
    torch.manual_seed(seed)
    if random_init:
        model = StepViT(cfg)
        return LoadedModel(model.eval(), cfg, {p: False for p in PARTS}, f"random-init(seed={seed})", "random-init",
                           warnings=[f"{name} uses RANDOM weights (--random-init): predictions, exits and the learned "
                                     "policy are noise; token counts, FLOPs and timings are real"])
    if str(weights) == "hub":
        import timm

        try:
            vit = timm.create_model(cfg.arch, pretrained=True, num_classes=0, img_size=cfg.img_size, **cfg.timm_kwargs)
        except Exception as exc:  # network and hub errors come in many types
            raise CheckpointError(f"cannot download timm weights for {cfg.arch} ({str(exc).splitlines()[0]})") from None
        model = StepViT(StepConfig(**{**cfg.to_dict(), "img_size": int(vit.patch_embed.img_size[0])}), vit)
        source = wid = f"hub:{cfg.arch}"
    else:
        path = Path(str(weights))
        if path.suffix == ".json":
            raise CheckpointError(f"{path}: not a tokenscope checkpoint description (format tag missing)")
        model = new_model(cfg, path, pickled)
        source, wid = str(path), file_digest(path)
    trained = {"backbone": True, "decoder": False, "exits": False, "policy": False}
    return LoadedModel(model.eval(), model.cfg, trained, wid, source, warnings=[BACKBONE_ONLY])
