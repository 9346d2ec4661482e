"""Training: the loss goes down, checkpoints reload exactly, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import torch

from conftest import TINY, make_tiny
from tokenscope.data.datasets import SyntheticDataset
from tokenscope.data.synthetic import CLASSES
from tokenscope.models.checkpoints import LoadedModel, load_checkpoint
from tokenscope.models.registry import StepConfig
from tokenscope.train.trainer import Trainer, TrainSettings, pixel_exit_blocks

CFG = StepConfig(**{**TINY.to_dict(), "num_classes": len(CLASSES), "class_names": CLASSES})


def _trainer(out: Path, steps: int, save_every: int = 100) -> Trainer:
    model = make_tiny(0, CFG)
    settings = TrainSettings(steps=steps, crops=((64, 4),), lr=3e-3, policy_lr=3e-3, warmup=2, save_every=save_every, seed=1)
    data = SyntheticDataset(range(6), 96, 96)
    return Trainer(LoadedModel(model, CFG, {}, "t", "t"), data, settings, out, torch.device("cpu"))


def test_training_lowers_the_loss_and_the_checkpoint_reloads_exactly(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "m", steps=30)
    state = trainer.fit()
    first = sum(h["loss"] for h in state.history[:5]) / 5
    last = sum(h["loss"] for h in state.history[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert state.history[-1]["policy"] < state.history[0]["policy"]
    loaded = load_checkpoint(tmp_path / "m.json")
    assert all(loaded.trained.values())
    model = trainer.model.eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():  # the model's own operating point: the learned policy and the gates
        a, b = model(x), loaded.model(x)
    assert torch.equal(a.patch_logits, b.patch_logits) and torch.equal(a.exit_block, b.exit_block)


def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = _trainer(tmp_path / "whole", steps=6)
    whole.fit()
    first = _trainer(tmp_path / "part", steps=6, save_every=3)

    class Killed(Exception):
        pass

    def kill_at_step_4(step: int, total: int, losses: dict[str, float]) -> None:
        if step == 4:  # step 4 is done but not saved: the resume must redo it
            raise Killed

    with pytest.raises(Killed):
        first.fit(kill_at_step_4)
    second = _trainer(tmp_path / "part", steps=6, save_every=3)
    second.resume()
    assert second.state.step == 3
    second.fit()
    a = whole.model.state_dict()
    b = second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exit_aware_steps_really_drop_tokens_and_supervise_only_tokens_that_reach_a_gate(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path / "m", steps=4)
    trainer.s.exit_aware_steps = 2
    assert [trainer.exit_aware(s) for s in range(4)] == [False, False, True, True]
    model = trainer.model
    trainer.setting = dataclasses.replace(trainer.setting, exit_threshold=0.0)  # every token exits at the first gate
    trainer.s.aux_weight = 0.0  # so any gradient on a gate head comes from the final loss
    x, y, seeds = trainer.batch(0)
    losses = trainer.losses(x, y, exits=True, seeds=seeds)
    assert torch.isfinite(losses["loss"])
    first, second = model.exit_after
    with torch.no_grad():
        out = model(x, y, return_aux=True, setting=dataclasses.replace(trainer.setting, policy=trainer.train_policy))
    assert int(out.exit_block.max()) == first  # nobody went past the first gate
    assert second not in out.aux_patch_logits  # no token reached the second gate
    reached = pixel_exit_blocks(out, y.shape[-2:])
    assert reached.shape == y.shape and bool((reached == first).all())
    losses["loss"].backward()
    assert model.gates[str(first)].head.weight.grad.abs().sum() > 0  # the final loss flows through the exit head


@pytest.mark.parametrize("flags, message", [(["--exit-aware-steps", "9"], "--exit-aware-steps must be in 0..5"),
                                            (["--warmup", "-1"], "--warmup must be >= 0")])
def test_bad_training_schedule_is_a_one_line_error(tmp_path: Path, flags: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from tokenscope.cli import app

    r = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "m"), "--steps", "5", "--device", "cpu", *flags])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not any(tmp_path.iterdir())
