"""Weights: our checkpoints round-trip exactly; foreign and broken files give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import make_tiny
from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.checkpoints import build_model, load_checkpoint, save_checkpoint


def test_checkpoint_reloads_with_identical_outputs(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    ref = make_tiny()
    x = torch.rand(1, 3, 64, 80)
    for m in (loaded.model, ref):
        m.configure(policy="learned", exits=True, exit_threshold=0.3)
    with torch.no_grad():
        assert torch.equal(loaded.model(x).patch_logits, ref(x).patch_logits)
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
