"""Tiny Segmenter checkpoints built in the tests, and a reference forward written from the formulas.

Nothing here uses tokenscope's model code: the reference is plain tensor algebra (patchify by
convolution, LayerNorm, multi-head attention, GELU MLP, Segmenter's decoders), so a match
between it and tokenscope's StepViT means the importer mapped every weight to its right place.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DIM, DEPTH, HEADS, PATCH, GRID, CLASSES, DEC_LAYERS = 64, 2, 2, 16, 4, 5, 1
MLP = 4 * DIM


def _block(prefix: str, dim: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda *s, scale=0.05: torch.randn(*s, generator=g) * scale  # noqa: E731
    return {
        f"{prefix}norm1.weight": 1 + r(dim, scale=0.1), f"{prefix}norm1.bias": r(dim),
        f"{prefix}attn.qkv.weight": r(3 * dim, dim, scale=0.15), f"{prefix}attn.qkv.bias": r(3 * dim),
        f"{prefix}attn.proj.weight": r(dim, dim, scale=0.15), f"{prefix}attn.proj.bias": r(dim),
        f"{prefix}norm2.weight": 1 + r(dim, scale=0.1), f"{prefix}norm2.bias": r(dim),
        f"{prefix}mlp.fc1.weight": r(4 * dim, dim, scale=0.15), f"{prefix}mlp.fc1.bias": r(4 * dim),
        f"{prefix}mlp.fc2.weight": r(dim, 4 * dim, scale=0.1), f"{prefix}mlp.fc2.bias": r(dim),
    }


def segmenter_state(decoder: str = "mask", distilled: bool = False, patch: int = PATCH, seed: int = 0,
                    classes: int = CLASSES) -> dict[str, torch.Tensor]:
    """Random weights under the Segmenter release's names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.05: torch.randn(*s, generator=g) * scale  # noqa: E731
    prefix = 2 if distilled else 1
    s: dict[str, torch.Tensor] = {
        "encoder.cls_token": r(1, 1, DIM, scale=0.5), "encoder.pos_embed": r(1, GRID * GRID + prefix, DIM, scale=0.5),
        "encoder.patch_embed.proj.weight": r(DIM, 3, patch, patch, scale=0.1), "encoder.patch_embed.proj.bias": r(DIM),
        "encoder.norm.weight": 1 + r(DIM, scale=0.1), "encoder.norm.bias": r(DIM),
        "encoder.head.weight": r(1000, DIM), "encoder.head.bias": r(1000),
    }
    if distilled:
        s["encoder.dist_token"] = r(1, 1, DIM, scale=0.5)
        s["encoder.head_dist.weight"], s["encoder.head_dist.bias"] = r(1000, DIM), r(1000)
    for i in range(DEPTH):
        s.update(_block(f"encoder.blocks.{i}.", DIM, g))
    if decoder == "linear":
        s["decoder.head.weight"], s["decoder.head.bias"] = r(classes, DIM, scale=0.2), r(classes)
    else:
        s.update({"decoder.proj_dec.weight": r(DIM, DIM, scale=0.15), "decoder.proj_dec.bias": r(DIM),
                  "decoder.cls_emb": r(1, classes, DIM, scale=0.5), "decoder.proj_patch": r(DIM, DIM, scale=0.15),
                  "decoder.proj_classes": r(DIM, DIM, scale=0.15),
                  "decoder.decoder_norm.weight": 1 + r(DIM, scale=0.1), "decoder.decoder_norm.bias": r(DIM),
                  "decoder.mask_norm.weight": 1 + r(classes, scale=0.1), "decoder.mask_norm.bias": r(classes)})
        for i in range(DEC_LAYERS):
            s.update(_block(f"decoder.blocks.{i}.", DIM, g))
    return s


