"""The shipped demo model: the default run shows real merges and real early exits offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.data.synthetic import ROAD, SKY
from tokenscope.models.checkpoints import BUILTIN_WEIGHTS_DIR, load_checkpoint
from tokenscope.trace.trace import Trace

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def test_demo_weights_ship_and_are_fully_trained() -> None:
    loaded = load_checkpoint(BUILTIN_WEIGHTS_DIR / "demo.json")
    assert all(loaded.trained.values())
    assert (BUILTIN_WEIGHTS_DIR / "demo.safetensors").stat().st_size < 25 * 2**20


def test_default_run_merges_sky_and_road_and_exits_them_early(tmp_path: Path) -> None:
    scene = SAMPLES / "street_5000001.png"
    r = CliRunner().invoke(app, ["run", str(scene), "--labels", str(SAMPLES / "labels"), "--device", "cpu",
                                 "--out", str(tmp_path), "--no-animation"])
    assert r.exit_code == 0, r.output
    (run,) = list(tmp_path.glob("run-*"))
    trace = Trace.load(run / "street_5000001")
    assert trace.meta.model == "demo" and trace.meta.policy == "learned" and trace.meta.exits
    labels = trace.patch_labels
    level = trace.per_patch(trace.token_level)
    early = trace.per_patch(trace.exited_early)
    for cls in (SKY, ROAD):
        region = labels == cls
        assert region.sum() > 50
        big = region & (level >= 2)
        assert big.mean() / region.mean() > 0.3, f"class {cls}: too few patches in level >= 2 supertokens"
        assert np.any(big & early), f"class {cls}: no large supertoken exits early"
    assert trace.num_tokens < trace.num_patches / 1.5
