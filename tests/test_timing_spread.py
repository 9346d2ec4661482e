"""Timing you can trust: interleaved repeats, a speed-up with its interval, a warning when repeats
disagree; and the paper-table options (columns, table*, an unlabelled sweep's axis)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tokenscope.analysis.timing_spread import (disagreement, paired_timing, per_repeat_totals, speedup_interval,
                                               spread_ms, throughput_interval)
from tokenscope.analysis.uncertainty import draws
from tokenscope.cli import app
from tokenscope.render.pareto import methods_pareto_figure
from tokenscope.render.tables import PaperTable, render_table, select_columns

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "sample_images" / "street_5000001.png"


def test_the_speed_up_interval_is_a_bootstrap_over_paired_repeats() -> None:
    base = [1.0, 1.1, 0.9, 1.05, 2.0]
    fast = [0.5, 0.55, 0.45, 0.5, 1.0]
    ci = speedup_interval(base, fast, resamples=300)
    assert ci["value"] == pytest.approx(np.median(base) / np.median(fast))
    idx = draws(5, 300)
    samples = np.median(np.asarray(base)[idx], axis=1) / np.median(np.asarray(fast)[idx], axis=1)
    assert ci["low"] == pytest.approx(np.quantile(samples, 0.025)) and ci["high"] == pytest.approx(np.quantile(samples, 0.975))
    assert speedup_interval([1.0], [0.5])["low"] is None  # one pair: no interval
    with pytest.raises(ValueError):
        speedup_interval([1.0, 2.0], [1.0])


def test_repeats_that_disagree_give_one_warning_line() -> None:
    assert disagreement("baseline", [0.566, 0.7, 1.524]) is not None
    assert "2.7x" in disagreement("baseline", [0.566, 0.7, 1.524])
    assert disagreement("baseline", [1.0, 1.1, 1.2]) is None
    s = spread_ms([0.1, 0.2, 0.3, 0.4])
    assert s["median_ms"] == pytest.approx(250) and s["iqr_ms"] == pytest.approx(150)
    assert per_repeat_totals([[1, 2, 3], [10, 20, 30]]) == [11, 22, 33]
    cols, warnings = paired_timing([[1.0, 1.0, 1.0]], [[0.5, 0.5, 2.0]], "tome")
    assert cols["speedup_pairs"] == 3 and len(warnings) == 1 and "tome" in warnings[0]
    low, high = throughput_interval([0.1, 0.2, 0.1, 0.3])
    assert low < 4 / 0.7 < high


def test_bench_reports_the_speed_up_with_its_interval_over_interleaved_repeats(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    r = CliRunner().invoke(app, ["bench", "--model", "demo", "--size", "128", "--repeats", "4", "--warmup", "1",
                                 "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    ci = doc["speedup_ci"]
    assert ci["pairs"] == 4 and ci["low"] <= ci["value"] <= ci["high"]
    assert doc["timing"]["interleaved"] and doc["timing"]["baseline"]["repeats"] == 4
    assert isinstance(doc["warnings"], list)
    assert "95% CI" in r.output and "IQR" in r.output


def test_compare_gives_each_methods_speed_up_an_interval(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["compare", str(IMAGE), "--methods", "tome", "--size", "128", "--repeats", "3",
                                 "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    run = next(tmp_path.glob("compare-*"))
    overall = {o["method"]: o for o in json.loads((run / "run.json").read_text())["overall"]}
    assert overall["tome"]["speedup_pairs"] == 3
    assert overall["tome"]["speedup_low"] <= overall["tome"]["speedup_high"]
    assert "interleaved" in json.loads((run / "run.json").read_text())["latency"]


def test_table_columns_and_a_wide_latex_table() -> None:
    t = PaperTable("t", ["method", "mIoU (%) [95% CI]", "ΔmIoU (points)", "GFLOPs per image"], [["a", "1", "2", "3"]])
    picked = select_columns(t, "gflops,method")
    assert picked.columns == ["GFLOPs per image", "method"] and picked.rows == [["3", "a"]]
    assert select_columns(t, "miou").columns == ["mIoU (%) [95% CI]"]  # not ΔmIoU: a start, not a substring
    with pytest.raises(Exception, match="starts no column"):
        select_columns(t, "nope")
    latex = render_table(PaperTable("t", ["a", "b"], [["1", "2"]], wide=True), "latex")
    assert latex.startswith("\\begin{table*}") and latex.rstrip().endswith("\\end{table*}")


def test_an_unlabelled_sweep_says_agreement_not_miou_on_its_axis() -> None:
    df = pd.DataFrame([{"size": 128, "point": "baseline", "method": "vit", "is_baseline": True, "miou": 1.0,
                        "gflops_per_image": 1.0, "images": 3, "scored_against": "unreduced model"},
                       {"size": 128, "point": "tome:r=2", "method": "tome", "is_baseline": False, "miou": 0.9,
                        "gflops_per_image": 0.5, "images": 3, "scored_against": "unreduced model"}])
    fig = methods_pareto_figure(df, "gflops_per_image", "GFLOPs", True)
    assert "agreement with the unreduced model" in fig.axes[0].get_ylabel()
