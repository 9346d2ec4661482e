"""`tokenscope run`: trace images (files, folders or a whole data set) and write where their tokens went.

Each image gets its own folder in the run folder: the trace, the processed image, overlays, the
per-layer histogram, an animation of tokens leaving, tokens.csv, blocks.csv, summary.json and,
when labels exist, eval.json (confusion matrices of STEP and of the same weights without
reduction). A video frame's folder holds its trace, image.jpg and summary.json: its pictures are
the clip's (overlay video, timeline; jobs/clips.py) and its token rows are in the run's tables;
the frame sink (jobs/frame_sink.py) writes those folders while the model goes on. When all
images are done, data-set tables (per image, class, level and block; CSV and Parquet) and
figures are derived from the folders (traces this process holds are used rather than read back:
they equal what their folders give), and run.json is marked complete once every folder is.

With sliding windows (an imported Segmenter model's default, or `--window N`), an image folder
holds the stitched prediction (`segmentation.png`, `eval.json`, `summary.json`, `windows.json`)
and one sub-folder per window (`w00/`, `w01/`, ...) with that window's trace and pictures; the
data-set tables then have one row per window, and mIoU is scored on the stitched label maps.

A run is resumable: run.json holds the request from the start, image folders appear only once
complete (written as `.partial-NAME`, then renamed), and `--resume RUN_DIR` redoes exactly the
images without a folder, then rebuilds the tables, so the result equals an uninterrupted run.
"""

from __future__ import annotations

import functools
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from tokenscope import __version__, dist
from tokenscope.analysis.aggregate import DatasetTables, ImageEval, aggregate
from tokenscope.analysis.metrics import confusion, pixel_agreement
from tokenscope.analysis.stats import blocks_table, joined_tokens_table, summary, tokens_columns, tokens_table
from tokenscope.analysis.windowed import ImagePrediction, predict
from tokenscope.data.datasets import SegmentationDataset, open_dataset
from tokenscope.data.images import (PreparedImage, check_size, find_images, find_label_for, frame_count, load_prepared,
                                    prepare_image)
from tokenscope.data.windows import WindowSpec, resolve_windows
from tokenscope.errors import ConfigError, RunFolderError, StorageError, TokenscopeError
from tokenscope.schema import SUMMARY_FIELDS, check_fields, read_json
from tokenscope.jobs.runfolder import (
    MANIFEST,
    PARTIAL_PREFIX,
    image_folder,
    new_run_dir,
    read_manifest,
    run_lock,
    check_no_links,
    unique_name,
    write_json_atomic,
    write_rgb,
    write_table,
)
from tokenscope.jobs.setup import LEGACY_FLAGS, ModelOptions, label_file_space, load_model, options_from_record, scoring_space
from tokenscope.jobs.writer import BackgroundWriter, default_workers
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.methods.point import external_names, resolve
from tokenscope.models.methods.registry import digest_of
from tokenscope.models.registry import StepConfig
from tokenscope.render.animation import write_exit_animation
from tokenscope.render.dataset_plots import write_dataset_figures
from tokenscope.render.figures import DEFAULT_STYLE, FigureStyle
from tokenscope.render.overlays import OVERLAY_KINDS, default_group_blocks, groups_overlay, render_label_map, render_overlay
from tokenscope.render.plots import token_histogram
from tokenscope.trace.capture import TraceCapture, merging_meta, pruning_meta
from tokenscope.analysis.stability import tails
from tokenscope.data.video import FrameReader, FrameSelection, VideoInfo, frame_number, is_video, probe
from tokenscope.data.classspace import ClassSpace
from tokenscope.jobs.clips import Clip, ClipFrame, ClipPass
from tokenscope.jobs.frame_sink import write_frame_files, write_frame_folder
from tokenscope.render.timeline import tails_figure
from tokenscope.trace.fates import FATES
from tokenscope.trace.trace import Trace, trace_damage, trace_folders

WINDOWS_JSON = "windows.json"
DATASET_ANIMATIONS = 10
"""A data-set run animates its first images only (a GIF costs more than all other pictures)."""
Progress = Callable[[int, int, str], None]
"""progress(done, total, current item)"""


