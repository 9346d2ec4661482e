"""The example notebook runs, top to bottom, on the shipped demo: it can never rot unnoticed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "where_do_tokens_go.ipynb"


def test_example_notebook_executes_offline_in_under_a_minute(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(NOTEBOOK.parent.parent)  # the notebook reads sample_images/ from the repository root
    matplotlib.use("Agg")
    doc = json.loads(NOTEBOOK.read_text())
    assert doc["nbformat"] == 4
    namespace: dict[str, object] = {"__name__": "__notebook__"}
    t0 = time.perf_counter()
    executed = 0
    for i, cell in enumerate(doc["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        assert not any(line.lstrip().startswith(("%", "!")) for line in source.splitlines()), "plain Python only"
        exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
        executed += 1
    assert executed >= 10
    assert time.perf_counter() - t0 < 60
    assert namespace["tables"].summary["images"] == 3  # type: ignore[attr-defined]