def to_mmseg(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under mmsegmentation's names (written independently of the importer)."""
    def layer(src: str, dst: str) -> dict[str, torch.Tensor]:
        return {f"{dst}ln1.weight": s[f"{src}norm1.weight"], f"{dst}ln1.bias": s[f"{src}norm1.bias"],
                f"{dst}attn.attn.in_proj_weight": s[f"{src}attn.qkv.weight"],
                f"{dst}attn.attn.in_proj_bias": s[f"{src}attn.qkv.bias"],
                f"{dst}attn.attn.out_proj.weight": s[f"{src}attn.proj.weight"],
                f"{dst}attn.attn.out_proj.bias": s[f"{src}attn.proj.bias"],
                f"{dst}ln2.weight": s[f"{src}norm2.weight"], f"{dst}ln2.bias": s[f"{src}norm2.bias"],
                f"{dst}ffn.layers.0.0.weight": s[f"{src}mlp.fc1.weight"], f"{dst}ffn.layers.0.0.bias": s[f"{src}mlp.fc1.bias"],
                f"{dst}ffn.layers.1.weight": s[f"{src}mlp.fc2.weight"], f"{dst}ffn.layers.1.bias": s[f"{src}mlp.fc2.bias"]}

    m = {"backbone.cls_token": s["encoder.cls_token"], "backbone.pos_embed": s["encoder.pos_embed"],
         "backbone.patch_embed.projection.weight": s["encoder.patch_embed.proj.weight"],
         "backbone.patch_embed.projection.bias": s["encoder.patch_embed.proj.bias"],
         "backbone.ln1.weight": s["encoder.norm.weight"], "backbone.ln1.bias": s["encoder.norm.bias"]}
    for i in range(DEPTH):
        m.update(layer(f"encoder.blocks.{i}.", f"backbone.layers.{i}."))
    if "decoder.head.weight" in s:
        m["decode_head.conv_seg.weight"] = s["decoder.head.weight"][:, :, None, None]
        m["decode_head.conv_seg.bias"] = s["decoder.head.bias"]
    else:
        n = s["decoder.cls_emb"].shape[1]
        m.update({"decode_head.dec_proj.weight": s["decoder.proj_dec.weight"], "decode_head.dec_proj.bias": s["decoder.proj_dec.bias"],
                  "decode_head.cls_emb": s["decoder.cls_emb"],
                  "decode_head.patch_proj.weight": s["decoder.proj_patch"].t().contiguous(),
                  "decode_head.classes_proj.weight": s["decoder.proj_classes"].t().contiguous(),
                  "decode_head.decoder_norm.weight": s["decoder.decoder_norm.weight"],
                  "decode_head.decoder_norm.bias": s["decoder.decoder_norm.bias"],
                  "decode_head.mask_norm.weight": s["decoder.mask_norm.weight"],
                  "decode_head.mask_norm.bias": s["decoder.mask_norm.bias"],
                  "decode_head.conv_seg.weight": torch.zeros(n, DIM, 1, 1), "decode_head.conv_seg.bias": torch.zeros(n)})
        for i in range(DEC_LAYERS):
            m.update(layer(f"decoder.blocks.{i}.", f"decode_head.layers.{i}."))
    return m


# ---- the reference forward ---------------------------------------------------------------------

def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _attention(x: torch.Tensor, s: dict[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    qkv = x @ s[f"{p}attn.qkv.weight"].t() + s[f"{p}attn.qkv.bias"]
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d // heads), dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, n, d)
    return out @ s[f"{p}attn.proj.weight"].t() + s[f"{p}attn.proj.bias"]


def _block_forward(x: torch.Tensor, s: dict[str, torch.Tensor], p: str, heads: int, eps: float) -> torch.Tensor:
    x = x + _attention(_ln(x, s[f"{p}norm1.weight"], s[f"{p}norm1.bias"], eps), s, p, heads)
    h = _ln(x, s[f"{p}norm2.weight"], s[f"{p}norm2.bias"], eps) @ s[f"{p}mlp.fc1.weight"].t() + s[f"{p}mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2.0)))
    return x + h @ s[f"{p}mlp.fc2.weight"].t() + s[f"{p}mlp.fc2.bias"]


def reference_forward(s: dict[str, torch.Tensor], images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                      enc_eps: float, pos_mode: str, heads: int = HEADS) -> torch.Tensor:
    """Patch logits (B, C, gh, gw) of a Segmenter model, from Segmenter-named weights."""
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    w = s["encoder.patch_embed.proj.weight"]
    patch = w.shape[-1]
    feat = F.conv2d(x, w, s["encoder.patch_embed.proj.bias"], stride=patch)
    b, d, gh, gw = feat.shape
    tokens = feat.flatten(2).transpose(1, 2)
    prefix = [s["encoder.cls_token"]] + ([s["encoder.dist_token"]] if "encoder.dist_token" in s else [])
    npre = len(prefix)
    pos = s["encoder.pos_embed"]
    if (gh, gw) != (GRID, GRID):
        grid = pos[:, npre:].reshape(1, GRID, GRID, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode=pos_mode, align_corners=False)
        pos = torch.cat([pos[:, :npre], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)
    x = torch.cat([p.expand(b, -1, -1) for p in prefix] + [tokens], dim=1) + pos
    for i in range(DEPTH):
        x = _block_forward(x, s, f"encoder.blocks.{i}.", heads, enc_eps)
    x = _ln(x, s["encoder.norm.weight"], s["encoder.norm.bias"], enc_eps)[:, npre:]
    if "decoder.head.weight" in s:
        logits = x @ s["decoder.head.weight"].t() + s["decoder.head.bias"]
    else:
        n_cls = s["decoder.cls_emb"].shape[1]
        y = torch.cat([x @ s["decoder.proj_dec.weight"].t() + s["decoder.proj_dec.bias"],
                       s["decoder.cls_emb"].expand(b, -1, -1)], dim=1)
        for i in range(DEC_LAYERS):
            y = _block_forward(y, s, f"decoder.blocks.{i}.", max(1, d // 64), 1e-5)
        y = _ln(y, s["decoder.decoder_norm.weight"], s["decoder.decoder_norm.bias"], 1e-5)
        pt, cl = y[:, :-n_cls] @ s["decoder.proj_patch"], y[:, -n_cls:] @ s["decoder.proj_classes"]
        pt, cl = pt / pt.norm(dim=-1, keepdim=True), cl / cl.norm(dim=-1, keepdim=True)
        logits = _ln(pt @ cl.transpose(1, 2), s["decoder.mask_norm.weight"], s["decoder.mask_norm.bias"], 1e-5)
    return logits.transpose(1, 2).reshape(b, -1, gh, gw)


# ---- files as the public releases ship them ------------------------------------------------------

def write_segmenter_release(folder: Path, state: dict[str, torch.Tensor], decoder: str, distilled: bool = False,
                            extra: dict[str, Any] | None = None, window: int = GRID * PATCH, stride: int = 48) -> Path:
    """checkpoint.pth ({"model": state, ...}) + variant.yml, as Segmenter's release ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, **(extra or {})}, folder / "checkpoint.pth")
    norm = "deit" if distilled else "vit"
    (folder / "variant.yml").write_text(
        "dataset_kwargs:\n  dataset: ade20k\n  crop_size: 64\n  normalization: " + norm + "\n"
        f"inference_kwargs:\n  im_size: {window}\n  window_size: {window}\n  window_stride: {stride}\n"
        "net_kwargs:\n  backbone: " + ("deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_384") + "\n"
        f"  d_model: {DIM}\n  n_heads: {HEADS}\n  n_layers: {DEPTH}\n  patch_size: {PATCH}\n  image_size: [64, 64]\n"
        f"  distilled: {'true' if distilled else 'false'}\n  normalization: {norm}\n  n_cls: {CLASSES}\n"
        f"  decoder:\n    name: {decoder}\n    n_layers: {DEC_LAYERS}\n    n_cls: {CLASSES}\n"
    )
    return folder / "checkpoint.pth"


MMSEG_CONFIG = """_base_ = ['../_base_/models/segmenter_vit-b16_mask.py', '../_base_/datasets/ade20k.py']
crop_size = (64, 64)
backbone_norm_cfg = dict(type='LN', eps=1e-6, requires_grad=True)
img_norm_cfg = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], to_rgb=True)
model = dict(
    backbone=dict(type='VisionTransformer', img_size=(64, 64), patch_size=16, embed_dims=64, num_layers=2,
                  num_heads=2, norm_cfg=backbone_norm_cfg, with_cls_token=True, interpolate_mode='bicubic'),
    decode_head=dict(type='SegmenterMaskTransformerHead', in_channels=64, channels=64, num_classes=5,
                     num_layers=1, num_heads=1, embed_dims=64),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(48, 48)))
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='MultiScaleFlipAug', img_scale=(256, 64), flip=False)]
dataset_type = 'ADE20KDataset'
"""


def write_mmseg_release(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """An mmsegmentation checkpoint ({"meta", "state_dict"}) with its config beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "segmenter_vit-t_mask_8x1_64x64_160k_ade20k_20220105_151706-0123abcd.pth"
    torch.save({"meta": {"mmseg_version": "0.20.2", "iter": 160000, "CLASSES": tuple(f"c{i}" for i in range(CLASSES))},
                "state_dict": to_mmseg(state)}, path)
    (folder / "segmenter_vit-t_mask_8x1_64x64_160k_ade20k.py").write_text(MMSEG_CONFIG)
    return path