@dataclass
class RunRequest:
    """Everything needed to start, or restart, a run; stored in run.json."""

    inputs: list[str] = field(default_factory=list)
    labels: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    split: str = "val"
    seeds: str = "0:100"
    dataset_size: int = 512
    size: int | None = None
    model: dict[str, Any] = field(default_factory=dict)
    figures: bool = True
    animation: bool = True
    baseline: bool | None = None
    """Also run the same weights without reduction (for mIoU with/without); default: when labelled."""
    window: int | None = None
    """Sliding-window side in pixels (0 = whole images); None = the model's own protocol."""
    stride: int | None = None
    animation_limit: int | None = None
    """GIFs for the first N images only; None = all files, or the first DATASET_ANIMATIONS of a data set."""
    render_workers: int | None = None
    """Processes writing image folders beside the model; None = chosen from the image count and cores."""
    every: int = 1
    """Video inputs: take every N-th frame."""
    start: str | None = None
    """Video inputs: first frame, as frames (300) or seconds (12.5s)."""
    end: str | None = None
    """Video inputs: stop before this frame or time."""
    max_frames: int | None = None
    """Video inputs: at most this many frames per clip."""
    frames: bool = False
    """Image folders are clips: numbered frames, taken in numeric order (at `fps` frames per second)."""
    fps: float = 25.0
    figure_format: str = "png"
    """Data-set figures also as pdf or svg (vector files for a paper); PNGs are always written (the
    report and explorer show them)."""
    figure_dpi: int = 150
    figure_titles: bool = True

    def figure_style(self) -> FigureStyle:
        return FigureStyle.parse(self.figure_format, self.figure_dpi, self.figure_titles)

    def model_options(self) -> ModelOptions:
        return options_from_record(self.model)


@dataclass
class RunItem:
    name: str
    source: str
    load: Callable[[int], PreparedImage]
    """load(patch): the image prepared for a model with `patch`-pixel patches."""
    labelled: bool
    clip: Clip | None = None
    """The video clip this frame belongs to (None for images)."""
    note: str = ""
    """What the run must say about this input (a multi-frame file of which only the first frame is traced)."""


@dataclass
class ImageResult:
    source: str
    folder: str | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False


@dataclass
class RunResult:
    run_dir: Path
    images: list[ImageResult]
    warnings: list[str] = field(default_factory=list)
    model: str = ""
    tables: DatasetTables | None = None
    rank: int = 0
    """This process's rank under torchrun; only rank 0 has the tables and reports."""
    method: str = ""
    """The token-reduction method run ("" = the policy and exits alone)."""
    class_space: ClassSpace | None = None
    """How labels met the model's classes (None: nothing was scored); its `tag` goes beside every mIoU."""

    @property
    def failed(self) -> list[ImageResult]:
        return [r for r in self.images if r.error is not None]


@dataclass
class Scoring:
    """How the run's labels meet the model's classes: set once the model is known (the items are
    made before it), read by every item's loader."""

    dataset: SegmentationDataset | None = None
    space: ClassSpace | None = None
    labelled_files: list[Path] = field(default_factory=list)
    """Image files whose label maps the user gave: checked before the run starts."""

    def labels(self, raw: np.ndarray, source: str) -> np.ndarray:
        return raw if self.space is None else self.space.labels(raw, source)

    def check(self, loaded: LoadedModel, opts: ModelOptions, req: RunRequest) -> ClassSpace | None:
        """Refuse (before the run folder exists) a model whose classes are not the data's."""
        if self.dataset is not None:
            self.space = scoring_space(loaded, opts, self.dataset, str(req.dataset))
        elif req.labels is not None:
            self.space = label_file_space(loaded, opts, req.labels, self.labelled_files)
        return self.space


def _items(req: RunRequest, scoring: Scoring) -> list[RunItem]:
    """The images of a request, with folder names fixed up front so a resume finds the same ones."""
    taken: set[str] = set()
    if req.dataset is not None:
        if req.inputs:
            raise ConfigError("give images or --dataset, not both")
        ds: SegmentationDataset = open_dataset(req.dataset, req.data_root, req.split, req.seeds, req.dataset_size)
        scoring.dataset = ds

        def loader(i: int) -> Callable[[int], PreparedImage]:
            def load(patch: int) -> PreparedImage:
                s = ds[i]
                labels = None if s.labels is None else scoring.labels(s.labels, s.name)
                return prepare_image(s.image, s.name, size=req.size, labels=labels, patch=patch)
            return load

        labelled = not getattr(ds, "unlabelled", False)
        return [RunItem(unique_name(ds.name(i), taken), ds.name(i), loader(i), labelled) for i in range(len(ds))]
    videos = [p for p in req.inputs if is_video(p)]
    sequences = [p for p in req.inputs if req.frames and Path(p).is_dir()]
    items = _frame_items(videos, req, taken) + _sequence_items(sequences, req, taken)
    paths = find_images([p for p in req.inputs if p not in videos and p not in sequences])
    if not paths and not items:
        raise TokenscopeError("no images found in " + ", ".join(req.inputs))
    labels = Path(req.labels) if req.labels is not None else None
    if labels is not None:
        scoring.labelled_files = list(paths)
    for p in paths:
        def load(patch: int, p: Path = p) -> PreparedImage:
            lab = find_label_for(p, labels) if labels is not None else None
            return load_prepared(p, size=req.size, labels_path=lab, patch=patch, convert_labels=scoring.labels)
        frames = frame_count(p)
        note = f"{p}: {frames} frames or pages in one file; only the first is traced" if frames > 1 else ""
        items.append(RunItem(unique_name(p.stem, taken), str(p), load, labels is not None, note=note))
    return items


