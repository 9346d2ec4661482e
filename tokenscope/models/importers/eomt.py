"""EoMT checkpoints (tue-mps/eomt) as tokenscope models.

Two files carry the same network, both read through the restricted unpickler:

| | model zoo `pytorch_model.bin` | Lightning `.ckpt` |
|---|---|---|
| content | the LightningModule's state dict | `{"state_dict": <that>, "epoch": ..., ...}` |

Keys: `network.encoder.backbone.*` (a timm DINOv2 ViT with registers, re-created at the EoMT patch
size: `patch_embed.proj`, `pos_embed` of the patches only, `cls_token`, `reg_token`, `blocks.N.*`
with LayerScale, `norm`), `network.encoder.pixel_mean/std`, `network.q` (queries), `class_head`,
`mask_head.{0,2,4}`, `upscale.N.{conv1,conv2,norm}` (ScaleBlocks), `attn_mask_probs` (one per query
block: its length is the number of blocks the queries join), and `criterion.*` buffers (ignored).
Everything else about the architecture is read from the tensors' shapes: width, depth, registers,
queries, query blocks, classes, patch size, upscale steps, training grid. Attention heads are not
in the file: width / 64, as every DINOv2 ViT has them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from tokenscope.data.classes import dataset_classes, guess_dataset
from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.eomt import upscale_steps
from tokenscope.models.importers.safe_pickle import read_pickled_checkpoint
from tokenscope.models.importers.segmenter import ImportedSegmenter
from tokenscope.models.registry import StepConfig

BACKBONE = "network.encoder.backbone."
DINOV2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
HEAD_PARTS = ("q.", "class_head.", "mask_head.", "upscale.")
IGNORED = ("network.attn_mask_probs", "network.encoder.pixel_mean", "network.encoder.pixel_std")


def eomt_state(obj: Any) -> dict[str, torch.Tensor] | None:
    """The `network.*` state dict of an unpickled EoMT file (either layout), or None."""
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if isinstance(state, dict):  # a compiled network's names carry `._orig_mod` (EoMT strips it when saving)
        state = {str(k).replace("._orig_mod", ""): v for k, v in state.items()}
    if isinstance(state, dict) and "network.q.weight" in state and any(k.startswith(BACKBONE) for k in state):
        return state
    return None


def holds_eomt(obj: Any) -> bool:
    return eomt_state(obj) is not None


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def eomt_to_stepvit(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """EoMT names -> StepViT names (the criterion's buffers and the annealing probabilities dropped)."""
    if any("rope" in k or k.startswith((BACKBONE + "embeddings.", BACKBONE + "layer.")) for k in state):
        raise CheckpointError(f"{source}: an EoMT model on a DINOv3 backbone in EoMT's own layout (its releases hold "
                              "deltas to the DINOv3 weights): not read yet; EoMT's DINOv2 models load, and EoMT-DINOv3 "
                              "Hugging Face folders (model_type eomt_dinov3)")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, v in state.items():
        if key.startswith("criterion.") or key in IGNORED:
            continue
        if key.startswith(BACKBONE):
            rest = key[len(BACKBONE):]
            if rest in ("pos_embed",) or rest.startswith("patch_embed.proj."):
                out["embed." + rest] = v
            elif rest in ("cls_token", "reg_token") or rest.startswith(("blocks.", "norm.")):
                out[rest] = v
            elif rest.startswith(("head.", "fc_norm.")) or rest == "mask_token":
                continue
            else:
                unknown.append(key)
        elif key.startswith("network.") and key[len("network."):].startswith(HEAD_PARTS):
            out["decoder." + key[len("network."):]] = v
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unexpected weights (e.g. {', '.join(unknown[:3])}); "
                              "is this an EoMT checkpoint?")
    return out


