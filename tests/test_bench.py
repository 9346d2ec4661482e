"""The speed path: token budgets, sync-free batching, and the bench measurements' bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner
from conftest import setting

from tokenscope.analysis.bench import run_bench
from tokenscope.cli import app
from tokenscope.models.partition import level_shape
from tokenscope.models.policy import budget_partition


def test_budget_partition_reaches_the_target_and_no_further_than_needed() -> None:
    rng = np.random.default_rng(0)
    grid = (64, 64)
    scores = [rng.random(level_shape(grid, k)) for k in range(1, 5)]
    counts = []
    for r in (1.5, 2.5, 4.0):
        p = budget_partition(scores, grid, r)
        target = grid[0] * grid[1] / r
        assert p.num_tokens <= target
        assert p.num_tokens > target - 3
        counts.append(p.num_tokens)
    assert counts == sorted(counts, reverse=True)


def test_budget_policy_gives_each_image_its_own_partition(tiny_model) -> None:
    s = setting(tiny_model, policy="budget", budget=2.0, exits=False)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    x[1, :, :64] = 0.5  # a flat half: more to merge, still the same budget
    with torch.no_grad():
        out = tiny_model(x, setting=s)
    for p in out.partitions:
        assert p.num_tokens <= 32
    assert not np.array_equal(out.partitions[0].token_of_patch, out.partitions[1].token_of_patch)


def test_run_bench_reports_consistent_ratios(tiny_model) -> None:
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    r = run_bench(tiny_model, x, torch.device("cpu"), setting(tiny_model, policy="budget", budget=2.0, exits=False),
                  repeats=2, warmup=1, loop=True)
    s = r.summary()
    assert r.baseline.tokens_per_image == 64 and r.step.tokens_per_image <= 32
    assert s["flop_reduction"] > 1.5
    assert len(r.baseline.latencies_s) == len(r.step.latencies_s) == 2
    assert len(r.recorder_on_s) == len(r.recorder_off_s) == 2 and len(r.loop_s) == 2
    assert abs(s["speedup_over_flop_reduction"] - s["speedup"] / s["flop_reduction"]) < 1e-9
    assert r.baseline.peak_mib > 0 and s["learned_policy_net_flops_pct_of_baseline"] > 0


def test_bench_command_prints_ratios(tmp_path) -> None:
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--model", "vitt", "--random-init", "--budget", "2", "--size", "64",
                                 "--batch", "2", "--device", "cpu", "--repeats", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "speed-up" in r.output and "FLOP reduction" in r.output and "recorder overhead" in r.output
    assert out.is_file()
    bad = CliRunner().invoke(app, ["bench", "--model", "vitt", "--random-init", "--size", "50", "--device", "cpu"])
    assert bad.exit_code == 2 and "multiple of the 16-pixel patch" in bad.output


@pytest.mark.parametrize("method", ["tome:r=4", "algm", "evit"])
def test_bench_json_of_a_method_with_steps_describes_them(tmp_path, method: str) -> None:
    import json

    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--model", "vitt", "--random-init", "--method", method, "--size", "64",
                                 "--device", "cpu", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    steps = doc["step"]["setting"]["steps"]
    assert steps and all(set(s) == {"block", "place", "name", "does"} for s in steps)
    assert doc["step"]["method"] == method and doc["flop_reduction"] > 1


def test_host_synchronisations_per_forward_are_counted_and_batch_constant_merges_need_none() -> None:
    """One forward of each method on a batch of two, its calls that hand values to the host counted (the
    calls that synchronise on a GPU). ToMe and PiToMe with one count for the batch, EViT, and the plain model,
    read nothing back; the others say what they need: a policy's partition (one copy), one per gate,
    one per data-dependent merge (ALGM's thresholds)."""
    from tokenscope.data.images import load_prepared
    from tokenscope.jobs.setup import ModelOptions, load_model
    from tokenscope.models.host_sync import count_host_syncs

    img = load_prepared("sample_images/street_5000001.png", size=128)
    x = torch.from_numpy(img.tensor_rgb)[None].repeat(2, 1, 1, 1)
    expected = {"vit": 0, "tome:r=4": 0, "pitome": 0, "tome:r=0.05": 0, "dcts": 2, "dtop": 2, "step": 4, "algm": 2,
                "evit": 0, "tome:r=4:count=per-image": 12, "hourglass": 0, "cubist": 0}
    for method, syncs in expected.items():
        loaded, _ = load_model(ModelOptions(method=method, device="cpu"))
        with torch.no_grad(), count_host_syncs("cpu") as count:
            loaded.model(x, setting=loaded.setting)
        assert count.total == syncs, (method, count.calls)


def test_a_padded_cpu_batch_runs_its_blocks_over_the_real_tokens_only_and_decides_as_each_image_alone() -> None:
    """On the CPU the blocks run over the packed real tokens of a padded batch (projections and MLPs over
    the T real tokens, attention per image on its exact length) and the dCTS policy scores one image at a
    time: the batch's outputs are those of the padded path and of each image alone (to float rounding:
    the attention sums in another order), and every image's partition is the one it gets alone. bench
    reports the padding share."""
    from tokenscope.jobs.bench import bench_images
    from tokenscope.jobs.setup import ModelOptions, load_model
    from tokenscope.models.encoder_block import EncoderBlock
    from tokenscope.models.step_vit import StepViT

    loaded, _ = load_model(ModelOptions(device="cpu"))
    model, s = loaded.model, loaded.setting
    x = bench_images(256, 4, None)
    packed_lengths = []
    real_packed, real_packing = EncoderBlock._packed, StepViT._packing

    def spy(self, x_, mask, num_prefix, rope, packing):  # type: ignore[no-untyped-def]
        packed_lengths.append(packing.lengths)
        return real_packed(self, x_, mask, num_prefix, rope, packing)

    with torch.no_grad():
        EncoderBlock._packed = spy  # type: ignore[method-assign]
        try:
            packed = model(x, setting=s)
        finally:
            EncoderBlock._packed = real_packed  # type: ignore[method-assign]
        StepViT._packing = lambda self, seq: None  # type: ignore[method-assign]
        try:
            padded = model(x, setting=s)
        finally:
            StepViT._packing = real_packing  # type: ignore[method-assign]
        alone = [model(x[i:i + 1], setting=s) for i in range(4)]
    assert len(packed_lengths) == model.depth  # every block of the padded batch ran packed
    assert all(len(set(lengths)) > 1 for lengths in packed_lengths)
    assert torch.allclose(packed.patch_logits, padded.patch_logits, atol=1e-4)
    assert torch.equal(packed.exit_block, padded.exit_block)
    for i, out in enumerate(alone):
        assert np.array_equal(out.partitions[0].token_of_patch, packed.partitions[i].token_of_patch)
        assert torch.allclose(out.patch_logits[0], packed.patch_logits[i], atol=1e-4)
        assert torch.equal(out.exit_block[0][:out.partitions[0].num_tokens],
                           packed.exit_block[i][:out.partitions[0].num_tokens])
    from tokenscope.analysis.bench import run_bench

    result = run_bench(model, x, torch.device("cpu"), s, repeats=1, warmup=0, recorder_repeats=1)
    assert 0.0 < result.step.padding_pct < 100.0 and result.baseline.padding_pct == 0.0
    assert result.summary()["step"]["padding_pct"] == result.step.padding_pct


def test_timing_keeps_freed_memory_in_the_process_and_says_so() -> None:
    """bench sets glibc to keep freed memory before it measures (the reduced forward's many differently sized
    tensors otherwise fault their pages in again on every pass), once, and records it beside the numbers."""
    import ctypes

    from tokenscope.analysis.bench import environment
    from tokenscope.models.runtime import keep_freed_memory

    note = keep_freed_memory()
    assert note == keep_freed_memory()  # set once
    assert environment(torch.device("cpu"))["allocator"] == note
    try:
        ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        assert "not glibc" in note
    else:
        assert note.startswith("glibc")
