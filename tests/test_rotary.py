"""Rotary positions (DINOv3's RoPE, timm's vit_*_dinov3): tokenscope drives the backbone as timm does, a
1x1 token is rotated exactly as its patch, a supertoken sits at its patches' centre, a merged token at
its group's size-weighted mean position, and every method keeps the accounting on such a backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenscope as ts
from tokenscope.models.partition import Partition
from tokenscope.models.registry import StepConfig
from tokenscope.models.rotary import merge_positions, patch_positions, rotary_embedding, token_positions
from tokenscope.models.step_vit import StepViT, create_backbone

ARCH = "vit_small_patch16_dinov3"


def _model(depth: int = 3, dtype: torch.dtype = torch.float32) -> tuple[StepViT, torch.nn.Module]:
    cfg = StepConfig(name="dinov3", arch=ARCH, num_classes=4, exit_after=(), img_size=224, decoder="linear",
                     decoder_layers=1, timm_kwargs={"depth": depth})
    torch.manual_seed(0)
    vit = create_backbone(cfg)
    with torch.no_grad():  # livelier than timm's init, so a wrong rotation shows
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(4.0)
    return StepViT(cfg, vit).to(dtype).eval(), vit.to(dtype).eval()


def test_the_plain_model_is_timms_dinov3_forward() -> None:
    model, vit = _model(dtype=torch.float64)
    x = torch.rand(2, 3, 160, 224, dtype=torch.float64)
    seen = {}
    hook = model.decoder.register_forward_hook(lambda m, args, out: seen.setdefault("tokens", args[0]))
    with torch.no_grad():
        model(x, setting=model.default_setting().plain())
        expected = vit.forward_features((x - model.pixel_mean) / model.pixel_std)[:, vit.num_prefix_tokens:]
    hook.remove()
    assert seen["tokens"].shape == expected.shape
    assert torch.allclose(seen["tokens"], expected, atol=1e-10, rtol=0), (seen["tokens"] - expected).abs().max()


def test_a_one_patch_token_is_rotated_as_its_patch_and_a_supertoken_sits_at_its_centre() -> None:
    model, _ = _model()
    grid = (6, 8)
    # patches (0..1, 0..1) form one 2x2 supertoken, token 0; the other 44 patches are tokens of their own
    rows, cols, levels = [0], [0], [1]
    token_of_patch = np.zeros(grid, dtype=np.int32)
    for r in range(6):
        for c in range(8):
            if r >= 2 or c >= 2:
                token_of_patch[r, c] = len(rows)
                rows.append(r), cols.append(c), levels.append(0)
    part = Partition(grid=grid, token_of_patch=token_of_patch, level=np.array(levels, dtype=np.int8),
                     row=np.array(rows, dtype=np.int32), col=np.array(cols, dtype=np.int32))
    patches = patch_positions(model.rope, grid, torch.device("cpu"))
    positions = token_positions([part], patches)
    assert torch.equal(positions[0, 0], patches[:2, :2].reshape(4, 2).mean(0))  # the square's centre
    ids = torch.arange(1, len(rows)).unsqueeze(0)
    got = rotary_embedding(model.rope, positions, ids)[0, 0]
    timm_table = model.rope.get_embed(list(grid))  # (gh * gw, 2 dim): timm's own angles per patch
    flat = [r * 8 + c for r, c in zip(rows[1:], cols[1:])]
    assert torch.equal(got, timm_table[flat].to(got.dtype))  # 1x1 tokens: exactly their patch's rotation


def test_a_merged_token_sits_at_its_groups_size_weighted_mean_position() -> None:
    positions = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [0.0, 0.0]]])  # 4 tokens + spare
    ids = torch.tensor([[0, 1, 2, 3]])
    sizes = torch.tensor([[1.0, 3.0, 1.0, 1.0]])
    merged = torch.tensor([[True, False, True, False]])
    into = torch.tensor([[1, 1, 1, 0]])
    out = merge_positions(positions, ids, sizes, merged, into, torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(out[0, 1], torch.tensor([(0 + 3 + 0) / 5, (0 + 0 + 2) / 5]))  # weights 1, 3, 1
    assert torch.equal(out[0, 3], positions[0, 3]) and torch.equal(out[0, 0], positions[0, 0])


@pytest.mark.parametrize("method", ["step", "dcts", "tome", "algm", "evit", "pitome", "hourglass"])
def test_every_method_keeps_the_accounting_on_a_dinov3_backbone(method: str) -> None:
    model = ts.load_model(f"timm:{ARCH}", random_init=True, device="cpu", method=method)
    trace = ts.trace(model, "sample_images/street_5000001.png", size=128)
    trace.assert_consistent()
    assert trace.num_tokens <= trace.num_patches


def test_a_dinov3_traces_flops_are_torchs_counter() -> None:
    """The cost model reads the EVA blocks' layers as it reads timm's: a trace's FLOPs are what torch's counter
    counts for the same forward (rotations are elementwise: no multiply-adds of a matrix product)."""
    from tokenscope.data.images import load_prepared
    from tokenscope.models.cost import measure_flops
    from tokenscope.trace.capture import TraceCapture, images_to_tensor

    for method in ("vit", "tome"):
        model = ts.load_model(f"timm:{ARCH}", random_init=True, device="cpu", method=method)
        prepared = load_prepared("sample_images/street_5000001.png", size=128)
        trace = TraceCapture(model.loaded, torch.device("cpu"))([prepared])[0]
        x, _ = images_to_tensor([prepared], torch.device("cpu"))
        with torch.no_grad():
            total = measure_flops(lambda: model.module(x, setting=model.setting))[0]
        assert trace.meta.flops["total"] == total, method
