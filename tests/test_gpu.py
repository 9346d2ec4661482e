"""GPU checks: skipped without CUDA (CI has none); `scripts/gpu_check.sh` runs them on a GPU machine.

The same models must give the same tokens and (within float tolerance) the same logits on the GPU
as on the CPU in float32; under bf16 autocast every trace must stay consistent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, blocky_image, make_tiny, setting
from segmenter_reference import reference_forward, segmenter_state, write_segmenter_release

from tokenscope.analysis.windowed import predict
from tokenscope.data.images import prepare_image
from tokenscope.data.windows import WindowSpec
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.resolve import build_model
from tokenscope.trace.capture import TraceCapture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _loaded(decoder: str) -> LoadedModel:
    m = make_tiny(0, TINY.replace(decoder=decoder, decoder_layers=1))
    return LoadedModel(m, m.cfg, {"backbone": True, "decoder": True, "exits": True, "policy": True}, "t", "t")


@pytest.mark.parametrize("decoder", ["linear", "mask"])
def test_gpu_and_cpu_agree_in_float32(decoder: str) -> None:
    img, lab = blocky_image(96, 128)
    im = prepare_image(img, "x", labels=lab)
    results = []
    for device in (torch.device("cpu"), CUDA):
        loaded = _loaded(decoder)
        loaded.model.to(device)
        s = setting(loaded.model, policy="uniform", exits=True, exit_threshold=0.3)
        trace, logits = TraceCapture(loaded, device, s).run([im])
        trace[0].assert_consistent()
        results.append((trace[0], logits))
    (tc, lc), (tg, lg) = results
    assert np.array_equal(tc.token_of_patch, tg.token_of_patch)
    assert torch.allclose(lc, lg, atol=1e-4)


def test_bf16_autocast_traces_stay_consistent() -> None:
    loaded = _loaded("mask")
    loaded.model.to(CUDA)
    s = setting(loaded.model, policy="uniform", exits=True, exit_threshold=0.3)
    img, lab = blocky_image(256, 320)
    traces = TraceCapture(loaded, CUDA, s, amp=True)([prepare_image(img, "x", labels=lab)])
    for t in traces:
        t.assert_consistent()
        assert t.meta.device.startswith("cuda")


def test_imported_segmenter_matches_reference_on_gpu(tmp_path: Path) -> None:
    state = segmenter_state("mask")
    loaded = build_model("demo", weights=str(write_segmenter_release(tmp_path / "s", state, "mask")))
    model = loaded.model.to(CUDA)
    x = torch.rand(2, 3, 80, 112, generator=torch.Generator().manual_seed(0))
    ref = reference_forward(state, x, (0.5,) * 3, (0.5,) * 3, enc_eps=1e-5, pos_mode="bilinear")
    with torch.no_grad():
        got = model(x.to(CUDA), setting=setting(model, policy="none", exits=False)).patch_logits.cpu()
    assert (got - ref).abs().max().item() < 1e-3  # TF32 matmuls may be on


def test_sliding_windows_on_gpu(tmp_path: Path) -> None:
    loaded = build_model("demo", weights=str(write_segmenter_release(tmp_path / "s", segmenter_state("mask"), "mask")))
    loaded.model.to(CUDA)
    img, lab = blocky_image(96, 150)
    pred = predict(TraceCapture(loaded, CUDA, setting(loaded.model, policy="uniform", exits=False), amp=True), prepare_image(img, "x", labels=lab), WindowSpec(64, 48, 64))
    assert len(pred.traces) == 2 and pred.label_map.shape == (96, 150)
    for t in pred.traces:
        t.assert_consistent()


@pytest.mark.parametrize("method", ["tome:r=6", "algm:threshold=0.2", "step+tome:r=3", "cts:groups=5"])
def test_methods_on_gpu_match_the_cpu_in_float32_and_stay_consistent_in_bf16(method: str) -> None:
    from tokenscope.jobs.setup import ModelOptions, method_setting

    img, lab = blocky_image(96, 128)
    im = prepare_image(img, "x", labels=lab)
    traces = []
    for device, amp in ((torch.device("cpu"), False), (CUDA, False), (CUDA, True)):
        loaded = _loaded("mask")
        loaded.model.to(device)
        loaded.setting = method_setting(loaded, ModelOptions(device=device.type, exit_threshold=0.3, amp=amp), method)
        trace = TraceCapture(loaded, device, amp=amp)([im])[0]
        trace.assert_consistent()
        traces.append(trace)
    cpu, gpu, _ = traces
    assert np.array_equal(cpu.token_of_patch, gpu.token_of_patch)
    if "tome" in method:  # a fixed count per block; thresholded merges may flip on float noise (TF32)
        assert np.array_equal(cpu.merges_per_block(), gpu.merges_per_block())


def test_cuda_event_timing_agrees_with_synchronised_wall_time() -> None:
    import time

    from tokenscope.models.runtime import Stopwatch, synchronize

    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    synchronize(device)
    t0 = time.perf_counter()
    with Stopwatch(device) as watch:
        for _ in range(20):
            a = a @ a / 64.0
    synchronize(device)
    wall = time.perf_counter() - t0
    assert 0 < watch.seconds <= wall * 1.05 and watch.seconds > 0.5 * wall