def _notes(items: list[RunItem]) -> list[str]:
    notes = [item.note for item in items if item.note]
    return notes if len(notes) <= 5 else [*notes[:5], f"... and {len(notes) - 5} more multi-frame files"]


def _sequence_items(folders: list[str], req: RunRequest, taken: set[str]) -> list[RunItem]:
    """A folder of numbered frames as one clip (frame_0001.png, ...; numeric order, not text order)."""
    items = []
    for folder in folders:
        files = sorted(find_images([folder]), key=frame_number)
        if not files:
            raise TokenscopeError(f"{folder}: no frames (image files) in this folder")
        clip = Clip(unique_name(Path(folder).name, taken), folder, req.fps, req.every)
        items += _clip_items(clip, VideoInfo(folder, req.fps, len(files), 0, 0), req, taken,
                             functools.partial(_file_frame, files, req.size), lambda i, files=files: str(files[i]))
    return items


def _frame_items(videos: list[str], req: RunRequest, taken: set[str]) -> list[RunItem]:
    """One item per selected frame of each clip; a clip's frames share one sequential reader."""
    items = []
    for v in videos:
        info = probe(v)
        clip = Clip(unique_name(Path(v).stem, taken), v, info.fps, req.every)
        items += _clip_items(clip, info, req, taken, functools.partial(_video_frame, FrameReader(info), req.size),
                             lambda i, v=v: f"{v}#frame={i}")
    return items


def _clip_items(clip: Clip, info: VideoInfo, req: RunRequest, taken: set[str],
                load_frame: Callable[[int, int], PreparedImage], source: Callable[[int], str]) -> list[RunItem]:
    """The run items of the frames `req` selects from a clip; `load_frame(index, patch)`."""
    items = []
    for index in FrameSelection(req.every, req.start, req.end, req.max_frames).indices(info):
        name = unique_name(f"{clip.name}-f{index:06d}", taken)
        clip.frames.append(ClipFrame(index, index / info.fps, name))
        items.append(RunItem(name, source(index), functools.partial(load_frame, index), False, clip))
    return items


def _video_frame(reader: FrameReader, size: int | None, index: int, patch: int) -> PreparedImage:
    return prepare_image(reader.frame(index), f"{reader.info.path}#frame={index}", size=size, patch=patch)


def _file_frame(files: list[Path], size: int | None, index: int, patch: int) -> PreparedImage:
    return load_prepared(files[index], size=size, labels_path=None, patch=patch)


def write_image_outputs(folder: Path, trace: Trace, display: np.ndarray, figures: bool = True,
                        animation: bool = True, frame: bool = False) -> None:
    """What `run` writes for one image, from its trace and its processed image.

    A video `frame` keeps its trace, summary and image (JPEG: the frame was lossy already) and no
    per-frame tables: tokens.csv and blocks.csv of every frame are rows of the run's tables
    (tables/tokens.parquet, tables/frames.csv), and writing them per frame cost as much as the
    trace itself."""
    if frame:
        write_frame_files(folder, trace, display)
    else:
        trace.save(folder, atomic=False)  # the image folder is renamed into place once complete
        write_rgb(folder / "image.png", display)
    if figures:
        for kind in OVERLAY_KINDS:
            write_rgb(folder / f"{kind}.png", render_overlay(kind, display, trace))
        if trace.has_merges:
            for block in default_group_blocks(trace):
                write_rgb(folder / f"groups_b{block:02d}.png", groups_overlay(display, trace, block))
        token_histogram(trace, folder / "histogram.png")
    if animation:
        write_exit_animation(folder / "tokens.gif", display, trace)
    if not frame:
        write_table(tokens_table(trace), folder / "tokens.csv")
        write_table(blocks_table(trace), folder / "blocks.csv")


def _evaluate_image(prepared: PreparedImage, pred: ImagePrediction, capture: TraceCapture,
                    windows: WindowSpec | None, with_baseline: bool) -> ImageEval:
    """Confusion matrices of STEP (and of the same weights without reduction) on one image."""
    ev = ImageEval()
    c = capture.loaded.config.num_classes
    if pred.labels is not None:
        ev.step_confusion = confusion(pred.label_map, pred.labels, c)
    if with_baseline:
        base = predict(capture.at(capture.setting.plain()), prepared, windows)
        ev.agreement = pixel_agreement(pred.label_map, base.label_map)
        ev.baseline_tokens = base.tokens
        ev.baseline_flops = base.flops
        if base.labels is not None:
            ev.baseline_confusion = confusion(base.label_map, base.labels, c)
    return ev


