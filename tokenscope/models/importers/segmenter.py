"""Segmenter checkpoints (the authors' release and mmsegmentation's) as tokenscope models.

Two layouts carry the same trained networks:

| | Segmenter release | mmsegmentation |
|---|---|---|
| file | `torch.save({"model": state, "optimizer": ..., ...})` + `variant.yml` beside it | `{"state_dict": state, "meta": {...}}` + a config `.py` beside it (or in `meta["config"]`) |
| encoder | `encoder.*`, timm names (`blocks.N.attn.qkv`, `norm`, ...); DeiT: `dist_token` | `backbone.*`: `layers.N.ln1/ln2`, `attn.attn.in_proj_*`, `attn.attn.out_proj`, `ffn.layers.0.0`/`ffn.layers.1`, final `ln1` |
| linear decoder | `decoder.head` | `decode_head.conv_seg` (a 1x1 conv) |
| mask decoder | `decoder.{proj_dec, blocks.N, cls_emb, proj_patch, proj_classes, decoder_norm, mask_norm}` | `decode_head.{dec_proj, layers.N, cls_emb, patch_proj, classes_proj, ...}`, the two projections as bias-free Linears (transposed) |
| LayerNorm eps | 1e-5 everywhere | 1e-6 in the encoder, 1e-5 in the decoder |
| input normalisation | `vit`: mean = std = 0.5; `deit`: ImageNet statistics | config `mean`/`std` (0-255 scale); 127.5 for Segmenter configs |
| position embedding resize | bilinear | the config's `interpolate_mode` (bicubic) |

Both are mapped onto one canonical naming (the Segmenter release's), then onto `StepViT`. Whatever
the weights show (width, depth, patch size, training grid, classes, decoder) is read from their
shapes; the side files add heads, normalisation, data set and the evaluation windows. The
policy and the exit gates of the resulting model are untrained (`trained` says so).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml

from tokenscope.data.classes import dataset_classes, guess_dataset
from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.importers.mmseg_config import find, parse_config_text, read_config_file, search
from tokenscope.models.importers.safe_pickle import read_pickled_checkpoint
from tokenscope.models.registry import StepConfig, default_exits
from tokenscope.models.step_vit import StepViT

VIT_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
DEIT_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
WIDTH_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
UNTRAINED_PARTS = ("gates.", "policies.")


@dataclass
class ImportedSegmenter:
    """A foreign checkpoint read and mapped: the config, StepViT-named tensors, and what was assumed."""

    config: StepConfig
    state: dict[str, torch.Tensor]
    layout: str
    source: str
    notes: list[str] = field(default_factory=list)
    """Facts not found in the files and filled in by convention (shown to the user)."""
    family: str = "Segmenter"

    def build(self) -> StepViT:
        """A StepViT with these weights in encoder and decoder (gates and policy untrained)."""
        model = StepViT(self.config)
        own = {k: v for k, v in model.state_dict().items() if not k.startswith(UNTRAINED_PARTS)}
        missing = [k for k in own if k not in self.state]
        wrong = [k for k in own if k in self.state and tuple(self.state[k].shape) != tuple(own[k].shape)]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (e.g. {', '.join(_segmenter_name(k) for k in missing[:3])})")
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} with wrong shapes (e.g. {_segmenter_name(k)}: "
                             f"{tuple(self.state[k].shape)} vs {tuple(own[k].shape)})")
            raise CheckpointError(f"{self.source}: weights do not fit an {self.family} model: " + "; ".join(parts)
                                  if self.family[0] in "AEIOU" else
                                  f"{self.source}: weights do not fit a {self.family} model: " + "; ".join(parts))
        model.load_state_dict(self.state, strict=False)
        return model.eval()


def _segmenter_name(key: str) -> str:
    """A StepViT key in the Segmenter release's naming, for error messages."""
    for ours, theirs in (("embed.pos_embed", "encoder.pos_embed"), ("embed.patch_embed.", "encoder.patch_embed."),
                         ("cls_token", "encoder.cls_token"), ("reg_token", "encoder.dist_token"),
                         ("blocks.", "encoder.blocks."), ("norm.", "encoder.norm.")):
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


# ---- layout detection and key mapping ---------------------------------------------------------

