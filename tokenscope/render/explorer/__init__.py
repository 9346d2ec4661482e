"""The explorer: an interactive page over a run folder's traces (a renderer: it never loads a model).

The page itself is real files beside this module (`page.html`, `explorer.js`, `explorer.css`);
Python only prepares compact data from what `run` and `compare --methods` wrote:

- the index: what kind of folder it is, the per-image summary rows (tables/images.csv, or
  methods.csv for a comparison), the per-class table, and one entry per image folder;
- one payload per image: the processed image (JPEG, at most `max_side` px), the patch grid,
  `token_of_patch`, and per token its level, top-left patch, exit block, confidence, class and
  merge record (block, target), the tokens entering each block, ground truth per patch when the
  run had labels. A comparison's payload holds one such panel per method, on one image.

Two ways to ship it: `explorer.html` with every payload inline (opens from disk, no network), or,
for large runs, `explorer_data/` (index + one JSON per image) read on demand by the page served
with `tokenscope view --serve`. An image whose trace is missing or damaged gets a payload that
holds only its error, which the page shows in place of the image.
"""

from __future__ import annotations

import base64
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pandas as pd

from tokenscope.errors import RunFolderError, TokenscopeError
from tokenscope.schema import check_fields, read_json
from tokenscope.render.manifest import method_folder_name, read_manifest
from tokenscope.trace.fates import patch_cost, token_fates
from tokenscope.trace.trace import TRACE_JSON, Trace, image_beside, trace_folders

HERE = Path(__file__).parent
DATA_DIR = "explorer_data"
Progress = Callable[[int, int, str], None]

WINDOW_PLAN = {"boxes": list[list[int]], "resized_hw": list[int]}
"""windows.json: where each window lies on the resized whole image."""


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    return read_manifest(run_dir, "tokenscope run or compare folder")


def _jpeg_uri(path: Path, max_side: int) -> str | None:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        return None
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 82])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None


def trace_panel(trace: Trace, name: str) -> dict[str, Any]:
    """What the page needs of one trace, as plain lists (ints; confidences to 3 decimals)."""
    m = trace.meta
    t = trace.num_tokens
    merged_at = trace.token_merged_at if trace.token_merged_at is not None else np.zeros(t, np.int64)
    merged_into = trace.token_merged_into if trace.token_merged_into is not None else np.full(t, -1, np.int64)
    fates = token_fates(trace)
    blocks, _ = patch_cost(trace)
    panel: dict[str, Any] = {
        "name": name, "method": m.method_name, "grid": list(m.grid), "patch": trace.patch_size,
        "input": list(m.input_hw), "padded": list(m.padded_hw), "depth": m.depth, "gates": list(m.exit_after),
        "classes": [m.class_name(c) for c in range(m.num_classes)],
        "colours": [list(c) for c in m.class_colours],
        "top": trace.token_of_patch.astype(np.int64).ravel().tolist(),
        "level": trace.token_level.astype(np.int64).tolist(), "row": trace.token_row.astype(np.int64).tolist(),
        "col": trace.token_col.astype(np.int64).tolist(), "exit": trace.token_exit_block.astype(np.int64).tolist(),
        "conf": [round(float(v), 3) for v in trace.token_confidence], "cls": trace.token_class.astype(np.int64).tolist(),
        "mat": merged_at.astype(np.int64).tolist(), "minto": merged_into.astype(np.int64).tolist(),
        "blocks_in": trace.block_tokens_in.astype(np.int64).tolist(),
        "gflops": round(float(m.flops.get("total", 0)) / 1e9, 3),
        # every token's one fate (trace/fates.py), by name, and the token-blocks its patches ran
        "fate": fates.labels().tolist(),
        "tblocks": [round(float(v), 2) for v in np.bincount(trace.token_of_patch.ravel(), weights=blocks.ravel(),
                                                              minlength=t)],
    }
    if m.queries_join_at:
        panel["query_blocks"] = [m.queries_join_at, m.depth]  # EoMT: blocks the queries go through
    if trace.token_pruned_at is not None:
        panel["pruned"] = trace.token_pruned_at.astype(np.int64).tolist()
    if trace.patch_labels is not None:
        panel["truth"] = trace.patch_labels.astype(np.int64).ravel().tolist()
    return panel


