"""The public Python API: what `import tokenscope as ts` exposes, and what the CLI is built on.

Everything here is a thin, documented entry point over the same internals the command line uses
(model loading, trace capture, sliding windows, tables, renderers, run folders), so a trace made
in a notebook and one made by `tokenscope run` are the same object. Errors are raised as the
`TokenscopeError` family (never printed); nothing here keeps global state.
"""

from __future__ import annotations

import base64
import html
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import pandas as pd
import torch

from tokenscope import dist
from tokenscope.analysis.aggregate import DatasetTables
from tokenscope.analysis.aggregate import aggregate as _aggregate
from tokenscope.analysis.stats import blocks_table, summary, tokens_table
from tokenscope.analysis.windowed import ImagePrediction
from tokenscope.analysis.windowed import predict as _predict
from tokenscope.data.images import as_rgb, load_label_map, prepare_image
from tokenscope.data.windows import resolve_windows
from tokenscope.errors import ConfigError, TokenscopeError
from tokenscope.jobs.setup import ModelOptions
from tokenscope.jobs.setup import load_model as _load_model
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.methods.registry import Listing, all_methods
from tokenscope.options import SWEPT, SharedOption, pick, with_options
from tokenscope.trace.capture import TraceCapture
from tokenscope.trace.trace import Trace as _CoreTrace
from tokenscope.trace.trace import image_beside

Progress = Callable[[int, int, str], None]
"""progress(done, total, current item): the callback every long-running function accepts."""


# ---- models ------------------------------------------------------------------------------------

class Model:
    """A loaded segmenter on a device at one operating point (policy, thresholds, exits).

    Made by `load_model`; `configure` changes the operating point in place. `module` is the
    underlying `torch.nn.Module` (a StepViT) for anyone who wants to run it directly.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, options: ModelOptions) -> None:
        self.loaded = loaded
        self.device = device
        self.options = options
        self._capture: TraceCapture | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def name(self) -> str:
        return self.loaded.config.name

    @property
    def config(self) -> Any:
        """The architecture and defaults (a StepConfig): classes, exit gates, window protocol, ..."""
        return self.loaded.config

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.loaded.config.class_names

    @property
    def trained(self) -> dict[str, bool]:
        """Which parts were trained: backbone, decoder, exits, policy."""
        return dict(self.loaded.trained)

    @property
    def warnings(self) -> list[str]:
        return list(self.loaded.warnings)

    @property
    def setting(self) -> Any:
        """This model's operating point, the value every forward it runs is given (a ReductionSetting)."""
        return self.loaded.setting

    @property
    def policy(self) -> str:
        return self.loaded.setting.policy

    @property
    def exits(self) -> bool:
        return self.loaded.setting.exits

    @property
    def method(self) -> str:
        """The token-reduction method of this operating point (step, tome, ...; "" = by policy and exits)."""
        return str(self.loaded.setting.method)

    def configure(self, *, policy: str | None = None, exits: bool | str | None = None,
                  merge_threshold: float | str | Sequence[float] | None = None,
                  exit_threshold: float | None = None, budget: float | None = None,
                  keep_per_class: int | None = None, method: str | None = None, **removed: Any) -> "Model":
        """Choose another operating point (same checks as `load_model`); returns the model. The network is
        not touched: this Model holds the new setting and passes it to every forward it runs.
        A new `method` (`tome:r=16`) starts from that method's defaults (settings are not carried over)."""
        _refuse_removed(removed, "configure")
        exits_text = _exits_text(exits)
        base = replace(self.options, policy=None, exits=None, method=method) if method is not None else self.options
        opts = replace(base, policy=policy if policy is not None else base.policy,
                       exits=exits_text if exits_text is not None else base.exits,
                       merge_threshold=_threshold_text(merge_threshold) if merge_threshold is not None
                       else base.merge_threshold,
                       exit_threshold=exit_threshold if exit_threshold is not None else base.exit_threshold,
                       budget=budget if budget is not None else base.budget,
                       keep_per_class=keep_per_class if keep_per_class is not None else base.keep_per_class)
        loaded, device = _load_model(opts, have_labels=True, loaded=self.loaded)
        self.loaded, self.device, self.options = loaded, device, opts
        return self

    def save(self, path: str | Path) -> Path:
        """Write this model as a tokenscope checkpoint (PATH.json describes it, PATH.safetensors holds
        its tensors), which `--weights PATH.json` and `ts.load_model(weights=...)` read back."""
        from tokenscope.models.checkpoints import save_checkpoint
        from tokenscope.models.decoders import LinearDecoder, MaskTransformerDecoder
        from tokenscope.models.eomt import EoMTHead

        if not isinstance(self.loaded.model.decoder, (LinearDecoder, MaskTransformerDecoder, EoMTHead)):
            raise ConfigError(f"Model.save: the decoder is your own module ({type(self.loaded.model.decoder).__name__}); "
                              "a checkpoint must be rebuildable from its description: use a linear, mask or eomt decoder")
        return save_checkpoint(self.loaded.model, path, self.loaded.trained,
                               metadata={"source": self.loaded.source, "saved_by": "tokenscope Model.save"})

    def capture(self) -> TraceCapture:
        """The trace capturer of this model (kept, so policy FLOPs are counted once per size)."""
        if self._capture is None:
            self._capture = TraceCapture(self.loaded, self.device, self.loaded.setting, amp=self.options.amp)
        elif self._capture.setting is not self.loaded.setting:
            self._capture = self._capture.at(self.loaded.setting)
        return self._capture

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, {self.config.arch}, patch {self.module.patch_size}, "  # type: ignore[attr-defined]
                f"{self.config.num_classes} classes, policy={self.policy!r}, exits={self.exits}, device={self.device})")


