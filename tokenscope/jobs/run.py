"""`tokenscope run`: trace images through a STEP model and write everything about their tokens.

Each image gets its own folder in a fresh run folder: the trace, the processed input image,
four overlays, the per-layer histogram, tokens.csv, blocks.csv and summary.json. The run adds
summary.csv plus tokens/blocks tables of all images in Parquet, and run.json last. An image
that cannot be read is reported and skipped; the others are still processed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from tokenscope import __version__
from tokenscope.analysis.stats import blocks_table, summary, tokens_table
from tokenscope.data.images import find_images, find_label_for, load_prepared
from tokenscope.errors import TokenscopeError
from tokenscope.jobs.runfolder import (
    MANIFEST,
    image_folder,
    new_run_dir,
    unique_name,
    write_json_atomic,
    write_rgb,
    write_table,
)
from tokenscope.jobs.setup import ModelOptions, load_model
from tokenscope.render.overlays import OVERLAY_KINDS, render_overlay
from tokenscope.render.plots import token_histogram
from tokenscope.trace.capture import TraceCapture
from tokenscope.trace.trace import Trace

Progress = Callable[[int, int, str], None]
"""progress(done, total, current item)"""


@dataclass
class ImageResult:
    source: str
    folder: str | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class RunResult:
    run_dir: Path
    images: list[ImageResult]
    warnings: list[str] = field(default_factory=list)
    model: str = ""

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.images if r.error is not None]


def write_image_outputs(folder: Path, trace: Trace, display: Any) -> None:
    """Everything `run` writes for one image, from its trace and its processed image."""
    trace.save(folder)
    write_rgb(folder / "image.png", display)
    for kind in OVERLAY_KINDS:
        write_rgb(folder / f"{kind}.png", render_overlay(kind, display, trace))
    token_histogram(trace, folder / "histogram.png")
    write_table(tokens_table(trace), folder / "tokens.csv")
    write_table(blocks_table(trace), folder / "blocks.csv")


def run_images(paths: list[str], opts: ModelOptions, out: str | Path = "outputs", size: int | None = None,
               labels: str | None = None, progress: Progress | None = None) -> RunResult:
    """Trace every image in `paths` (files or folders) into a new run folder under `out`."""
    images = find_images(paths)
    if not images:
        raise TokenscopeError("no images found in " + ", ".join(map(str, paths)))
    labels_path = Path(labels) if labels is not None else None
    loaded, device = load_model(opts, have_labels=labels_path is not None)
    capture = TraceCapture(loaded, device, amp=opts.amp)
    run_dir = new_run_dir(out, "run")
    results: list[ImageResult] = []
    taken: set[str] = set()
    token_frames, block_frames = [], []
    for i, path in enumerate(images):
        if progress:
            progress(i, len(images), path.name)
        result = ImageResult(source=str(path))
        try:
            lab = find_label_for(path, labels_path) if labels_path is not None else None
            prepared = load_prepared(path, size=size, labels_path=lab)
            trace = capture([prepared])[0]
            name = unique_name(path.stem, taken)
            with image_folder(run_dir, name) as folder:
                write_image_outputs(folder, trace, prepared.display)
                info = summary(trace)
                info["folder"] = name
                write_json_atomic(folder / "summary.json", info)
            result.folder, result.summary = name, info
            token_frames.append(tokens_table(trace).assign(image=name))
            block_frames.append(blocks_table(trace).assign(image=name))
        except TokenscopeError as exc:
            result.error = str(exc)
        results.append(result)
    if progress:
        progress(len(images), len(images), "")
    ok = [r for r in results if r.summary is not None]
    if ok:
        rows = [{k: v for k, v in r.summary.items() if not isinstance(v, (dict, list))} for r in ok]  # type: ignore[union-attr]
        write_table(pd.DataFrame(rows), run_dir / "summary.csv")
        write_table(pd.concat(token_frames, ignore_index=True), run_dir / "tokens.parquet")
        write_table(pd.concat(block_frames, ignore_index=True), run_dir / "blocks.parquet")
    manifest = {
        "tool": "tokenscope", "version": __version__, "kind": "run",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": loaded.config.name, "arch": loaded.config.arch, "weights": loaded.weights_id,
        "weights_source": loaded.source, "device": str(device),
        "policy": loaded.model.active_policy, "exits": loaded.model.exits_enabled,
        "merge_thresholds": list(loaded.model.merge_thresholds), "exit_threshold": loaded.model.exit_threshold,
        "size": size, "labels": labels, "warnings": loaded.warnings,
        "images": [{"source": r.source, "folder": r.folder, "error": r.error} for r in results],
    }
    write_json_atomic(run_dir / MANIFEST, manifest)
    return RunResult(run_dir, results, loaded.warnings, loaded.config.name)