def _load_panel(folder: Path, name: str) -> dict[str, Any]:
    try:
        return trace_panel(Trace.load(folder), name)
    except (TokenscopeError, OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        return {"name": name, "error": f"{folder.name}: the trace cannot be read ({str(exc).splitlines()[0][:200]})"}


def _panels(folder: Path, name: str, max_side: int) -> list[dict[str, Any]]:
    """The trace in `folder`, or with sliding windows one panel per window (`w00/`, ...), each
    drawn over its own window of the image."""
    windows = [p for p in trace_folders(folder) if p != folder]
    if not windows:
        return [_load_panel(folder, name)]
    try:  # where each window lies on the (resized) whole image
        plan = read_json(folder / "windows.json", "windows.json")
        check_fields(plan, WINDOW_PLAN, folder / "windows.json")
        boxes, whole = plan["boxes"], plan["resized_hw"]
    except (OSError, KeyError, TokenscopeError):
        boxes, whole = [], None
    panels = []
    for k, sub in enumerate(windows):
        panel = _load_panel(sub, f"{name}, window {k}")
        if whole is not None and k < len(boxes):
            panel["box"], panel["whole"] = boxes[k], whole  # drawn over the stitched image, at its place
        else:
            panel["image"] = _jpeg_uri(image_beside(sub), max_side)  # no plan: the window on its own
        panels.append(panel)
    return panels


def image_payload(folder: Path, kind: str, methods: list[str], max_side: int = 768) -> dict[str, Any]:
    """One image folder of a run (one panel, or one per window) or of a comparison (one panel per
    method)."""
    payload: dict[str, Any] = {"name": folder.name, "image": _jpeg_uri(image_beside(folder), max_side)}
    if kind == "compare":
        payload["panels"] = [panel for method in methods for panel in
                             _panels(folder / method_folder_name(method), method, max_side)]
    else:
        payload["panels"] = _panels(folder, payload["name"], max_side)
    errors = [p["error"] for p in payload["panels"] if "error" in p]
    if errors and len(errors) == len(payload["panels"]):
        payload["error"] = errors[0]
    return payload


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return json.loads(df.to_json(orient="records"))


@dataclass
class RunIndex:
    kind: str
    title: str
    methods: list[str]
    folders: list[Path]
    index: dict[str, Any]


def run_index(run_dir: Path) -> RunIndex:
    """The run's kind, its image folders (in the manifest's order) and the summary tables."""
    manifest = _read_manifest(run_dir)
    if manifest.get("kind") not in (None, "run", "compare"):  # a sweep holds tables and figures, no traces
        raise RunFolderError(f"{run_dir}: the explorer shows run and compare folders; this is a "
                             f"{manifest.get('kind')!r} folder (`tokenscope table {run_dir}` and its figures show it)")
    kind = "compare" if manifest.get("kind") == "compare" else "run"
    methods: list[str] = []
    if kind == "compare":  # compare --methods names its methods; plain compare holds step and baseline
        methods = ["baseline", *manifest["methods"]] if "methods" in manifest else ["baseline", "step"]
    names = [e.get("folder") for e in manifest.get("images", []) if e.get("folder")]
    if not names:  # older manifests: every sub-folder that holds (or held) a trace
        names = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and ((p / TRACE_JSON).exists()
                       or image_beside(p).exists()))
    folders = [run_dir / n for n in names if (run_dir / n).is_dir()]
    missing = [n for n in names if not (run_dir / n).is_dir()]
    missing += [f"{Path(str(e.get('source', '?'))).name} ({e['error']})" for e in manifest.get("images", [])
                if e.get("error") and not e.get("folder")]  # images the run could not process
    if kind == "compare":
        table = run_dir / ("methods.csv" if "methods" in manifest else "compare.csv")
        rows = [r for r in _records(table) if r.get("image") != "ALL"]
        for r in rows:
            r["image"] = Path(str(r["image"])).stem
    else:
        rows = _records(run_dir / "tables" / "images.csv")
        for r in rows:  # the accuracy a reduction cost this image, where labels were given
            if r.get("step_miou") is not None and r.get("baseline_miou") is not None:
                r["miou_change"] = r["step_miou"] - r["baseline_miou"]
    title = f"{run_dir.name}: {manifest.get('model') or manifest.get('request', {}).get('model', {}).get('model', '')}"
    warnings = [w for w in manifest.get("warnings", []) if w]  # read_manifest checked they are strings
    index = {"kind": kind, "title": title, "methods": methods, "images": [f.name for f in folders],
             "missing": missing, "rows": rows, "classes": _records(run_dir / "tables" / "classes.csv"),
             "warnings": warnings}
    return RunIndex(kind, title, methods, folders, index)


