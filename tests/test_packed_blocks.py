"""Packed blocks: a padded batch's blocks run over its real tokens only, laid back to back.

What is checked: the packing's index and offsets; attention over packed images equals each image's
own attention (with a per-key bias and with rotary angles); a whole packed block equals the padded
block on the real tokens and leaves the padding slots as they were; the encoder packs exactly when a
batch is padded and no step sits inside the block; and on CUDA, the variable-length flash kernel
agrees with one SDPA call per image.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tokenscope.models.attention import attend_heads, attend_packed, size_weighted_mask
from tokenscope.models.encoder_block import EncoderBlock, _packed_rope
from tokenscope.models.sequence import Packing, attention_mask


def _attention(dim: int = 32, heads: int = 4, seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import Block

    torch.manual_seed(seed)
    return Block(dim, heads).eval()


def test_a_packing_knows_where_each_images_tokens_are_without_reading_the_device() -> None:
    assert Packing.of([3, 3], num_prefix=1, width=4) is None  # nothing padded: nothing to pack
    p = Packing.of([3, 1, 2], num_prefix=1, width=4)
    assert p is not None and p.lengths == (4, 2, 3) and p.longest == 4
    assert p.spans == [(0, 4), (4, 6), (6, 9)]
    assert p.index(torch.device("cpu")).tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10]
    assert p.cumulative(torch.device("cpu")).tolist() == [0, 4, 6, 9]
    assert p.cumulative(torch.device("cpu")).dtype == torch.int32


@pytest.mark.parametrize("weighted", [False, True])
def test_packed_attention_is_each_images_own_attention(weighted: bool) -> None:
    block = _attention()
    counts, prefix, width = [5, 2, 7], 1, 8
    torch.manual_seed(1)
    x = torch.randn(3, width, 32)
    valid = torch.arange(width - prefix)[None] < torch.tensor(counts)[:, None]
    sizes = torch.where(valid, torch.randint(1, 5, valid.shape).float(), torch.zeros(valid.shape))
    bias = size_weighted_mask(valid, sizes, prefix, torch.float32) if weighted else None
    packing = Packing.of(counts, prefix, width)
    assert packing is not None
    packed = x.reshape(-1, 32)[packing.index(torch.device("cpu"))].unsqueeze(0)
    with torch.no_grad():
        out = attend_packed(block.attn, packed, packing, bias)[0]
        for i, (start, end) in enumerate(packing.spans):
            n = end - start
            own = attend_heads(block.attn, x[i:i + 1, :n], None if bias is None else bias[i:i + 1, :, :, :n])[0][0]
            assert torch.allclose(out[start:end], own, atol=1e-6), (i, (out[start:end] - own).abs().max())


def test_a_packed_block_equals_the_padded_block_on_the_real_tokens_and_leaves_the_padding() -> None:
    block = EncoderBlock(_attention()).eval()
    counts, prefix, width = [6, 3, 1], 2, 8
    torch.manual_seed(2)
    x = torch.randn(3, width, 32)
    valid = torch.arange(width - prefix)[None] < torch.tensor(counts)[:, None]
    mask = attention_mask(valid, prefix)
    packing = Packing.of(counts, prefix, width)
    with torch.no_grad():
        packed = block(x, attn_mask=mask, num_prefix=prefix, packing=packing)
        padded = block(x, attn_mask=mask, num_prefix=prefix)
    for i, n in enumerate(packing.lengths):
        assert torch.allclose(packed[i, :n], padded[i, :n], atol=1e-5)
        assert torch.equal(packed[i, n:], x[i, n:])  # padding slots come back untouched
    with torch.enable_grad():  # training keeps the padded path (one graph, every slot)
        assert torch.equal(block(x, attn_mask=mask, num_prefix=prefix, packing=packing), padded)
    with torch.no_grad():  # and so does a block in training mode (its attention dropout is the padded path's)
        assert torch.equal(block.train()(x, attn_mask=mask, num_prefix=prefix, packing=packing),
                           block(x, attn_mask=mask, num_prefix=prefix))


def test_packed_rotary_angles_rotate_image_tokens_and_leave_the_prefix() -> None:
    from timm.layers import apply_rot_embed_cat

    torch.manual_seed(3)
    rope = torch.randn(2, 1, 4, 8)  # (B, 1, N - P, 2 Dh)
    packing = Packing.of([4, 2], num_prefix=1, width=5)
    assert packing is not None
    angles = _packed_rope(rope, packing, 1)
    assert angles.shape == (8, 1, 8)  # lengths 5 and 3
    q = torch.randn(8, 3, 4)
    rotated = apply_rot_embed_cat(q, angles)
    assert torch.equal(rotated[0], q[0]) and torch.equal(rotated[5], q[5])  # the prefix token of each image
    for rows, image, n in ((slice(1, 5), 0, 4), (slice(6, 8), 1, 2)):
        expected = apply_rot_embed_cat(q[rows].transpose(0, 1), rope[image, 0, :n])
        assert torch.equal(rotated[rows], expected.transpose(0, 1))


def test_the_encoder_packs_a_padded_batch_and_only_blocks_without_a_step_inside() -> None:
    import tokenscope as ts
    from tokenscope.jobs.bench import bench_images

    seen: list[bool] = []
    real = EncoderBlock._packed

    def spy(self, *args):  # type: ignore[no-untyped-def]
        seen.append(True)
        return real(self, *args)

    x = bench_images(128, 3, None)
    for method, packs in (("dcts", True), ("tome", False), ("vit", False)):
        model = ts.load_model("vitt", random_init=True, device="cpu", method=method)
        seen.clear()
        EncoderBlock._packed = spy  # type: ignore[method-assign]
        try:
            with torch.no_grad():
                model.module(x, setting=model.setting)
        finally:
            EncoderBlock._packed = real  # type: ignore[method-assign]
        # dCTS: images of different token counts, every block packed; ToMe merges the same number in every
        # image (no padding) inside every block; the plain ViT has no padding
        assert (len(seen) == model.module.depth) if packs else not seen, method


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_varlen_attention_agrees_with_one_sdpa_call_per_image() -> None:
    from tokenscope.models.attention import _varlen_kernel

    device = torch.device("cuda")
    block = _attention(dim=128, heads=2).to(device)
    counts, prefix, width = [37, 5, 64], 1, 65
    torch.manual_seed(4)
    x = torch.randn(3, width, 128, device=device)
    packing = Packing.of(counts, prefix, width)
    assert packing is not None
    packed = x.reshape(-1, 128)[packing.index(device)].unsqueeze(0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast = attend_packed(block.attn, packed, packing)[0].float()
        b16 = packed.to(torch.bfloat16)
        assert _varlen_kernel(b16, b16, b16) is not None, "this torch has no varlen attention"
        for i, (start, end) in enumerate(packing.spans):
            own = attend_heads(block.attn, x[i:i + 1, :end - start], None)[0][0].float()
            assert torch.allclose(fast[start:end], own, atol=3e-2), (i, (fast[start:end] - own).abs().max())


@pytest.mark.parametrize("model_name", ["vitt", "timm:vit_small_patch16_dinov3"])
def test_a_packed_batch_predicts_what_the_padded_batch_predicts(model_name: str) -> None:
    """The whole model, a dCTS batch of different token counts (DINOv3: rotary angles packed too)."""
    import tokenscope as ts
    from tokenscope.jobs.bench import bench_images
    from tokenscope.models.step_vit import StepViT

    model = ts.load_model(model_name, random_init=True, device="cpu", method="dcts")
    x = bench_images(128, 3, None)
    real = StepViT._packing
    with torch.no_grad():
        packed = model.module(x, setting=model.setting)
        StepViT._packing = lambda self, seq: None  # type: ignore[method-assign]
        try:
            padded = model.module(x, setting=model.setting)
        finally:
            StepViT._packing = real  # type: ignore[method-assign]
    assert len({p.num_tokens for p in packed.partitions}) > 1
    assert torch.allclose(packed.patch_logits, padded.patch_logits, atol=1e-4), \
        (packed.patch_logits - padded.patch_logits).abs().max()


def test_packing_reads_nothing_from_the_device() -> None:
    """A padded dCTS batch (two different scenes) synchronises as often as an unpadded one: the policy's
    partition copy and its token counts, nothing per packed block."""
    import tokenscope as ts
    from tokenscope.jobs.bench import bench_images
    from tokenscope.models.host_sync import count_host_syncs

    model = ts.load_model("vitt", random_init=True, device="cpu", method="dcts")
    x = bench_images(128, 2, None)
    with torch.no_grad(), count_host_syncs("cpu") as count:
        out = model.module(x, setting=model.setting)
    assert len({p.num_tokens for p in out.partitions}) == 2  # padded: the blocks ran packed
    assert count.total == 2, count.calls
