"""Segmenter checkpoints in both public layouts load into tokenscope and compute what Segmenter computes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from segmenter_reference import (
    CLASSES,
    DIM,
    segmenter_state,
    reference_forward,
    write_mmseg_release,
    write_segmenter_release,
)

from tokenscope.errors import CheckpointError
from tokenscope.models.checkpoints import load_checkpoint
from tokenscope.models.resolve import build_model, import_segmenter
from tokenscope.models.importers.segmenter import read_segmenter_checkpoint

VIT = ((0.5,) * 3, (0.5,) * 3)
DEIT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _tokenscope_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, setting=model.default_setting().plain()).patch_logits


def _images(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder,distilled", [("linear", False), ("mask", False), ("mask", True)])
@pytest.mark.parametrize("hw", [(64, 64), (80, 112)])
def test_segmenter_release_matches_reference_forward(tmp_path: Path, decoder: str, distilled: bool,
                                                     hw: tuple[int, int]) -> None:
    """(a) linear decoder, (b) mask transformer, (c) DeiT distilled; at the training size and at
    another size, where the position embedding must be resized bilinearly as Segmenter does."""
    state = segmenter_state(decoder, distilled)
    ckpt = write_segmenter_release(tmp_path / "seg", state, decoder, distilled)
    loaded = build_model("demo", weights=str(ckpt))
    assert loaded.config.decoder == decoder and loaded.model.num_prefix_tokens == (2 if distilled else 1)
    assert loaded.trained == {"backbone": True, "decoder": True, "exits": False, "policy": False}
    x = _images(*hw)
    mean, std = DEIT if distilled else VIT
    ref = reference_forward(state, x, mean, std, enc_eps=1e-5, pos_mode="bilinear")
    got = _tokenscope_logits(loaded.model, x)
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("decoder", ["linear", "mask"])
@pytest.mark.parametrize("hw", [(64, 64), (96, 80)])
def test_mmseg_layout_matches_reference_forward(tmp_path: Path, decoder: str, hw: tuple[int, int]) -> None:
    """(d) the same weights under mmsegmentation's names: eps 1e-6 in the encoder, bicubic resize."""
    state = segmenter_state(decoder)
    ckpt = write_mmseg_release(tmp_path / "mm", state)
    loaded = build_model("demo", weights=str(ckpt))
    assert loaded.config.norm_eps == 1e-6 and loaded.config.pos_resize == "bicubic"
    assert loaded.config.window == 64 and loaded.config.stride == 48 and loaded.config.resize_short == 64
    assert loaded.config.class_names == tuple(f"c{i}" for i in range(CLASSES))  # from the checkpoint's meta
    x = _images(*hw, seed=1)
    ref = reference_forward(state, x, *VIT, enc_eps=1e-6, pos_mode="bicubic")
    assert (_tokenscope_logits(loaded.model, x) - ref).abs().max().item() < 1e-4


def test_both_layouts_of_the_same_weights_give_the_same_outputs(tmp_path: Path) -> None:
    state = segmenter_state("mask", seed=3)
    a = read_segmenter_checkpoint(write_segmenter_release(tmp_path / "a", state, "mask")).build()
    b = read_segmenter_checkpoint(write_mmseg_release(tmp_path / "b", state), overrides={"norm_eps": 1e-5}).build()
    x = _images(64, 64, seed=2)
    assert torch.allclose(_tokenscope_logits(a, x), _tokenscope_logits(b, x), atol=1e-5)


