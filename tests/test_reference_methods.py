"""Methods named after a paper decide as its public code does: ToMe and ALGM merge for merge in
every merging block, CTS group for group and token for token.

The references here are written for this test from the public code's semantics (read, not
copied): facebookresearch/ToMe (`tome/merge.py`, `tome/patch/timm.py`), tue-mps/algm-segmenter
(`algm/algm/local_merge.py`, `global_merge.py`, `patch/algm_segmenter_patch.py`) and
tue-mps/cts-segmenter (`segm/model/efficient.py`, `segm/model/vit.py`). The merging ones run the
same timm blocks one image sequence at a time with plain Python bookkeeping (which patches each
token holds), so they share no code with tokenscope's batched, padded implementation. Both run
in float64 so that a near-tie between similarities cannot flip one side and not the other.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import blocky_image, merging, setting

from tokenscope.models.methods.cts import CTSPolicy
from tokenscope.models.methods.merging import MergingSpec
from tokenscope.models.policy import Policy
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import ReductionSetting, StepViT, create_backbone
from tokenscope.trace.recorder import Recorder

Groups = set[frozenset[int]]


# ---- the models: one timm ViT, driven by tokenscope and by the references --------------------------

def _pair(arch: str, seed: int = 0, decoder: str = "linear", **timm_kwargs: object) -> tuple[StepViT, torch.nn.Module]:
    cfg = StepConfig(name="ref", arch=arch, num_classes=4, exit_after=(), img_size=224, decoder=decoder,
                     decoder_layers=1, timm_kwargs={"depth": 12, "embed_dim": 48, "num_heads": 3, **timm_kwargs})
    torch.manual_seed(seed)
    vit = create_backbone(cfg)
    with torch.no_grad():  # livelier random weights than timm's init, so tokens differ clearly
        for blk in vit.blocks:
            blk.attn.qkv.weight.mul_(8.0)
            blk.mlp.fc1.weight.mul_(4.0)
    model = StepViT(cfg, vit).double().eval()
    return model, vit.double().eval()


def _method_setting(model: StepViT, point: str) -> ReductionSetting:
    """The operating point `point` on `model` (every part counted as trained), resolved as a command does."""
    from tokenscope.jobs.setup import ModelOptions, method_setting
    from tokenscope.models.checkpoints import LoadedModel

    loaded = LoadedModel(model, model.cfg, {"backbone": True, "decoder": True, "exits": True, "policy": True}, "t", "t")
    return method_setting(loaded, ModelOptions(device="cpu"), point)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    out = []
    for s in range(n):
        img, _ = blocky_image(224, 224, seed + s)
        rng = np.random.default_rng(seed + s)
        out.append(np.clip(img + 0.1 * rng.standard_normal(img.shape), 0, 1).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).double()


def _groups_by_block(model: StepViT, s: ReductionSetting, images: torch.Tensor) -> list[list[Groups]]:
    """tokenscope's merge groups after each block, per image, from what its hooks recorded."""
    with torch.no_grad(), Recorder(model, s) as rec:
        model(images, setting=s)
    out = []
    for r in rec.pop_records():
        per_block = []
        for block in range(1, model.depth + 1):
            owner = np.arange(len(r.merged_at))
            done = (r.merged_at > 0) & (r.merged_at <= block)
            owner[done] = r.merged_into[done]
            for _ in range(model.depth):  # follow chains: a group merged into a later group
                owner = owner[owner]
            members: dict[int, set[int]] = {}
            for patch, token in enumerate(r.partition.token_of_patch.ravel()):
                members.setdefault(int(owner[token]), set()).add(patch)
            per_block.append({frozenset(m) for m in members.values()})
        out.append(per_block)
    return out


# ---- the references --------------------------------------------------------------------------------

@dataclasses.dataclass
class Sequence:
    """One image's tokens in the reference's order: features, sizes, and the patches each holds
    (None for prefix tokens)."""

    x: torch.Tensor
    size: torch.Tensor
    members: list[frozenset[int] | None]

    def groups(self) -> Groups:
        return {m for m in self.members if m is not None}


