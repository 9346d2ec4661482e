"""Pictures of traces for notebooks: overlays as RGB arrays, charts as matplotlib figures.

The same renderers `tokenscope run` writes its PNGs with. Overlays are drawn on `image` (a path,
array, PIL image or tensor; resized to the trace's input size if needed), else on the image the
trace was made from when it is known, else on a grey canvas.

    ts.plot.merge(trace)        supertokens by level          (H, W', 3) uint8
    ts.plot.exit(trace)         where each token left          (H, W', 3) uint8
    ts.plot.confidence(trace)   top-1 probability per patch    (H, W', 3) uint8
    ts.plot.segmentation(trace) predicted classes              (H, W', 3) uint8
    ts.plot.groups(trace, 7)    tokens entering block 7, any shape (H, W', 3) uint8
    ts.plot.histogram(trace)    tokens per block, by level     matplotlib Figure
    ts.plot.token_flow(traces)  patches -> levels -> exits     matplotlib Figure
    ts.plot.pareto(sweep)       mIoU [95% CI] vs cost          matplotlib Figure
    ts.plot.classes(run)        per class: levels or exits     matplotlib Figure
    ts.plot.tokens_per_block(run) tokens entering each block    matplotlib Figure

Figures are plain matplotlib: `fig.savefig("pareto.pdf")` writes a vector file for a paper. The
data-set figures take traces, a run folder, or tables from `ts.tabulate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from tokenscope.analysis.aggregate import DatasetTables, aggregate
from tokenscope.data.images import as_rgb
from tokenscope.errors import ConfigError
from tokenscope.render.dataset_plots import (class_fates_figure, class_levels_figure, token_flow_figure,
                                             tokens_per_block_figure)
from tokenscope.render.overlays import groups_overlay, render_overlay
from tokenscope.render.pareto import methods_pareto_figure, pareto_figure
from tokenscope.render.plots import histogram_figure
from tokenscope.trace.trace import Trace

__all__ = ["merge", "exit", "confidence", "segmentation", "groups", "histogram", "token_flow", "pareto", "classes",
           "tokens_per_block"]


def _canvas(trace: Trace, image: Any) -> np.ndarray:
    h, w = trace.meta.input_hw
    if image is None:
        image = getattr(trace, "image", None)
    if image is None:
        return np.full((h, w, 3), 200, np.uint8)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (h, w, 3):
        return image
    rgb, _ = as_rgb(image)
    if rgb.shape[:2] != (h, w):
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def merge(trace: Trace, image: Any = None) -> np.ndarray:
    """Supertokens filled and outlined by level, with a legend of counts."""
    return render_overlay("merge", _canvas(trace, image), trace)


def exit(trace: Trace, image: Any = None) -> np.ndarray:  # noqa: A001 - the name users look for
    """Each patch coloured by the gate its token left at (or the end)."""
    return render_overlay("exit", _canvas(trace, image), trace)


def confidence(trace: Trace, image: Any = None) -> np.ndarray:
    """Top-1 probability of each patch's final prediction."""
    return render_overlay("confidence", _canvas(trace, image), trace)


def segmentation(trace: Trace, image: Any = None) -> np.ndarray:
    """Predicted classes, legend with the most frequent ones."""
    return render_overlay("segmentation", _canvas(trace, image), trace)


def groups(trace: Trace, block: int, image: Any = None) -> np.ndarray:
    """The tokens as block `block` begins (1-based; depth + 1 = after the encoder): supertokens and
    groups merged inside the encoder outlined, coloured by patches covered; exited ones greyed."""
    depth = trace.meta.depth
    if not 1 <= int(block) <= depth + 1:
        raise ConfigError(f"block must be in 1..{depth + 1} (depth + 1 = after the encoder), got {block}")
    return groups_overlay(_canvas(trace, image), trace, int(block))


def histogram(trace: Trace, title: str | None = None) -> Any:
    """Tokens entering each block stacked by superpatch level, and tokens leaving at each gate."""
    return histogram_figure(trace, title)