def prediction_summary(pred: ImagePrediction, source: str) -> dict[str, Any]:
    """summary.json of a windowed image: its windows' numbers added up."""
    first = summary(pred.traces[0])
    total, base = pred.flops, pred.baseline_flops
    fates = pred.fate_totals()
    tokens, patches = max(pred.tokens, 1), max(pred.patches, 1)
    return {
        **{k: first[k] for k in ("model", "method", "merging", "policy", "exits", "merge_thresholds", "exit_threshold",
                                 "weights", "device")},
        "image": source, "windows": len(pred.traces), "patches": pred.patches, "tokens": pred.tokens,
        "reduction": pred.patches / tokens, "exited_early_tokens": fates["tokens_exited"],
        "mean_tokens_per_block": pred.mean_tokens_per_block,
        **{f"{kind}_tokens": fates[f"tokens_{kind}"] for kind in FATES},
        **{f"{kind}_pct": 100.0 * fates[f"tokens_{kind}"] / tokens for kind in FATES},
        **{f"{kind}_patch_pct": 100.0 * fates[f"patches_{kind}"] / patches for kind in FATES},
        "exited_early_pct": 100.0 * fates["tokens_exited"] / tokens,
        "exited_early_patch_pct": 100.0 * fates["patches_exited"] / patches,
        "gflops": total / 1e9, "baseline_gflops": base / 1e9, "flop_reduction": base / total if total else float("nan"),
        "forward_s": pred.forward_s,
    }


def write_image_folder(run_dir: Path, name: str, prepared: PreparedImage, pred: ImagePrediction,
                       ev: ImageEval | None, req: "RunRequest", cfg: StepConfig, frame: bool = False) -> dict[str, Any]:
    """The image folder `run_dir/name`, complete or not at all; returns its summary (`frame`: a
    video frame, see `write_image_outputs`).

    A top-level function of plain data, so a worker process can run it (see jobs/writer.py).
    """
    if frame and pred.plan is None:  # the very folder the frame sink writes for a frame handed to it
        info = frame_summary(name, pred.traces[0])
        write_frame_folder(run_dir, name, prepared.display, pred.traces[0], info, None if ev is None else ev.to_json())
        return info
    with image_folder(run_dir, name) as folder:
        info = _write_prediction(folder, prepared, pred, ev, req, cfg, frame)
        info["folder"] = name
        write_json_atomic(folder / "summary.json", info)
    return info


def frame_summary(name: str, trace: Trace) -> dict[str, Any]:
    """summary.json of a video frame's folder (whoever writes it: the run or the frame sink)."""
    return {**summary(trace), "folder": name}


def _animated_items(req: "RunRequest", items: list[RunItem]) -> set[int]:
    """Which images get a GIF: all of them for files; the first `animation_limit` (default
    DATASET_ANIMATIONS) of a data set, since the GIFs are for looking at, not for the tables."""
    if not req.animation:
        return set()
    limit = req.animation_limit
    if limit is None:
        limit = DATASET_ANIMATIONS if req.dataset is not None else len(items)
    return set(range(min(max(limit, 0), len(items))))


def _write_prediction(folder: Path, prepared: PreparedImage, pred: ImagePrediction, ev: ImageEval | None,
                      req: "RunRequest", cfg: StepConfig, frame: bool = False) -> dict[str, Any]:
    """Everything `run` writes for one image; returns its summary."""
    if pred.plan is None:
        write_image_outputs(folder, pred.traces[0], prepared.display, req.figures, req.animation, frame)
        info = summary(pred.traces[0])
    else:
        for k, (trace, window) in enumerate(zip(pred.traces, pred.inputs)):
            sub = folder / f"w{k:02d}"
            sub.mkdir()
            write_image_outputs(sub, trace, window.display, req.figures, req.animation and k == 0, frame)
        write_rgb(folder / ("image.jpg" if frame else "image.png"), prepared.display)
        if req.figures:
            write_rgb(folder / "segmentation.png", render_label_map(prepared.display, pred.label_map, cfg.class_colours,
                                                                    cfg.class_names, cfg.num_classes))
        write_json_atomic(folder / WINDOWS_JSON, pred.plan.to_json())
        info = prediction_summary(pred, prepared.source)
    if ev is not None:
        write_json_atomic(folder / "eval.json", ev.to_json())
    return info


EVAL_FIELDS = {"agreement": float | None, "baseline_tokens": float | None, "baseline_flops": float | None,
               "step_confusion": dict | None, "baseline_confusion": dict | None}
CONFUSION_FIELDS = {"n": int, "entries": list[list[int]]}


def read_eval_file(path: Path) -> ImageEval:
    """An image's eval.json, checked (field types; confusion sizes and cells inside them) before use."""
    doc = read_json(path, "eval.json")
    check_fields(doc, EVAL_FIELDS, path)
    for key in ("step_confusion", "baseline_confusion"):
        if doc.get(key) is None:
            continue
        check_fields(doc[key], CONFUSION_FIELDS, path, prefix=key)
        n = doc[key].get("n")
        if not isinstance(n, int) or not 1 <= n <= 65535 or not all(
                len(e) == 3 and 0 <= e[0] < n and 0 <= e[1] < n for e in doc[key].get("entries", [])):
            raise RunFolderError(f"{path}: field '{key}' is not a confusion matrix of 1..65535 classes")
    return ImageEval.from_json(doc)