def _start(vit: torch.nn.Module, images: torch.Tensor) -> list[Sequence]:
    """timm's own embedding: patch embedding, prefix tokens, position embedding."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    p = vit.num_prefix_tokens
    n = x.shape[1] - p
    return [Sequence(x[i], torch.ones(x.shape[1], dtype=x.dtype), [None] * p + [frozenset([j]) for j in range(n)])
            for i in range(x.shape[0])]


def _attention(attn: torch.nn.Module, h: torch.Tensor, size: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, with ToMe's proportional attention (log size added to the logits)
    when `size` is given; returns the output and the keys averaged over heads."""
    t, c = h.shape
    q, k, v = attn.qkv(h).reshape(t, 3, attn.num_heads, c // attn.num_heads).permute(1, 2, 0, 3)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[None, None, :]
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(t, c)
    return attn.proj(out), k.mean(0)


def _merge_into(seq: Sequence, pairs: list[tuple[int, int]]) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """Size-weighted sums of sources into their destinations; returns per position the new
    feature, size and members (sources keep their old values: callers drop them)."""
    x = [seq.x[i] * seq.size[i] for i in range(len(seq.members))]
    size = [seq.size[i].clone() for i in range(len(seq.members))]
    members = list(seq.members)
    for src, dst in pairs:
        x[dst] = x[dst] + seq.x[src] * seq.size[src]
        size[dst] = size[dst] + seq.size[src]
        members[dst] = members[dst] | members[src]
    return [xi / si for xi, si in zip(x, size)], size, members


def _best_matches(metric: torch.Tensor, protect_first_a: bool, protect_first_b: bool
                  ) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor]:
    """Bipartite matching's A (even positions) and B (odd positions), each A's best similarity and
    its best B (cosine), with the class token (first A) and distillation token (first B) barred."""
    a_pos, b_pos = list(range(0, len(metric), 2)), list(range(1, len(metric), 2))
    unit = F.normalize(metric, dim=-1)
    sim = unit[a_pos] @ unit[b_pos].T
    if protect_first_a:
        sim[0, :] = -float("inf")
    if protect_first_b:
        sim[:, 0] = -float("inf")
    best, best_b = sim.max(dim=-1)
    return a_pos, b_pos, best, best_b


def _rematch(seq: Sequence, a_pos: list[int], b_pos: list[int], best_b: torch.Tensor, merging: list[int],
             keep: list[int], distill: bool) -> Sequence:
    """Merge A tokens `merging` (indices into A) into their best B; the sequence becomes the kept
    A tokens in `keep`'s order, then B (with a distillation token: A0, B0, other A, other B)."""
    x, size, members = _merge_into(seq, [(a_pos[a], b_pos[int(best_b[a])]) for a in merging])
    kept = [a_pos[a] for a in keep]
    order = [kept[0], b_pos[0], *kept[1:], *b_pos[1:]] if distill else [*kept, *b_pos]
    return Sequence(torch.stack([x[i] for i in order]), torch.stack([size[i] for i in order]),
                    [members[i] for i in order])


