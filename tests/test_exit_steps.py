"""A method's own exits: a step may let tokens leave with a prediction of its own (an ExitDecision),
carried out by the encoder on the same path as the model's trained gates and accounted as exits in
traces, fates and FLOPs. The rule here is a plug-in file, so nothing of tokenscope names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.trace.fates import EXITED, REACHED_END, token_fates
from tokenscope.trace.trace import TRACE_JSON, Trace

IMAGE = Path(__file__).resolve().parents[1] / "sample_images" / "street_5000001.png"

RULE = '''
import torch
import torch.nn as nn
from tokenscope.methods import ExitDecision, Method, Plan, Setting, Step


class NormExit(nn.Module):
    """After `block`, the `frac` of tokens with the largest feature norm exit, each predicting
    class (trace id mod C) with its own logits: a rule whose predictions are known in advance."""

    def __init__(self, block, frac):
        super().__init__()
        self.block, self.frac = block, frac

    def forward(self, view):
        norms = torch.where(view.valid, view.x.float().norm(dim=-1), torch.full(view.valid.shape, -1.0))
        leave = torch.floor(view.valid.sum(dim=1).double() * self.frac).long()
        order = torch.argsort(-norms, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        exits = view.valid & (rank < leave[:, None])
        logits = torch.zeros(*view.valid.shape, view.num_classes)
        logits.scatter_(2, (view.token_ids.clamp_min(0) % view.num_classes).unsqueeze(-1), 8.0)
        return ExitDecision(self.block, "norm_exit", view.token_ids, view.valid, exits, logits)


def plan(values, facts):
    block = int(values["block"])
    return Plan(policy="none", steps=(Step(block, "after", NormExit(block, values["frac"]), "norm_exit", does="exit"),))


METHOD = Method(name="norm_exit", kind="exit", plan=plan,
                settings=(Setting("frac", float, 0.25, "share that exits"), Setting("block", int, 2, "after which block")),
                summary="the tokens with the largest norm exit after one block with a prediction of their own")
'''


@pytest.fixture()
def rule(tmp_path: Path) -> Path:
    path = tmp_path / "norm_exit.py"
    path.write_text(RULE)
    return path


def _run(tmp_path: Path, *args: str) -> Trace:
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--size", "128", "--device", "cpu", "--no-animation", "--no-figures",
                                 "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return Trace.load(next((tmp_path / "o").rglob(TRACE_JSON)).parent)


def test_a_plugins_exit_step_lets_tokens_leave_with_its_own_prediction(tmp_path: Path, rule: Path) -> None:
    trace = _run(tmp_path, "--method", f"{rule}:frac=0.25:block=2")
    trace.assert_consistent()  # every patch once; block counts equal what the exits imply
    n = trace.num_tokens
    exited = trace.token_exit_block == 2
    assert exited.sum() == int(0.25 * n) and set(np.unique(trace.token_exit_block)) == {2, trace.meta.depth}
    assert trace.block_tokens_in[2] == n - exited.sum()  # they really skip the later blocks
    ids = np.nonzero(exited)[0]
    assert np.array_equal(trace.token_class[ids], ids % trace.meta.num_classes)  # the step's own prediction is final
    assert trace.meta.exits and 2 in trace.meta.exit_after
    fates = token_fates(trace)
    assert (fates.kind[exited] == EXITED).all() and (fates.kind[~exited] == REACHED_END).all()
    assert trace.meta.flops["exiting"] >= 0 and "gates" in trace.meta.flops


def test_an_exit_step_with_nonsense_logits_is_one_line(tmp_path: Path, rule: Path) -> None:
    rule.write_text(rule.read_text().replace("8.0)", "float('nan'))"))
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--method", f"{rule}", "--size", "128", "--device", "cpu",
                                 "--no-animation", "--no-figures", "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "method norm_exit" in r.output and "logits hold NaN" in r.output, r.output