def read_image_eval(folder: Path) -> ImageEval | None:
    ev_path = folder / "eval.json"
    return read_eval_file(ev_path) if ev_path.is_file() else None


class HeldTraces:
    """Traces this process has just traced (and written, or handed to the frame sink to write),
    kept with their evaluations (up to `budget` bytes) for the run's tables so they are not read
    back from disk: a clip's frames are many and small, and reading each again cost as much as
    drawing its overlay. They equal what `Trace.load` gives (saving and loading round-trip
    exactly: tests/test_trace.py), so tables built from held traces equal those of a resumed run
    that reads every folder. A held trace always has a folder of its own (no windows)."""

    def __init__(self, budget: int = 512 << 20) -> None:
        self._traces: dict[str, tuple[Trace, ImageEval | None]] = {}
        self._left = budget

    def hold(self, name: str, trace: Trace | None, evaluation: ImageEval | None = None) -> bool:
        """Keep `trace` if the budget allows; returns whether it was kept."""
        if trace is None:
            return False
        size = sum(a.nbytes for a in vars(trace).values() if isinstance(a, np.ndarray))
        if size > self._left:
            return False
        self._traces[name], self._left = (trace, evaluation), self._left - size
        return True

    def __contains__(self, name: str) -> bool:
        return name in self._traces

    def take(self, name: str) -> tuple[Trace, ImageEval | None] | None:
        return self._traces.pop(name, None)


def _records(run_dir: Path, names: list[str], held: HeldTraces | None = None) -> Any:
    """(name, folder, trace, eval) per trace of the run: one per image, or one per window (eval on the image)."""
    for n in names:
        kept = held.take(n) if held is not None else None
        if kept is not None:
            yield n, run_dir / n, kept[0], kept[1]
            continue
        folders = trace_folders(run_dir / n)
        if folders == [run_dir / n]:
            yield n, run_dir / n, Trace.load(run_dir / n), read_image_eval(run_dir / n)
        else:
            for f in folders:
                yield f"{n}/{f.name}", f, Trace.load(f), None


def _window_evals(run_dir: Path, names: list[str]) -> list[ImageEval]:
    """The stitched (whole-image) evaluations of windowed images."""
    out = []
    for n in names:
        ev_path = run_dir / n / "eval.json"
        if (run_dir / n / WINDOWS_JSON).is_file() and ev_path.is_file():
            out.append(read_eval_file(ev_path))
    return out


Visit = Callable[[str, Path, Trace], None]
"""visit(name, folder, trace): called for every trace while the run's tables read it."""


def finish_run(run_dir: Path, names: list[str], figures: bool = True, extra: dict[str, Any] | None = None,
               visit: Visit | None = None, held: HeldTraces | None = None,
               style: FigureStyle | None = None) -> DatasetTables | None:
    """Derive the data-set tables and figures from the image folders alone (`extra`: facts about
    the run itself added to its summary, e.g. how many images were animated). Every trace is read
    once: the aggregate tables, the token table and `visit` (a clip's outputs) share that read;
    traces in `held` were just traced by this process and are not read again (their folders may
    still be on their way: the frame sink writes them meanwhile)."""
    present = [n for n in names if (held is not None and n in held) or (run_dir / n).is_dir()]
    if not present:
        return None
    token_rows: list[tuple[str, dict[str, np.ndarray]]] = []

    def records() -> Any:
        for name, folder, trace, ev in _records(run_dir, present, held):
            token_rows.append((name, tokens_columns(trace)))
            if visit is not None:
                visit(name, folder, trace)
            yield name, trace, ev

    tables = aggregate(records(), image_evals=_window_evals(run_dir, present), images=len(present))
    tables.summary.update(extra or {})
    tables.summary["tails"] = tails(tables.images)
    out = run_dir / "tables"
    out.mkdir(exist_ok=True)
    for name in ("images", "classes", "levels", "blocks"):
        df: pd.DataFrame = getattr(tables, name)
        write_table(df, out / f"{name}.csv")
        write_table(df, out / f"{name}.parquet")
    write_table(joined_tokens_table(token_rows), out / "tokens.parquet")
    write_json_atomic(run_dir / "summary.json", tables.summary)
    if figures:
        fig_dir = run_dir / "figures"
        fig_dir.mkdir(exist_ok=True)
        png = style if style is not None and style.format == "png" else DEFAULT_STYLE
        for fig_style in [png, *([style] if style is not None and style.format != "png" else [])]:  # PNGs, then vectors
            write_dataset_figures(tables, fig_dir, fig_style)
            if len(tables.images) > 1:
                tails_figure(tables.images, fig_dir / "tails.png",
                             f"{run_dir.name}: distributions over {len(tables.images)} images",
                             None if fig_style is DEFAULT_STYLE else fig_style)
    return tables


