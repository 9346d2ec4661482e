"""Traces: the accounting invariant, exact save/load, and FLOPs that match torch's counter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import blocky_image, merging, setting
from tokenscope.data.images import prepare_image
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.cost import measure_flops
from tokenscope.models.partition import level_shape
from tokenscope.trace.capture import TraceCapture, images_to_tensor
from tokenscope.trace.trace import Trace, TraceInconsistency


class RandomScorePolicyPatch:
    """Swap the uniform policy's scores for seeded random ones: arbitrary valid partitions."""

    def __init__(self, model, seed: int) -> None:
        self.policy = model.policies["uniform"]
        self.rng = np.random.default_rng(seed)

    def __enter__(self):
        def score(images, labels):
            grid = (images.shape[-2] // 16, images.shape[-1] // 16)
            return [torch.from_numpy(self.rng.random((images.shape[0], *level_shape(grid, k)))).float()
                    for k in range(1, 5)]
        self.policy.score = score
        return self

    def __exit__(self, *exc):
        del self.policy.score


def _prepared(seed: int = 0, h: int = 96, w: int = 128):
    img, lab = blocky_image(h, w, seed)
    return prepare_image(img, f"scene{seed}.png", labels=lab)


@pytest.mark.parametrize("seed", range(4))
def test_invariant_holds_for_random_partitions_and_exits(tiny_loaded: LoadedModel, seed: int) -> None:
    model = tiny_loaded.model
    s = setting(model, policy="uniform", exits=True, exit_threshold=0.3 + 0.05 * seed)
    with RandomScorePolicyPatch(model, seed):
        trace = TraceCapture(tiny_loaded, torch.device("cpu"), s)([_prepared(seed, 112, 160)])[0]
    trace.assert_consistent()
    assert trace.token_level.max() > 0, "random scores should merge something"
    assert trace.exited_early.any()
    assert trace.block_tokens_in[0] == trace.num_tokens


def test_invariant_holds_for_oracle_partitions(tiny_loaded: LoadedModel) -> None:
    s = setting(tiny_loaded.model, policy="oracle", exits=True, exit_threshold=0.35)
    traces = TraceCapture(tiny_loaded, torch.device("cpu"), s)([_prepared(0, 200, 264)])
    t = traces[0]
    t.assert_consistent()
    assert t.num_tokens < t.num_patches


def test_save_load_round_trip_is_exact(tiny_loaded: LoadedModel, tmp_path: Path) -> None:
    s = setting(tiny_loaded.model, policy="uniform", exits=True, exit_threshold=0.3)
    trace = TraceCapture(tiny_loaded, torch.device("cpu"), s)([_prepared(1, 70, 101)])[0]
    trace.save(tmp_path / "t")
    back = Trace.load(tmp_path / "t")
    assert back.meta == trace.meta
    for f in dataclasses.fields(Trace):
        if f.name in ("meta", "policy_scores"):
            continue
        a, b = getattr(trace, f.name), getattr(back, f.name)
        if a is None:  # an optional array that was not recorded stays absent
            assert b is None, f.name
            continue
        assert a.dtype == b.dtype and np.array_equal(a, b), f.name
    assert len(back.policy_scores) == 4
    assert all(np.array_equal(a, b) for a, b in zip(trace.policy_scores, back.policy_scores))


def _corruptions(t: Trace):
    def swap_patch(tr):
        tr.token_of_patch[0, 0], tr.token_of_patch[-1, -1] = tr.token_of_patch[-1, -1], tr.token_of_patch[0, 0]

    def bad_exit(tr):
        tr.token_exit_block[0] = 2 if 2 not in tr.meta.exit_after else 0

    def count_off(tr):
        tr.block_tokens_in[-1] += 1

    def misalign(tr):
        i = int(np.argmax(tr.token_level))
        tr.token_row[i] += 1

    return [swap_patch, bad_exit, count_off, misalign]


def test_assert_consistent_catches_broken_accounting(tiny_loaded: LoadedModel) -> None:
    s = setting(tiny_loaded.model, policy="oracle", exits=True, exit_threshold=0.3)
    good = TraceCapture(tiny_loaded, torch.device("cpu"), s)([_prepared(0, 128, 128)])[0]
    good.assert_consistent()
    for corrupt in _corruptions(good):
        t = dataclasses.replace(good, **{f.name: np.copy(getattr(good, f.name)) for f in dataclasses.fields(Trace)
                                         if f.name not in ("meta", "policy_scores") and getattr(good, f.name) is not None})
        corrupt(t)
        with pytest.raises(TraceInconsistency):
            t.assert_consistent()


def test_trace_flops_equal_torch_flop_counter(tiny_loaded: LoadedModel) -> None:
    model = tiny_loaded.model
    for policy, exits in (("none", False), ("uniform", True), ("learned", True)):
        s = setting(model, policy=policy, exits=exits, exit_threshold=0.3)
        cap = TraceCapture(tiny_loaded, torch.device("cpu"), s)
        im = _prepared(2, 96, 144)
        trace = cap([im])[0]
        x, labels = images_to_tensor([im], torch.device("cpu"))
        with torch.no_grad():
            total, per_module, _ = measure_flops(lambda: model(x, labels, setting=s))
        assert trace.meta.flops["total"] == total, policy
        for i, f in enumerate(trace.block_flops):
            assert per_module.get(f"StepViT.blocks.{i}", 0) == f, (policy, i)
    assert trace.meta.flops["policy"] > 0


def test_flops_can_be_counted_inside_inference_mode_at_the_native_size() -> None:
    """At the backbone's native size the prefix position embedding is a view of a parameter; torch's
    counter used to crash on it under inference mode (the bench path)."""
    from conftest import make_tiny

    model = make_tiny(0)
    x = torch.rand(1, 3, model.cfg.img_size, model.cfg.img_size)
    with torch.inference_mode():
        total, _, out = measure_flops(lambda: model(x))
    with torch.no_grad():
        expected, _, ref = measure_flops(lambda: model(x))
    assert total == expected > 0
    assert torch.equal(out.patch_logits, ref.patch_logits)


def test_the_npz_reader_gives_what_numpy_gives(tmp_path: Path) -> None:
    """Trace.load's own .npz reader equals np.load, for the arrays traces hold and for the ones it
    hands to np.load (Fortran order, 0-d, bool, big-endian)."""
    from tokenscope.trace.trace import _read_npz

    rng = np.random.default_rng(0)
    arrays = {"i32": rng.integers(-5, 5, (7, 3)).astype(np.int32), "u8": rng.integers(0, 255, (4, 4)).astype(np.uint8),
              "f32": rng.random(5, dtype=np.float32), "empty": np.zeros((0,), np.int16), "scalar": np.array(3.5),
              "fortran": np.asfortranarray(rng.random((3, 4))), "flags": rng.random(6) > 0.5,
              "big": np.arange(4, dtype=">i4")}
    np.savez_compressed(tmp_path / "a.npz", **arrays)
    got = _read_npz(tmp_path / "a.npz")
    assert sorted(got) == sorted(arrays)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].shape == a.shape and np.array_equal(got[name], a), name
        assert got[name].flags.writeable


