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
"""

from __future__ import annotations

from typing import Any, Iterable

import cv2
import numpy as np

from tokenscope.analysis.aggregate import aggregate
from tokenscope.data.images import as_rgb
from tokenscope.errors import ConfigError
from tokenscope.render.dataset_plots import token_flow_figure
from tokenscope.render.overlays import groups_overlay, render_overlay
from tokenscope.render.plots import histogram_figure
from tokenscope.trace.trace import Trace

__all__ = ["merge", "exit", "confidence", "segmentation", "groups", "histogram", "token_flow"]


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


def token_flow(traces: Trace | Iterable[Trace]) -> Any:
    """Patches -> superpatch levels -> where the tokens leave, for one trace or many."""
    items = [traces] if isinstance(traces, Trace) else list(traces)
    if not items:
        raise ConfigError("token_flow needs at least one trace")
    fig = token_flow_figure(aggregate((f"image{i}", t, None) for i, t in enumerate(items)))
    if fig is None:
        raise ConfigError("the traces cover no patches")
    return fig