def detect_layout(obj: Any, source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """('segmenter' | 'mmseg', its state dict) of an unpickled checkpoint."""
    if isinstance(obj, dict):
        for key, layout, prefix in (("model", "segmenter", "encoder."), ("state_dict", "mmseg", "backbone.")):
            state = obj.get(key)
            if isinstance(state, dict) and any(str(k).startswith(prefix) for k in state):
                bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
                if bad:
                    raise CheckpointError(f"{source}: entry {bad[0]!r} of the weights is not a tensor")
                return layout, state
    raise CheckpointError(f"{source}: not a Segmenter checkpoint (expected 'model' with encoder.* keys, or "
                          "mmsegmentation's 'state_dict' with backbone.* keys)")


_MMSEG_LAYER = [
    (r"ln1\.", "norm1."), (r"ln2\.", "norm2."),
    (r"attn\.attn\.in_proj_weight$", "attn.qkv.weight"), (r"attn\.attn\.in_proj_bias$", "attn.qkv.bias"),
    (r"attn\.attn\.out_proj\.", "attn.proj."), (r"ffn\.layers\.0\.0\.", "mlp.fc1."), (r"ffn\.layers\.1\.", "mlp.fc2."),
]


def _mmseg_block_key(rest: str) -> str | None:
    for pattern, repl in _MMSEG_LAYER:
        if re.match(pattern, rest):
            return re.sub(pattern, repl, rest, count=1)
    return None


def mmseg_to_segmenter(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """mmsegmentation names -> the Segmenter release's names; also the keys that mean nothing here."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    mask_head = "decode_head.cls_emb" in state
    for key, v in state.items():
        new: str | None = None
        if key.startswith("backbone."):
            rest = key[len("backbone."):]
            if rest in ("cls_token", "pos_embed"):
                new = f"encoder.{rest}"
            elif rest.startswith("patch_embed.projection."):
                new = "encoder.patch_embed.proj." + rest[len("patch_embed.projection."):]
            elif rest.startswith("ln1."):
                new = "encoder.norm." + rest[len("ln1."):]
            elif (m := re.match(r"layers\.(\d+)\.(.*)$", rest)) and (b := _mmseg_block_key(m.group(2))):
                new = f"encoder.blocks.{m.group(1)}.{b}"
        elif key.startswith("decode_head."):
            rest = key[len("decode_head."):]
            if rest.startswith("conv_seg."):
                if mask_head:
                    continue  # BaseDecodeHead always builds conv_seg; the mask head never uses it
                new = "decoder.head." + rest[len("conv_seg."):]
                v = v.reshape(v.shape[0], -1) if v.ndim == 4 else v
            elif rest.startswith("dec_proj."):
                new = "decoder.proj_dec." + rest[len("dec_proj."):]
            elif rest in ("patch_proj.weight", "classes_proj.weight"):
                new = "decoder.proj_patch" if rest.startswith("patch") else "decoder.proj_classes"
                v = v.t().contiguous()  # Linear computes x @ W^T; Segmenter stores the right factor
            elif rest == "cls_emb" or rest.startswith(("decoder_norm.", "mask_norm.")):
                new = "decoder." + rest
            elif (m := re.match(r"layers\.(\d+)\.(.*)$", rest)) and (b := _mmseg_block_key(m.group(2))):
                new = f"decoder.blocks.{m.group(1)}.{b}"
        elif key.startswith("auxiliary_head."):
            continue  # training-only auxiliary heads
        if new is None:
            unknown.append(key)
        else:
            out[new] = v
    return out, unknown


def segmenter_to_stepvit(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Segmenter release names -> StepViT names; also the keys with no place in StepViT."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, v in state.items():
        if key.startswith(("encoder.head.", "encoder.head_dist.")):
            continue  # the ImageNet classification heads of the pre-trained backbone
        if key.startswith("decoder."):
            out[key] = v
            continue
        rest = key[len("encoder."):] if key.startswith("encoder.") else None
        if rest is None:
            unknown.append(key)
        elif rest == "pos_embed":
            out["embed.pos_embed"] = v
        elif rest.startswith("patch_embed.proj."):
            out["embed." + rest] = v
        elif rest == "cls_token":
            out["cls_token"] = v
        elif rest == "dist_token":
            out["reg_token"] = v
        elif rest.startswith(("blocks.", "norm.")):
            out[rest] = v
        else:
            unknown.append(key)
    return out, unknown


# ---- architecture from shapes -----------------------------------------------------------------

def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


@dataclass
class _Arch:
    dim: int
    depth: int
    patch: int
    mlp_ratio: float
    distilled: bool
    grid: int
    num_classes: int
    decoder: str
    decoder_layers: int


def _arch_from_shapes(seg: dict[str, torch.Tensor], source: str) -> _Arch:
    """Everything about the network that its (Segmenter-named) tensors determine."""
    needed = ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "encoder.blocks.0.mlp.fc1.weight")
    missing = [k for k in needed if k not in seg]
    if missing:
        raise CheckpointError(f"{source}: weights do not fit a Segmenter model: missing {', '.join(missing)}")
    proj = seg["encoder.patch_embed.proj.weight"]
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    if proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"{source}: the patch embedding is not square ({tuple(proj.shape[-2:])})")
    distilled = "encoder.dist_token" in seg
    n = int(seg["encoder.pos_embed"].shape[1]) - (2 if distilled else 1)
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise CheckpointError(f"{source}: position embedding of {n} patches is not a square grid")
    if "decoder.cls_emb" in seg:
        decoder, classes, layers = "mask", int(seg["decoder.cls_emb"].shape[1]), _count(seg, "decoder.blocks.")
        width = int(seg["decoder.proj_dec.weight"].shape[0]) if "decoder.proj_dec.weight" in seg else dim
        if width != dim:
            raise CheckpointError(f"{source}: mask-transformer width {width} differs from the encoder's {dim}; "
                                  "tokenscope's mask decoder uses the encoder width, as Segmenter does")
    elif "decoder.head.weight" in seg:
        decoder, classes, layers = "linear", int(seg["decoder.head.weight"].shape[0]), 0
    else:
        raise CheckpointError(f"{source}: no decoder found (expected decoder.head.* or the mask transformer's decoder.cls_emb)")
    mlp = int(seg["encoder.blocks.0.mlp.fc1.weight"].shape[0]) / dim
    return _Arch(dim, _count(seg, "encoder.blocks."), patch, mlp, distilled, grid, classes, decoder, layers)


def _timm_arch(dim: int, patch: int) -> str:
    size = WIDTH_NAMES.get(dim, "base")
    name = f"vit_{size}_patch{patch}_224"
    return name if name in timm.list_models(name) else f"vit_{size}_patch16_224"


@dataclass
class _SideInfo:
    """What a variant.yml or an mmseg config adds to the shapes (None = not said)."""

    heads: int | None = None
    decoder_heads: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    norm_eps: float | None = None
    pos_resize: str | None = None
    dataset_hint: str = ""
    window: int = 0
    stride: int = 0
    resize_short: int = 0
    class_names: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()


def _pair_first(v: Any) -> int:
    if isinstance(v, (list, tuple)) and v:
        return int(v[0])
    return int(v) if isinstance(v, (int, float)) else 0


def _typed(read: Any, path: Path, what: str) -> "_SideInfo":
    """A side file's values read, or one line naming the file when one has the wrong type (a list where a
    mapping goes, `n_heads: abc`, `.inf`): a foreign file is data, checked, never a traceback."""
    try:
        info = read()
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError, OverflowError, KeyError) as exc:
        raise CheckpointError(f"{path}: a value of this {what} has the wrong type or range "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    if info.heads is not None and (not isinstance(info.heads, int) or isinstance(info.heads, bool)
                                   or not 1 <= info.heads <= 1024):
        raise CheckpointError(f"{path}: the number of heads {info.heads!r} in this {what} is not a whole number in 1..1024")
    return info


def read_variant(path: Path) -> _SideInfo:
    """Segmenter's variant.yml (plain YAML, read with the safe loader)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{path}: not a readable variant.yml ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: not a Segmenter variant.yml")
    net = doc.get("net_kwargs", {}) or {}
    data = doc.get("dataset_kwargs", {}) or {}
    infer = doc.get("inference_kwargs", {}) or {}
    norm = net.get("normalization") or data.get("normalization")
    mean, std = (DEIT_STATS if norm == "deit" else VIT_STATS) if norm in ("vit", "deit") else (None, None)
    return _SideInfo(
        heads=int(net["n_heads"]) if "n_heads" in net else None, mean=mean, std=std,
        dataset_hint=str(data.get("dataset", "")), window=_pair_first(infer.get("window_size", 0)),
        stride=_pair_first(infer.get("window_stride", 0)), resize_short=_pair_first(infer.get("im_size", 0)),
    )


def read_mmseg_side(cfg: dict[str, Any], meta: dict[str, Any]) -> _SideInfo:
    """An mmseg config (parsed, never run) and the checkpoint's meta."""
    backbone = find(cfg, "model", "backbone") or {}
    info = _SideInfo(heads=backbone.get("num_heads"), pos_resize=backbone.get("interpolate_mode"),
                     decoder_heads=find(cfg, "model", "decode_head", "num_heads"))
    eps = find(backbone, "norm_cfg", "eps")
    info.norm_eps = float(eps) if isinstance(eps, (int, float)) else None
    mean, std = search(cfg, "mean"), search(cfg, "std")
    if isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) == 3:
        scale = 255.0 if max(mean) > 1.5 else 1.0
        info.mean = tuple(float(m) / scale for m in mean)  # type: ignore[assignment]
        info.std = tuple(float(s) / scale for s in std)  # type: ignore[assignment]
    test = find(cfg, "model", "test_cfg") or {}
    if test.get("mode") == "slide":
        info.window, info.stride = _pair_first(test.get("crop_size", 0)), _pair_first(test.get("stride", 0))
    scale = search(cfg, "img_scale") or search(cfg, "scale")
    if isinstance(scale, (list, tuple)) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale):
        info.resize_short = int(min(scale))
    info.dataset_hint = str(cfg.get("dataset_type", ""))
    classes = meta.get("CLASSES") or find(meta, "dataset_meta", "classes")
    palette = meta.get("PALETTE") or find(meta, "dataset_meta", "palette")
    if isinstance(classes, (list, tuple)):
        info.class_names = tuple(str(c).strip() for c in classes)
    if isinstance(palette, (list, tuple)) and all(isinstance(c, (list, tuple)) and len(c) == 3 for c in palette):
        info.palette = tuple(tuple(int(v) for v in c) for c in palette)  # type: ignore[misc]
    return info


