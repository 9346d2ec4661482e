"""ViTs with 8- and 14-pixel patches (Segmenter B/8, DINOv2-style /14) run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.models.checkpoints import save_checkpoint
from tokenscope.models.registry import StepConfig
from tokenscope.models.step_vit import StepViT
from tokenscope.trace.trace import Trace

import torch


def _checkpoint(tmp_path: Path, patch: int) -> Path:
    cfg = StepConfig(name=f"tiny-p{patch}", arch="vit_tiny_patch16_224", num_classes=4, exit_after=(1, 2),
                     timm_kwargs={"depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": patch}, img_size=patch * 8,
                     class_names=("sky", "road", "car", "tree"), decoder="mask", decoder_layers=1)
    torch.manual_seed(0)
    path = tmp_path / f"p{patch}" / "model.json"
    save_checkpoint(StepViT(cfg), path, trained={"backbone": True, "decoder": True, "exits": True, "policy": True})
    return path


@pytest.mark.parametrize("patch", [8, 14])
def test_non_16_patch_models_run_heatmap_and_compare(tmp_path: Path, patch: int) -> None:
    ckpt = _checkpoint(tmp_path, patch)
    out = tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["run", "sample_images/street_5000001.png", "--weights", str(ckpt), "--size", "150",
                              "--labels", "sample_images/labels", "--device", "cpu", "--out", str(out),
                              "--exit-threshold", "0.3", "--no-animation", "--ignore-class-mismatch"])
    assert res.exit_code == 0, res.output
    assert "class mismatch ignored" in res.output  # a 4-class model scored on the 7-class sample labels
    run = next(out.glob("run-*"))
    trace = Trace.load(run / "street_5000001")
    trace.assert_consistent()
    assert trace.patch_size == patch
    assert trace.meta.padded_hw[0] % patch == 0 and trace.meta.grid[0] == trace.meta.padded_hw[0] // patch
    assert trace.meta.input_hw == (150, 150) and trace.label_map.shape == (150, 150)
    levels = json.loads((run / "summary.json").read_text())
    assert levels["patches"] == trace.num_patches
    import pandas as pd

    assert pd.read_csv(run / "tables" / "levels.csv")["side_px"].tolist()[:2] == [patch, 2 * patch]
    res = runner.invoke(app, ["heatmap", str(run)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", "sample_images/street_5000001.png", "--weights", str(ckpt), "--size", "150",
                              "--device", "cpu", "--out", str(out), "--repeats", "1", "--warmup", "0"])
    assert res.exit_code == 0, res.output
    cmp = next(out.glob("compare-*"))
    base = Trace.load(cmp / "street_5000001" / "baseline")
    assert base.num_tokens == base.num_patches == int(np.prod(base.meta.grid))
    assert base.meta.grid == (-(-150 // patch), -(-150 // patch))