def test_a_runs_token_table_joins_the_token_tables_of_its_traces(tiny_loaded: LoadedModel) -> None:
    """The run's tokens.parquet is built from arrays in one go; it equals the per-trace tables
    stacked with their image, with in-network merging or without, whatever the classes are called."""
    import pandas as pd

    from tokenscope.analysis.stats import joined_tokens_table, tokens_columns, tokens_table
    from tokenscope.models.methods.merging import MergingSpec

    model = tiny_loaded.model
    s = setting(model, policy="uniform", exits=True, exit_threshold=0.3)
    with RandomScorePolicyPatch(model, 3):
        plain = TraceCapture(tiny_loaded, torch.device("cpu"), s)([_prepared(2, 112, 160)])[0]
    tome = merging(setting(model, s, exits=False), MergingSpec("tome", tuple(range(1, model.depth + 1)), r=2))
    merged = TraceCapture(tiny_loaded, torch.device("cpu"), tome)([_prepared(3)])[0]
    assert merged.has_merges and not plain.has_merges
    unnamed = dataclasses.replace(plain, meta=dataclasses.replace(plain.meta, class_names=plain.meta.class_names[:1]))
    parts = [("a", plain), ("b", merged), ("c", unnamed)]
    expected = pd.concat([tokens_table(t).assign(image=n) for n, t in parts], ignore_index=True)
    joined = joined_tokens_table([(n, tokens_columns(t)) for n, t in parts])
    pd.testing.assert_frame_equal(joined, expected)
    assert (joined["class_name"].str.startswith("class_")).any()  # classes past the names get a made-up name