def _side_file(ckpt: Path, given: str | Path | None, layout: str) -> Path | None:
    """variant.yml beside a Segmenter checkpoint; for mmseg, the given config or the one .py beside it."""
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise CheckpointError(f"{p}: no such config file")
        return p
    if layout == "segmenter":
        for name in ("variant.yml", "variant.yaml"):
            if (ckpt.parent / name).is_file():
                return ckpt.parent / name
        return None
    same = ckpt.with_suffix(".py")
    if same.is_file():
        return same
    beside = sorted(ckpt.parent.glob("*.py"))
    prefixed = [p for p in beside if ckpt.stem.startswith(p.stem)]
    if len(prefixed) == 1:
        return prefixed[0]
    return beside[0] if len(beside) == 1 else None


def read_segmenter_checkpoint(path: str | Path, side_file: str | Path | None = None, name: str | None = None,
                              overrides: dict[str, Any] | None = None, obj: Any = None) -> ImportedSegmenter:
    """Read a Segmenter or mmsegmentation checkpoint safely and map it onto a StepViT config and state.

    `obj` is the file's content when the caller has already read it (large files are read once).
    """
    ckpt = Path(path)
    if obj is None:
        obj = read_pickled_checkpoint(ckpt)
    layout, state = detect_layout(obj, str(ckpt))
    notes: list[str] = []
    side = _side_file(ckpt, side_file, layout)
    if layout == "mmseg":
        seg, unknown = mmseg_to_segmenter(state)
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        cfg_text = meta.get("config") if isinstance(meta.get("config"), str) else None
        cfg = read_config_file(side) if side is not None else (parse_config_text(cfg_text) if cfg_text else {})
        info = _typed(lambda: read_mmseg_side(cfg, meta), side or ckpt, "mmseg config")
        if side is None and cfg_text is None:
            notes.append("no mmseg config beside the checkpoint: conventions of mmseg's Segmenter configs assumed")
    else:
        seg, unknown = state, []
        info = _typed(lambda: read_variant(side), side, "variant.yml") if side is not None else _SideInfo()
        if side is None:
            notes.append("no variant.yml beside the checkpoint: Segmenter's conventions assumed")
    mapped, unknown2 = segmenter_to_stepvit(seg)
    unknown += unknown2
    if unknown:
        raise CheckpointError(f"{ckpt}: {len(unknown)} unexpected weights (e.g. {', '.join(unknown[:3])}); "
                              "is this a Segmenter checkpoint?")
    default_name = ckpt.parent.name if ckpt.stem == "checkpoint" else ckpt.stem
    config = describe(seg, info, layout, name or default_name, overrides, str(ckpt), notes)
    return ImportedSegmenter(config, mapped, layout, str(ckpt), notes)


