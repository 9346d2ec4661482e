"""`tokenscope compare`: the same weights with and without token reduction, image by image.

One job for both questions: one operating point (the model's, or `--method`) against the plain ViT,
or several side by side (`--methods a,b,c`). For each image every operating point is traced (tokens
per block), counted (torch's FLOP counter over the whole forward pass, policy included, 2 FLOPs per
multiply-add), measured for peak memory and timed (median of repeats after warm-up, hooks off, all
of them interleaved repeat by repeat); their label maps are compared with the plain ViT's and, when
labels are given, with the ground truth (mIoU). What is written is the report's (jobs/compare_reports.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokenscope.analysis.memory import peak_forward_bytes
from tokenscope.trace.fates import fate_percentages
from tokenscope.analysis.timing import median, time_calls
from tokenscope.analysis.windowed import ImagePrediction, predict
from tokenscope.data.classspace import ClassSpace
from tokenscope.data.images import PreparedImage, check_size, find_images, find_label_for, load_prepared
from tokenscope.data.windows import WindowSpec, resolve_windows
from tokenscope.errors import ConfigError, StorageError, TokenscopeError
from tokenscope.models.methods.point import resolve_list
from tokenscope.models.methods.registry import PluginError
from tokenscope.jobs.compare_reports import CompareResult, Context, MethodsReport, PointReport, Variant, figure_block
from tokenscope.jobs.run import ImageResult, Progress
from tokenscope.jobs.runfolder import new_run_dir, unique_name
from tokenscope.jobs.setup import ModelOptions, label_file_space, load_model, method_setting
from tokenscope.models.checkpoints import LoadedModel
from tokenscope.models.cost import measure_flops
from tokenscope.models.runtime import inference
from tokenscope.trace.capture import TraceCapture, images_to_tensor

__all__ = ["BASELINES", "CompareResult", "Variant", "compare_images", "measure_variants", "prepare_input"]

BASELINES = ("vit",)


def measure_variants(loaded: LoadedModel, variants: list[Variant], image: PreparedImage, windows: WindowSpec | None,
                     device: torch.device, capture: TraceCapture, repeats: int, warmup: int,
                     failures: dict[str, str] | None = None) -> list[tuple[ImagePrediction, dict[str, Any]] | None]:
    """Predict one image with every variant, count each one's FLOPs and peak memory, then time their
    forward passes interleaved (repeat r of every variant before repeat r + 1 of any), so that a busy
    machine slows all of them alike and repeat r of two variants is a pair (`latency_runs_ms`).

    With sliding windows the windows of one size run as one batch; a repeat's latency adds up the batches.
    With `failures`, a variant whose plug-in fails is recorded there (name -> its one line) and given None,
    and the others are still measured; without it the failure is raised.
    """
    model = loaded.model
    counted: list[Any] = []
    for v in variants:
        try:
            pred = predict(capture.at(v.setting), image, windows)
        except PluginError as exc:
            if failures is None:
                raise
            failures[v.name] = str(exc)
            counted.append(None)
            continue
        groups: dict[tuple[int, int], list[PreparedImage]] = {}
        for inp in pred.inputs:
            groups.setdefault(inp.padded_hw, []).append(inp)
        batches = [images_to_tensor(group, device) for group in groups.values()]
        flops, peak = 0, 0
        with inference(device, capture.amp):
            for x, labels in batches:
                flops += measure_flops(lambda: model(x, labels, setting=v.setting))[0]
                peak = max(peak, peak_forward_bytes(lambda: model(x, labels, setting=v.setting), device))
        counted.append((pred, batches, flops, peak))
    runs: list[list[float]] = [[] for _ in variants]
    with inference(device, capture.amp):
        for r in range(warmup + repeats):
            for k, v in enumerate(variants):
                if counted[k] is None:
                    continue
                total = sum(sum(time_calls(lambda: model(x, labels, setting=v.setting), device, repeats=1, warmup=0))
                            for x, labels in counted[k][1])
                if r >= warmup:
                    runs[k].append(total)
    out: list[tuple[ImagePrediction, dict[str, Any]] | None] = []
    for done, seconds in zip(counted, runs):
        if done is None:
            out.append(None)
            continue
        pred, _, flops, peak = done
        fates = pred.fate_totals()
        out.append((pred, {"gflops": flops / 1e9, "latency_ms": 1e3 * median(seconds), "peak_mib": peak / 2**20,
                           "latency_runs_ms": [1e3 * t for t in seconds],
                           "tokens": pred.tokens, "mean_tokens_per_block": pred.mean_tokens_per_block,
                           **{kind: fates[f"tokens_{kind}"] for kind in ("merged", "pruned", "exited")},
                           **fate_percentages(fates, pred.tokens)}))
    return out


def prepare_input(path: Path, labels_path: Path | None, size: int | None, patch: int,
                  space: ClassSpace | None = None) -> PreparedImage:
    """One image of a comparison, with its label map (in the model's class ids, see `space`) when a
    labels file or folder was given."""
    lab = find_label_for(path, labels_path) if labels_path is not None else None
    return load_prepared(path, size=size, labels_path=lab, patch=patch,
                         convert_labels=None if space is None else space.labels)


def compare_images(paths: list[str], opts: ModelOptions, baseline: str = "vit", out: str | Path = "outputs",
                   size: int | None = None, labels: str | None = None, repeats: int = 5, warmup: int = 1,
                   progress: Progress | None = None, window: int | None = None,
                   stride: int | None = None, model: tuple[LoadedModel, torch.device] | None = None,
                   methods: list[str] | None = None, at_block: int | None = None) -> CompareResult:
    """Compare the command's operating point (or, with `methods`, each of several) with the plain ViT on
    every image. With `methods`, an operating point whose plug-in fails is marked failed and the others
    are still measured and written; a single point's failure is that image's error."""
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    labels_path = Path(labels) if labels is not None else None
    parsed = resolve_list(",".join(methods)) if methods else None
    images = find_images(paths)
    if not images:
        raise TokenscopeError("no images found in " + ", ".join(map(str, paths)))
    loaded, device = model if model is not None else load_model(opts, have_labels=labels_path is not None)
    base = Variant("baseline", loaded.setting.plain())
    if parsed is not None:
        variants = [Variant(m.label, method_setting(loaded, opts, m.text, labels_path is not None)) for m in parsed]
    else:
        variants = [Variant("step", loaded.setting)]
    space = label_file_space(loaded, opts, str(labels), images) if labels is not None else None
    cfg = loaded.config
    patch = loaded.model.patch_size
    block = figure_block(loaded.model.depth, at_block) if parsed is not None else 0
    check_size(size, patch)
    windows = resolve_windows(cfg.window, cfg.stride, cfg.resize_short, window, stride, size, patch)
    ctx = Context(loaded, device, baseline, repeats, warmup, space, windows, labels_path is not None)
    report = PointReport(ctx, variants[0]) if parsed is None else MethodsReport(ctx, base, variants, parsed, block)
    capture = TraceCapture(loaded, device, base.setting, amp=opts.amp)
    run_dir = new_run_dir(out, "compare")
    results: list[ImageResult] = []
    taken: set[str] = set()
    runs: dict[str, list[list[float]]] = {v.name: [] for v in [base, *variants]}  # per image, per interleaved repeat (ms)
    failed: dict[str, str] = {}
    """Operating points whose plug-in failed (name -> its one line): left out from then on, said in the results."""
    for i, path in enumerate(images):
        if progress:
            progress(i, len(images), path.name)
        result = ImageResult(source=str(path))
        try:
            prepared = prepare_input(path, labels_path, size, patch, space)
            every = [base, *(v for v in variants if v.name not in failed)]
            done = measure_variants(loaded, every, prepared, windows, device, capture, repeats, warmup,
                                    failures=failed if parsed is not None else None)
            if done[0] is None:  # the unreduced model is built in: its failure is not a method's
                raise TokenscopeError(failed.pop(base.name))
            measured = [(v, got[0], got[1]) for v, got in zip(every, done) if got is not None]
            for v, _, m in measured:
                runs[v.name].append(m.pop("latency_runs_ms"))
            name = unique_name(path.stem, taken)
            report.image(run_dir, name, path, prepared, measured)
            result.folder = name
        except StorageError:
            raise  # the disk refused: stop (the folder is taken away)
        except TokenscopeError as exc:
            result.error = str(exc)
        results.append(result)
    if progress:
        progress(len(images), len(images), "")
    return report.finish(run_dir, results, runs, failed)