def _tables(source: Any) -> DatasetTables:
    """Data-set tables from traces, a run folder (its tables/ are read, no model) or tables themselves."""
    if isinstance(source, DatasetTables):
        return source
    if isinstance(source, (str, Path)):
        return _run_tables(Path(source))
    items = [source] if isinstance(source, Trace) else list(source)
    if not items:
        raise ConfigError("a data-set figure needs at least one trace")
    return aggregate((f"image{i}", t, None) for i, t in enumerate(items))


def _run_tables(folder: Path) -> DatasetTables:
    import pandas as pd

    from tokenscope.schema import SUMMARY_FIELDS, check_fields, read_json

    tables = folder / "tables"
    try:
        frames = {n: pd.read_csv(tables / f"{n}.csv") for n in ("images", "classes", "levels", "blocks")}
        summary = read_json(folder / "summary.json", "summary.json", ConfigError)
        check_fields(summary, SUMMARY_FIELDS, folder / "summary.json", error=ConfigError)
    except FileNotFoundError as exc:
        raise ConfigError(f"{folder}: not a finished run folder ({Path(str(exc.filename)).name} missing)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder}: its tables cannot be read ({exc})") from None
    return DatasetTables(frames["images"], frames["classes"], frames["levels"], frames["blocks"], summary)


def token_flow(traces: Any) -> Any:
    """Patches -> superpatch levels -> where the tokens leave, for one trace, many, or a run folder."""
    fig = token_flow_figure(_tables(traces))
    if fig is None:
        raise ConfigError("the traces cover no patches")
    return fig


def classes(source: Any, kind: str = "levels") -> Any:
    """Per class: the share of its patches in each superpatch level (`kind="levels"`) or in each fate
    (`kind="fates"`: merged, pruned, exited by block or gate, reached the end), for traces or a run folder."""
    if kind == "exits":  # the earlier name of the fates figure
        kind = "fates"
    if kind not in ("levels", "fates"):
        raise ConfigError(f"kind must be 'levels' or 'fates', got {kind!r}")
    t = _tables(source)
    return class_levels_figure(t) if kind == "levels" else class_fates_figure(t)


def tokens_per_block(source: Any) -> Any:
    """Tokens entering each block (mean per image) by superpatch level, for traces or a run folder."""
    return tokens_per_block_figure(_tables(source))


def pareto(sweep: Any, column: str = "gflops_per_image", size: int | None = None) -> Any:
    """mIoU (95% interval bars) against `column` (gflops_per_image, or images_per_s for speed) of a
    sweep: a sweep folder, a SweepResult, or its table; one input size (default: the first)."""
    import pandas as pd

    if isinstance(sweep, (str, Path)):
        path = Path(sweep)
        csv = path / "sweep.csv" if path.is_dir() else path
        if not csv.is_file():
            raise ConfigError(f"{path}: no sweep.csv here")
        df = pd.read_csv(csv)
    else:
        df = getattr(sweep, "table", sweep)
    if not isinstance(df, pd.DataFrame) or column not in df:
        raise ConfigError(f"pareto needs a sweep table with a {column!r} column")
    sizes = list(df["size"].unique())
    chosen = sizes[0] if size is None else size
    if chosen not in sizes:
        raise ConfigError(f"size {size} is not in this sweep (it has {', '.join(map(str, sizes))})")
    sub = df[df["size"] == chosen]
    cheap = column != "images_per_s"
    label = "GFLOPs per image (2 per multiply-add)" if column == "gflops_per_image" else column.replace("_", " ")
    methods = sub["method"].nunique() > 1 or "is_default" not in sub or not sub["is_default"].any()
    make = methods_pareto_figure if methods else pareto_figure
    return make(sub, column, label, lower_is_better=cheap)


def _check_arguments() -> None:
    """The picture functions check their arguments' types (see tokenscope/arguments.py)."""
    from tokenscope.arguments import checked

    for name in ("merge", "exit", "confidence", "segmentation", "groups", "histogram", "token_flow", "classes",
                 "tokens_per_block", "pareto"):
        globals()[name] = checked(globals()[name])


_check_arguments()
