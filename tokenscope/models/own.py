"""Your own ViT segmenter as a tokenscope model: a timm VisionTransformer plus a decoder.

`wrap_timm(vit, decoder=..., ...)` reads the architecture off the module itself (width, depth,
heads, patch, registers, layer scale, ...), so the config it writes rebuilds the same network
from timm; the weights are the module's own. The decoder is `linear` or `mask` (new, untrained),
an `nn.Linear(width, classes)` (your trained per-token head, copied), or any module mapping tokens
(B, N, width) and their validity (B, N) to logits (B, N, classes) with a `num_classes` attribute
(traced and compared, but not saved: a checkpoint must be rebuildable from its description).
Saved with `save_checkpoint` it is an ordinary tokenscope checkpoint (NAME.json describes it,
NAME.safetensors holds its tensors) that `--weights NAME.json` runs on the command line.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
import torch.nn as nn

from tokenscope.errors import ConfigError
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.registry import StepConfig, default_exits
from tokenscope.models.step_vit import StepViT, check_backbone

BUILT_DECODERS = ("linear", "mask")


def _architecture(vit: nn.Module) -> tuple[str, dict[str, Any]]:
    """timm's architecture name and the kwargs that rebuild this instance's shapes."""
    cfg = getattr(vit, "pretrained_cfg", None) or getattr(vit, "default_cfg", None) or {}
    arch = str(cfg.get("architecture") or "vit_base_patch16_224")
    block = vit.blocks[0]
    dim = int(vit.embed_dim)
    kwargs: dict[str, Any] = {
        "embed_dim": dim, "depth": len(vit.blocks), "num_heads": int(block.attn.num_heads),
        "patch_size": int(vit.patch_embed.patch_size[0]),
        "mlp_ratio": int(block.mlp.fc1.out_features) / dim if hasattr(block.mlp, "fc1") else 4.0,
        "qkv_bias": block.attn.qkv.bias is not None, "class_token": vit.cls_token is not None,
        "reg_tokens": int(vit.reg_token.shape[1]) if getattr(vit, "reg_token", None) is not None else 0,
        "no_embed_class": bool(vit.no_embed_class),
    }
    if not hasattr(block, "ls1"):  # timm's EVA (DINOv3): its own architecture name says the rest
        return arch, {k: kwargs[k] for k in ("embed_dim", "depth", "num_heads")}
    gamma = getattr(block.ls1, "gamma", None)
    if gamma is not None:
        kwargs["init_values"] = 1e-5  # layer scale present; its values are the weights'
    return arch, kwargs


def wrap_timm(vit: Any, decoder: str | nn.Module = "linear", num_classes: int | None = None,
              class_names: Sequence[str] = (), mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              name: str = "custom", exit_after: Sequence[int] | None = None) -> LoadedModel:
    """A LoadedModel of `vit` (a timm VisionTransformer) with `decoder`; one line when it cannot be."""
    if not isinstance(vit, nn.Module):
        raise ConfigError(f"from_timm(vit): expected a timm VisionTransformer module (timm.create_model('vit_...')), "
                          f"got a {type(vit).__name__}")
    arch, kwargs = _architecture(vit) if hasattr(vit, "blocks") and hasattr(vit, "patch_embed") else ("?", {})
    check_backbone(vit, f"from_timm(vit) ({type(vit).__name__})")
    dim = int(vit.embed_dim)
    head = None
    if isinstance(decoder, nn.Linear):
        if decoder.in_features != dim:
            raise ConfigError(f"from_timm(decoder=Linear): its input is {decoder.in_features} wide, the ViT's tokens "
                              f"are {dim}")
        head, kind, classes = decoder, "linear", decoder.out_features
    elif isinstance(decoder, nn.Module):
        classes = getattr(decoder, "num_classes", None)
        if not isinstance(classes, int) or classes < 1:
            raise ConfigError("from_timm(decoder=module): the module needs a num_classes attribute (an int), and maps "
                              "tokens (B, N, width) and valid (B, N) to logits (B, N, num_classes)")
        kind = "linear"
    elif decoder in BUILT_DECODERS:
        if num_classes is None:
            raise ConfigError(f"from_timm(decoder={decoder!r}) builds a new decoder: give num_classes (or class_names)")
        kind, classes = str(decoder), int(num_classes)
    else:
        raise ConfigError(f"from_timm(decoder=...): 'linear', 'mask', an nn.Linear(width, classes) or a decoder module, "
                          f"not {decoder!r}")
    if num_classes is not None and num_classes != classes:
        raise ConfigError(f"from_timm: num_classes={num_classes} but the decoder predicts {classes}")
    names = tuple(class_names)
    if names and len(names) != classes:
        raise ConfigError(f"from_timm: {len(names)} class names for {classes} classes")
    timm_cfg = getattr(vit, "pretrained_cfg", None) or {}
    depth = len(vit.blocks)
    cfg = StepConfig(
        name=name, arch=arch, num_classes=classes,
        exit_after=tuple(exit_after) if exit_after is not None else default_exits(depth),
        img_size=int(vit.patch_embed.img_size[0]), timm_kwargs=kwargs, class_names=names, decoder=kind,
        pixel_mean=tuple(float(v) for v in (mean if mean is not None else timm_cfg.get("mean", (0.5, 0.5, 0.5)))),
        pixel_std=tuple(float(v) for v in (std if std is not None else timm_cfg.get("std", (0.5, 0.5, 0.5)))),
    )
    model = StepViT(cfg, vit)
    if head is not None:
        with torch.no_grad():
            model.decoder.head.weight.copy_(head.weight)
            model.decoder.head.bias.copy_(head.bias if head.bias is not None else torch.zeros(classes))
    elif isinstance(decoder, nn.Module):
        model.decoder = decoder
        if not hasattr(decoder, "needs_context"):
            decoder.needs_context = False  # type: ignore[attr-defined]
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().float().numpy().tobytes()[:4096])
    trained = {"backbone": True, "decoder": not isinstance(decoder, str), "exits": False, "policy": False}
    return LoadedModel(model.eval(), cfg, trained, digest.hexdigest()[:16], f"from_timm({arch})",
                       warnings=[] if trained["decoder"] else [f"{name}'s {kind} decoder is new (untrained): predictions "
                                                                "are noise until it is trained"])
