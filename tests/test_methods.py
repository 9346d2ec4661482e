"""Token-reduction methods beside STEP: ToMe, ALGM, CTS, DToP, and the version-2 trace they write."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, blocky_image, make_tiny, merging, setting

from tokenscope.data.images import prepare_image
from tokenscope.errors import ConfigError
from tokenscope.jobs.setup import ModelOptions, load_model, method_setting
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.cost import measure_flops
from tokenscope.models.attention import attend, size_weighted_mask
from tokenscope.models.methods.merging import MergingSpec, algm_blocks
from tokenscope.models.methods.point import resolve, resolve_list
from tokenscope.trace.capture import TraceCapture, images_to_tensor
from tokenscope.trace.trace import Trace, TraceInconsistency

DEEP = dataclasses.replace(TINY, name="deep", exit_after=(2, 4), timm_kwargs={"depth": 6, "embed_dim": 32, "num_heads": 2})


def _loaded(cfg=DEEP, seed: int = 0) -> LoadedModel:
    return LoadedModel(make_tiny(seed, cfg), cfg, {"backbone": True, "decoder": True, "exits": True, "policy": True},
                       "test", "test")


def _image(seed: int, h: int = 128, w: int = 160, noise: float = 0.05):
    img, lab = blocky_image(h, w, seed)
    rng = np.random.default_rng(seed)
    img = np.clip(img + noise * rng.standard_normal(img.shape).astype(np.float32), 0, 1)
    return prepare_image(img, f"img{seed}", labels=lab)


def _batch(n: int = 2) -> torch.Tensor:
    return torch.from_numpy(np.stack([_image(s).tensor_rgb for s in range(n)]))


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_tome_with_r_0_and_algm_that_merges_nothing_equal_the_plain_model_exactly(decoder: str) -> None:
    cfg = dataclasses.replace(DEEP, decoder=decoder, decoder_layers=1)
    model = make_tiny(0, cfg)
    s = setting(model, policy="none", exits=False)
    x = _batch()
    with torch.no_grad():
        plain = model(x, setting=s).patch_logits
        tome = model(x, setting=merging(s, MergingSpec("tome", tuple(range(1, model.depth + 1)), r=0)))
        algm = model(x, setting=merging(s, MergingSpec("algm", algm_blocks(model.depth), threshold=2.0,
                                                            global_threshold=2.0)))
    assert torch.equal(tome.patch_logits, plain)  # the split blocks compute exactly what timm's blocks do
    assert torch.equal(algm.patch_logits, plain)
    assert torch.equal(tome.token_owner, torch.arange(tome.token_owner.shape[1]).expand_as(tome.token_owner))


def test_tome_merges_exactly_r_tokens_per_block_and_the_trace_accounts_for_every_patch() -> None:
    loaded = _loaded()
    loaded.setting = setting(loaded.model, loaded.setting, policy="uniform", exits=False)  # images of different token counts share a batch
    loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("tome", tuple(range(1, 7)), r=1))
    traces = TraceCapture(loaded, torch.device("cpu"))([_image(0, noise=0.0), _image(1)])
    assert traces[0].num_tokens != traces[1].num_tokens  # 17 and 80 tokens: padding in the batch
    for t in traces:
        t.assert_consistent()
        assert t.merges_per_block().tolist() == [1] * 6
    loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("tome", tuple(range(1, 7)), r=7))
    traces = TraceCapture(loaded, torch.device("cpu"))([_image(1), _image(2)])
    for t in traces:
        t.assert_consistent()
        assert t.merges_per_block().tolist() == [7] * 6
        assert np.array_equal(t.block_tokens_in, t.num_tokens - 7 * np.arange(6))
        assert np.array_equal(t.block_tokens_mid, t.block_tokens_in - 7)
        assert t.survivors.sum() == t.num_tokens - 42
        assert t.cover_at(t.meta.depth + 1).max() < t.num_tokens


def test_tome_r_as_a_fraction_and_its_limit_of_half_the_tokens() -> None:
    loaded = _loaded()
    loaded.setting = setting(loaded.model, loaded.setting, policy="none", exits=False)
    loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("tome", tuple(range(1, 7)), r=0.1))
    t = TraceCapture(loaded, torch.device("cpu"))([_image(0)])[0]
    assert t.merges_per_block().tolist() == [round(0.1 * 80)] * 6
    loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("tome", tuple(range(1, 7)), r=1000))
    t = TraceCapture(loaded, torch.device("cpu"))([_image(0)])[0]
    assert t.block_tokens_in.tolist() == [80, 40, 20, 10, 5, 3]  # at most half the live tokens merge per block


def test_merge_count_batch_takes_the_smallest_images_count_and_per_image_each_its_own() -> None:
    loaded = _loaded()
    loaded.setting = setting(loaded.model, loaded.setting, policy="uniform", exits=False)
    images = [_image(0, noise=0.0), _image(1)]  # 17 and 80 tokens in one padded batch
    wanted = [round(0.1 * 17), round(0.1 * 80)]
    for count, expected in (("batch", [min(wanted)] * 2), ("per-image", wanted)):
        loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("tome", tuple(range(1, 7)), r=0.1, count=count))
        traces = TraceCapture(loaded, torch.device("cpu"))(images)
        assert [int(t.merges_per_block()[0]) for t in traces] == expected, count
        assert all(t.meta.merging["count"] == count for t in traces)
        alone = TraceCapture(loaded, torch.device("cpu"))(images[1:])[0]
        assert int(alone.merges_per_block()[0]) == wanted[1]  # alone, the big image merges its own count


def test_proportional_attention_matches_a_reference_and_makes_a_duplicate_token_equal_a_merged_one() -> None:
    torch.manual_seed(0)
    attn = make_tiny(0, DEEP).blocks[0].attn
    b, n, d = 2, 9, 32
    h = torch.randn(b, n, d)
    sizes = torch.randint(1, 5, (b, n)).float()
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, -2:] = False
    sizes[1, -2:] = 0
    with torch.no_grad():
        out, keys = attend(attn, h, size_weighted_mask(valid, sizes, 0, h.dtype))
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
        logits = logits + torch.where(valid, sizes.clamp_min(1).log(), torch.tensor(-math.inf))[:, None, None, :]
        ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))
    assert torch.allclose(out[0], ref[0], atol=1e-5)
    assert torch.allclose(out[1, :-2], ref[1, :-2], atol=1e-5)
    assert torch.allclose(keys, k.mean(1))
    # ToMe's reason for it: a token of size 2 is attended to like two identical tokens
    dup = torch.cat([h[:1], h[:1, 3:4]], dim=1)  # token 3 twice
    ones = torch.ones(1, n + 1, dtype=torch.bool)
    with torch.no_grad():
        full, _ = attend(attn, dup, None)
        two = torch.ones(1, n)
        two[0, 3] = 2
        merged, _ = attend(attn, h[:1], size_weighted_mask(ones[:, :n], two, 0, h.dtype))
        unweighted, _ = attend(attn, h[:1], None)
    assert torch.allclose(merged, full[:, :n], atol=1e-5)
    assert not torch.allclose(unweighted, full[:, :n], atol=1e-4)


def test_cts_shares_exactly_k_groups_and_nothing_larger() -> None:
    loaded = _loaded()
    for groups, expected in (("7", 7), ("0.25", round(0.25 * 20)), ("0", 0), ("500", 20)):
        loaded.setting = method_setting(loaded, ModelOptions(device="cpu"), f"cts:groups={groups}")
        assert loaded.setting.policy == "cts" and not loaded.setting.exits
        t = TraceCapture(loaded, torch.device("cpu"))([_image(3)])[0]
        t.assert_consistent()
        levels = np.bincount(t.token_level, minlength=5)
        assert levels[1] == expected and levels[2:].sum() == 0, groups
        assert t.num_tokens == 80 - 3 * expected


def test_algm_joins_only_aligned_2x2_windows_of_single_patches_in_block_1() -> None:
    loaded = _loaded()
    loaded.setting = setting(loaded.model, loaded.setting, policy="uniform", exits=False)
    loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("algm", (1, 4), threshold=-1.0, global_threshold=2.0, prop_attn=False))
    t = TraceCapture(loaded, torch.device("cpu"))([_image(4)])[0]
    t.assert_consistent()
    before, after = t.cover_at(1), t.cover_at(2)
    gh, gw = after.shape
    single = np.bincount(before.ravel(), minlength=t.num_tokens)[before] == 1
    for i in range(0, gh, 2):
        for j in range(0, gw, 2):
            win = after[i:i + 2, j:j + 2]
            if single[i:i + 2, j:j + 2].all():
                assert (win == win[1, 1]).all()  # merged into the bottom-right token, as in ALGM
            else:
                assert np.array_equal(win, before[i:i + 2, j:j + 2])
    assert t.merges_per_block()[0] == 3 * sum(single[i:i + 2, j:j + 2].all() for i in range(0, gh, 2) for j in range(0, gw, 2))


@pytest.mark.parametrize("seed", range(6))
def test_the_version_2_invariant_holds_for_random_merges_and_exits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    loaded = _loaded(seed=seed)
    kind = ["tome", "algm"][seed % 2]
    spec = (MergingSpec("tome", tuple(sorted(rng.choice(np.arange(1, 7), 3, replace=False).tolist())),
                        r=int(rng.integers(1, 12)), prop_attn=bool(seed % 3))
            if kind == "tome" else MergingSpec("algm", (1, int(rng.integers(2, 7))), threshold=float(rng.uniform(-0.5, 0.9))))
    loaded.setting = setting(loaded.model, loaded.setting, policy=["none", "uniform"][int(rng.integers(2))], exits=True,
                           exit_threshold=float(rng.uniform(0.3, 0.6)), keep_per_class=int(rng.integers(0, 2)))
    loaded.setting = merging(setting(loaded.model, loaded.setting), spec)
    images = [_image(int(s), 96 + 32 * int(rng.integers(0, 3)), 128) for s in rng.integers(0, 100, 3)]
    for im in images:
        trace = TraceCapture(loaded, torch.device("cpu"))([im])[0]  # capture checks the invariant itself
        assert trace.has_merges and trace.meta.merging["kind"] == kind
        for block in range(1, trace.meta.depth + 2):
            cover = trace.cover_at(block)
            live = (trace.token_merged_at == 0) | (trace.token_merged_at >= block)
            assert live[cover].all()


def _merged_trace() -> Trace:
    loaded = _loaded()
    loaded.setting = setting(loaded.model, loaded.setting, policy="none", exits=True, exit_threshold=0.4)
    loaded.setting = merging(setting(loaded.model, loaded.setting), MergingSpec("tome", tuple(range(1, 7)), r=5))
    trace = TraceCapture(loaded, torch.device("cpu"))([_image(5)])[0]
    assert trace.exited_early.any() and trace.has_merges
    return trace


def _copy(t: Trace) -> Trace:
    return dataclasses.replace(t, **{f.name: np.copy(getattr(t, f.name)) for f in dataclasses.fields(Trace)
                                     if f.name not in ("meta", "policy_scores") and getattr(t, f.name) is not None})


def test_the_version_2_invariant_catches_broken_merge_records() -> None:
    good = _merged_trace()
    src = int(np.nonzero(good.token_merged_at > 0)[0][0])
    later = int(np.nonzero(good.token_merged_at > good.token_merged_at[src])[0][0])

    def into_merged(t: Trace) -> None:  # merged into a token that had already merged away
        t.token_merged_at[later], t.token_merged_into[later] = t.token_merged_at[later], src

    def wrong_block(t: Trace) -> None:
        t.token_merged_at[src] = 99

    def dangling(t: Trace) -> None:
        t.token_merged_into[src] = -1

    def counts(t: Trace) -> None:
        t.block_tokens_mid[2] += 1

    def exit_differs(t: Trace) -> None:
        t.token_exit_block[src] = 1 if t.token_exit_block[src] != 1 else t.meta.depth

    def self_loop(t: Trace) -> None:
        t.token_merged_into[src] = src

    for corrupt in (into_merged, wrong_block, dangling, counts, exit_differs, self_loop):
        t = _copy(good)
        corrupt(t)
        with pytest.raises(TraceInconsistency):
            t.assert_consistent()


def test_a_version_2_trace_round_trips_through_its_files(tmp_path) -> None:
    trace = _merged_trace()
    trace.save(tmp_path / "t")
    back = Trace.load(tmp_path / "t")
    back.assert_consistent()
    for name in ("token_merged_at", "token_merged_into", "block_tokens_mid", "token_exit_block"):
        assert np.array_equal(getattr(back, name), getattr(trace, name))
    assert back.meta.merging == trace.meta.merging
    assert np.array_equal(back.cover_at(4), trace.cover_at(4))


@pytest.mark.parametrize("method", ["tome:r=6", "algm:threshold=0.2", "dtop+tome:r=3", "cts:groups=5"])
def test_trace_flops_of_merging_methods_equal_torch_flop_counter(method: str) -> None:
    loaded = _loaded()
    loaded.setting = method_setting(loaded, ModelOptions(device="cpu", exit_threshold=0.5), method)
    im = _image(6)
    trace = TraceCapture(loaded, torch.device("cpu"))([im])[0]
    x, labels = images_to_tensor([im], torch.device("cpu"))
    with torch.no_grad():
        total, _, _ = measure_flops(lambda: loaded.model(x, labels, setting=loaded.setting))
    assert trace.meta.flops["total"] == total
    if "tome" in method or "algm" in method:
        assert trace.meta.flops["merging"] > 0


def test_methods_resolve_to_policies_exits_and_merging() -> None:
    loaded = _loaded()
    opts = ModelOptions(device="cpu")
    expect = {"vit": ("none", False, None), "step": ("learned", True, None), "dcts": ("learned", False, None),
              "dtop": ("none", True, None), "cts": ("cts", False, None), "tome": ("none", False, "tome"),
              "algm": ("none", False, "algm"), "step+tome": ("learned", True, "tome"), "cts+algm": ("cts", False, "algm")}
    for name, (policy, exits, merging) in expect.items():
        s = method_setting(loaded, opts, name)
        kind = s.record["merging"]["kind"] if "merging" in s.record else None
        assert (s.policy, s.exits, kind) == (policy, exits, merging), name
        assert s.method == name
    assert method_setting(loaded, opts, "tome").size_weighted is True  # ToMe weighs by size
    assert method_setting(loaded, opts, "algm").size_weighted is False  # ALGM's attention ignores sizes
    assert method_setting(loaded, opts, "algm").record["merging"]["blocks"] == [1, 5]
    assert method_setting(loaded, opts, "tome:r=16:prop=off").record["merging"]["r"] == 16
    assert resolve("algm:global=adaptive").value("global") is None


@pytest.mark.parametrize("text, words", [
    ("tomme", "unknown method"), ("tome:r", "key=value"),
    ("tome:speed=3", "unknown setting"), ("tome:r=abc", "not a valid number"), ("tome:r=2.5", "whole count"),
    ("tome+step", "goes first"),
])
def test_bad_method_names_and_settings_are_one_line_errors(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        resolve(text)
    assert "\n" not in str(err.value)


def test_the_unreduced_model_does_not_combine() -> None:
    with pytest.raises(ConfigError, match="unreduced model"):
        resolve("vit+tome")


def test_contradicting_flags_are_refused_with_the_method_that_was_meant() -> None:
    loaded = _loaded()
    with pytest.raises(ConfigError, match="dcts"):
        load_model(ModelOptions(device="cpu", method="tome", policy="learned"), loaded=loaded)
    with pytest.raises(ConfigError, match="without exits"):
        load_model(ModelOptions(device="cpu", method="dcts", exits="learned"), loaded=loaded)
    with pytest.raises(ConfigError, match="unknown setting 'r'"):
        load_model(ModelOptions(device="cpu", method="step:r=4"), loaded=loaded)
    with pytest.raises(ConfigError, match="twice"):
        resolve_list("tome,tome")


def test_operating_points_are_values_and_the_model_holds_none() -> None:
    """A setting is resolved once and passed to the forward: running another one in between changes
    nothing the first gives (the model holds no operating point to leak), and the plain one has no
    reduction at all."""
    model = _loaded().model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tome = method_setting(_loaded_for(model), ModelOptions(device="cpu"), "step+tome:r=3")
    plain = tome.plain()
    assert not plain.steps and plain.policy == "none" and not plain.exits and plain.method == "vit"
    assert tome.record["merging"]["r"] == 3 and tome.method == "step+tome:r=3"
    x = _batch(1)
    with torch.no_grad():
        first = model(x, setting=tome).patch_logits
        model(x, setting=plain)
        model(x, setting=method_setting(_loaded_for(model), ModelOptions(device="cpu"), "evit:rate=0.5"))
        assert torch.equal(model(x, setting=tome).patch_logits, first)
        assert not torch.equal(model(x, setting=plain).patch_logits, first)
    assert not any(hasattr(model, name) for name in ("configure", "install", "set_merging", "setting", "plain"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _loaded_for(model) -> LoadedModel:
    return LoadedModel(model, DEEP, {"backbone": True, "decoder": True, "exits": True, "policy": True}, "test", "test")


def test_f_interpolate_free_decoding_unmerges_tokens_for_the_mask_decoder() -> None:
    """With a mask transformer every patch is decoded from its group's features (ALGM's un-merging):
    patches of one merged group get identical logits when no other token differs."""
    cfg = dataclasses.replace(DEEP, decoder="mask", decoder_layers=1)
    model = make_tiny(0, cfg)
    s = merging(setting(model, policy="none", exits=False), MergingSpec("tome", tuple(range(1, 7)), r=10))
    with torch.no_grad():
        out = model(_batch(1), setting=s)
    owner = out.token_owner[0]
    logits = out.token_logits[0]
    for t in range(owner.shape[0]):
        assert torch.allclose(logits[t], logits[owner[t]], atol=1e-5)
    assert F.softmax(logits, -1).sum(-1).allclose(torch.ones(owner.shape[0]))


def test_every_method_runs_under_bf16_autocast() -> None:
    """On a GPU the model runs under bf16 autocast (`--amp`, the default); the CPU's autocast checks
    the same dtype paths here: embedding into float32 slots, the size mask, merging, both decoders."""
    for decoder in ("linear", "mask"):
        model = make_tiny(0, dataclasses.replace(DEEP, decoder=decoder, decoder_layers=1))
        for point in ("step", "tome:r=5", "algm:threshold=0", "dtop+tome:r=3"):
            s = method_setting(_loaded_for(model), ModelOptions(device="cpu", exit_threshold=0.4), point)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(_batch(), setting=s)
            assert torch.isfinite(out.patch_logits.float()).all(), (decoder, point)
        s = merging(setting(model, policy="none", exits=False), MergingSpec("tome", tuple(range(1, 7)), r=5))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(_batch(), setting=s)
        assert (out.token_owner != torch.arange(out.token_owner.shape[1])).sum(1).tolist() == [30, 30]


def test_bench_counts_tokens_per_block_of_a_merging_method() -> None:
    from tokenscope.analysis.bench import run_bench

    model = make_tiny(0, DEEP)
    s = method_setting(_loaded_for(model), ModelOptions(device="cpu"), "tome:r=5")
    r = run_bench(model, _batch(2), torch.device("cpu"), s, repeats=1, warmup=0)
    assert r.baseline.mean_tokens_per_block == 80
    assert r.step.mean_tokens_per_block == pytest.approx(80 - 5 * 2.5 - 2.5)  # 80, 75, ... entering; 5 fewer after each merge
    assert r.step.method == "tome:r=5" and r.flop_reduction > 1


def test_order_and_count_settings_reach_every_merger_and_bad_values_are_one_line_errors() -> None:
    loaded = _loaded()
    s = method_setting(loaded, ModelOptions(device="cpu"), "tome:r=2:order=spatial:count=per-image")
    assert (s.record["merging"]["order"], s.record["merging"]["count"]) == ("spatial", "per-image")
    assert all((m.order, m.count) == ("spatial", "per-image") for m in (step.module for step in s.steps))
    s = method_setting(loaded, ModelOptions(device="cpu"), "algm")
    assert (s.record["merging"]["order"], s.record["merging"]["count"]) == ("reference", "batch")
    assert all((m.order, m.count) == ("reference", "batch") for m in (step.module for step in s.steps))
    for bad, words in (("tome:order=random", "order is one of reference, spatial"),
                       ("algm:count=some", "count is one of batch, per-image"),
                       ("dtop:order=spatial", "unknown setting 'order'")):
        with pytest.raises(ConfigError, match=words) as err:
            loaded.setting = method_setting(loaded, ModelOptions(device="cpu"), bad)
        assert "\n" not in str(err.value)


def test_dtop_keeps_five_tokens_per_class_as_its_public_code_unless_told_otherwise() -> None:
    loaded = _loaded()
    assert method_setting(loaded, ModelOptions(device="cpu"), "dtop").keep_per_class == 5
    assert method_setting(loaded, ModelOptions(device="cpu"), "dtop+tome").keep_per_class == 5
    assert method_setting(loaded, ModelOptions(device="cpu"), "dtop:keep=0").keep_per_class == 0
    assert method_setting(loaded, ModelOptions(device="cpu", keep_per_class=2), "dtop").keep_per_class == 2
    assert method_setting(loaded, ModelOptions(device="cpu"), "step").keep_per_class == DEEP.keep_per_class


def test_every_block_is_called_as_one_module_merging_and_pruning_blocks_included() -> None:
    """Hooks (and torch.compile) see every block: a method acting inside a block does not take it apart."""
    loaded = _loaded()
    for point in ("tome:r=5", "algm:threshold=0", "evit:rate=0.5", "dtop+evit"):
        loaded.setting = method_setting(loaded, ModelOptions(device="cpu", exit_threshold=0.4), point)
        model = loaded.model
        calls: list[int] = []
        handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
        try:
            with torch.no_grad():
                model(_batch(1), setting=loaded.setting)
        finally:
            for h in handles:
                h.remove()
        assert calls == list(range(model.depth)), point
        assert all(type(b).__name__ == "EncoderBlock" for b in model.blocks)


def test_no_method_is_named_in_the_encoder_or_the_recorder() -> None:
    import importlib
    import re
    from pathlib import Path

    from tokenscope.models.methods.registry import list_names

    for module in (importlib.import_module("tokenscope.models.step_vit"), importlib.import_module("tokenscope.trace.recorder")):
        code = "\n".join(ln for ln in Path(module.__file__).read_text().splitlines() if not ln.strip().startswith("#"))
        for name in list_names():
            if name not in ("step", "vit"):  # the model family (STEP) and the architecture (a ViT)
                assert not re.search(rf"\b{name}\b", code, flags=re.I), (module.__name__, name)


def test_compiled_blocks_run_merging_and_pruning_steps_with_the_same_outputs() -> None:
    """torch.compile sees every block (dynamo traces the EncoderBlock; a step runs between its halves
    outside the graph); the eager backend checks the tracing without needing a C++ compiler."""
    loaded = _loaded()
    x = _batch(2)
    for point in ("tome:r=5", "evit:rate=0.5"):
        loaded.setting = method_setting(loaded, ModelOptions(device="cpu"), point)
        model = loaded.model
        with torch.no_grad():
            eager = model(x, setting=loaded.setting).patch_logits
        compiled = [torch.compile(b, backend="eager", dynamic=True) for b in model.blocks]
        plain = list(model.blocks)
        try:
            for i, c in enumerate(compiled):
                model.blocks[i] = c
            with torch.no_grad():
                out = model(x, setting=loaded.setting).patch_logits
        finally:
            for i, b in enumerate(plain):
                model.blocks[i] = b
        assert torch.allclose(out, eager, atol=1e-5), point