REMOVED_KEYWORDS = {"tome_r": "tome:r=16", "algm_threshold": "algm:threshold=0.92", "algm_global_threshold":
                    "algm:global=0.9", "prop_attn": "tome:prop=off", "cts_groups": "cts:groups=300"}


def _refuse_removed(removed: dict[str, Any], where: str) -> None:
    """Per-method keywords of earlier versions: one line naming the operating point's spelling."""
    for key in removed:
        if key in REMOVED_KEYWORDS:
            raise ConfigError(f"{where}({key}=...) is gone: a method's settings follow its name, e.g. "
                              f"method={REMOVED_KEYWORDS[key]!r} (ts.list_methods() lists every setting)")
        raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")


def _exits_text(exits: bool | str | None) -> str | None:
    """True -> "learned", False -> "none" (the CLI's words); strings pass as they are, so an
    unknown mode is refused by the same check as on the command line; None -> the model's default."""
    if isinstance(exits, bool):
        return "learned" if exits else "none"
    return exits


def _threshold_text(value: float | str | Sequence[float]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(float(value))
    return ",".join(str(float(v)) for v in value)


def _api_type(option: SharedOption) -> Any:
    """A shared option's type in the API: `model` also takes a loaded Model (tokenscope/options.py)."""
    return Model | str if option.name == "model" else option.api_type


def _shared(names: tuple[str, ...]) -> Callable[[Any], Any]:
    """Give an API function the shared model options `names` (declared once, in tokenscope/options.py)."""
    return with_options(names, _api_type, into="shared", api=True)


def _model_options(shared: dict[str, Any], where: str, model: Any = None) -> ModelOptions:
    """The ModelOptions the shared options `shared` mean (a threshold list or bool exits in the CLI's words)."""
    s = dict(shared)
    name = _model_name(s.pop("model", "demo") if model is None else model, f"{where}(model=...)")
    weights, threshold, class_map = s.pop("weights", None), s.pop("merge_threshold", None), s.pop("class_map", None)
    if weights is not None and not isinstance(weights, (str, Path)):
        raise ConfigError(f"{where}(weights=...): expected a file path or 'hub', got a {type(weights).__name__}")
    return ModelOptions(model=name, weights=None if weights is None else str(weights),
                        merge_threshold=None if threshold is None else _threshold_text(threshold),
                        exits=_exits_text(s.pop("exits", None)), class_map=None if class_map is None else str(class_map),
                        **s)


@_shared(pick(without=("model", "weights", "class_map", "ignore_class_mismatch"), adding=("amp",)))
def load_model(model: str = "demo", weights: str | Path | None = None, *, shared: dict[str, Any] | None = None,
               **removed: Any) -> Model:
    """Load a model and set its operating point.

    `model`: "demo" (shipped), a published Segmenter model's name (downloaded once; see
    `models()`), "vitt"/"vits"/"vitb"/"vitl", or "timm:<vit name>". `weights`: a tokenscope
    checkpoint (NAME.json), a Segmenter or mmsegmentation .pth (read without running code), or a
    timm ViT file. `policy`: learned | oracle | uniform | budget | none (default: learned when
    trained, else uniform). `exits`: True/"learned" or False/"none" (default: when trained).
    `method`: the operating point, a method with its settings (`step`, `tome:r=16`, `dtop+tome`,
    a plug-in's name or a method file `./rule.py:frac=0.2`; see list_methods()).
    `device`: auto | cpu | cuda. Raises CheckpointError / ConfigError with a one-line message.
    """
    _refuse_removed(removed, "load_model")
    return _loaded(_model_options({**(shared or {}), "weights": weights}, "load_model", model))


def _loaded(opts: ModelOptions) -> Model:
    """The model `opts` name, built and on its device at its operating point."""
    loaded, dev = _load_model(opts, have_labels=True)
    return Model(loaded, dev, opts)


def _held_and_options(shared: dict[str, Any], where: str) -> tuple[Model | None, ModelOptions]:
    """A loaded Model passed as `model` (with its own options), else the shared options; either way with
    this call's class map and waiver."""
    held = shared["model"] if isinstance(shared["model"], Model) else None
    opts = held.options if held is not None else _model_options(shared, where)
    class_map = shared["class_map"]
    return held, replace(opts, class_map=None if class_map is None else str(class_map),
                         ignore_class_mismatch=shared["ignore_class_mismatch"] or opts.ignore_class_mismatch)


def from_timm(vit: Any, *, decoder: str | torch.nn.Module = "linear", num_classes: int | None = None,
              class_names: Sequence[str] = (), mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              name: str = "custom", exit_after: Sequence[int] | None = None, device: str = "auto",
              method: str | None = None) -> Model:
    """Your own ViT segmenter as a Model: a timm VisionTransformer (its weights as they are) and a
    decoder: "linear" or "mask" (new), your trained `nn.Linear(width, classes)`, or your own module
    (tokens (B, N, width), valid (B, N) -> logits (B, N, classes), with `num_classes`). Gates are
    untrained, so it runs without exits and with the training-free uniform policy unless `method`
    says otherwise; `Model.save(path)` writes a checkpoint the CLI runs (docs/models.md)."""
    from tokenscope.models.own import wrap_timm

    loaded = wrap_timm(vit, decoder, num_classes, class_names, mean, std, name, exit_after)
    opts = ModelOptions(model=name, device=device, method=method, exits=None if method else "none")
    loaded, dev = _load_model(opts, have_labels=True, loaded=loaded)
    return Model(loaded, dev, opts)


def _model_name(model: Any, what: str) -> str:
    """`model` as a name or path, or one error that says what to pass (never an AttributeError deep inside)."""
    if isinstance(model, (str, Path)):
        return str(model)
    kind = type(model).__module__.split(".")[0] + "." + type(model).__name__
    raise ConfigError(f"{what}: expected a model name or checkpoint path (str) or a tokenscope Model from "
                      f"ts.load_model(...), got a {kind}; for a timm ViT use ts.load_model('timm:<name>', weights=FILE)")


def _held(model: Any, what: str) -> Model:
    """The Model a function that traces needs, or one error naming what was passed instead."""
    if isinstance(model, Model):
        return model
    _model_name(model, what)
    raise ConfigError(f"{what}: expected a tokenscope Model, got the name {model!r}; load it first: "
                      f"model = ts.load_model({str(model)!r})")


# ---- traces ------------------------------------------------------------------------------------

class Trace(_CoreTrace):
    """What happened to every token of one image (see `tokenscope.trace.trace` for the fields).

    Tables: `tokens()` (one row per token), `blocks()` (one row per encoder block), `summary()`.
    In a notebook, a Trace shows its summary and merge overlay. `save(folder)` / `load_trace(folder)`.
    """

    _image: np.ndarray | None = None

    @classmethod
    def of(cls, core: _CoreTrace, image: np.ndarray | None = None) -> "Trace":
        """The public view of a trace made by the internals (arrays are shared, not copied)."""
        out = cls(**{f.name: getattr(core, f.name) for f in fields(_CoreTrace)})
        out._image = image
        return out

    @property
    def image(self) -> np.ndarray | None:
        """The processed input (uint8 RGB at the input size), when known."""
        return self._image

    def tokens(self) -> pd.DataFrame:
        return tokens_table(self)

    def blocks(self) -> pd.DataFrame:
        return blocks_table(self)

    def summary(self) -> dict[str, Any]:
        return summary(self)

    def save(self, folder: str | Path) -> None:
        """trace.json + trace.npz into `folder`, and image.png when the input is known."""
        super().save(folder)
        if self._image is not None:
            from tokenscope.jobs.runfolder import write_rgb

            write_rgb(Path(folder) / "image.png", self._image)

    def _repr_png_(self) -> bytes:
        from tokenscope import plot

        ok, buf = cv2.imencode(".png", cv2.cvtColor(plot.merge(self), cv2.COLOR_RGB2BGR))
        return bytes(buf) if ok else b""

    def _repr_html_(self) -> str:
        s = self.summary()
        rows = [("image", s["image"]), ("model", f"{s['model']} (method {s['method']}: {s['policy']} policy, "
                                                 f"exits {'on' if s['exits'] else 'off'})"),
                ("tokens", f"{s['tokens']} of {s['patches']} patches ({s['reduction']:.2f}x fewer)"),
                ("tokens per block", f"{s['mean_tokens_per_block']:.0f} on average"
                                     + (f", {s['merged_tokens']} merged inside the encoder" if s["merged_tokens"] else "")),
                ("exited early", f"{s['exited_early_pct']:.1f}% of tokens, {s['exited_early_patch_pct']:.1f}% of patches"),
                ("GFLOPs", f"{s['gflops']:.2f} (without reduction {s['baseline_gflops']:.2f})")]
        table = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in rows)
        png = base64.b64encode(self._repr_png_()).decode()
        return f"<table>{table}</table><img src='data:image/png;base64,{png}' style='max-width:640px'>"


