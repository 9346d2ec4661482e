"""Model names -> small config records, kept apart from the architecture and from weights.

`StepConfig` is everything needed to rebuild a STEP model's architecture and its default
operating point; it is what a tokenscope checkpoint stores beside its tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import timm

from tokenscope.data.synthetic import CLASS_COLOURS as SYNTHETIC_COLOURS
from tokenscope.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from tokenscope.errors import ConfigError
from tokenscope.models.partition import MAX_LEVEL


@dataclass(frozen=True)
class StepConfig:
    """Architecture and default thresholds of a STEP segmenter."""

    name: str
    arch: str
    """timm ViT name, e.g. vit_large_patch16_224 (timm_kwargs may override patch size, width, depth)."""
    num_classes: int
    exit_after: tuple[int, ...]
    """Gates sit after these many blocks (1-based block counts)."""
    exit_threshold: float = 0.95
    keep_per_class: int = 0
    """DToP's context rule at the exit gates: the K most confident qualifying tokens of each class stay."""
    merge_thresholds: tuple[float, ...] = (0.5,) * MAX_LEVEL
    policy_backbone: str = "mini"
    uniform_tau: float = 0.05
    img_size: int = 224
    """Input size the backbone's position embedding was made for (its native grid)."""
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides passed to timm.create_model (depth, embed_dim, ...), for small models."""
    class_names: tuple[str, ...] = ()
    class_colours: tuple[tuple[int, int, int], ...] = ()
    """RGB per class for overlays; empty = tokenscope's default palette."""
    decoder: str = "linear"
    """`linear` (one Linear per token), `mask` (Segmenter's mask transformer) or `eomt` (EoMT's
    queries inside the last `query_blocks` blocks, mask head and upscaler)."""
    queries: int = 0
    """EoMT: learned queries that join the encoder (0 for other decoders)."""
    query_blocks: int = 0
    """EoMT: how many of the last blocks the queries go through."""
    decoder_layers: int = 2
    decoder_heads: int = 0
    """Attention heads of the mask transformer; 0 = embed_dim // 64, as Segmenter builds it."""
    decoder_norm_eps: float = 1e-5
    norm_eps: float = 0.0
    """LayerNorm eps of the encoder; 0 keeps timm's (1e-6). Segmenter's own code uses 1e-5."""
    pos_resize: str = "timm"
    """How the position-embedding grid is resized to other input sizes: `timm` (bicubic with
    antialiasing), or plain `bilinear`/`bicubic` interpolation as Segmenter/mmsegmentation do."""
    window: int = 0
    """Sliding-window evaluation: window side in pixels (0 = whole image in one forward)."""
    stride: int = 0
    """Stride of the sliding windows (0 = window - 32)."""
    resize_short: int = 0
    """Before sliding windows, the image's short side is resized to this (0 = the window side)."""
    dataset: str = ""
    """Data set the weights were trained on (ade20k, cityscapes, pascal_context), if known."""
    ignore_index: int = 255

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config fields {sorted(unknown)}; is the checkpoint from a newer tokenscope?")
        kw = dict(d)
        for key in ("exit_after", "merge_thresholds", "pixel_mean", "pixel_std", "class_names"):
            if key in kw:
                if isinstance(kw[key], (str, bytes, dict)) or not hasattr(kw[key], "__iter__"):
                    raise ConfigError(f"field {key!r} must be a list, got {type(kw[key]).__name__}")
                kw[key] = tuple(kw[key])
        for key in ("merge_thresholds", "pixel_mean", "pixel_std"):
            if key in kw and not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                     for v in kw[key]):
                raise ConfigError(f"field {key!r} must hold finite numbers, got {list(kw[key])[:4]!r}")
        if "class_colours" in kw:
            colours = kw["class_colours"]
            ok = isinstance(colours, (list, tuple)) and all(
                isinstance(c, (list, tuple)) and len(c) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 255
                    for v in c) for c in colours)
            if not ok:
                raise ConfigError("field 'class_colours' must be a list of [r, g, b] with 0..255 each")
            kw["class_colours"] = tuple(tuple(int(v) for v in c) for c in colours)
        return cls(**kw)

    def replace(self, **changes: Any) -> "StepConfig":
        """A copy with some fields changed (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else f"class_{c}"


def default_exits(depth: int) -> tuple[int, int]:
    """Gates at the ends of the first and second thirds of the encoder."""
    return depth // 3, 2 * depth // 3


def _vit(name: str, arch: str, depth: int, num_classes: int = 150, policy_backbone: str = "mini") -> StepConfig:
    cfg = timm.get_pretrained_cfg(arch)
    mean = tuple(cfg.mean) if cfg is not None else (0.5, 0.5, 0.5)
    std = tuple(cfg.std) if cfg is not None else (0.5, 0.5, 0.5)
    return StepConfig(name=name, arch=arch, num_classes=num_classes, exit_after=default_exits(depth),
                      pixel_mean=mean, pixel_std=std, policy_backbone=policy_backbone)  # type: ignore[arg-type]


DEMO = StepConfig(
    name="demo", arch="vit_tiny_patch16_224", num_classes=len(SYNTHETIC_CLASSES), exit_after=(4, 8),
    img_size=512, pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225), policy_backbone="mini",
    class_names=SYNTHETIC_CLASSES, class_colours=SYNTHETIC_COLOURS,
)
"""The shipped demo: ViT-Ti/16 (5.7M parameters) for the 8 synthetic street classes, native 512 px."""

BUILTIN: dict[str, StepConfig] = {
    "demo": DEMO,
    "vitt": _vit("vitt", "vit_tiny_patch16_224", 12),
    "vits": _vit("vits", "vit_small_patch16_224", 12),
    "vitb": _vit("vitb", "vit_base_patch16_224", 12, policy_backbone="efficientnet_lite0"),
    "vitl": _vit("vitl", "vit_large_patch16_224", 24, policy_backbone="efficientnet_lite0"),
}
"""Named STEP models on timm ViT-Ti/S/B/L patch16; 150 classes (ADE20K) by default. B and L use
CTS's efficientnet_lite0 policy trunk; Ti and S a lighter CNN that keeps the policy cheap."""


def config_for_timm(arch: str, num_classes: int = 150) -> StepConfig:
    """A STEP config for any timm ViT named `timm:<arch>` on the command line."""
    if arch not in timm.list_models():
        raise ConfigError(f"timm has no model named {arch!r}; try `timm.list_models('vit_*')`")
    try:
        depth = len(timm.create_model(arch, pretrained=False, num_classes=0, img_size=64).blocks)
    except Exception as exc:  # timm raises many types for unsupported kwargs
        raise ConfigError(f"{arch} cannot be built as a ViT for segmentation ({exc})") from None
    return _vit(f"timm:{arch}", arch, depth, num_classes)


def resolve_config(name: str) -> StepConfig:
    """The config for a registry name or a `timm:<arch>` spec."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("timm:"):
        return config_for_timm(name[len("timm:"):])
    raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(BUILTIN))}, timm:<vit name>, "
                      "or a published model (`tokenscope models` lists them)")