def run_job(req: RunRequest, out: str | Path = "outputs", resume: str | Path | None = None,
            progress: Progress | None = None, model: tuple[LoadedModel, Any] | None = None,
            trusted_method: str | None = None) -> RunResult:
    """Start a run from `req`, or finish the interrupted run at `resume`.

    `model` is an already loaded (model, device) matching `req.model`, reused instead of loading
    it again (the Python API passes the one a notebook holds); a resume always loads its own.
    A resumed folder is locked while it is worked on: a second `--resume` of it says it is busy.
    A run folder is data: when it names a method file or module, the resume runs it only when the
    caller names the same method (`trusted_method`, the command line's --method) and the file's bytes
    are those recorded, checked before it is imported.
    """
    if resume is None:
        return _run_job(req, out, None, progress, model)
    with run_lock(Path(resume)):
        return _run_job(req, out, resume, progress, model, trusted_method)


def _code_paths(names: list[str]) -> set[str]:
    """Method files as resolved paths (modules by name), to compare what a run recorded with what the
    caller named."""
    return {str(Path(n).expanduser().resolve()) if n.endswith(".py") or "/" in n or "\\" in n else n for n in names}


def check_trusted_methods(run_dir: Path, manifest: dict[str, Any], recorded: str | None, trusted: str | None) -> None:
    """Refuse to resume a run whose method is code from a file or module unless the caller named that
    same code, and unless the file still holds the bytes the run recorded (checked before any import)."""
    files = external_names(recorded or "")
    if not files:
        return
    sources = [s for s in manifest.get("method_sources") or [] if isinstance(s, dict)]
    recorded_paths = _code_paths(files) | {str(s.get("source"))[5:] for s in sources
                                            if str(s.get("source", "")).startswith("file ")}
    named = _code_paths(external_names(trusted or ""))
    if not named or not named <= recorded_paths:
        raise RunFolderError(f"{run_dir}: was run with the method file or module {files[0]}, and a run folder never "
                             f"makes code run; if you trust it, name it yourself: tokenscope run --resume {run_dir} "
                             f"--method {shlex.quote(str(recorded))}")
    for src in sources:
        source, digest = str(src.get("source", "")), src.get("digest")
        if source.startswith("file ") and not Path(source[5:]).is_file():
            raise RunFolderError(f"{run_dir}: method file {source[5:]}: no such file")
        if source.startswith("file ") and isinstance(digest, str) and digest and digest_of(source[5:]) != digest:
            raise RunFolderError(f"{run_dir}: was run with method {src.get('name')} from {source} (sha256 "
                                 f"{digest[:12]}), and that file has changed since: start a new run instead of resuming")


def _request_of(manifest: dict[str, Any], run_dir: Path) -> RunRequest:
    """The request a run folder recorded, or one line naming what is wrong with it."""
    raw = manifest.get("request")
    known = {f.name for f in fields(RunRequest)}
    if not isinstance(raw, dict) or set(raw) - known:
        extra = sorted(set(raw) - known) if isinstance(raw, dict) else []
        raise RunFolderError(f"{run_dir / MANIFEST}: field 'request' " + (f"has unknown keys {extra}" if extra else
                                                                         "must be a JSON object"))
    model = raw.get("model", {})
    if not isinstance(model, dict) or set(model) - {f.name for f in fields(ModelOptions)} - set(LEGACY_FLAGS):
        raise RunFolderError(f"{run_dir / MANIFEST}: field 'request.model' is not a set of model options")
    _check_types(raw, RunRequest(), "request", run_dir, skip={"model"})
    _check_types(model, ModelOptions(), "request.model", run_dir, skip=set(LEGACY_FLAGS))
    return RunRequest(**raw)


def _check_types(raw: dict[str, Any], defaults: Any, where: str, run_dir: Path, skip: set[str]) -> None:
    """Each recorded field has its declared type (`int | None` takes a whole number or null, a list a list
    of plain values): a run.json edited by hand is one line naming the field."""
    check_fields(raw, type(defaults), run_dir / MANIFEST, prefix=where, skip=skip)


def check_same_methods(run_dir: Path, recorded: Any, now: list[dict[str, str]] | None) -> None:
    """A resumed run must run the methods it started with: same name, same source file bytes."""
    if not recorded:
        return
    for old, new in zip(recorded, now or []):
        if old.get("name") != new["name"] or (old.get("digest") and old.get("digest") != new["digest"]):
            raise RunFolderError(f"{run_dir}: was run with method {old.get('name')} from {old.get('source')} "
                                 f"(sha256 {str(old.get('digest'))[:12]}); it is now {new['name']} from {new['source']} "
                                 f"(sha256 {new['digest'][:12]}): start a new run instead of resuming")
    if len(recorded) != len(now or []):
        raise RunFolderError(f"{run_dir}: its methods were {[r.get('name') for r in recorded]}, the request now "
                             f"resolves to {[n['name'] for n in now or []]}")