def _labels(labels: Any) -> np.ndarray | None:
    if labels is None:
        return None
    if isinstance(labels, (str, Path)):
        return load_label_map(labels)
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.ndim != 2:
        raise ConfigError(f"labels must be a (H, W) map of class ids, got shape {arr.shape}")
    return arr.astype(np.int32)


def _prepare(model: Model, image: Any, labels: Any, size: int | None) -> Any:
    rgb, source = as_rgb(image)
    return prepare_image(rgb, source, size=size, labels=_labels(labels), patch=model.module.patch_size)  # type: ignore[attr-defined]


def trace(model: Model, image: Any, *, labels: Any = None, size: int | None = None) -> Trace:
    """Run the model once on the whole image and return its checked Trace.

    `image`: a path, a numpy array (H, W[, C]; 8/16-bit or float), a PIL image, or a tensor on any
    device. `labels`: a label map (path or (H, W) array of class ids, 255 = ignore), needed by the
    oracle policy and for per-class accuracy. `size`: resize the long side first. For Segmenter's
    sliding-window protocol use `predict`.
    """
    model = _held(model, "trace(model, ...)")
    prepared = _prepare(model, image, labels, size)
    return Trace.of(model.capture()([prepared])[0], prepared.display)


def trace_many(model: Model, images: Iterable[Any], *, labels: Iterable[Any] | None = None, size: int | None = None,
               batch_size: int = 8, progress: Progress | None = None) -> list[Trace]:
    """Trace many images, `batch_size` at a time (images of one padded size share a forward pass)."""
    model = _held(model, "trace_many(model, ...)")
    items = list(images)
    labs = list(labels) if labels is not None else [None] * len(items)
    if len(labs) != len(items):
        raise ConfigError(f"{len(items)} images but {len(labs)} label maps")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    prepared = [_prepare(model, im, lab, size) for im, lab in zip(items, labs)]
    out: list[Trace | None] = [None] * len(prepared)
    groups: dict[tuple[Any, bool], list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault((p.padded_hw, p.labels is not None), []).append(i)
    done = 0
    for idx in groups.values():
        for j in range(0, len(idx), batch_size):
            chunk = idx[j:j + batch_size]
            for i, t in zip(chunk, model.capture()([prepared[i] for i in chunk])):
                out[i] = Trace.of(t, prepared[i].display)
            done += len(chunk)
            if progress:
                progress(done, len(prepared), prepared[chunk[-1]].source)
    return [t for t in out if t is not None]


def predict(model: Model, image: Any, *, labels: Any = None, size: int | None = None, window: int | None = None,
            stride: int | None = None) -> ImagePrediction:
    """Predict one image with the model's evaluation protocol: one forward, or Segmenter's sliding
    windows (the checkpoint's, or `window`/`stride`; `window=0` for the whole image).

    Returns an ImagePrediction: `.traces` (one per window), `.label_map` at the original size,
    `.labels`, `.plan` (where the windows lie), and token/FLOP totals.
    """
    model = _held(model, "predict(model, ...)")
    cfg = model.config
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, size,
                              model.loaded.model.patch_size)
    pred = _predict(model.capture(), _prepare(model, image, labels, size), windows)
    pred.traces = [Trace.of(t, inp.display) for t, inp in zip(pred.traces, pred.inputs)]
    return pred


