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
from tokenscope.models.checkpoints import load_checkpoint
from tokenscope.models.resolve import build_model
from tokenscope.trace.trace import Trace


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


@pytest.mark.parametrize("flags,message", [(["--freeze", "policy"], "--freeze 'policy'"),
                                           (["--crops", "128x1"], "--crops 128x1: one 128-px crop")])
def test_bad_fine_tuning_options_are_one_line_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("linear", classes=len(CLASSES)), "linear")
    res = CliRunner().invoke(app, ["train", "--init", str(ckpt), "--out", str(tmp_path / "x"), "--steps", "2",
                                   "--device", "cpu", *flags])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "x.json").exists()


def _fake_ade20k(root: Path, n: int = 3) -> Path:
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            lab = np.zeros((80, 112), np.uint8)  # 0 = "other", ignored
            lab[:40] = 3  # sky (class 2 after the shift)
            lab[40:] = 7  # road
            lab[50:70, 30:60] = rng.integers(1, 151)
            img = (rng.random((80, 112, 3)) * 40 + lab[..., None]).astype(np.uint8)
            cv2.imwrite(str(base / "images" / split / f"ADE_{split}_{i:08d}.jpg"), img)
            cv2.imwrite(str(base / "annotations" / split / f"ADE_{split}_{i:08d}.png"), lab)
    return root


def test_finetuning_on_an_ade20k_tree_keeps_the_sliding_window_protocol(tmp_path: Path) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("linear", seed=5, classes=150), "linear")
    root = _fake_ade20k(tmp_path / "data")
    out = tmp_path / "ft" / "ade"
    res = CliRunner().invoke(app, ["train", "--init", str(ckpt), "--data", "ade20k", "--root", str(root), "--out", str(out),
                                   "--freeze", "encoder", "--steps", "3", "--crops", "64x2", "--warmup", "1",
                                   "--device", "cpu", "--save-every", "3"])
    assert res.exit_code == 0, res.output
    loaded = load_checkpoint(out.with_suffix(".json"))
    assert loaded.config.window == 64 and loaded.config.class_names[2] == "sky"
    evaluation = loaded.metadata["evaluation"]["variants"]
    assert evaluation["step"]["images"] == 3 and evaluation["step"]["windows"] == 3 * 2  # 64x90 after resize: 2 windows


def test_a_new_model_on_a_known_data_set_records_segmenters_protocol(tmp_path: Path) -> None:
    root = _fake_ade20k(tmp_path / "data", n=2)
    out = tmp_path / "new"
    res = CliRunner().invoke(app, ["train", "--model", "demo", "--decoder", "mask", "--data", "ade20k", "--root", str(root),
                                   "--out", str(out), "--steps", "1", "--crops", "64x2", "--warmup", "0", "--device", "cpu",
                                   "--no-eval"])
    assert res.exit_code == 0, res.output
    cfg = load_checkpoint(out.with_suffix(".json")).config
    assert (cfg.decoder, cfg.dataset, cfg.window, cfg.stride, cfg.resize_short) == ("mask", "ade20k", 512, 512, 512)
    assert cfg.num_classes == 150 and len(cfg.class_colours) == 150


def test_training_with_algm_lowers_the_loss_and_the_checkpoint_runs_with_algm(tmp_path: Path) -> None:
    ckpt = write_segmenter_release(tmp_path / "seg", segmenter_state("mask", seed=23, classes=len(CLASSES)), "mask")
    out = tmp_path / "ft" / "algm"
    res = CliRunner().invoke(app, ["train", "--init", str(ckpt), "--out", str(out), "--method", "algm:threshold=0.5",
                                   "--steps", "30", "--crops", "64x4", "--lr", "3e-3", "--warmup", "2", "--size", "96",
                                   "--train-seeds", "0:6", "--val-seeds", "900000:900002", "--device", "cpu",
                                   "--seed", "1", "--save-every", "30"])
    assert res.exit_code == 0, res.output
    blob = torch.load(out.with_suffix(".train.pt"), weights_only=True)
    history = json.loads(blob["history"])
    assert blob["settings"]["method"] == "algm:threshold=0.5"
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    runs = tmp_path / "runs"
    run = CliRunner().invoke(app, ["run", "sample_images/street_5000001.png", "--weights", str(out.with_suffix(".json")),
                                   "--method", "algm:threshold=0.5", "--window", "0", "--size", "128", "--device", "cpu",
                                   "--out", str(runs), "--no-animation"])
    assert run.exit_code == 0, run.output
    (folder,) = [p for p in next(runs.glob("run-*")).iterdir() if (p / "trace.json").is_file()]
    trace = Trace.load(folder)
    assert trace.meta.merging["kind"] == "algm" and trace.merges_per_block().sum() > 0


def test_train_refuses_a_method_without_merging(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "x"), "--method", "cts", "--steps", "2",
                                   "--device", "cpu"])
    assert res.exit_code == 2 and "train --method takes a merging method" in res.output, res.output