def _run_job(req: RunRequest, out: str | Path, resume: str | Path | None, progress: Progress | None,
             model: tuple[LoadedModel, Any] | None, trusted_method: str | None = None) -> RunResult:
    if resume is not None:
        run_dir = Path(resume)
        manifest = read_manifest(run_dir)
        if manifest.get("kind") != "run":
            raise RunFolderError(f"{run_dir}: not a tokenscope run folder")
        req = _request_of(manifest, run_dir)
        check_no_links(run_dir)
        method = req.model.get("method")
        check_trusted_methods(run_dir, manifest, method if isinstance(method, str) else None, trusted_method)
    style = req.figure_style()  # a bad --format or --dpi is refused before anything else
    scoring = Scoring()
    items = _items(req, scoring)
    opts = req.model_options()
    if model is not None and resume is None:
        loaded, device = model
    else:
        loaded, device = load_model(opts, have_labels=any(it.labelled for it in items))
    space = scoring.check(loaded, opts, req)
    cfg = loaded.config
    patch = loaded.model.patch_size
    check_size(req.size, patch)  # before the run folder exists: a bad option leaves nothing behind
    if req.dataset == "synthetic":
        check_size(req.dataset_size, patch, "--scene-size")
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, req.window, req.stride, req.size, patch)
    ctx = dist.context(device.type)  # rank 0 of 1 unless started by torchrun
    sources = resolve(opts.method).provenance() if opts.method else None
    if resume is not None:
        check_same_methods(run_dir, manifest.get("method_sources"), sources)
        if manifest.get("weights") != loaded.weights_id:
            raise RunFolderError(f"{run_dir}: was run with weights {manifest.get('weights')}, these are {loaded.weights_id}")
        if ctx.is_writer:
            for stale in run_dir.glob(f"{PARTIAL_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            for item in items:  # a damaged image folder (a truncated trace, say) is traced again
                folder = run_dir / item.name
                if folder.is_dir() and trace_damage(folder) is not None:
                    shutil.rmtree(folder, ignore_errors=True)
    else:
        run_dir = Path(dist.broadcast(ctx, str(new_run_dir(out, "run")) if ctx.is_writer else ""))
    setting = loaded.setting
    capture = TraceCapture(loaded, device, setting, amp=opts.amp)
    labelled = any(it.labelled for it in items)
    with_baseline = labelled if req.baseline is None else req.baseline
    base_manifest = {
        "tool": "tokenscope", "version": __version__, "kind": "run", "status": "running",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "request": asdict(req),
        "model": loaded.config.name, "arch": loaded.config.arch, "weights": loaded.weights_id,
        "weights_source": loaded.source, "device": str(device),
        "policy": setting.policy, "exits": setting.exits,
        "method": setting.method or None, "merging": merging_meta(setting) or None,
        "pruning": pruning_meta(setting) or None, "method_sources": sources,
        "merge_thresholds": list(setting.merge_thresholds),
        "exit_threshold": setting.exit_threshold if loaded.model.gates else float("nan"),
        "operating_point": setting.describe(),
        "warnings": [*loaded.warnings, *(space.warnings() if space is not None else []), *_notes(items)],
        "class_space": None if space is None else space.record(), "windows": None if windows is None else asdict(windows),
        "animated_images": len(_animated_items(req, items)),
    }
    if resume is None:
        if ctx.is_writer:
            write_json_atomic(run_dir / MANIFEST, base_manifest)
    else:
        base_manifest["created"] = manifest.get("created", base_manifest["created"])
        base_manifest["resumed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    base_manifest["world_size"] = ctx.world_size
    dist.barrier(ctx, "run folder ready")  # every rank now sees the same finished image folders
    results = [ImageResult(source=item.source) for item in items]
    animate = _animated_items(req, items)
    todo = [i for i, item in enumerate(items) if not (run_dir / item.name).is_dir()]
    mine = ctx.shard(todo)  # each image is one rank's: no two ranks write the same folder
    clips = list({id(it.clip): it.clip for it in items if it.clip is not None}.values())
    clip_pass = ClipPass(run_dir, clips, req.figures, cores_free=device.type != "cpu") if clips and ctx.is_writer else None
    sunk = clip_pass is not None and clip_pass.writes  # frames go to the frame sink, not to render workers
    written_here = sum(1 for i in mine if not (sunk and items[i].clip is not None))
    workers = default_workers(written_here, device.type) if req.render_workers is None else req.render_workers
    held = HeldTraces()

    def settle(i: int) -> None:
        if clip_pass is not None:
            clip_pass.settle(items[i].name, results[i].folder is not None)

    for i in sorted(set(range(len(items))) - set(todo)):
        results[i].folder, results[i].skipped = items[i].name, True
        settle(i)  # frames of an earlier, interrupted run

    written: dict[int, tuple[Trace, ImageEval | None]] = {}  # traces whose folder is being written

    def record(done: list[tuple[Any, Any, BaseException | None]]) -> None:
        for i, info, exc in done:
            if isinstance(exc, StorageError):
                raise exc  # the disk refused: every later image would too; stop with one line (resumable)
            if isinstance(exc, TokenscopeError):
                results[i].error = str(exc)
            elif exc is not None:
                raise exc  # a bug: keep its traceback
            else:
                results[i].folder, results[i].summary = items[i].name, info
                held.hold(items[i].name, *written.get(i, (None, None)))
            written.pop(i, None)
            settle(i)

    try:
        with BackgroundWriter(workers) as writer:
            for n, i in enumerate(mine):
                item = items[i]
                if progress:
                    progress(n, len(mine), item.name)
                try:
                    prepared = item.load(patch)
                    pred = predict(capture, prepared, windows)
                    ev = (_evaluate_image(prepared, pred, capture, windows, with_baseline)
                          if (pred.labels is not None or with_baseline) else None)
                except StorageError:
                    raise
                except TokenscopeError as exc:
                    results[i].error = str(exc)
                    settle(i)
                    continue
                # a video frame's pictures are its clip's: the overlay video and the timeline show every
                # frame at a fraction of the cost of per-frame PNGs and GIFs (the trace and image stay)
                frame = item.clip is not None
                if frame and sunk and pred.plan is None:
                    assert clip_pass is not None
                    trace = pred.traces[0]  # the frame sink writes its folder while the model goes on
                    info = frame_summary(item.name, trace)
                    kept = held.hold(item.name, trace, ev)  # else the tables read it once the sink has written it
                    clip_pass.write(item.name, prepared.display, trace, info, None if ev is None else ev.to_json(), kept)
                    results[i].folder, results[i].summary = item.name, info
                    continue
                options = replace(req, animation=req.animation and i in animate and not frame,
                                  figures=req.figures and not frame)
                if pred.plan is None:
                    written[i] = (pred.traces[0], ev)
                record(writer.submit(i, write_image_folder, run_dir, item.name, prepared, pred, ev, options, cfg, frame))
            record(writer.drain())
        if clip_pass is not None:
            clip_pass.model_done()
        if progress:
            progress(len(mine), len(mine), "")
        for rank_results in dist.gather(ctx, [(i, results[i].folder, results[i].summary, results[i].error) for i in mine]):
            for i, folder, info, error in rank_results:
                results[i].folder, results[i].summary, results[i].error = folder, info, error
        if not ctx.is_writer:  # rank 0 alone builds the tables and marks the run complete
            return RunResult(run_dir, results, loaded.warnings, loaded.config.name, None, rank=ctx.rank,
                             method=setting.method)
        tables = finish_run(run_dir, [it.name for it in items], req.figures,
                            {"animated_images": base_manifest["animated_images"],
                             **({"class_space": space.record()} if space is not None else {})},
                            visit=clip_pass.visit if clip_pass is not None else None, held=held, style=style)
        if clip_pass is not None and tables is not None:
            tables.summary["clips"] = clip_pass.finish(tables.images)
            write_json_atomic(run_dir / "summary.json", tables.summary)
        elif clip_pass is not None:  # no frame was traced: the sink was handed nothing
            clip_pass.abort()
    except BaseException:
        if clip_pass is not None:
            clip_pass.abort()  # no drawing process outlives the run, no half-written video stays
        raise
    for r in results:
        if r.skipped and r.folder is not None:
            r.summary = read_json(run_dir / r.folder / "summary.json", "summary.json")
            check_fields(r.summary, SUMMARY_FIELDS, run_dir / r.folder / "summary.json")
    if space is not None:  # mismatches met while scoring (with --ignore-class-mismatch) join the record
        base_manifest["class_space"] = space.record()
        base_manifest["warnings"] = [*loaded.warnings, *space.warnings(), *_notes(items)]
    every_failed = bool(results) and all(r.error is not None for r in results)
    write_json_atomic(run_dir / MANIFEST, {  # a run none of whose images could be traced is not a finished run
        **base_manifest, "status": "failed" if every_failed else "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "summary": tables.summary if tables is not None else {},
        "images": [{"source": r.source, "folder": r.folder, "error": r.error} for r in results],
    })
    return RunResult(run_dir, results, base_manifest["warnings"], loaded.config.name, tables, method=setting.method,
                     class_space=space)


def run_images(paths: list[str], opts: ModelOptions, out: str | Path = "outputs", size: int | None = None,
               labels: str | None = None, progress: Progress | None = None, **kw: Any) -> RunResult:
    """Convenience: trace image files or folders with `opts`."""
    req = RunRequest(inputs=[str(p) for p in paths], labels=labels, size=size, model=asdict(opts), **kw)
    return run_job(req, out, progress=progress)
