"""scripts/gpu_check.sh --smoke-cpu: every row of the GPU check's quick tier, once, at 128 px on the CPU,
with whatever Python runs the tests and the package imported from the checkout (as on a lent GPU
machine, where nothing can be installed). Proves on any machine that each command of the lease runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = 13
"""ViT-L at batch 1 and 2 (dCTS 2.5x, ToMe, ALGM, EViT), EoMT-L and DINOv3-L (ToMe, ALGM), the demo's full STEP."""


def test_the_gpu_checks_quick_rows_all_run_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    env = {**os.environ, "PYTHON": sys.executable, "TOKENSCOPE_OFFLINE": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke-cpu", f"--out={out}"],
                       capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    results = sorted(out.glob("gpu_*.json"))
    assert len(results) == ROWS, [p.name for p in results]
    for path in results:
        summary = json.loads(path.read_text())
        assert summary["flop_reduction"] > 1.0 and summary["speedup"] > 0, path.name  # each row really reduces
        assert "host_syncs" in summary["step"], path.name
    times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()]
    assert len(times) == ROWS and all(status == "ok" for *_, status in times)
    table = (out / "gpu_summary.md").read_text().splitlines()
    assert len([line for line in table if line.startswith("| ") and "cpu" in line]) == ROWS
    assert "0 failed row(s)" in r.stdout
