"""EViT through the method interface, checked decision for decision against an independent
re-implementation of the reference's rule (youweiliang/evit, `evit.py`), written from its
semantics on a plain timm ViT: which tokens stay at every stage, in which order, and the fused token."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenscope.data.images import prepare_image
from conftest import blocky_image
from test_reference_methods import _images
from tokenscope.errors import ConfigError
from tokenscope.jobs.setup import ModelOptions, method_setting
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import StepViT, create_backbone
from tokenscope.models.steps import PruneDecision
from tokenscope.trace.capture import TraceCapture


def _pair(seed: int = 0, decoder: str = "linear") -> tuple[StepViT, torch.nn.Module, LoadedModel]:
    cfg = StepConfig(name="evit-test", arch="vit_small_patch16_224", num_classes=4, exit_after=(4, 8), img_size=224,
                     decoder=decoder, decoder_layers=1, timm_kwargs={"depth": 12, "embed_dim": 48, "num_heads": 3})
    torch.manual_seed(seed)
    vit = create_backbone(cfg)
    with torch.no_grad():  # livelier attention than timm's init, so the class token prefers some tokens clearly
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(6.0)
    model = StepViT(cfg, vit).double().eval()
    loaded = LoadedModel(model, cfg, {"backbone": True, "decoder": True, "exits": True, "policy": True}, "test", "test")
    return model, vit.double().eval(), loaded


def reference_evit(vit: torch.nn.Module, images: torch.Tensor, blocks: tuple[int, ...], rate: float, fuse: bool = True
                   ) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """EViT's rule on one batch of equal-sized images: per stage, the patch ids that stay (in the
    order the sorted top-k leaves them) for every image, and the fused token of that stage.

    Sequence: class token, fused tokens of earlier stages, image tokens. Attention is written out
    in full (softmax of q k^T * scale); the class token's row, averaged over heads, ranks the image
    tokens; the top ceil(rate * n) stay; the rest are summed weighted by that attention."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    b, n1, d = x.shape
    cls, extras, tokens = x[:, :1], x[:, 1:1], x[:, 1:]
    ids = torch.arange(n1 - 1).expand(b, -1)
    kept_per_stage, fused_per_stage = [], []
    for k, blk in enumerate(vit.blocks, start=1):
        seq = torch.cat([cls, extras, tokens], dim=1)
        attn_mod = blk.attn
        h = blk.norm1(seq)
        qkv = attn_mod.qkv(h).reshape(b, seq.shape[1], 3, attn_mod.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, kk, v = qkv.unbind(0)
        weights = ((q * attn_mod.scale) @ kk.transpose(-2, -1)).softmax(dim=-1)
        out = attn_mod.proj((weights @ v).transpose(1, 2).reshape(b, seq.shape[1], -1))
        seq = seq + blk.ls1(out)
        e = extras.shape[1]
        cls, extras, tokens = seq[:, :1], seq[:, 1:1 + e], seq[:, 1 + e:]
        if k in blocks:
            cls_attn = weights[:, :, 0, 1 + e:].mean(dim=1)
            left = math.ceil(rate * tokens.shape[1])
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            rest = torch.stack([torch.tensor(sorted(set(range(tokens.shape[1])) - set(row.tolist()))) for row in idx])
            fused = (tokens.gather(1, rest[..., None].expand(-1, -1, d))
                     * cls_attn.gather(1, rest)[..., None]).sum(dim=1, keepdim=True)
            tokens = tokens.gather(1, idx[..., None].expand(-1, -1, d))
            ids = ids.gather(1, idx)
            if fuse:
                extras = torch.cat([extras, fused], dim=1)
            kept_per_stage.append(ids.tolist())
            fused_per_stage.append(fused)
        seq = torch.cat([cls, extras, tokens], dim=1)
        seq = seq + blk.ls2(blk.mlp(blk.norm2(seq)))
        e = extras.shape[1]
        cls, extras, tokens = seq[:, :1], seq[:, 1:1 + e], seq[:, 1 + e:]
    return [[stage[i] for stage in kept_per_stage] for i in range(b)], fused_per_stage


def _ours(model: StepViT, setting, images: torch.Tensor) -> tuple[list[list[list[int]]], list[torch.Tensor], list[int]]:  # noqa: ANN001
    """tokenscope's EViT decisions, read from the steps' outputs by forward hooks."""
    decisions: list[PruneDecision] = []
    handles = [s.module.register_forward_hook(lambda mod, args, out: decisions.append(out)) for s in setting.steps]
    try:
        with torch.no_grad():
            model(images, setting=setting)
    finally:
        for h in handles:
            h.remove()
    kept = []
    for i in range(images.shape[0]):
        per_stage = []
        for dec in decisions:
            stay = dec.valid[i] & ~dec.pruned[i]
            order = torch.argsort(torch.where(stay, dec.order[i], dec.order.new_full((), 10**9)))[: int(stay.sum())]
            per_stage.append(dec.token_ids[i][order].tolist())
        kept.append(per_stage)
    return kept, [d.fused for d in decisions], [d.block for d in decisions]


@pytest.mark.parametrize("rate", [0.7, 0.5])
def test_evit_keeps_the_tokens_and_fuses_the_token_the_reference_rule_does(rate: float) -> None:
    model, vit, loaded = _pair()
    images = _images(2)
    setting = method_setting(loaded, ModelOptions(device="cpu"), f"evit:rate={rate}")
    assert [s.block for s in setting.steps] == [4, 7, 10]  # the reference's drop_loc 3, 6, 9 of 12
    ours, fused, blocks = _ours(model, setting, images)
    with torch.no_grad():
        ref, ref_fused = reference_evit(vit, (images - model.pixel_mean) / model.pixel_std, (4, 7, 10), rate)
    assert blocks == [4, 7, 10]
    for image in range(2):
        assert ours[image] == ref[image], f"image {image}"
    assert [len(s) for s in ours[0]] == [math.ceil(rate * 196), math.ceil(rate * math.ceil(rate * 196)),
                                         math.ceil(rate * math.ceil(rate * math.ceil(rate * 196)))]
    for a, b in zip(fused, ref_fused):
        assert torch.allclose(a, b, atol=1e-9)


def test_evit_without_fusing_prunes_the_same_first_stage_and_adds_no_token() -> None:
    model, vit, loaded = _pair(seed=1)
    images = _images(2, seed=3)
    loaded.setting = method_setting(loaded, ModelOptions(device="cpu"), "evit:rate=0.6:fuse=off:blocks=3-6")
    ours, fused, blocks = _ours(model, loaded.setting, images)
    with torch.no_grad():
        ref, _ = reference_evit(vit, (images - model.pixel_mean) / model.pixel_std, (3, 6), 0.6, fuse=False)
    assert blocks == [3, 6] and all(f is None for f in fused)
    assert ours == ref


@pytest.mark.parametrize("method", ["evit", "step+evit", "dtop+evit", "evit:rate=0.3:blocks=2"])
def test_evit_traces_account_for_every_patch_and_prune_really_drops_tokens(method: str) -> None:
    model, _, loaded = _pair(decoder="mask" if method == "dtop+evit" else "linear")
    loaded.setting = method_setting(loaded, ModelOptions(device="cpu", exit_threshold=0.3, policy="uniform"), method)
    capture = TraceCapture(loaded, torch.device("cpu"))
    img, _ = blocky_image(160, 224, 7)
    trace = capture([prepare_image(img, "scene")])[0]
    trace.assert_consistent()  # every patch in one token; every token exits once; counts agree with the hooks
    pruned = trace.token_pruned_at > 0
    assert pruned.any()
    assert np.array_equal(trace.token_exit_block[pruned], trace.token_pruned_at[pruned])
    first = min(trace.meta.pruning["inside"])
    assert trace.block_tokens_mid[first - 1] < trace.block_tokens_in[first - 1]  # fewer tokens reach the MLP
    assert trace.block_tokens_in[first] <= trace.block_tokens_mid[first - 1]  # pruned tokens skip the later blocks
    assert trace.meta.flops["total"] < trace.meta.flops["baseline_total"]
    assert trace.meta.method == method and trace.meta.pruning["kind"] == "evit"


def test_evit_settings_are_checked_in_one_line() -> None:
    _, _, loaded = _pair()
    for bad, words in (("evit:rate=0", "keep rate"), ("evit:rate=1.5", "keep rate"), ("evit:blocks=0-4", "outside"),
                       ("evit:blocks=x", "list of blocks"), ("evit:keep=3", "unknown setting")):
        with pytest.raises(ConfigError, match=words) as err:
            loaded.setting = method_setting(loaded, ModelOptions(device="cpu"), bad)
        assert "\n" not in str(err.value)


def test_pruned_tokens_are_counted_where_they_were_pruned_not_at_a_gate() -> None:
    from tokenscope.analysis.stats import exit_level_matrix

    model, _, loaded = _pair()
    loaded.setting = method_setting(loaded, ModelOptions(device="cpu", policy="uniform"), "evit:rate=0.5")
    img, _ = blocky_image(160, 224, 3)
    trace = TraceCapture(loaded, torch.device("cpu"))([prepare_image(img, "scene")])[0]
    labels, mat = exit_level_matrix(trace)
    assert labels == ["pruned\n4", "pruned\n7", "pruned\n10", "end"]  # exits are off: no gate points
    assert mat.sum() == trace.survivors.sum()
    assert list(mat.sum(axis=1)[:3]) == [int((trace.token_pruned_at == b).sum()) for b in (4, 7, 10)]