def describe(seg: dict[str, torch.Tensor], info: _SideInfo, layout: str, name: str, overrides: dict[str, Any] | None,
             source: str, notes: list[str]) -> StepConfig:
    """The StepConfig of a Segmenter model from its (Segmenter-named) tensors and side information.

    Only shapes are read, so tensors on the `meta` device describe an architecture without memory.
    Assumptions made for facts the files do not state are appended to `notes`.
    """
    arch = _arch_from_shapes(seg, source)
    heads = info.heads or max(1, arch.dim // 64)
    if info.heads is None:
        notes.append(f"attention heads not stated: {heads} (= width / 64, as in every Segmenter ViT)")
    mean, std = info.mean, info.std
    if mean is None or std is None:
        mean, std = DEIT_STATS if arch.distilled else VIT_STATS
        notes.append(f"input normalisation not stated: {'ImageNet (DeiT)' if arch.distilled else 'mean = std = 0.5 (ViT)'}")
    dataset = guess_dataset(arch.num_classes, info.dataset_hint)
    names, palette = info.class_names, info.palette
    if len(names) != arch.num_classes:
        names, palette = (), ()
        if dataset:
            try:
                known = dataset_classes(dataset, arch.num_classes)
                names, palette = known.names, known.palette
            except ConfigError:
                notes.append(f"{arch.num_classes} classes do not match {dataset}'s class list: classes left unnamed")
                dataset = ""
    if len(palette) != len(names):
        palette = ()
    window = info.window or arch.grid * arch.patch
    timm_kwargs: dict[str, Any] = {"embed_dim": arch.dim, "depth": arch.depth, "num_heads": heads,
                                   "patch_size": arch.patch, "mlp_ratio": arch.mlp_ratio}
    if arch.distilled:
        timm_kwargs["reg_tokens"] = 1  # DeiT's distillation token sits right after the class token
    fields: dict[str, Any] = dict(
        name=name, arch=_timm_arch(arch.dim, arch.patch), num_classes=arch.num_classes,
        exit_after=tuple(sorted({k for k in default_exits(arch.depth) if 1 <= k < arch.depth})),
        img_size=arch.grid * arch.patch, pixel_mean=mean, pixel_std=std, timm_kwargs=timm_kwargs,
        class_names=names, class_colours=palette, policy_backbone="efficientnet_lite0" if arch.dim >= 768 else "mini",
        decoder=arch.decoder, decoder_layers=arch.decoder_layers,
        decoder_heads=(info.decoder_heads or max(1, arch.dim // 64)) if arch.decoder == "mask" else 0,
        decoder_norm_eps=1e-5,
        norm_eps=(info.norm_eps or 1e-6) if layout == "mmseg" else 1e-5,
        pos_resize=(info.pos_resize or "bicubic") if layout == "mmseg" else "bilinear",
        window=window, stride=info.stride or max(arch.patch, window - 32), resize_short=info.resize_short or window,
        dataset=dataset,
    )
    fields.update(overrides or {})
    if fields["pos_resize"] not in ("timm", "bilinear", "bicubic"):
        fields["pos_resize"] = "bicubic"
    try:
        return StepConfig.from_dict(fields)
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{source}: cannot describe this model ({exc})") from None


def architecture_state(dim: int, depth: int, patch: int, grid: int, classes: int, decoder: str,
                       decoder_layers: int = 2) -> dict[str, torch.Tensor]:
    """Shape-only (meta-device) Segmenter tensors of an architecture, for `describe`."""
    e = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    state = {"encoder.patch_embed.proj.weight": e(dim, 3, patch, patch), "encoder.pos_embed": e(1, grid * grid + 1, dim),
             "encoder.cls_token": e(1, 1, dim)}
    state.update({f"encoder.blocks.{i}.mlp.fc1.weight": e(4 * dim, dim) for i in range(depth)})
    if decoder == "mask":
        state.update({"decoder.cls_emb": e(1, classes, dim), "decoder.proj_dec.weight": e(dim, dim)})
        state.update({f"decoder.blocks.{i}.norm1.weight": e(dim) for i in range(decoder_layers)})
    else:
        state["decoder.head.weight"] = e(classes, dim)
    return state


def holds_segmenter(obj: Any) -> bool:
    """Whether an unpickled checkpoint is in one of the two Segmenter layouts."""
    try:
        detect_layout(obj, "")
    except CheckpointError:
        return False
    return True
