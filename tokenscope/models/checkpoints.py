"""tokenscope's own checkpoint format, and the LoadedModel every reader produces.

A tokenscope checkpoint is two files with one stem: `NAME.safetensors` (the StepViT state
dict) and `NAME.json` (format tag, version, `StepConfig`, which parts are trained, metrics).
Foreign formats have their readers in models/importers/; models/resolve.py is the one front door
that picks the reader for what was asked.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.hashing import file_sha256
from tokenscope.models.importers.tensors import _load_tensors, _strict_load  # noqa: F401 (re-exported)
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import ReductionSetting, StepViT
from tokenscope.schema import check_fields, read_json
from tokenscope.storage import storage_error, writing

CHECKPOINT_FORMAT = "tokenscope-checkpoint"
CHECKPOINT_VERSION = 1
PARTS = ("backbone", "decoder", "exits", "policy")
BUILTIN_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
IMPORTED = ("imported weights: encoder and decoder (or mask head) are trained, the exit gates and the dCTS policy are not "
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
    setting: ReductionSetting | None = None
    """The operating point the command resolved (jobs/setup.py), set once; every forward is given it."""

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
        return read_json(meta, "checkpoint description", CheckpointError).get("format") == CHECKPOINT_FORMAT
    except (OSError, CheckpointError):
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


DESCRIPTION_FIELDS = {"format": str, "version": int, "config": dict, "trained": dict[str, bool], "metadata": dict}
"""A checkpoint description's top level (the model config is checked by StepConfig.from_dict)."""


def _load_meta(meta: Path) -> dict[str, Any]:
    try:
        doc = read_json(meta, "checkpoint description", CheckpointError, kind=object)
    except FileNotFoundError:
        raise CheckpointError(f"{meta}: no such checkpoint description") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{meta}: not a tokenscope checkpoint description (format tag missing)")
    check_fields(doc, DESCRIPTION_FIELDS, meta, error=CheckpointError)
    version = doc.get("version", 0)
    if version < 0:
        raise CheckpointError(f"{meta}: field 'version' must be a whole number, got {version!r}")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{meta}: checkpoint version {version} is newer than this tokenscope supports")
    timm_kwargs = doc.get("config", {}).get("timm_kwargs", {})
    if not isinstance(timm_kwargs, dict):
        raise CheckpointError(f"{meta}: field 'config.timm_kwargs' must be a JSON object")
    named = sorted(k for k in timm_kwargs if "path" in k.lower() or "file" in k.lower() or k == "pretrained")
    if named:  # a description that points timm at another file would make it read what the json names
        raise CheckpointError(f"{meta}: field 'config.timm_kwargs' names {named[0]!r}; a checkpoint description may "
                              "not point at other files (its weights are the .safetensors beside it)")
    return doc


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
    family = "EoMT" if str(metadata.get("layout", "")).startswith("eomt") else "Segmenter"
    warnings = ([IMPORTED.replace("imported weights", f"imported {family} weights", 1)]
                if metadata.get("imported_from") and not (trained["policy"] or trained["exits"]) else [])
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


