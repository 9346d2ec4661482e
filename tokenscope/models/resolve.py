"""One front door for models: what was asked -> where the bytes are -> which reader -> LoadedModel.

`build_model(name, weights, random_init)` is the only entry every command and the API go through:

| asked | bytes | reader |
|---|---|---|
| `demo` | shipped in the package | tokenscope checkpoint (models/checkpoints.py) |
| a published name | the cache, else downloaded once (models/published.py) | its family's reader, then a tokenscope checkpoint |
| `--weights NAME.json` | the file | tokenscope checkpoint |
| `--weights FILE.pth/.bin/.ckpt` | the file, unpickled safely once | the first of READERS that recognises it (Segmenter / mmsegmentation, EoMT), else a timm backbone |
| `--weights DIR` (config.json + model.safetensors) | a Hugging Face model folder | models/importers/hf_folder.py (model_type `eomt`, `eomt_dinov3`) |
| `--weights DIR --backbone DIR_OR_HF_ID` (config.json + pytorch_model.bin) | an EoMT-DINOv3 release of deltas, and the DINOv3 folder they add to | the same folder reader |
| `hf:ORG/NAME[@REVISION]` | the Hugging Face hub cache (`HF_HUB_CACHE`, `HF_HOME`), else downloaded | the same folder reader |
| `--weights FILE.safetensors/.npz`, `hub` | the file, or timm's hub | timm backbone (models/importers/timm_file.py) |
| `--random-init` | none | the architecture alone |

A foreign format is one reader: `Reader(family, recognise(content) -> bool, read(path, content))`
returning an ImportedModel (its StepConfig, StepViT-named tensors, notes); adding a format is one
module in models/importers/ and one line in READERS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.checkpoints import (
    BACKBONE_ONLY,
    BUILTIN_WEIGHTS_DIR,
    IMPORTED,
    IMPORTED_TRAINED,
    PARTS,
    PICKLE_SUFFIXES,
    LoadedModel,
    checkpoint_paths,
    file_digest,
    is_tokenscope_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tokenscope.models.hashing import file_sha256
from tokenscope.models.importers.eomt import describe_eomt, eomt_architecture_state, holds_eomt, read_eomt_checkpoint
from tokenscope.models.importers.hf_folder import hub_snapshot, is_hf_folder, read_hf_folder
from tokenscope.models.importers.safe_pickle import read_pickled_checkpoint
from tokenscope.models.importers.segmenter import (
    ImportedSegmenter,
    _SideInfo,
    architecture_state,
    describe,
    holds_segmenter,
    read_segmenter_checkpoint,
)
from tokenscope.models.importers.timm_file import backbone_from_file
from tokenscope.models.published import PUBLISHED, PublishedModel, ensure_published, suggestions
from tokenscope.models.registry import StepConfig, resolve_config
from tokenscope.models.step_vit import StepViT


@dataclass(frozen=True)
class Reader:
    """One foreign checkpoint format: how to recognise its (unpickled) content and read it."""

    family: str
    recognise: Callable[[Any], bool]
    read: Callable[[Path, Any], ImportedSegmenter]


READERS = (
    Reader("Segmenter", holds_segmenter, lambda path, obj: read_segmenter_checkpoint(path, obj=obj)),
    Reader("EoMT", holds_eomt, lambda path, obj: read_eomt_checkpoint(path, obj=obj)),
)


def reader_for(content: Any) -> Reader | None:
    return next((r for r in READERS if r.recognise(content)), None)


def convert_published(raw: Path, out: Path, entry: PublishedModel) -> None:
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
    return load_checkpoint(ensure_published(name, convert_published))


def loaded_from_import(imp: ImportedSegmenter, path: Path) -> LoadedModel:
    """A ready model from a foreign checkpoint read in place (nothing written)."""
    return LoadedModel(imp.build(), imp.config, dict(IMPORTED_TRAINED), file_digest(path), str(path),
                       warnings=[IMPORTED.replace("imported weights", f"imported {imp.family} weights", 1), *imp.notes],
                       metadata={"layout": imp.layout, "notes": imp.notes})


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


def new_model(cfg: StepConfig, backbone_weights: str | os.PathLike[str] | None = None, obj: Any = None) -> StepViT:
    """An untrained StepViT for `cfg`, its backbone optionally from a local timm ViT file."""
    if backbone_weights is None:
        return StepViT(cfg)
    vit = backbone_from_file(cfg, Path(backbone_weights), obj)
    cfg = StepConfig(**{**cfg.to_dict(), "img_size": int(vit.patch_embed.img_size[0])})
    return StepViT(cfg, vit)


def _backbone_folder(backbone: str | None) -> Path | None:
    """`--backbone`: a DINOv3 model folder, or `hf:ORG/NAME[@REVISION]` from the Hugging Face cache."""
    if backbone is None:
        return None
    if str(backbone).startswith("hf:"):
        from tokenscope.data.download import offline_mode

        return hub_snapshot(str(backbone), offline_mode())
    return Path(str(backbone))


def build_model(name: str, weights: str | os.PathLike[str] | None = None, random_init: bool = False,
                seed: int = 0, num_classes: int | None = None, backbone: str | None = None) -> LoadedModel:
    """Resolve `--model`, `--weights` and `--random-init` into a model, or a clear error: the one
    front door (what was asked -> where the bytes are -> which reader).

    - the shipped demo, or a published name (its cached conversion, or downloaded and converted);
    - a pickled foreign checkpoint goes to the first reader (READERS) that recognises its content;

    - a tokenscope checkpoint (`--weights NAME.json|NAME.safetensors`) defines everything;
    - any other weights file is taken as a timm ViT backbone for the named model;
    - `--weights hub` downloads timm's pretrained backbone (the only network access);
    - `--random-init` builds untrained weights for architecture and speed studies;
    - `backbone` (a DINOv3 model folder or `hf:ORG/NAME`) completes an EoMT-DINOv3 release of deltas.
    """
    if backbone is not None and (weights is None and not str(name).startswith("hf:") or random_init):
        raise ConfigError("--backbone completes an EoMT-DINOv3 release of deltas given as --weights DIR or "
                          "--model hf:ORG/NAME; there is none here")
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
    if name.startswith("hf:") and weights is None and not random_init:
        from tokenscope.data.download import offline_mode

        folder = hub_snapshot(name, offline_mode())
        imp = read_hf_folder(folder, name.split("/")[-1].split("@")[0], _backbone_folder(backbone))
        return loaded_from_import(imp, Path(imp.source))
    if weights is not None and not random_init and is_hf_folder(Path(str(weights))):
        imp = read_hf_folder(Path(str(weights)), backbone=_backbone_folder(backbone))
        return loaded_from_import(imp, Path(imp.source))
    if backbone is not None:
        raise ConfigError(f"--backbone completes an EoMT-DINOv3 release of deltas (a model folder); {weights} is not one")
    pickled: Any = None
    if weights is not None and Path(str(weights)).suffix.lower() in PICKLE_SUFFIXES and not random_init:
        pickled = read_pickled_checkpoint(Path(str(weights)))
        reader = reader_for(pickled)
        if reader is not None:
            return loaded_from_import(reader.read(Path(str(weights)), pickled), Path(str(weights)))
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