def load_trace(folder: str | Path) -> Trace:
    """A trace saved by `Trace.save` or by `tokenscope run` (an image folder or a window folder)."""
    from tokenscope.jobs.runfolder import read_rgb

    t = Trace.load(folder)
    png = image_beside(folder)
    if png.is_file():
        try:
            t._image = read_rgb(png)
        except TokenscopeError:
            t._image = None
    return t


def tabulate(traces: Iterable[_CoreTrace], names: Sequence[str] | None = None) -> DatasetTables:
    """Data-set tables over many traces: `.images`, `.classes`, `.levels`, `.blocks` (DataFrames)
    and `.summary` (dict), exactly as `tokenscope run` writes them for a data set."""
    items = list(traces)
    labels = list(names) if names is not None else [f"image{i}" for i in range(len(items))]
    return _aggregate((n, t, None) for n, t in zip(labels, items))


# ---- the command-line jobs, as functions ---------------------------------------------------------

@_shared(pick())
def run(images: Sequence[str | Path] | None = None, *, labels: str | None = None,
        dataset: str | None = None, data_root: str | None = None, split: str = "val",
        seeds: str = "100000:100100", scene_size: int = 512, size: int | None = None, window: int | None = None,
        stride: int | None = None, figures: bool = True, animation: bool = True, animation_limit: int | None = None,
        baseline: bool | None = None, render_workers: int | None = None,
        out: str | Path = "outputs", resume: str | Path | None = None, progress: Progress | None = None,
        every: int = 1, start: str | None = None, end: str | None = None, max_frames: int | None = None,
        frames: bool = False, fps: float = 25.0, figure_format: str = "png", figure_dpi: int = 150,
        figure_titles: bool = True, shared: dict[str, Any] | None = None) -> Any:
    """`tokenscope run`: trace image files/folders, video clips or a data set into a fresh run folder.

    Video files (.mp4, .avi, ...) are traced frame by frame (`every` N-th frame, from `start` to
    `end` in frames or seconds such as "2.5s", at most `max_frames`): a frame table with the
    changes between consecutive frames, a timeline figure and an overlay video per clip.

    Labels (`labels`, or a data set's) must use the model's classes: otherwise it refuses, unless
    `class_map` (a file: data class -> model class) maps them or `ignore_class_mismatch` waives
    the check (recorded in run.json and summary.json, and in `.class_space`). `figure_format`
    "pdf" or "svg" also writes the data-set figures as vector files (`figure_dpi`, `figure_titles`).

    Returns a RunResult (`.run_dir`, `.images`, `.tables`, `.warnings`). With a `Model` object its
    operating point is used and recorded; with a name, the model options load it.
    """
    from tokenscope.jobs.run import RunRequest, run_job

    if resume is None and not images and dataset is None:
        raise ConfigError("give image files/folders, --dataset, or --resume RUN_DIR")
    if resume is not None and (images or dataset is not None):
        raise ConfigError("--resume finishes a run with its own images and settings; give it alone (no images or --dataset)")
    shared = dict(shared or {})
    method = shared["method"]
    held, opts = _held_and_options(shared, "run")
    req = RunRequest(inputs=[str(p) for p in images or []], labels=labels, dataset=dataset, data_root=data_root,
                     split=split, seeds=seeds, dataset_size=scene_size, size=size, model=asdict(opts), figures=figures,
                     animation=animation, baseline=baseline, window=window, stride=stride,
                     animation_limit=animation_limit, render_workers=render_workers, every=every, start=start,
                     end=end, max_frames=max_frames, frames=frames, fps=fps, figure_format=figure_format,
                     figure_dpi=figure_dpi, figure_titles=figure_titles)
    return run_job(req, out=out, resume=resume, progress=progress,
                   model=None if held is None else (held.loaded, held.device),
                   trusted_method=method if resume is not None else None)