def describe_eomt(state: dict[str, torch.Tensor], name: str, source: str, notes: list[str],
                  overrides: dict[str, Any] | None = None,
                  backbone: tuple[str, dict[str, Any], int] | None = None) -> StepConfig:
    """The StepConfig of an EoMT model from its (EoMT-named) tensors; only shapes are read. `backbone`
    (timm architecture, its kwargs, the native grid side) for a backbone without a position table
    (DINOv3's rotary positions); else DINOv2's, read from the tensors."""
    need = ("network.q.weight", "network.class_head.weight", BACKBONE + "patch_embed.proj.weight",
            *(() if backbone else (BACKBONE + "pos_embed",)))
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{source}: weights do not fit an EoMT model: missing {', '.join(missing)}")
    queries, dim = (int(v) for v in state["network.q.weight"].shape)
    classes = int(state["network.class_head.weight"].shape[0]) - 1
    proj = state[BACKBONE + "patch_embed.proj.weight"]
    patch = int(proj.shape[-1])
    depth = _count(state, BACKBONE + "blocks.")
    registers = int(state[BACKBONE + "reg_token"].shape[1]) if BACKBONE + "reg_token" in state else 0
    if backbone is not None:
        grid = backbone[2]
    else:
        n = int(state[BACKBONE + "pos_embed"].shape[1])
        grid = int(round(n ** 0.5))
        if grid * grid != n:
            raise CheckpointError(f"{source}: position embedding of {n} patches is not a square grid")
    upscale = _count(state, "network.upscale.")
    if upscale != upscale_steps(patch):
        raise CheckpointError(f"{source}: {upscale} upscale blocks, but EoMT builds {upscale_steps(patch)} for "
                              f"{patch}-px patches")
    if "network.attn_mask_probs" in state:
        query_blocks = int(state["network.attn_mask_probs"].shape[0])
    else:
        query_blocks = 4
        notes.append("attn_mask_probs missing: the queries join the last 4 blocks (EoMT's default)")
    mean = tuple(float(v) for v in state["network.encoder.pixel_mean"].flatten()) \
        if "network.encoder.pixel_mean" in state and state["network.encoder.pixel_mean"].device.type != "meta" \
        else (0.485, 0.456, 0.406)
    std = tuple(float(v) for v in state["network.encoder.pixel_std"].flatten()) \
        if "network.encoder.pixel_std" in state and state["network.encoder.pixel_std"].device.type != "meta" \
        else (0.229, 0.224, 0.225)
    fc1 = state.get(BACKBONE + "blocks.0.mlp.fc1.weight")
    mlp_ratio = int(fc1.shape[0]) / dim if fc1 is not None else 4.0
    size = DINOV2_SIZES.get(dim, "base")
    arch = f"vit_{size}_patch14_reg{registers}_dinov2" if registers else f"vit_{size}_patch14_dinov2"
    timm_kwargs: dict[str, Any] = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": max(1, dim // 64),
                                   "mlp_ratio": mlp_ratio}
    if size == "giant":
        timm_kwargs.pop("mlp_ratio")  # its SwiGLU MLP is named by the architecture
    if backbone is not None:
        arch, timm_kwargs = backbone[0], dict(backbone[1])
    dataset = guess_dataset(classes, (overrides or {}).get("dataset", ""))
    names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    if dataset:
        try:
            known = dataset_classes(dataset, classes)
            names, palette = known.names, known.palette
        except ConfigError:
            dataset = ""
    join = depth - query_blocks + 1
    exits = tuple(k for k in (depth // 3, 2 * depth // 3) if 1 <= k < join)
    fields: dict[str, Any] = dict(
        name=name, arch=arch, num_classes=classes, exit_after=exits, img_size=grid * patch, pixel_mean=mean,
        pixel_std=std, timm_kwargs=timm_kwargs, class_names=names, class_colours=palette,
        policy_backbone="efficientnet_lite0" if dim >= 768 else "mini", decoder="eomt", decoder_layers=0,
        queries=queries, query_blocks=query_blocks, norm_eps=1e-6, dataset=dataset,
        window=grid * patch, stride=-1, resize_short=grid * patch,
    )
    fields.update(overrides or {})
    try:
        return StepConfig.from_dict(fields)
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{source}: cannot describe this model ({exc})") from None


def read_eomt_checkpoint(path: str | Path, name: str | None = None, overrides: dict[str, Any] | None = None,
                         obj: Any = None) -> ImportedSegmenter:
    """Read an EoMT checkpoint safely and map it onto a StepViT config and state."""
    ckpt = Path(path)
    if obj is None:
        obj = read_pickled_checkpoint(ckpt)
    state = eomt_state(obj)
    if state is None:
        raise CheckpointError(f"{ckpt}: not an EoMT checkpoint (no network.q.weight and network.encoder.backbone.*)")
    layout = "lightning" if isinstance(obj, dict) and "state_dict" in obj else "state_dict"
    notes = ["masked attention off, as EoMT's released inference runs"]
    default_name = ckpt.parent.name if ckpt.stem in ("pytorch_model", "model", "last") else ckpt.stem
    config = describe_eomt(state, name or default_name, str(ckpt), notes, overrides)
    return ImportedSegmenter(config, eomt_to_stepvit(state, str(ckpt)), f"eomt-{layout}", str(ckpt), notes,
                             family="EoMT")


def eomt_architecture_state(dim: int, depth: int, patch: int, grid: int, classes: int, queries: int,
                            query_blocks: int, registers: int = 4) -> dict[str, torch.Tensor]:
    """Shape-only (meta-device) EoMT tensors of an architecture, for `describe_eomt`."""
    e = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    state = {BACKBONE + "patch_embed.proj.weight": e(dim, 3, patch, patch), BACKBONE + "pos_embed": e(1, grid * grid, dim),
             BACKBONE + "cls_token": e(1, 1, dim), "network.q.weight": e(queries, dim),
             "network.class_head.weight": e(classes + 1, dim), "network.attn_mask_probs": e(query_blocks)}
    if registers:
        state[BACKBONE + "reg_token"] = e(1, registers, dim)
    state.update({f"{BACKBONE}blocks.{i}.mlp.fc1.weight": e(4 * dim, dim) for i in range(depth)})
    state.update({f"network.upscale.{i}.conv1.weight": e(dim, dim, 2, 2) for i in range(upscale_steps(patch))})
    return state
