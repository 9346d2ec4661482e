"""Fine-tuning STEP from an imported Segmenter: the loss goes down, and the result runs with a
learned policy and learned exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from segmenter_reference import segmenter_state, write_segmenter_release
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.data.synthetic import CLASSES
from tokenscope.models.checkpoints import build_model, load_checkpoint


@pytest.mark.parametrize("freeze", ["", "encoder"])
def test_finetuning_an_imported_segmenter_lowers_the_loss_and_runs_with_learned_policy_and_exits(
        tmp_path: Path, freeze: str) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("mask", seed=21, classes=len(CLASSES)), "mask")
    before = build_model("demo", weights=str(ckpt)).model.state_dict()
    out = tmp_path / "ft" / "step"
    args = ["train", "--init", str(ckpt), "--out", str(out), "--steps", "30", "--crops", "64x4", "--lr", "3e-3",
            "--warmup", "2", "--size", "96", "--train-seeds", "0:6", "--val-seeds", "900000:900002", "--device", "cpu",
            "--seed", "1", "--save-every", "30"]
    if freeze:
        args += ["--freeze", freeze]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    loaded = load_checkpoint(out.with_suffix(".json"))
    assert all(loaded.trained.values()) and loaded.config.decoder == "mask"
    history = json.loads(torch.load(out.with_suffix(".train.pt"), weights_only=True)["history"])
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    after = loaded.model.state_dict()
    encoder_same = all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks."))
    gates_changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("gates."))
    assert encoder_same == (freeze == "encoder") and gates_changed
    run = CliRunner().invoke(app, ["run", "sample_images/street_5000001.png", "--weights", str(out.with_suffix(".json")),
                                   "--policy", "learned", "--exits", "learned", "--window", "0", "--size", "128",
                                   "--device", "cpu", "--out", str(tmp_path / "runs"), "--no-animation"])
    assert run.exit_code == 0, run.output


def test_freezing_an_unknown_part_is_a_one_line_error(tmp_path: Path) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("linear", classes=len(CLASSES)), "linear")
    res = CliRunner().invoke(app, ["train", "--init", str(ckpt), "--out", str(tmp_path / "x"), "--freeze", "policy",
                                   "--steps", "2", "--device", "cpu"])
    assert res.exit_code == 2 and "--freeze 'policy'" in res.output
    assert not (tmp_path / "x.json").exists()