@_shared(pick())
def compare(images: Sequence[str | Path], *, baseline: str = "vit", methods: str | Sequence[str] | None = None,
            labels: str | None = None, size: int | None = None, window: int | None = None, stride: int | None = None,
            repeats: int = 5, warmup: int = 1, out: str | Path = "outputs", at_block: int | None = None,
            progress: Progress | None = None, shared: dict[str, Any] | None = None) -> Any:
    """`tokenscope compare`: the same weights with and without reduction on each image (tokens,
    GFLOPs, latency, memory, agreement, mIoU with labels). Returns a CompareResult.

    `methods` ("step,tome,cts,dtop" or a list, settings inline as in `tome:r=16`) compares several
    methods at once: `.method_overall` has one row per method, `.rows` one per image and method;
    `at_block` picks the block whose tokens the per-image figure shows."""
    from tokenscope.jobs.compare import compare_images

    held, opts = _held_and_options(dict(shared or {}), "compare")
    listed = [m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods or []) if m.strip()]
    if methods is not None and not listed:
        raise ConfigError("--methods needs at least one method, e.g. step,tome,cts,dtop")
    return compare_images([str(p) for p in images], opts, baseline=baseline, out=out, size=size, labels=labels,
                          repeats=repeats, warmup=warmup, progress=progress, window=window, stride=stride,
                          model=None if held is None else (held.loaded, held.device), methods=listed or None,
                          at_block=at_block)


@_shared(pick(without=("model",)))
def evaluate(model: Model | str = "demo", *, data: str = "synthetic", data_root: str | None = None, split: str = "val",
             seeds: str = "100000:100200", size: int = 512, window: int | None = None, stride: int | None = None,
             json_out: str | Path | None = None, progress: Progress | None = None,
             shared: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """`tokenscope evaluate`: mIoU, tokens, exits and GFLOPs of the model's operating point
    ("step") and of the same weights without reduction ("baseline") over a data set.

    Every variant's dict has `miou_ci` (95% bootstrap interval over the images), the reduced one
    `miou_change_ci` (paired, against the baseline on the same images) and `class_space` (how the
    data's classes met the model's: they must agree unless `class_map` maps them or
    `ignore_class_mismatch` waives the check; the waiver is recorded there)."""
    from tokenscope.jobs.runfolder import write_json_atomic
    from tokenscope.jobs.train import DataOptions, evaluate_model

    shared = dict(shared or {})
    class_map, ignore_class_mismatch = shared.pop("class_map"), shared.pop("ignore_class_mismatch")
    held = model if isinstance(model, Model) else _loaded(_model_options(shared, "evaluate", model))
    d = DataOptions(kind=data, root=data_root, val_split=split, val_seeds=seeds, size=size)
    result = evaluate_model(held.loaded, held.device, d, held.policy, progress, window, stride, held.options.amp,
                            class_map=None if class_map is None else str(class_map),
                            ignore_class_mismatch=ignore_class_mismatch)
    metrics = {k: v.as_dict(held.config.class_names) for k, v in result.variants.items()}
    base = result.variants.get("baseline")
    record = result.class_space.record() if result.class_space is not None else {}
    for name, v in result.variants.items():
        metrics[name]["class_space"] = record
        if base is not None and v is not base:
            metrics[name]["miou_change_ci"] = v.miou_change(base).as_dict()
    if json_out is not None and dist.context(held.device.type).is_writer:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(json_out), {"model": held.name, "weights": held.loaded.weights_id,
                                           "merge_thresholds": list(held.setting.merge_thresholds),
                                           "exit_threshold": held.setting.exit_threshold,
                                           "operating_point": held.setting.describe(),
                                           "policy": held.policy, "exits": held.exits, "method": held.method or None,
                                           "data": d.__dict__, "class_space": record,
                                           "variants": metrics})
    return metrics


