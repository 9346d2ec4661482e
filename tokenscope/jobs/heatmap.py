"""`tokenscope heatmap`: re-render overlays from a saved run, without loading any model.

Renders go to a fresh `heatmaps-<time>` folder inside the run, so earlier pictures are kept. They are
drawn in a hidden `.heatmaps-partial-<time>` folder renamed when every image is done, so a render killed
half-way never leaves a folder that looks finished.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tokenscope.errors import ConfigError, RunFolderError, TokenscopeError
from tokenscope.jobs.run import Progress
from tokenscope.storage import forget_folder, writing
from tokenscope.jobs.runfolder import image_folder, latest_run, new_run_dir, read_manifest, read_rgb, write_rgb
from tokenscope.render.overlays import OVERLAY_KINDS, default_group_blocks, groups_overlay, render_overlay
from tokenscope.render.plots import token_histogram
from tokenscope.trace.trace import Trace, image_beside, trace_folders

HEATMAP_KINDS = (*OVERLAY_KINDS, "groups", "histogram", "all")


@dataclass
class HeatmapResult:
    run_dir: Path
    out_dir: Path
    rendered: list[str]
    failed: list[str] = field(default_factory=list)
    """One line per image that could not be rendered (a damaged or missing trace)."""


def rerender(run_dir: str | Path | None, kind: str = "all", out_root: str | Path = "outputs",
             progress: Progress | None = None, blocks: list[int] | None = None) -> HeatmapResult:
    """Re-draw `kind` (or all) pictures for every image of a run folder (the latest if None).

    `groups` draws the tokens entering each of `blocks` (1-based; depth + 1 = after the
    encoder), outlined whatever their shape; by default just after merging blocks and at the end
    (with no in-network merging: the policy's tokens at block 1)."""
    if kind not in HEATMAP_KINDS:
        raise ConfigError(f"unknown --kind {kind!r}; choose one of {', '.join(HEATMAP_KINDS)}")
    if blocks is not None and (not blocks or min(blocks) < 1):
        raise ConfigError("--blocks are encoder blocks counted from 1, e.g. 1,5,13")
    run = Path(run_dir) if run_dir is not None else latest_run(out_root)
    manifest = read_manifest(run)
    folders = [im["folder"] for im in manifest.get("images", []) if im.get("folder")]
    kinds = [*OVERLAY_KINDS, "groups", "histogram"] if kind == "all" else [kind]
    out = new_run_dir(run, PARTIAL)
    rendered = []
    failed = []
    for i, name in enumerate(folders):
        if progress:
            progress(i, len(folders), name)
        try:
            sources = [(src, Trace.load(src), read_rgb(image_beside(src))) for src in trace_folders(run / name)]
        except TokenscopeError as exc:  # a damaged image is named; the others still render
            failed.append(str(exc))
            continue
        with image_folder(out, name) as dst:
            for src, trace, image in sources:
                target = dst if src == run / name else dst / src.name
                target.mkdir(exist_ok=True)
                for k in kinds:
                    if k == "histogram":
                        token_histogram(trace, target / "histogram.png")
                    elif k == "groups":
                        depth = trace.meta.depth
                        bad = [b for b in blocks or [] if b > depth + 1]
                        if bad:
                            raise ConfigError(f"--blocks {bad}: {name} has {depth} blocks (depth + 1 = after the encoder)")
                        for b in blocks or default_group_blocks(trace):
                            write_rgb(target / f"groups_b{b:02d}.png", groups_overlay(image, trace, b))
                    else:
                        write_rgb(target / f"{k}.png", render_overlay(k, image, trace))
        rendered.append(name)
    if progress:
        progress(len(folders), len(folders), "")
    return HeatmapResult(run, _finish(out), rendered, failed)


PARTIAL = ".heatmaps-partial"


def _finish(staging: Path) -> Path:
    """Give the finished render its visible name (`heatmaps-<time>`, never over an existing one)."""
    stem = staging.name.replace(PARTIAL, "heatmaps", 1)
    for n in range(1, 1000):
        final = staging.parent / (stem if n == 1 else f"{stem}-{n}")
        if final.exists():
            continue
        with writing(final):
            os.rename(staging, final)
        forget_folder(staging)
        return final
    raise RunFolderError(f"too many renders named {stem} in {staging.parent}")
