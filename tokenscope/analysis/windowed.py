"""One image in, one prediction out: a whole-image forward, or Segmenter's sliding windows.

Every command that scores images (run, evaluate, compare, sweep) goes through `predict`, so the
same protocol gives the same numbers everywhere. A windowed prediction holds one trace per
window (each window is one forward; the every-patch-once invariant holds per window) and the
stitched label map at the image's original size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokenscope.analysis.stitch import stitched_label_map
from tokenscope.data.images import PreparedImage
from tokenscope.data.windows import WindowPlan, WindowSpec, cut_windows, plan_windows
from tokenscope.trace.capture import TraceCapture
from tokenscope.trace.fates import fate_totals
from tokenscope.trace.trace import Trace


@dataclass
class ImagePrediction:
    """Traces (one, or one per window), the label map and the labels it is scored against."""

    traces: list[Trace]
    label_map: np.ndarray
    labels: np.ndarray | None
    plan: WindowPlan | None = None
    inputs: list[PreparedImage] = field(default_factory=list)
    """The model input behind each trace (the windows, or the whole prepared image)."""

    @property
    def tokens(self) -> int:
        return sum(t.num_tokens for t in self.traces)

    @property
    def patches(self) -> int:
        return sum(t.num_patches for t in self.traces)

    @property
    def flops(self) -> int:
        return sum(int(t.meta.flops["total"]) for t in self.traces)

    @property
    def baseline_flops(self) -> int:
        return sum(int(t.meta.flops["baseline_total"]) for t in self.traces)

    @property
    def block_tokens(self) -> float:
        """Tokens summed over the encoder's blocks (exits and in-block merges included)."""
        return sum(float(t.tokens_in_block().sum()) for t in self.traces)

    @property
    def groups(self) -> int:
        """Tokens that exited or reached the end (a group merged inside the encoder counts once)."""
        return sum(int(t.survivors.sum()) for t in self.traces)

    @property
    def mean_tokens_per_block(self) -> float:
        """Tokens an average block works on per forward pass (image or window)."""
        return self.block_tokens / max(len(self.traces) * self.traces[0].meta.depth, 1)

    def fate_totals(self) -> dict[str, int]:
        """Tokens and patches in each fate (trace/fates.py), summed over the windows."""
        out: dict[str, int] = {}
        for t in self.traces:
            for k, v in fate_totals(t).items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def exited_tokens(self) -> int:
        """Tokens that left at an exit gate (pruned and merged tokens are counted apart)."""
        return self.fate_totals()["tokens_exited"]

    @property
    def exited_patches(self) -> int:
        return self.fate_totals()["patches_exited"]

    @property
    def forward_s(self) -> float:
        return sum(float(t.meta.timings.get("forward_s", 0.0)) for t in self.traces)


def predict(capture: TraceCapture, image: PreparedImage, windows: WindowSpec | None, batch: int = 4) -> ImagePrediction:
    """Predict one prepared image (prepared at its original size when `windows` is set)."""
    h, w = image.input_hw
    labels = None if image.labels is None else image.labels[:h, :w]
    if windows is None:
        trace = capture([image])[0]
        return ImagePrediction([trace], trace.label_map, labels, None, [image])
    rgb = np.ascontiguousarray(image.tensor_rgb[:, :h, :w].transpose(1, 2, 0))
    plan = plan_windows((h, w), windows.window, windows.stride, windows.resize_short)
    patch = capture.loaded.model.patch_size
    crops = cut_windows(rgb, labels, plan, image.source, patch)
    traces: list[Trace] = []
    logits = []
    for i in range(0, len(crops), batch):
        chunk = crops[i:i + batch]
        if len({c.padded_hw for c in chunk}) > 1:  # windows of a short side differ in size
            for c in chunk:
                t, lg = capture.run([c])
                traces += t
                logits.append(lg[0])
            continue
        t, lg = capture.run(chunk)
        traces += t
        logits.extend(lg)
    return ImagePrediction(traces, stitched_label_map(logits, plan, patch), labels, plan, crops)