def heatmap(run_dir: str | Path | None = None, *, kind: str = "all", out: str | Path = "outputs",
            blocks: Sequence[int] | None = None, progress: Progress | None = None) -> Any:
    """`tokenscope heatmap`: re-render a run's pictures from its traces (no model loaded).
    `blocks`: for kind "groups" (and "all"), the blocks whose tokens are drawn."""
    from tokenscope.jobs.heatmap import rerender

    return rerender(run_dir, kind=kind, out_root=out, progress=progress, blocks=None if blocks is None else list(blocks))


def report(run_dir: str | Path | None = None, *, gallery: int = 24, animations: int = 6,
           out: str | Path = "outputs", problems: list[str] | None = None) -> Path:
    """`tokenscope report`: one self-contained HTML file of a run folder (the latest if None).
    Damaged image folders are listed in the report and, if `problems` is a list, added to it."""
    from tokenscope.jobs.runfolder import fresh_file, latest_run, write_text_atomic
    from tokenscope.render.report import build_report

    run_path = Path(run_dir) if run_dir is not None else latest_run(out)
    text = build_report(run_path, gallery=gallery, animations=animations, problems=problems)
    path = fresh_file(run_path / "report.html")
    write_text_atomic(path, text)
    return path


def import_segmenter(checkpoint: str | Path, out: str | Path, *, config: str | Path | None = None,
                     name: str | None = None) -> Path:
    """`tokenscope import segmenter`: convert a Segmenter/mmseg checkpoint into NAME.json +
    NAME.safetensors (never overwrites); returns the .json path, loadable with `load_model(weights=...)`."""
    from tokenscope.models.checkpoints import checkpoint_paths
    from tokenscope.models.resolve import import_segmenter as _import

    tensors, meta = checkpoint_paths(out)
    if tensors.exists() or meta.exists():
        raise ConfigError(f"{meta} already exists; choose another --out (nothing is overwritten)")
    written, _ = _import(checkpoint, out, side_file=config, name=name)
    return written.with_suffix(".json")


def train(out: str | Path, *, model: str = "demo", backbone_weights: str | None = None, init: str | None = None,
          freeze: Sequence[str] = (), decoder: str | None = None, data: str = "synthetic", data_root: str | None = None,
          train_split: str = "train", val_split: str = "val", train_seeds: str = "0:2000",
          val_seeds: str = "900000:900100", size: int = 512, steps: int = 3000,
          crops: Sequence[tuple[int, int]] = ((256, 8), (384, 4), (512, 2)), lr: float = 1e-3, aux_weight: float = 0.5,
          warmup: int = 150, exit_aware_steps: int = 0, save_every: int = 250, accumulate: int = 1, resume: bool = False,
          evaluate_after: bool = True, device: str = "auto", seed: int = 0,
          progress: Callable[[int, int, dict[str, float]], None] | None = None,
          eval_progress: Progress | None = None, keep_per_class: int | None = None, method: str | None = None,
          overwrite: bool = False) -> Any:
    """`tokenscope train`: train a STEP model (or fine-tune one with `init`: a checkpoint or a
    published model) into `out`.json + .safetensors; `method` (algm, tome, X+algm, ...) trains with
    that method's in-network merging on. An existing checkpoint at `out` is refused unless `resume`
    (continue it) or `overwrite` (replace it, keeping the old files as NAME.backup-STAMP.*).
    Returns a TrainResult (`.checkpoint`, `.state.history`,
    `.metrics` of the final evaluation)."""
    from tokenscope.jobs.train import DataOptions, train_model
    from tokenscope.train.trainer import TrainSettings

    settings = TrainSettings(steps=steps, crops=tuple((int(a), int(b)) for a, b in crops), lr=lr, aux_weight=aux_weight,
                             warmup=warmup, save_every=save_every, seed=seed, exit_aware_steps=exit_aware_steps,
                             init=init or "", freeze=tuple(freeze), accumulate=accumulate, method=method or "")
    d = DataOptions(kind=data, root=data_root, train_split=train_split, val_split=val_split, train_seeds=train_seeds,
                    val_seeds=val_seeds, size=size)
    return train_model(model, out, d, settings, device=device, backbone_weights=backbone_weights, resume=resume,
                       evaluate_after=evaluate_after, progress=progress, eval_progress=eval_progress, decoder=decoder,
                       keep_per_class=keep_per_class, overwrite=overwrite)


