"""The STEP encoder: equivalence with plain timm, real token dropping, supertoken embedding."""

from __future__ import annotations

import numpy as np
import timm
import torch
import torch.nn.functional as F

from conftest import TINY, blocky_image, make_tiny, setting
from tokenscope.models.partition import grid_partition, partition_from_merges
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import StepViT
from tokenscope.trace.recorder import Recorder


def _timm_twin(model: StepViT, cfg: StepConfig) -> torch.nn.Module:
    """The same weights in an untouched timm VisionTransformer."""
    vit = timm.create_model(cfg.arch, pretrained=False, num_classes=0, img_size=cfg.img_size,
                            dynamic_img_size=True, **cfg.timm_kwargs).eval()
    sd = model.state_dict()
    mapped = {}
    for k in vit.state_dict():
        if k.startswith("patch_embed."):
            mapped[k] = sd["embed." + k]
        elif k == "pos_embed":
            mapped[k] = sd["embed.pos_embed"]
        else:
            mapped[k] = sd[k]
    vit.load_state_dict(mapped)
    return vit


def test_no_policy_no_exits_equals_plain_timm_vit() -> None:
    for cfg in (TINY, StepConfig(**{**TINY.to_dict(), "timm_kwargs": {**TINY.timm_kwargs, "reg_tokens": 2,
                                                                       "no_embed_class": True}})):
        model = make_tiny(1, cfg)
        vit = _timm_twin(model, cfg)
        x = torch.rand(2, 3, 80, 112, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(x, setting=setting(model, policy="none", exits=False))
            feats = vit.forward_features((x - model.pixel_mean) / model.pixel_std)[:, vit.num_prefix_tokens:]
            ref = model.decoder(feats)
        assert out.token_logits.shape == ref.shape
        assert (out.token_logits - ref).abs().max().item() < 1e-4


def test_hooks_do_not_change_outputs(tiny_model: StepViT) -> None:
    s = setting(tiny_model, policy="uniform", exits=True, exit_threshold=0.3)
    x = torch.from_numpy(blocky_image()[0].transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        plain = tiny_model(x, setting=s)
        with Recorder(tiny_model, s) as rec:
            hooked = tiny_model(x, setting=s)
        assert rec.pop_records()
        after = tiny_model(x, setting=s)
    for a, b in ((plain, hooked), (plain, after)):
        assert torch.equal(a.patch_logits, b.patch_logits)
        assert torch.equal(a.exit_block, b.exit_block)


def test_exited_tokens_skip_later_blocks(tiny_model: StepViT) -> None:
    """The block after a gate really receives fewer tokens (shape seen by the block itself)."""
    s = setting(tiny_model, policy="none", exits=True, exit_threshold=0.0)  # everything confident enough
    seen: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in tiny_model.blocks]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = tiny_model(x, setting=s)
    for h in handles:
        h.remove()
    assert seen == [16 + 1]  # only block 1 ran: all 16 tokens left at the gate after it
    assert torch.all(out.exit_block[0] == 1)
    s = setting(tiny_model, s, exit_threshold=0.5)
    seen.clear()
    handles = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for b in tiny_model.blocks]
    with torch.no_grad():
        out = tiny_model(x, setting=s)
    for h in handles:
        h.remove()
    n_exit_1 = int((out.exit_block[0] == 1).sum())
    assert seen[1] == seen[0] - n_exit_1


def test_exited_tokens_keep_their_gate_prediction(tiny_model: StepViT) -> None:
    s = setting(tiny_model, policy="none", exits=True, exit_threshold=0.0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = tiny_model(x, setting=s)
        gate = tiny_model.gates["1"]
        # recompute the gate's logits from block 1's output with a hook-free pass
        feats = {}
        h = tiny_model.blocks[0].register_forward_hook(lambda m, a, o: feats.setdefault("x", o))
        tiny_model(x, setting=setting(tiny_model, s, exits=False))
        h.remove()
    expect = gate.classify(feats["x"][:, 1:])
    assert torch.allclose(out.token_logits, expect, atol=1e-5)


def test_batch_with_different_token_counts_matches_one_at_a_time(tiny_model: StepViT) -> None:
    s = setting(tiny_model, policy="uniform", exits=True, exit_threshold=0.4)
    a = torch.from_numpy(blocky_image(96, 128, 0)[0].transpose(2, 0, 1).copy())
    b = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = tiny_model(torch.stack([a, b]), setting=s)
        one = [tiny_model(t[None], setting=s) for t in (a, b)]
    assert both.partitions[0].num_tokens != both.partitions[1].num_tokens
    for i, o in enumerate(one):
        t = o.partitions[0].num_tokens
        assert torch.allclose(both.patch_logits[i], o.patch_logits[0], atol=1e-4)
        assert torch.equal(both.exit_block[i, :t], o.exit_block[0])


def test_supertoken_is_the_area_resized_block_through_the_patch_embedding(tiny_model: StepViT) -> None:
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    grid = (4, 4)
    merged = [np.zeros((2, 2), bool), np.ones((1, 1), bool), np.zeros((0, 0), bool), np.zeros((0, 0), bool)]
    part = partition_from_merges(grid, merged)
    emb, _ = tiny_model.embed(x, [part])
    block = F.interpolate(x, size=(16, 16), mode="area")
    pe = tiny_model.embed.patch_embed
    expect = pe.proj(block).flatten(2).transpose(1, 2)[0, 0]
    pos_grid, _ = tiny_model.embed.patch_pos_grid(grid)
    expect = expect + pos_grid.reshape(pos_grid.shape[0], -1).mean(dim=1)
    assert emb.tokens.shape[1] == 1
    assert torch.allclose(emb.tokens[0, 0], expect, atol=1e-5)
    ref, _ = tiny_model.embed(x, [grid_partition(grid)])
    assert ref.tokens.shape[1] == 16
