"""DToP's context rule at the exit gates: the K most confident qualifying tokens of each class stay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from tokenscope.cli import app
from tokenscope.models.exits import hold_back_per_class
from tokenscope.trace.trace import Trace


def _reference(candidates: np.ndarray, conf: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    held = np.zeros_like(candidates)
    for b in range(candidates.shape[0]):
        for c in np.unique(pred[b]):
            idx = np.nonzero(candidates[b] & (pred[b] == c))[0]
            best = idx[np.argsort(-conf[b, idx], kind="stable")][:k]
            held[b, best] = True
    return held


def test_exactly_k_tokens_per_class_stay_when_more_qualify() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5):
        conf = torch.rand(3, 200, generator=g)
        pred = torch.randint(0, 6, (3, 200), generator=g)
        candidates = (conf > 0.3) & (torch.rand(3, 200, generator=g) > 0.1)  # some slots are padding-like
        held = hold_back_per_class(candidates, conf, pred, k)
        assert np.array_equal(held.numpy(), _reference(candidates.numpy(), conf.numpy(), pred.numpy(), k))
        for b in range(3):
            for c in range(6):
                qualifying = int((candidates[b] & (pred[b] == c)).sum())
                assert int((held[b] & (pred[b] == c)).sum()) == min(k, qualifying)
        assert not bool((held & ~candidates).any())
    assert not bool(hold_back_per_class(candidates, conf, pred, 0).any())


def test_held_tokens_are_in_the_trace_and_stay_past_their_gate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "sample_images/street_5000001.png", "--keep-per-class", "5", "--device", "cpu",
                                   "--out", str(out), "--no-animation", "--no-figures"])
    assert res.exit_code == 0, res.output
    trace = Trace.load(next(out.glob("run-*")) / "street_5000001")
    trace.assert_consistent()
    assert trace.meta.keep_per_class == 5 and trace.token_held_at is not None
    held = trace.token_held_at
    first_gate = trace.meta.exit_after[0]
    at_first = held == first_gate
    assert at_first.any()
    assert np.all(trace.token_exit_block[held > 0] > held[held > 0])  # a held token went on
    # every token held at the first gate would have left there without the rule
    res0 = CliRunner().invoke(app, ["run", "sample_images/street_5000001.png", "--device", "cpu", "--out",
                                    str(tmp_path / "off"), "--no-animation", "--no-figures"])
    assert res0.exit_code == 0, res0.output
    off = Trace.load(next((tmp_path / "off").glob("run-*")) / "street_5000001")
    assert off.token_held_at is None and off.meta.keep_per_class == 0
    assert int((off.token_exit_block == first_gate).sum()) - int((trace.token_exit_block == first_gate).sum()) == int(at_first.sum())
