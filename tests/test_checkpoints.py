"""Weights: our checkpoints round-trip exactly; foreign and broken files give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import make_tiny, setting
from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.checkpoints import load_checkpoint, save_checkpoint
from tokenscope.models.resolve import build_model


def test_checkpoint_reloads_with_identical_outputs(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    ref = make_tiny()
    x = torch.rand(1, 3, 64, 80)
    s = setting(ref, policy="learned", exits=True, exit_threshold=0.3)
    with torch.no_grad():
        assert torch.equal(loaded.model(x, setting=s).patch_logits, ref(x, setting=s).patch_logits)
    assert loaded.trained["policy"] and len(loaded.weights_id) == 16
    assert load_checkpoint(tiny_checkpoint.with_suffix(".safetensors")).weights_id == loaded.weights_id


def test_named_model_without_weights_says_what_to_do() -> None:
    with pytest.raises(CheckpointError, match="--random-init"):
        build_model("vitl")


def test_timm_backbone_file_loads_into_the_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)  # with a classifier head
    for name, saver in (("w.safetensors", lambda sd, p: save_file(sd, p)), ("w.pth", lambda sd, p: torch.save(sd, p))):
        path = tmp_path / name
        saver({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
        loaded = build_model("vitt", weights=path)
        assert torch.equal(loaded.model.blocks[3].mlp.fc1.weight, vit.blocks[3].mlp.fc1.weight)
        assert torch.equal(loaded.model.embed.pos_embed, vit.pos_embed)
        assert loaded.trained == {"backbone": True, "decoder": False, "exits": False, "policy": False}
        assert loaded.warnings


def test_wrong_or_broken_weights_are_clear_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        build_model("vitt", weights=junk)
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model("vitt", weights=path)
    with pytest.raises(CheckpointError, match="no such weights file"):
        build_model("vitb", weights=tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="exclude"):
        build_model("vitt", weights=tiny_checkpoint, random_init=True)
    # a checkpoint whose tensors do not match its own description
    other = tmp_path / "other.json"
    save_checkpoint(make_tiny(), other, trained={})
    (tmp_path / "other.safetensors").write_bytes(tiny_checkpoint.with_suffix(".safetensors").read_bytes()[:50])
    with pytest.raises(CheckpointError):
        load_checkpoint(other)


def _write_jax_npz(vit: torch.nn.Module, path: Path) -> None:
    """A ViT's weights in the original JAX (`.npz`) layout, written from the layout's own conventions
    (kernels input-major, HWIO convolutions, attention split into query/key/value heads)."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = vit.blocks[0].attn.num_heads
    w: dict[str, np.ndarray] = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                                "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
                                "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
                                "Transformer/encoder_norm/scale": sd["norm.weight"],
                                "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, dim, dim), sd[b + "attn.qkv.bias"].reshape(3, dim)
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j].T.reshape(dim, heads, dim // heads)
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j].reshape(heads, dim // heads)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, dim // heads, dim)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_jax_npz_backbone_loads_through_its_own_reader_not_torch_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    path = tmp_path / "ViT-Ti_16.npz"
    _write_jax_npz(vit, path)
    loaded = build_model("vitt", weights=path)
    assert torch.allclose(loaded.model.blocks[5].attn.qkv.weight, vit.blocks[5].attn.qkv.weight)
    assert torch.allclose(loaded.model.blocks[5].mlp.fc2.bias, vit.blocks[5].mlp.fc2.bias)
    assert torch.allclose(loaded.model.embed.pos_embed, vit.pos_embed)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="broken.npz"):
        build_model("vitt", weights=broken)


def test_a_patch_14_backbone_keeps_its_own_position_grid(tmp_path: Path) -> None:
    """DINOv2's 37x37 grid (518 px at patch 14) stays 37x37: it is not read as 16-pixel patches."""
    torch.manual_seed(0)
    arch = "vit_small_patch14_dinov2"
    vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=518, depth=2)
    path = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    backbone = __import__("tokenscope.models.importers.timm_file", fromlist=["backbone_from_file"]).backbone_from_file
    from tokenscope.models.registry import StepConfig, resolve_config

    cfg = resolve_config(f"timm:{arch}")
    cfg = StepConfig(**{**cfg.to_dict(), "timm_kwargs": {**cfg.timm_kwargs, "depth": 2}})
    loaded = backbone(cfg, path)
    assert tuple(loaded.patch_embed.grid_size) == (37, 37)
    assert torch.equal(loaded.pos_embed, vit.pos_embed)