def _page(data_script: str) -> str:
    page = (HERE / "page.html").read_text()
    return (page.replace("/*EXPLORER_CSS*/", (HERE / "explorer.css").read_text())
            .replace("/*EXPLORER_JS*/", (HERE / "explorer.js").read_text())
            .replace("<!--EXPLORER_DATA-->", data_script))


def _inline_json(obj: Any) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(obj, separators=(",", ":")).replace("</", "<\\/")


def _note_problems(problems: list[str] | None, ri: RunIndex, folder: Path | None, payload: dict[str, Any] | None) -> None:
    """Collect one line per damaged image (for the terminal), beside the message the page shows."""
    if problems is None:
        return
    if folder is None:
        problems.extend(f"missing: {m}" for m in ri.index["missing"])
        return
    errors = sorted({str(p["error"]) for p in (payload or {}).get("panels", []) if "error" in p})
    problems.extend(f"{folder.name}: {e}" for e in errors)


def explorer_html(run_dir: Path, progress: Progress | None = None, max_side: int = 768,
                  problems: list[str] | None = None) -> str:
    """The whole explorer as one HTML string, every image's data inline; `problems` (if given)
    collects one line per damaged or missing image."""
    ri = run_index(run_dir)
    _note_problems(problems, ri, None, None)
    images = {}
    for i, folder in enumerate(ri.folders):
        if progress:
            progress(i, len(ri.folders), folder.name)
        images[folder.name] = image_payload(folder, ri.kind, ri.methods, max_side)
        _note_problems(problems, ri, folder, images[folder.name])
    data = {"index": ri.index, "images": images}
    return _page(f'<script id="ts-data" type="application/json">{_inline_json(data)}</script>')


def trace_html(trace: Trace, name: str = "trace", image: np.ndarray | None = None) -> str:
    """The explorer for one trace in memory (the notebook view): the image view of one panel."""
    uri = None
    if image is not None:
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR))
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else None
    payload = {"name": name, "image": uri, "panels": [trace_panel(trace, name)]}
    index = {"kind": "run", "title": name, "methods": [], "images": [name], "missing": [], "rows": [], "classes": [],
             "warnings": [], "open": name}
    return _page(f'<script id="ts-data" type="application/json">{_inline_json({"index": index, "images": {name: payload}})}</script>')


def served_files(run_dir: Path, progress: Progress | None = None, max_side: int = 768,  # noqa: ANN201
                 problems: list[str] | None = None):
    """(relative path, text) of everything `view --serve` needs: `explorer-served.html`, which reads
    `explorer_data/index.json` first and `explorer_data/images/NAME.json` only when an image is
    opened. Payloads come one at a time, so a 10,000-image run never sits in memory at once."""
    ri = run_index(run_dir)
    _note_problems(problems, ri, None, None)
    yield f"{DATA_DIR}/index.json", json.dumps(ri.index, separators=(",", ":"))
    for i, folder in enumerate(ri.folders):
        if progress:
            progress(i, len(ri.folders), folder.name)
        payload = image_payload(folder, ri.kind, ri.methods, max_side)
        _note_problems(problems, ri, folder, payload)
        yield f"{DATA_DIR}/images/{folder.name}.json", json.dumps(payload, separators=(",", ":"))
    yield "explorer-served.html", _page(f'<script id="ts-data" type="application/json">{_inline_json({"lazy": DATA_DIR})}</script>')