def test_training_checkpoint_with_optimizer_and_scheduler_state_loads(tmp_path: Path) -> None:
    """(e) what Segmenter's trainer saves: optimizer, scheduler and loss-scaler state beside the model."""
    state = segmenter_state("mask", seed=4)
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    sum((p ** 2).sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=100, power=0.9)
    extra = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "n_cls": CLASSES, "epoch": 63,
             "loss_scaler": {"scale": 65536.0, "growth_tracker": 0}}
    ckpt = write_segmenter_release(tmp_path / "train", state, "mask", extra=extra)
    loaded = build_model("demo", weights=str(ckpt))
    x = _images(64, 64)
    ref = reference_forward(state, x, *VIT, enc_eps=1e-5, pos_mode="bilinear")
    assert (_tokenscope_logits(loaded.model, x) - ref).abs().max().item() < 1e-4


def test_import_then_reload_gives_identical_outputs_and_never_unpickles_again(tmp_path: Path) -> None:
    state = segmenter_state("mask", seed=5)
    ckpt = write_segmenter_release(tmp_path / "seg", state, "mask")
    direct = build_model("demo", weights=str(ckpt))
    tensors, _ = import_segmenter(ckpt, tmp_path / "out" / "ade-tiny")
    os.remove(ckpt)  # the converted checkpoint must stand on its own
    reloaded = load_checkpoint(tensors)
    assert reloaded.config.replace(name="seg") == direct.config and direct.config.name == "seg"
    assert reloaded.trained == direct.trained
    x = _images(80, 96, seed=6)
    assert torch.equal(_tokenscope_logits(direct.model, x), _tokenscope_logits(reloaded.model, x))
    assert reloaded.config.window == 64 and reloaded.config.stride == 48
    assert reloaded.config.dataset == ""  # the variant says ade20k, but 5 classes are not ADE20K's 150


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # what a malicious checkpoint does: call a function while unpickling
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil" / "checkpoint.pth"
    path.parent.mkdir()
    torch.save({"model": segmenter_state("linear"), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused.*system"):
        build_model("demo", weights=str(path))
    with pytest.raises(CheckpointError, match="refused"):
        import_segmenter(path, tmp_path / "never")
    assert not marker.exists()
    assert not (tmp_path / "never.json").exists()


def test_missing_and_unexpected_keys_are_one_error_naming_some(tmp_path: Path) -> None:
    state = segmenter_state("mask")
    del state["encoder.blocks.1.mlp.fc2.weight"], state["decoder.mask_norm.bias"]
    ckpt = write_segmenter_release(tmp_path / "missing", state, "mask")
    with pytest.raises(CheckpointError, match=r"2 missing \(e\.g\. encoder\.blocks\.1\.mlp\.fc2\.weight, decoder\.mask_norm\.bias\)"):
        build_model("demo", weights=str(ckpt))
    state = segmenter_state("linear")
    state["encoder.extra_thing"] = torch.zeros(3)
    ckpt = write_segmenter_release(tmp_path / "extra", state, "linear")
    with pytest.raises(CheckpointError, match="unexpected weights .*encoder.extra_thing"):
        build_model("demo", weights=str(ckpt))
    state = segmenter_state("linear")
    state["encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3 * DIM, DIM + 1)
    ckpt = write_segmenter_release(tmp_path / "shape", state, "linear")
    with pytest.raises(CheckpointError, match="wrong shapes .*encoder.blocks.0.attn.qkv.weight"):
        build_model("demo", weights=str(ckpt))


def test_class_names_and_palette_come_from_the_data_set(tmp_path: Path) -> None:
    from tokenscope.data.classes import dataset_classes

    state = segmenter_state("linear", classes=150)
    imp = read_segmenter_checkpoint(write_segmenter_release(tmp_path / "ade", state, "linear"))
    ade = dataset_classes("ade20k")
    assert imp.config.class_names == ade.names and len(ade.names) == 150 and imp.config.dataset == "ade20k"
    assert imp.config.class_names[:3] == ("wall", "building", "sky")
    assert imp.config.class_colours == ade.palette
    assert dataset_classes("pascal_context", 59).names[0] == "aeroplane"
    assert dataset_classes("pascal_context", 60).names[0] == "background"
    assert dataset_classes("cityscapes").names[-1] == "bicycle"