@_shared(pick(without=("class_map", "ignore_class_mismatch"), adding=("amp",)))
def bench(*, size: int = 1024, batch: int = 1, image: str | None = None, threads: int | None = None, repeats: int = 3,
          warmup: int = 1, loop: bool = False, compile_blocks: bool = False, json_out: str | Path | None = None,
          methods: str | Sequence[str] | None = None, progress: Progress | None = None,
          shared: dict[str, Any] | None = None) -> Any:
    """`tokenscope bench`: baseline vs STEP speed (images/s, latency, memory, GFLOPs) on one batch.
    Returns a BenchResult; `.summary()` is what `--json` writes.

    With `methods` ("tome,algm,evit" or a list), every operating point is timed against one baseline,
    side by side in interleaved rounds, and a MethodsBenchResult is returned (one row per point)."""
    from tokenscope.jobs.bench import bench as run_bench
    from tokenscope.jobs.bench import bench_methods
    from tokenscope.jobs.runfolder import write_json_atomic

    def written(doc: dict[str, Any]) -> None:
        if json_out is not None:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(json_out), doc)

    opts = _model_options(dict(shared or {}), "bench")
    if methods is not None:
        if loop or compile_blocks:
            raise ConfigError("--methods times operating points side by side; --loop and --compile go with one point")
        text = methods if isinstance(methods, str) else ",".join(methods)
        several = bench_methods(opts, text, size=size, batch=batch, image=image, repeats=repeats, warmup=warmup,
                                threads=threads, progress=progress)
        written(several.summary())
        return several
    result = run_bench(opts, size=size, batch=batch, image=image, repeats=repeats, warmup=warmup, threads=threads,
                       loop=loop, compile_blocks=compile_blocks, progress=progress)
    written({"model": result.model, "policy": result.step.policy, "method": result.step.method, "budget": opts.budget,
             **result.summary()})
    return result


@_shared(pick(without=SWEPT))
def sweep(*, merge_thresholds: Sequence[float] = (0.3, 0.5, 0.7, 0.9),
          exit_thresholds: Sequence[float] = (0.8, 0.9, 0.95, 0.99),
          sizes: Sequence[int | None] = (None,), data: str = "synthetic", data_root: str | None = None, split: str = "val",
          seeds: str = "100000:100050", scene_size: int = 512, window: int | None = None, stride: int | None = None,
          out: str | Path = "outputs", methods: str | Sequence[str] | None = None, style: Any = None,
          progress: Progress | None = None, shared: dict[str, Any] | None = None) -> Any:
    """`tokenscope sweep`: every merge x exit threshold (x size) on one data set; a folder with
    sweep.csv and Pareto plots. Returns a SweepResult (`.table`, `.folder`, `.default`).

    `methods` ("step,dcts,dtop,cts,tome,algm"; a bare name is three operating points, a name with
    settings such as `tome:r=16` one) puts every method on one Pareto plot instead. The model
    options are `run`'s: a model without trained exit gates sweeps without exits by default (and
    its training-free methods with `methods`). Every row has the mIoU's 95% bootstrap interval
    (`miou_low`, `miou_high`) and the paired change against the plain ViT (`miou_change*`).
    `style` (a render.figures.FigureStyle) picks png/pdf/svg figures, their dpi and titles."""
    from tokenscope.jobs.sweep import sweep as run_sweep
    from tokenscope.render.figures import DEFAULT_STYLE

    opts = _model_options(dict(shared or {}), "sweep")
    listed = ",".join(methods) if isinstance(methods, (list, tuple)) else methods
    return run_sweep(opts, list(merge_thresholds), list(exit_thresholds), list(sizes), data, data_root, split, seeds,
                     scene_size, out, progress, methods=listed or None, window=window, stride=stride,
                     style=style or DEFAULT_STYLE)


def table(folder: str | Path, *, kind: str = "methods", format: str = "markdown",
          out: str | Path | None = None, figure: str | Path | None = None, columns: str | None = None,
          wide: bool = False) -> str:
    """`tokenscope table`: the comparison table a sweep folder or `compare --methods` folder holds
    (`kind="methods"`), a run's per-class table (`kind="classes"`: fates, cost per patch, IoU), early
    decisions against the unreduced model (`kind="agreement"`, a compare folder) or fates against the
    distance to a class boundary (`kind="boundary"`), as Markdown, LaTeX (booktabs) or CSV, with units,
    per-image/total in the headers and the conditions as notes. Written to `out` too when given, and the
    kind's figure to `figure` (classes, boundary; .png, .pdf or .svg), never over an existing file.
    `columns`: keep these (comma-separated starts of headers, in that order); `wide`: LaTeX `table*`."""
    import dataclasses

    from tokenscope.jobs.runfolder import write_text_atomic
    from tokenscope.render.tables import paper_table, render_table, select_columns

    for target in (out, figure):
        if target is not None and Path(target).exists():
            raise ConfigError(f"{target} exists; choose another path (nothing is overwritten)")
    if figure is not None and Path(figure).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"--figure {figure}: name a .png, .pdf or .svg file")
    if figure is not None and kind not in ("classes", "boundary"):
        raise ConfigError(f"--figure: the {kind} table has no figure (classes and boundary do)")
    t = paper_table(folder, kind)
    if columns is not None:
        t = select_columns(t, columns)
    text = render_table(dataclasses.replace(t, wide=bool(wide)), format)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    if figure is not None:
        from tokenscope.render.figures import FigureStyle

        fig = _table_figure(Path(folder), kind)
        Path(figure).parent.mkdir(parents=True, exist_ok=True)
        FigureStyle(format=Path(figure).suffix.lower().lstrip(".")).save(fig, Path(figure))
    return text