def reference_tome(vit: torch.nn.Module, images: torch.Tensor, r: int, prop_attn: bool = True) -> list[list[Groups]]:
    """ToMe on a timm ViT: in every block, between attention and MLP, the r best-matched A tokens
    (keys averaged over heads, cosine) merge into their best B token, r capped at half the
    unprotected tokens; unmerged A stay in index order when there is a class token, by descending
    similarity otherwise; sizes weight the average and (prop_attn) the attention."""
    cls_token = vit.cls_token is not None
    distill = getattr(vit, "dist_token", None) is not None
    out = []
    for seq in _start(vit, images):
        per_block = []
        for blk in vit.blocks:
            attn_out, keys = _attention(blk.attn, blk.norm1(seq.x), seq.size if prop_attn else None)
            seq = Sequence(seq.x + blk.ls1(attn_out), seq.size, seq.members)
            rr = min(r, (len(seq.members) - int(cls_token) - int(distill)) // 2)
            if rr > 0:
                a_pos, b_pos, best, best_b = _best_matches(keys, cls_token, distill)
                ranked = torch.argsort(best, descending=True).tolist()
                keep = sorted(ranked[rr:]) if cls_token else ranked[rr:]
                seq = _rematch(seq, a_pos, b_pos, best_b, ranked[:rr], keep, distill)
            seq = Sequence(seq.x + blk.ls2(blk.mlp(blk.norm2(seq.x))), seq.size, seq.members)
            per_block.append(seq.groups())
        out.append(per_block)
    return out


def _window_similarity(feat: torch.Tensor, grid: int) -> tuple[list[list[int]], torch.Tensor]:
    """ALGM's 2x2 windows (patch indices, row-major inside the window) and each window's mean
    cosine similarity over its 12 ordered pairs of distinct tokens."""
    windows, sims = [], []
    for wi in range(grid // 2):
        for wj in range(grid // 2):
            idx = [(2 * wi + di) * grid + 2 * wj + dj for di in (0, 1) for dj in (0, 1)]
            unit = F.normalize(feat[idx], dim=-1)
            gram = unit @ unit.T
            sims.append((gram.sum() - gram.diagonal().sum()) / 12)
            windows.append(idx)
    return windows, torch.stack(sims)


def reference_algm(vit: torch.nn.Module, images: torch.Tensor, threshold: float, blocks: tuple[int, int] = (1, 5)
                   ) -> list[list[Groups]]:
    """ALGM on a Segmenter-style ViT (one class token), for a batch as its code runs one: in the
    first block (after attention, tokens as metric) the windows whose similarity reaches the
    threshold, as many per image as the image with fewest, the most similar first, merge into one
    token each; the sequence becomes class token, merged windows, the rest in index order. In
    the second block, bipartite matching on the tokens; its threshold is the batch's mean of the
    images' mean best similarity plus their mean std divided by the block number (class token
    left out), and every image merges its best as many as the image with fewest at or above it;
    unmerged A in index order, then B. No proportional attention."""
    seqs = _start(vit, images)
    grid = int(round((len(seqs[0].members) - 1) ** 0.5))
    per_image: list[list[Groups]] = [[] for _ in seqs]
    for k, blk in enumerate(vit.blocks, start=1):
        for i, seq in enumerate(seqs):
            attn_out, _ = _attention(blk.attn, blk.norm1(seq.x), None)
            seqs[i] = Sequence(seq.x + blk.ls1(attn_out), seq.size, seq.members)
        if k == blocks[0]:
            found = [_window_similarity(s.x[1:], grid) for s in seqs]
            r = min(int((sims >= threshold).sum()) for _, sims in found)
            for i, (seq, (windows, sims)) in enumerate(zip(seqs, found)):
                top = torch.argsort(sims, descending=True).tolist()[:r]
                pairs = [(1 + w[j], 1 + w[3]) for t in top for w in [windows[t]] for j in range(3)]
                x, size, members = _merge_into(seq, pairs)
                merged = [1 + windows[t][3] for t in top]
                gone = {src for src, _ in pairs} | set(merged)
                order = [0, *merged, *[j for j in range(1, len(members)) if j not in gone]]
                seqs[i] = Sequence(torch.stack([x[j] for j in order]), torch.stack([size[j] for j in order]),
                                   [members[j] for j in order])
        elif k == blocks[1]:
            matched = [_best_matches(s.x, True, False) for s in seqs]
            mean = np.mean([float(best[1:].mean()) for _, _, best, _ in matched])
            std = np.mean([float(best[1:].std()) for _, _, best, _ in matched])
            cut = mean + std / k
            r = min(int((best >= cut).sum()) for _, _, best, _ in matched)
            for i, (seq, (a_pos, b_pos, best, best_b)) in enumerate(zip(seqs, matched)):
                ranked = torch.argsort(best, descending=True).tolist()
                seqs[i] = _rematch(seq, a_pos, b_pos, best_b, ranked[:r], sorted(ranked[r:]), False)
        for i, seq in enumerate(seqs):
            seqs[i] = Sequence(seq.x + blk.ls2(blk.mlp(blk.norm2(seq.x))), seq.size, seq.members)
            per_image[i].append(seqs[i].groups())
    return per_image


def _merged_count(groups: Groups) -> int:
    return sum(len(g) - 1 for g in groups)


# ---- the tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 8, 20])
def test_tome_merge_groups_equal_the_reference_in_every_block(r: int) -> None:
    model, vit = _pair("vit_small_patch16_224")
    images = _images(2)
    s = merging(setting(model, policy="none", exits=False), MergingSpec("tome", tuple(range(1, 13)), r=r))
    ours = _groups_by_block(model, s, images)
    with torch.no_grad():
        ref = reference_tome(vit, (images - model.pixel_mean) / model.pixel_std, r)
    for image in range(2):
        assert _merged_count(ref[image][0]) == r
        for block in range(12):
            assert ours[image][block] == ref[image][block], f"image {image}, block {block + 1}"
    if r == 20:  # the cap of half the tokens was reached, so the run covered it
        assert _merged_count(ref[0][-1]) < 12 * r


def _assert_tome_equals_reference(model: StepViT, vit: torch.nn.Module, images: torch.Tensor) -> None:
    """Every block's merge groups of every image, for r = 1, 8, 20."""
    for r in (1, 8, 20):
        s = merging(setting(model, policy="none", exits=False), MergingSpec("tome", tuple(range(1, 13)), r=r))
        ours = _groups_by_block(model, s, images)
        with torch.no_grad():
            ref = reference_tome(vit, (images - model.pixel_mean) / model.pixel_std, r)
        assert ours == ref, f"r={r}"


def test_tome_with_a_distillation_token_equals_the_reference() -> None:
    model, vit = _pair("deit_small_distilled_patch16_224")
    assert model.num_prefix_tokens == 2 and model.dist_token is not None
    _assert_tome_equals_reference(model, vit, _images(2, seed=3))


def test_tome_without_a_class_token_orders_unmerged_tokens_by_similarity_as_the_reference() -> None:
    model, vit = _pair("vit_small_patch16_224", class_token=False, global_pool="avg")
    assert model.num_prefix_tokens == 0
    _assert_tome_equals_reference(model, vit, _images(2, seed=1))


def test_tome_order_spatial_is_tokenscopes_earlier_rule_and_decides_otherwise() -> None:
    """order=spatial: A is every other patch token counted from the first patch and tokens keep
    their raster order: a different rule from the reference's from the first block on."""
    model, vit = _pair("vit_small_patch16_224")
    images = _images(1)
    s = merging(setting(model, policy="none", exits=False), MergingSpec("tome", tuple(range(1, 13)), r=8, order="spatial"))
    spatial = _groups_by_block(model, s, images)[0]
    with torch.no_grad():
        ref = reference_tome(vit, (images - model.pixel_mean) / model.pixel_std, 8)[0]
    pairs_spatial = [g for g in spatial[0] if len(g) > 1]
    pairs_ref = [g for g in ref[0] if len(g) > 1]
    assert _merged_count(spatial[0]) == _merged_count(ref[0]) == 8
    assert all(sum(p % 2 for p in g) == 1 for g in pairs_spatial)  # one odd patch (B), the rest even (A)
    assert all(sum(1 - p % 2 for p in g) == 1 for g in pairs_ref)  # behind a class token B is the even patches
    assert spatial[0] != ref[0]


def test_algm_local_windows_and_global_merges_equal_the_reference_on_a_segmenter_model() -> None:
    model, vit = _pair("vit_small_patch16_224", seed=1, decoder="mask")
    images = _images(2, seed=5)
    with torch.no_grad():  # a threshold that merges some windows of each image, and not the same number
        feats = vit.blocks[0]
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed((images - model.pixel_mean) / model.pixel_std)))
        x = x + feats.ls1(feats.attn(feats.norm1(x)))
        sims = [_window_similarity(x[i, 1:], 14)[1] for i in range(2)]
    threshold = float(sims[0].median())
    counts = [int((s >= threshold).sum()) for s in sims]
    assert counts[0] != counts[1] and 0 < min(counts) < 49
    s = merging(setting(model, policy="none", exits=False), MergingSpec("algm", (1, 5), threshold=threshold, prop_attn=False))
    ours = _groups_by_block(model, s, images)
    with torch.no_grad():
        ref = reference_algm(vit, (images - model.pixel_mean) / model.pixel_std, threshold)
    for image in range(2):
        assert _merged_count(ref[image][0]) == 3 * min(counts)  # one count for the batch
        assert _merged_count(ref[image][4]) > _merged_count(ref[image][3])  # the global merging did merge
        assert ours[image] == ref[image]


def test_algm_count_per_image_lets_each_image_decide_alone() -> None:
    model, vit = _pair("vit_small_patch16_224", seed=1, decoder="mask")
    images = _images(2, seed=5)
    s = merging(setting(model, policy="none", exits=False), MergingSpec("algm", (1, 5), threshold=0.5, prop_attn=False, count="per-image"))
    together = _groups_by_block(model, s, images)
    alone = [_groups_by_block(model, s, images[i:i + 1])[0] for i in range(2)]
    assert together == alone
    with torch.no_grad():
        ref = [reference_algm(vit, (images[i:i + 1] - model.pixel_mean) / model.pixel_std, 0.5)[0] for i in range(2)]
    assert together == ref


# ---- CTS: which 2x2 groups share a token, and what that token is -----------------------------------

class _FixedScores(Policy):
    """A score source that returns a given level-1 map: CTS's policy-net output, fixed."""

    name = "fixed"

    def __init__(self, level1: torch.Tensor) -> None:
        super().__init__(patch=16)
        self.level1 = level1

    def score(self, images: torch.Tensor, labels: torch.Tensor | None) -> list[torch.Tensor]:
        return [self.level1]


def reference_cts_tokens(model: StepViT, normed: torch.Tensor, scores: torch.Tensor, k: int
                         ) -> list[dict[tuple[int, int, int], torch.Tensor]]:
    """CTS as its public code embeds an image: the k best-scored 2x2 groups (descending) are cut
    from the image downsampled 2x (bilinear, align_corners=False) and position embeddings
    downsampled the same way; every other patch at full scale. Keyed by (level, row, col)."""
    proj = model.embed.patch_embed.proj
    grid = normed.shape[-2] // 16, normed.shape[-1] // 16
    p = model.num_prefix_tokens
    pos = model.embed.pos_embed[0, p:].reshape(*grid, -1).permute(2, 0, 1)[None]
    half = F.interpolate(normed, scale_factor=0.5, mode="bilinear", align_corners=False)
    pos_half = F.interpolate(pos, scale_factor=0.5, mode="bilinear", align_corners=False)[0]
    out = []
    for b in range(normed.shape[0]):
        flat = scores[b].reshape(-1)
        chosen = {divmod(int(i), scores.shape[-1]) for i in torch.argsort(flat, descending=True)[:k]}
        tokens = {}
        for i in range(grid[0]):
            for j in range(grid[1]):
                if (i // 2, j // 2) in chosen:
                    continue
                cut = normed[b:b + 1, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
                tokens[(0, i, j)] = proj(cut).flatten() + pos[0, :, i, j]
        for gi, gj in chosen:
            cut = half[b:b + 1, :, 16 * gi:16 * gi + 16, 16 * gj:16 * gj + 16]
            tokens[(1, 2 * gi, 2 * gj)] = proj(cut).flatten() + pos_half[:, gi, gj]
        out.append(tokens)
    return out


@pytest.mark.parametrize("k", [0, 5, 16])
def test_cts_shares_the_groups_its_reference_shares_and_embeds_them_the_same_way(k: int) -> None:
    cfg = StepConfig(name="cts", arch="vit_tiny_patch16_224", num_classes=4, exit_after=(), img_size=128,
                     timm_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})
    torch.manual_seed(0)
    model = StepViT(cfg).eval()
    scores = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(k))
    cts = CTSPolicy({"uniform": _FixedScores(scores)}, patch=16, groups=k, source="uniform")
    s = setting(model, policy="cts", exits=False, policies=(("cts", cts),))
    images = _images(2).float()[:, :, :128, :128]
    seen = []
    handle = model.embed.register_forward_hook(lambda mod, args, out: seen.append((args[1], out[0])))
    with torch.no_grad():
        model(images, setting=s)
        ref = reference_cts_tokens(model, (images - model.pixel_mean) / model.pixel_std, scores, k)
    handle.remove()
    partitions, emb = seen[0]
    for b in range(2):
        part = partitions[b]
        ours = {(int(lv), int(r), int(c)): emb.tokens[b, t] for t, (lv, r, c) in enumerate(zip(part.level, part.row, part.col))}
        assert set(ours) == set(ref[b])
        assert sum(1 for key in ours if key[0] == 1) == k
        for key, vec in ref[b].items():
            assert torch.allclose(ours[key], vec, atol=1e-5), key


# ---- PiToMe ---------------------------------------------------------------------------------------------

def reference_pitome(vit: torch.nn.Module, images: torch.Tensor, ratio: float) -> list[list[Groups]]:
    """PiToMe on a timm ViT with a class token, written from the public rule: in block l (from 0) of L
    the margin is 0.9 - 0.8 l / L; the image tokens' energy is the mean of ELU(cos - margin) over the image
    tokens (keys averaged over heads); r = floor(T - T ratio); in energy order the first 2r alternate A, B,
    each A merges (size-weighted) into its most similar B; the sequence becomes class, protected (energy
    order), B (energy order); proportional attention."""
    out = []
    depth = len(vit.blocks)
    for seq in _start(vit, images):
        per_block = []
        for l, blk in enumerate(vit.blocks):
            attn_out, keys = _attention(blk.attn, blk.norm1(seq.x), seq.size)
            seq = Sequence(seq.x + blk.ls1(attn_out), seq.size, seq.members)
            t = len(seq.members) - 1
            r = math.floor(t - t * ratio)
            if r > 0:
                unit = F.normalize(keys[1:], dim=-1)
                sim = unit @ unit.T
                energy = F.elu(sim - (0.9 - 0.8 * l / depth), alpha=1.0).mean(dim=-1)
                order = torch.argsort(energy, descending=True).tolist()
                a, b, protected = order[:2 * r:2], order[1:2 * r:2], order[2 * r:]
                best = sim[a][:, b].argmax(dim=-1).tolist()
                x, size, members = _merge_into(seq, [(1 + src, 1 + b[j]) for src, j in zip(a, best)])
                keep = [0, *(1 + p for p in protected), *(1 + p for p in b)]
                seq = Sequence(torch.stack([x[i] for i in keep]), torch.stack([size[i] for i in keep]),
                               [members[i] for i in keep])
            seq = Sequence(seq.x + blk.ls2(blk.mlp(blk.norm2(seq.x))), seq.size, seq.members)
            per_block.append(seq.groups())
        out.append(per_block)
    return out


@pytest.mark.parametrize("ratio", [0.95, 0.9])
def test_pitome_merges_the_groups_its_reference_rule_merges_in_every_block(ratio: float) -> None:
    model, vit = _pair("vit_small_patch16_224")
    images = _images(2)
    s = _method_setting(model, f"pitome:ratio={ratio}")
    assert s.size_weighted and [st.block for st in s.steps] == list(range(1, 13))
    ours = _groups_by_block(model, s, images)
    with torch.no_grad():
        ref = reference_pitome(vit, (images - model.pixel_mean) / model.pixel_std, ratio)
    for image in range(2):
        assert _merged_count(ref[image][0]) == math.floor(196 - 196 * ratio)
        for block in range(12):
            assert ours[image][block] == ref[image][block], f"image {image}, block {block + 1}"


# ---- Hourglass (Expedit) ------------------------------------------------------------------------------

def reference_hourglass(model: StepViT, vit: torch.nn.Module, images: torch.Tensor, at: int, clusters: tuple[int, int],
                        iters: int = 5, temp: float = 0.01, window: int = 5, k: int = 20) -> torch.Tensor:
    """Expedit's Hourglass on a timm ViT, written from the public rule (TokenClusteringBlock,
    TokenReconstructionBlock), one image at a time with explicit loops over centres: after block `at` the
    image tokens become `clusters` centres (start: adaptive average pool; then `iters` rounds where each
    patch weighs the centres within window // 2 cells of its nearest-neighbour starting cell by softmax of
    -temp x squared distance, and each centre becomes the weighted mean of the patches); the later blocks
    run on the class token and the centres; each patch is rebuilt from the final centres with the weights
    exp(-temp x squared distance) of its k nearest centres at clustering time, L2-normalised; the linear
    decoder labels every rebuilt patch. Returns (B, L, C) per-patch logits."""
    out = []
    ch, cw = clusters
    radius = window // 2
    for seq in _start(vit, images):
        x = seq.x
        for blk in vit.blocks[:at]:
            x = blk(x[None])[0]
        cls, feats = x[:1], x[1:]
        gh = gw = int(math.isqrt(feats.shape[0]))
        centres = F.adaptive_avg_pool2d(feats.T.reshape(1, -1, gh, gw), (ch, cw)).reshape(-1, ch * cw).T
        start = [(int(i * ch / gh), int(j * cw / gw)) for i in range(gh) for j in range(gw)]  # nearest neighbour
        cells = [(c // cw, c % cw) for c in range(ch * cw)]
        allowed = torch.tensor([[abs(si - ci) <= radius and abs(sj - cj) <= radius for (si, sj) in start]
                                for (ci, cj) in cells])
        for _ in range(iters):
            dist = torch.stack([((feats - centres[c]) ** 2).sum(-1) for c in range(ch * cw)])  # (L', L)
            affinity = torch.softmax(torch.where(allowed, -dist * temp, torch.full_like(dist, -float("inf"))), dim=0)
            centres = torch.stack([(affinity[c, :, None] * feats).sum(0) / affinity[c].sum() for c in range(ch * cw)])
        clustered = centres
        y = torch.cat([cls, centres])
        for blk in vit.blocks[at:]:
            y = blk(y[None])[0]
        final = model.norm(y)[1:]
        rebuilt = []
        for p in range(feats.shape[0]):
            weight = torch.exp(-temp * ((clustered - feats[p]) ** 2).sum(-1).clamp_min(0))
            top = torch.topk(weight, min(k, weight.numel())).indices
            w = torch.zeros_like(weight)
            w[top] = weight[top]
            rebuilt.append((w / w.norm()) @ final)
        out.append(model.decoder(torch.stack(rebuilt)[None]))
    return torch.cat(out)


@pytest.mark.parametrize("side,at", [(0.5, 4), (0.7, 6)])
def test_hourglass_clusters_and_rebuilds_as_its_reference_rule(side: float, at: int) -> None:
    model, vit = _pair("vit_small_patch16_224")
    images = _images(2)
    s = _method_setting(model, f"hourglass:side={side}:at={at}")
    assert [st.block for st in s.steps] == [at] and s.reconstruction is not None and not s.size_weighted
    with torch.no_grad(), Recorder(model, s) as rec:
        out = model(images, setting=s)
        records = rec.pop_records()
    clusters = (round(14 * side), round(14 * side))
    with torch.no_grad():
        ref = reference_hourglass(model, vit, (images - model.pixel_mean) / model.pixel_std, at, clusters)
    ours = out.token_logits  # plain grid: token t is patch t, each with its own rebuilt prediction
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-8, rtol=1e-8), (ours - ref).abs().max()
    for r in records:  # the accounting: every patch merged into one centre's carrier or carrying one
        assert r.block_tokens_in.tolist() == [196] * at + [clusters[0] * clusters[1]] * (12 - at)
        assert int((r.merged_at > 0).sum()) == 196 - clusters[0] * clusters[1]


# ---- CubistMerge --------------------------------------------------------------------------------------

def reference_cubist(vit: torch.nn.Module, images: torch.Tensor, rate: float) -> list[list[Groups]]:
    """tokenscope's reading of CubistMerge (no public code), written as plain loops over lines: after each
    block (proportional attention), every row (blocks 1, 3, ...) or column (blocks 2, 4, ...) of the token grid
    loses round(length x rate) tokens: the tokens at even places take the more similar of their neighbours
    (cosine of the block's output, right on a tie), the best of them by that similarity merge into it, and the
    grid closes up in raster order."""
    out = []
    for seq in _start(vit, images):
        h = w = int(math.isqrt(len(seq.members) - 1))
        per_block = []
        for i, blk in enumerate(vit.blocks):
            attn_out, _ = _attention(blk.attn, blk.norm1(seq.x), seq.size)
            x = seq.x + blk.ls1(attn_out)
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
            seq = Sequence(x, seq.size, seq.members)
            rows = i % 2 == 0
            lines, length = (h, w) if rows else (w, h)
            r = min(round(length * rate), (length + 1) // 2 if length > 1 else 0)
            place = (lambda ln, j: 1 + ln * w + j) if rows else (lambda ln, j: 1 + j * w + ln)
            pairs, gone = [], set()
            for ln in range(lines):
                unit = [F.normalize(seq.x[place(ln, j)], dim=0) for j in range(length)]
                scored = []
                for j in range(0, length, 2):
                    left = float(unit[j] @ unit[j - 1]) if j > 0 else -float("inf")
                    right = float(unit[j] @ unit[j + 1]) if j + 1 < length else -float("inf")
                    scored.append((max(left, right), j, j + 1 if right >= left else j - 1))
                scored.sort(key=lambda s: -s[0])  # stable: equal scores keep place order
                for _, j, partner in scored[:r]:
                    pairs.append((place(ln, j), place(ln, partner)))
                    gone.add(place(ln, j))
            x, size, members = _merge_into(seq, pairs)
            keep = [0] + [p for p in range(1, len(members)) if p not in gone]
            if not rows:  # the grid closes up column by column: back to raster order
                new_h = h - r
                kept = {ln: [p for p in (place(ln, j) for j in range(length)) if p not in gone] for ln in range(w)}
                keep = [0] + [kept[c][rr] for rr in range(new_h) for c in range(w)]
            seq = Sequence(torch.stack([x[p] for p in keep]), torch.stack([size[p] for p in keep]),
                           [members[p] for p in keep])
            h, w = (h, w - r) if rows else (h - r, w)
            per_block.append(seq.groups())
        out.append(per_block)
    return out


@pytest.mark.parametrize("rate", [0.05, 0.15])
def test_cubist_merges_the_groups_of_its_rule_and_keeps_a_grid(rate: float) -> None:
    from tokenscope.models.methods.builtin.cubist import grid_before

    model, vit = _pair("vit_small_patch16_224")
    images = _images(2)
    s = _method_setting(model, f"cubist:rate={rate}")
    ours = _groups_by_block(model, s, images)
    with torch.no_grad():
        ref = reference_cubist(vit, (images - model.pixel_mean) / model.pixel_std, rate)
    for image in range(2):
        for block in range(12):
            h, w = grid_before(14, 14, rate, block + 1)
            assert len(ours[image][block]) == h * w  # one shape for every image
            assert ours[image][block] == ref[image][block], f"image {image}, block {block + 1}"
    assert len(ours[0][-1]) < 196 * 0.6
