"""Every token's fate: one account from the trace (trace/fates.py), read by every table and figure.

The invariant is checked on every built-in method, the composites the tests use and a plug-in method
file: the patches of every class in each fate add up to its patches, and the per-patch cost adds up
to the trace's token-blocks and block FLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import tokenscope as ts
from tokenscope.analysis.aggregate import aggregate
from tokenscope.analysis.stats import blocks_table, tokens_table
from tokenscope.cli import app
from tokenscope.render.tables import paper_table, render_table
from tokenscope.trace.fates import (EXITED, FATES, MERGED, PRUNED, REACHED_END, assert_fates_cover, fate_totals,
                                    patch_cost, token_fates)
from tokenscope.trace.trace import TraceInconsistency

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"
LABELS = ROOT / "sample_images" / "labels" / "street_5000001.png"
PLUGIN = ROOT / "examples" / "plugins" / "norm_prune" / "norm_prune.py"
METHODS = ["vit", "step", "dcts", "dtop", "cts", "tome", "algm", "evit", "step+tome", "dtop+evit", "cts+algm",
           "tome:r=8", "evit:rate=0.5", "pitome", "step+pitome:ratio=0.9", "hourglass", "cubist",
           "hourglass+evit:side=0.5:at=2"]


def _trace(method: str, size: int = 256) -> ts.Trace:
    model = ts.load_model("demo", method=method)
    return ts.trace(model, IMAGE, labels=LABELS, size=size)


@pytest.fixture(scope="module")
def traces() -> dict[str, ts.Trace]:
    return {m: _trace(m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_every_methods_fates_cover_every_class_and_the_cost_adds_up(traces: dict[str, ts.Trace], method: str) -> None:
    t = traces[method]
    t.assert_consistent()
    fates = token_fates(t)
    assert_fates_cover(t, fates)
    totals = fate_totals(t, fates)
    assert sum(totals[f"tokens_{k}"] for k in FATES) == t.num_tokens
    assert sum(totals[f"patches_{k}"] for k in FATES) == t.num_patches
    blocks, flops = patch_cost(t)
    assert blocks.sum() == pytest.approx(t.tokens_in_block().sum(), rel=1e-9)
    ran = t.tokens_in_block() > 0
    assert flops.sum() == pytest.approx(t.block_flops[ran].astype(float).sum(), rel=1e-9)
    tables = aggregate([("img", t, None)])
    classes = tables.classes
    for _, row in classes.iterrows():
        assert sum(row[f"patches_{k}"] for k in FATES) == row["patches"]
        places = [c for c in classes.columns if c.startswith("patches_") and "level" not in c
                  and c.removeprefix("patches_") not in FATES]
        assert sum(row[c] for c in places) + row["patches_reached_end"] == row["patches"]
    assert classes["patches"].sum() == t.num_patches
    assert classes["token_blocks"].sum() == pytest.approx(t.tokens_in_block().sum(), rel=1e-9)
    assert not any(c.startswith("tokens_exit_") for c in classes.columns)
    assert "iou_step" not in classes.columns


def test_each_methods_fates_are_the_ones_it_makes(traces: dict[str, ts.Trace]) -> None:
    kinds = {m: set(np.unique(token_fates(t).kind).tolist()) for m, t in traces.items()}
    assert kinds["vit"] == {REACHED_END} and kinds["dcts"] == {REACHED_END} and kinds["cts"] == {REACHED_END}
    assert EXITED in kinds["step"] and EXITED in kinds["dtop"]
    assert MERGED in kinds["tome"] and MERGED in kinds["algm"] and PRUNED not in kinds["tome"]
    assert PRUNED in kinds["evit"] and EXITED not in kinds["evit"] and MERGED not in kinds["evit"]
    assert {MERGED, EXITED} <= kinds["step+tome"]
    assert {PRUNED, EXITED} <= kinds["dtop+evit"]


def test_evit_prunes_are_named_by_block_and_never_called_exits(traces: dict[str, ts.Trace]) -> None:
    t = traces["evit"]
    classes = aggregate([("img", t, None)]).classes
    pruned_cols = [c for c in classes.columns if c.startswith("patches_pruned_b")]
    blocks = sorted(t.meta.pruning["after"] + t.meta.pruning["inside"])
    assert pruned_cols == [f"patches_pruned_b{b}" for b in blocks]  # in the order of the blocks
    assert not any("exited_gate" in c for c in classes.columns)
    assert classes["patches_pruned"].sum() == int(t.token_patches[t.token_pruned_at > 0].sum())
    tokens = t.tokens()
    assert set(tokens["fate"]) <= set(FATES)
    assert (tokens["pruned_at"] > 0).sum() == (tokens["fate"] == "pruned").sum()
    assert (tokens["fate_block"][tokens["fate"] == "pruned"] == tokens["pruned_at"][tokens["fate"] == "pruned"]).all()
    assert tokens["exited_early"].sum() == 0  # a prune is not an exit
    assert tokens["token_blocks"].sum() == pytest.approx(t.tokens_in_block().sum())
    summary = t.summary()
    assert summary["exited_early_pct"] == 0.0 and summary["pruned_pct"] > 0


def test_merged_tokens_name_the_token_they_joined_and_their_group_fate(traces: dict[str, ts.Trace]) -> None:
    t = traces["step+tome"]
    fates = token_fates(t)
    merged = fates.kind == MERGED
    assert merged.any()
    assert np.array_equal(fates.into[merged], t.token_merged_into[merged])
    assert np.array_equal(fates.block[merged], t.token_merged_at[merged])
    assert not np.any(fates.final_kind == MERGED)
    df = tokens_table(t)
    assert (df.loc[merged, "fate_place"].str.startswith("merged_b")).all()
    blocks = blocks_table(t)
    assert blocks["merged_in_block"].sum() == merged.sum()
    assert blocks["exited_after"].sum() == int((fates.kind == EXITED).sum())


def test_a_broken_fate_account_is_caught(traces: dict[str, ts.Trace]) -> None:
    t = traces["tome"]
    fates = token_fates(t)
    broken = type(fates)(kind=fates.kind.copy(), block=fates.block, into=fates.into.copy(), final=fates.final,
                         depth=fates.depth)
    i = int(np.nonzero(fates.kind == MERGED)[0][0])
    broken.into[i] = -1
    with pytest.raises(TraceInconsistency, match="does not name the token it joined"):
        assert_fates_cover(t, broken)


def test_a_plugin_method_files_prunes_appear_in_the_class_table(tmp_path: Path) -> None:
    rule = tmp_path / "my_rule.py"
    rule.write_text(PLUGIN.read_text())
    r = CliRunner().invoke(app, ["run", str(IMAGE), "--labels", str(LABELS.parent), "--method", f"{rule}:frac=0.3",
                                 "--size", "256", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    run = next((tmp_path / "o").glob("run-*"))
    image = next(p for p in run.iterdir() if (p / "trace.json").is_file())
    t = ts.load_trace(image)
    assert_fates_cover(t)
    classes = pd.read_csv(run / "tables" / "classes.csv")
    assert classes["patches_pruned"].sum() == int(t.token_patches[t.token_pruned_at > 0].sum()) > 0
    assert (classes[[f"patches_{k}" for k in FATES]].sum(axis=1) == classes["patches"]).all()
    assert (run / "figures" / "class_fates.png").is_file() and not (run / "figures" / "class_exits.png").exists()
    md = render_table(paper_table(run, "classes"), "markdown")
    assert "pruned (% of patches)" in md and "token-blocks per patch" in md
    summary = json.loads((run / "summary.json").read_text())
    assert summary["pruned_pct"] > 0 and summary["exited_early_pct"] == 0


def _sweep_folder(folder: Path) -> Path:
    """A two-size sweep folder as `sweep` writes it: each size with its own unreduced row."""
    rows = []
    for size, base_gflops in ((512, 100.0), (1024, 400.0)):
        for point, gflops in (("baseline", base_gflops), ("step", base_gflops / 4)):
            rows.append({"size": size, "point": point, "method": "vit" if point == "baseline" else "step",
                         "is_baseline": point == "baseline", "miou": 0.5, "miou_low": 0.4, "miou_high": 0.6,
                         "miou_change": 0.0 if point == "baseline" else -0.01, "miou_change_low": -0.02,
                         "miou_change_high": 0.0, "gflops_per_image": gflops, "images_per_s": 10.0, "images": 4,
                         "mean_tokens_per_block": 100.0, "exited_early_pct": 20.0, "exited_pct": 20.0,
                         "pruned_pct": 0.0, "merged_pct": 0.0})
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "sweep.csv", index=False)
    (folder / "run.json").write_text(json.dumps({"tool": "tokenscope", "kind": "sweep", "model": "demo",
                                                 "methods": ["step"], "data": {"kind": "synthetic"}}))
    return folder


def test_a_multi_size_sweep_divides_each_size_by_its_own_unreduced_model(tmp_path: Path) -> None:
    table = paper_table(_sweep_folder(tmp_path / "sweep"))
    reduction = {(r[2], r[0]): r[6] for r in table.rows}
    assert reduction[("512", "vit")] == "1.00" and reduction[("1024", "vit")] == "1.00"
    assert reduction[("512", "step")] == "4.00" and reduction[("1024", "step")] == "4.00"
    assert any("same input size" in n for n in table.notes)
    latex = render_table(table, "latex")
    assert "0.25" not in latex.split(r"\midrule")[1].split(r"\bottomrule")[0]


def test_the_explorer_panel_carries_each_tokens_fate_and_cost(traces: dict[str, ts.Trace]) -> None:
    from tokenscope.render.explorer import trace_panel

    t = traces["evit"]
    panel = trace_panel(t, "img")
    assert panel["fate"] == token_fates(t).labels().tolist()
    assert sum(panel["tblocks"]) == pytest.approx(t.tokens_in_block().sum(), abs=0.01 * t.num_tokens)