def _table_figure(folder: Path, kind: str) -> Any:
    if kind == "boundary":
        from tokenscope.render.decision_tables import boundary_figure

        return boundary_figure(folder)
    from tokenscope.plot import _run_tables
    from tokenscope.render.dataset_plots import class_fates_figure

    return class_fates_figure(_run_tables(folder))


def list_methods() -> Listing:
    """The token-reduction methods: built-ins, then installed plug-ins (entry-point group
    `tokenscope.methods`); `.methods` (each with `.describe()`), `.problems` (broken plug-ins)."""
    return all_methods()


def list_models() -> pd.DataFrame:
    """The named models: built-in architectures and published Segmenter and EoMT checkpoints."""
    from tokenscope.models.checkpoints import BUILTIN_WEIGHTS_DIR
    from tokenscope.models.published import PUBLISHED, converted_path
    from tokenscope.models.registry import BUILTIN

    rows = [{"name": n, "kind": "built-in", "arch": c.arch, "classes": c.num_classes, "data set": c.dataset or
             ("synthetic" if n == "demo" else ""), "decoder": c.decoder, "published_miou": None,
             "weights": ("shipped" if (BUILTIN_WEIGHTS_DIR / "demo.json").is_file() else "missing") if n == "demo"
             else "--weights / hub / --random-init"} for n, c in BUILTIN.items()]
    rows += [{"name": m.name, "kind": "published", "arch": m.backbone, "classes": m.classes, "data set": m.dataset,
              "decoder": m.decoder, "published_miou": m.miou, "hf": m.hf_id,
              "weights": "cached" if converted_path(m.name).is_file() else
              ("downloaded on first use" + ("" if m.sha256 else f" (about {m.approx_bytes / 1e9:.1f} GB; {m.digest_note})"))}
             for m in PUBLISHED.values()]
    return pd.DataFrame(rows)



def fetch_data(name: str, *, url: str | None = None, keep_archive: bool = False, offline: bool | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Download, verify and unpack data set `name` (ade20k) into the cache; its folder. Data sets
    that need an account raise a ConfigError that says what to download and where to put it."""
    from tokenscope.data.fetch import fetch

    return fetch(name, progress=progress, url=url, keep_archive=keep_archive, offline=offline)


def check_data(name: str, *, root: str | Path | None = None, limit: int | None = None,
               progress: Callable[[int, int, str], None] | None = None) -> Any:
    """Check a data-set tree (at `root`, else the cached one): counts per split and every problem
    (missing labels, label values out of range, size mismatches), one line each."""
    from tokenscope.data.check import check_dataset

    return check_dataset(name, root, limit=limit, progress=progress)


def list_data() -> pd.DataFrame:
    """The data sets tokenscope knows: cached or not, where, size on disk."""
    from tokenscope.data.fetch import listing

    return pd.DataFrame(listing())


class ExplorerView:
    """The explorer page as HTML; in Jupyter it shows inline (in an iframe, so its script and
    styles stay its own). `.save(path)` writes it as a file that opens from disk."""

    def __init__(self, page: str, path: Path | None = None) -> None:
        self.html = page
        self.path = path

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:900px;border:0" '
                'sandbox="allow-scripts"></iframe>')

    def save(self, path: str | Path) -> Path:
        from tokenscope.jobs.runfolder import write_text_atomic

        p = Path(path)
        write_text_atomic(p, self.html)
        return p


def view(obj: Trace | _CoreTrace | str | Path | None = None, *, out: str | Path = "outputs",
         image: Any = None) -> ExplorerView:
    """The explorer of a trace (one image's view), or of a run / comparison folder (None = the
    latest run under `out`; its `explorer.html` is written too, as `tokenscope view` does)."""
    from tokenscope.jobs.view import write_view
    from tokenscope.render.explorer import trace_html

    if isinstance(obj, (Trace, _CoreTrace)):
        rgb = None if image is None else (np.clip(as_rgb(image)[0], 0, 1) * 255).astype(np.uint8)
        return ExplorerView(trace_html(obj, Path(obj.meta.source).stem or "trace", rgb))
    result = write_view(obj, out=out)
    return ExplorerView(result.page.read_text(encoding="utf-8"), result.page)


def read_operating_point(path: str | Path) -> str:
    """The method label (with its settings) an operating-point file from `tokenscope tune` holds:
    pass it as `method=` to load_model, run, evaluate or bench."""
    from tokenscope.jobs.tune import read_operating_point as _read

    return _read(path)


def _check_arguments() -> None:
    """Every public function (and the public methods of Model and Trace) checks its arguments' types
    against its annotations: a wrong type is one ConfigError, never a TypeError from inside."""
    from tokenscope.arguments import checked

    for name in ("load_model", "from_timm", "trace", "trace_many", "predict", "load_trace", "tabulate", "run",
                 "compare", "evaluate", "heatmap", "report", "import_segmenter", "train", "bench", "sweep", "table",
                 "list_methods", "list_models", "fetch_data", "check_data", "list_data", "view",
                 "read_operating_point"):
        globals()[name] = checked(globals()[name])
    for cls, methods in ((Model, ("save", "configure")), (Trace, ("save",))):
        for m in methods:
            setattr(cls, m, checked(getattr(cls, m)))


_check_arguments()
