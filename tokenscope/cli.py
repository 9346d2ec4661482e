"""The `tokenscope` command line: parse options, call the library, show progress and results.

Errors users can cause (TokenscopeError) become one red line and a non-zero exit code; the
library itself never prints.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table as _RichTable
from typer.core import TyperGroup

from tokenscope import __version__
from tokenscope.errors import ConfigError, TokenscopeError
from tokenscope.options import SWEPT, TUNED, SharedOption, pick, with_options
from tokenscope.storage import text_of

REMOVED_FLAGS = {"--tome-r": "tome:r=16", "--algm-threshold": "algm:threshold=0.92", "--cts-groups": "cts:groups=300",
                 "--prop-attn": "tome:prop=on", "--no-prop-attn": "tome:prop=off"}
"""Per-method flags of earlier versions, and the one spelling that replaced them."""


class _OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type, a missing argument) as one line
    and exit code 2, like every other error: never click's boxed usage text."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            err_console.print("[bold red]interrupted[/]", highlight=False)
            sys.exit(130)
        except typer.TyperException as exc:  # click's usage errors (typer ships its own click)
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "tokenscope"
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            flag = next((f for f in REMOVED_FLAGS if f"'{f}'" in message or f"{f} " in message + " "), None)
            if flag is not None and "No such option" in message:
                message = (f"{flag} is gone: a method's settings follow its name, e.g. "
                           f"--method {REMOVED_FLAGS[flag]} (`tokenscope methods` lists every setting)")
            err_console.print(f"[bold red]error:[/] {escape(message)} (see `{where} --help`)",
                              highlight=False, soft_wrap=True)
            sys.exit(int(getattr(exc, "exit_code", 2)))
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    name="tokenscope",
    help="Where do the tokens go? Trace supertoken merges (dCTS) and early exits in STEP ViT segmenters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_WIDE = None if sys.stdout.isatty() else 160  # tables stay readable when piped or captured
out_console = Console(width=_WIDE)
err_console = Console(stderr=True, width=_WIDE)

# ---- shared option types: --help teaches the vocabulary ------------------------------------
def _cli_type(option: SharedOption) -> Any:
    """A shared model option as a typed command-line option (declared once, in tokenscope/options.py)."""
    return Annotated[option.cli_type, typer.Option(*option.flags, help=option.help)]


def shared_options(names: tuple[str, ...]) -> Callable[[Any], Any]:
    """Give a command the shared model options `names`; it receives their values as the dict `shared`."""
    return with_options(names, _cli_type, into="shared", first=True)



KeepOpt = Annotated[Optional[int], typer.Option("--keep-per-class", help="DToP's context rule: at each gate the K most confident qualifying tokens of every predicted class stay in the sequence (0 = off).")]
LabelsOpt = Annotated[Optional[str], typer.Option(help="Ground-truth label map (integer class ids, 255 = ignore), or a folder of them named like the images.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (GPU if present), cpu or cuda.")]
SizeOpt = Annotated[Optional[int], typer.Option(help="Resize each image so its long side is this many pixels (then pad to a multiple of 16).")]
OutOpt = Annotated[Path, typer.Option(help="Root folder for run folders; every call makes a new one.")]
WindowOpt = Annotated[Optional[int], typer.Option(help="Sliding windows of this side in pixels (Segmenter's protocol: short side resized, windows averaged); 0 = whole image. Default: the checkpoint's.")]
FormatOpt = Annotated[str, typer.Option("--format", help="Figure files: png, or pdf / svg (vector, for papers; a run writes them beside its PNGs).")]
DpiOpt = Annotated[int, typer.Option(help="Resolution of png figures.")]
TitlesOpt = Annotated[bool, typer.Option("--titles/--no-titles", help="Titles on the figures (off for a paper, whose caption says it).")]
StrideOpt = Annotated[Optional[int], typer.Option(help="Stride of the sliding windows in pixels. Default: the checkpoint's, else window - 32.")]



class Table(_RichTable):
    """A rich table whose cells and title are text, never markup: an image or folder named `o[/]` is shown,
    not parsed."""

    def __init__(self, *args: Any, title: str | None = None, **kw: Any) -> None:
        super().__init__(*args, title=None if title is None else escape(_plain(title)), **kw)

    def add_row(self, *renderables: Any, **kw: Any) -> None:
        super().add_row(*(escape(text_of(r)) if isinstance(r, str) else r for r in renderables), **kw)


MAX_LINE = 600
"""The longest message printed whole: a 79 kB --method string is echoed by its ends, not in full."""


def _plain(text: object) -> str:
    """`text` safe for a terminal line: control characters (a newline or an ANSI escape in a file name)
    shown as `\\x..` escapes, so a name can neither split the one line nor rewrite the screen; a
    message longer than MAX_LINE keeps its start and end."""
    line = "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in text_of(text))
    if len(line) > MAX_LINE:
        cut = len(line) - MAX_LINE
        line = f"{line[:MAX_LINE // 2]} [... {cut:,} characters ...] {line[-MAX_LINE // 2:]}"
    return line


def _fail(exc: TokenscopeError) -> None:
    err_console.print(f"[bold red]error:[/] {escape(_plain(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


INTERRUPTED = {
    "run": "interrupted; the images finished so far are kept and run.json says the run is unfinished: "
           "complete it with `tokenscope run --resume RUN_DIR`",
    "train": "interrupted; the last saved checkpoint state (if any) is kept: continue with `tokenscope train --resume "
             "--out NAME`",
}


INTERRUPT_SAID = False
"""Whether a Ctrl-C was already said in its command's words (the entry point says it otherwise)."""


@contextmanager
def _user_errors(command: str = "") -> Iterator[None]:
    """User errors and refused writes become one line; a fresh output folder the command could not
    finish (no run.json yet) is taken away, so nothing half-written looks like a result. Running out of
    memory is one line too (a decompression bomb, an image too large for this machine). A Ctrl-C is said
    in the command's words, also when it landed inside a library that turned it into another error (a
    figure being drawn when it came raises matplotlib's ValueError instead)."""
    from tokenscope import storage

    pressed = _watch_ctrl_c()
    try:
        yield
    except TokenscopeError as exc:
        storage.discard_incomplete()
        _fail(exc)
    except KeyboardInterrupt:
        _say_interrupted(command)
    except OSError as exc:
        if pressed.is_set():
            _say_interrupted(command)
        if not storage.is_storage_error(exc):
            raise  # a bug: keep its traceback
        storage.discard_incomplete()
        _fail(storage.storage_error(exc, verb="use"))  # not raised inside a write: read or written
    except MemoryError:
        storage.discard_incomplete()
        _fail(TokenscopeError("out of memory: the input (an image, a trace, a batch) is too large for this machine; "
                              "try a smaller --size or --batch, or fewer images at once"))
    except Exception:
        if pressed.is_set():  # the Ctrl-C, seen by the library as something else
            _say_interrupted(command)
        raise  # a bug: keep its traceback
    finally:
        _stop_watching(pressed)


def _watch_ctrl_c() -> threading.Event:
    """Note every Ctrl-C (SIGINT) while a command works, then raise KeyboardInterrupt as Python does."""
    import signal

    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return pressed
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with Ctrl-C ignored (a background job): leave it so
        return pressed

    def on_ctrl_c(signum: int, frame: Any) -> None:
        pressed.set()
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGINT, on_ctrl_c)
    except ValueError:  # not the main thread of the main interpreter
        return pressed
    pressed.previous = previous  # type: ignore[attr-defined]
    return pressed


def _stop_watching(pressed: threading.Event) -> None:
    import signal

    previous = getattr(pressed, "previous", None)
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, previous)


def _say_interrupted(command: str) -> None:
    """The command's one line after a Ctrl-C (what was kept, how to go on), then exit 130."""
    from tokenscope import storage

    kept = storage.resumable_folders()
    removed = storage.discard_incomplete()
    message = INTERRUPTED.get(command, "interrupted; nothing unfinished was kept"
                              + (f" ({len(removed)} unfinished folder(s) removed)" if removed else ""))
    if kept and "RUN_DIR" in message:  # name the very folder to finish
        message = message.replace("RUN_DIR", shlex.quote(str(kept[-1])))
    err_console.print(f"[bold red]interrupted[/]{escape(message.removeprefix('interrupted'))}", highlight=False)
    global INTERRUPT_SAID
    INTERRUPT_SAID = True
    raise typer.Exit(130) from None


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[item]}", markup=False))
    with Progress(*columns, console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=None, item="")

        def update(done: int, total: int, item: str) -> None:
            bar.update(task, completed=done, total=total, item=item)

        yield update


def _fail_on_problems(problems: list[str]) -> None:
    """One line per damaged image, then exit 3 (the page or report was still written)."""
    for line in problems:
        err_console.print(f"[bold red]error:[/] {escape(_plain(line))}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(3)


def _warn(lines: list[str]) -> None:
    for w in lines:
        err_console.print(f"[bold yellow]WARNING:[/] {escape(_plain(w))}", highlight=False, soft_wrap=True)


def _is_writer() -> bool:
    """Rank 0 of a torchrun job (or the only process) reports for the job. Read from torchrun's
    environment, so the CLI never joins the process group itself (the job picks its backend)."""
    return int(os.environ.get("RANK", "0")) == 0


def _print_tails(summary: dict[str, Any]) -> None:
    """Distributions, not just means: the tails of latency, tokens and GFLOPs, and each clip's stability."""
    tails = summary.get("tails", {})
    if summary.get("images", 0) > 1:
        for label, unit in (("latency_ms", "ms"), ("tokens", "tokens"), ("gflops", "GFLOPs")):
            t = tails.get(label)
            if t:
                worst = ", ".join(w["name"] for w in t["worst"][:2])
                out_console.print(f"{label}: p50 {t['p50']:.3g} p90 {t['p90']:.3g} p95 {t['p95']:.3g} p99 {t['p99']:.3g} "
                                  f"max {t['max']:.3g} {unit} (p99/p50 {t['p99_over_p50']:.2f}; worst: {worst})",
                                  highlight=False)
    for name, clip in summary.get("clips", {}).items():
        changes = ", ".join(f"{k.replace('_change', '')} {100 * clip[k]['mean']:.1f}% (max {100 * clip[k]['max']:.1f}%)"
                            for k in ("level_change", "exit_change", "class_change"))
        video = f"; overlay video {clip['overlay_video']}" if clip.get("overlay_video") else ""
        out_console.print(f"clip {escape(str(name))}: {clip['frames']} frames; patches changed between frames: {changes}{video}",
                          highlight=False)


def _with_operating_point(method: str | None, operating_point: Path | None, model: str | None = None) -> str | None:
    """The method an operating-point file holds (it replaces --method, never mixes with it); a
    point tuned for another model is said (its numbers were measured there)."""
    if operating_point is None:
        return method
    from tokenscope.jobs.tune import operating_point_doc

    if method is not None:
        raise ConfigError("give --method or --operating-point, not both")
    doc = operating_point_doc(operating_point)
    tuned_for = doc.get("model")
    if model is not None and tuned_for not in (None, model):
        _warn([f"{operating_point} was tuned for model {tuned_for}, not {model}: its measured targets may not hold here"])
    return str(doc["method"])


def _resolved(shared: dict[str, Any]) -> dict[str, Any]:
    """The shared options as the API takes them: `--operating-point FILE` read into `method`."""
    options = dict(shared)
    operating_point = options.pop("operating_point", None)
    if "method" in options:
        options["method"] = _with_operating_point(options["method"], operating_point, options.get("model"))
    return options


def _report_failures(images: list[Any]) -> int:
    failed = [r for r in images if r.error]
    counts: dict[str, int] = {}
    for r in failed:  # a damaged clip fails all its later frames with one message: say it once
        counts[r.error] = counts.get(r.error, 0) + 1
    for error, n in counts.items():
        more = f" ({n} frames or images)" if n > 1 else ""
        err_console.print(f"[bold red]error:[/] {escape(_plain(error))}{more}", highlight=False, soft_wrap=True)
    return len(failed)


@app.command()
@shared_options(pick())
def run(
    images: Annotated[Optional[list[str]], typer.Argument(help="Image files, folders of images, or video clips (.mp4, .avi, ...: traced frame by frame).")] = None,
    labels: LabelsOpt = None,
    dataset: Annotated[Optional[str], typer.Option(help="Run over a data set instead of files: synthetic, folder, ade20k, cityscapes or pascal_context.")] = None,
    data_root: Annotated[Optional[str], typer.Option("--data-root", "--root", help="Root folder of a folder/ade20k/cityscapes/pascal_context data set.")] = None,
    split: Annotated[str, typer.Option(help="Data-set split.")] = "val",
    seeds: Annotated[str, typer.Option(help="Synthetic scenes, START:STOP.")] = "100000:100100",
    scene_size: Annotated[int, typer.Option(help="Side of generated synthetic scenes.")] = 512,
    baseline: Annotated[Optional[bool], typer.Option("--baseline/--no-baseline", help="Also run the same weights without reduction (mIoU with/without); default: when labels exist.")] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures", help="Per-image overlays and histograms, and data-set figures.")] = True,
    animation: Annotated[bool, typer.Option("--animation/--no-animation", help="Per-image GIF of tokens leaving block by block.")] = True,
    animation_limit: Annotated[Optional[int], typer.Option(help="GIFs for the first N images only. Default: every image file; the first 10 images of a data set.")] = None,
    render_workers: Annotated[Optional[int], typer.Option(help="Processes that write pictures and files while the model runs (0 = none). Default: none on the CPU; cores - 1 with a GPU and 4+ images.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Finish an interrupted run folder (its own settings are used).")] = None,
    every: Annotated[int, typer.Option(help="Video inputs: trace every N-th frame.")] = 1,
    start: Annotated[Optional[str], typer.Option(help="Video inputs: first frame, in frames (300) or seconds (12.5s).")] = None,
    end: Annotated[Optional[str], typer.Option(help="Video inputs: stop before this frame or time.")] = None,
    max_frames: Annotated[Optional[int], typer.Option(help="Video inputs: at most this many frames per clip.")] = None,
    frames: Annotated[bool, typer.Option("--frames", help="Image folders are clips of numbered frames (numeric order), traced like a video.")] = False,
    fps: Annotated[float, typer.Option(help="With --frames: frames per second of the sequence (for times and the overlay video).")] = 25.0,
    size: SizeOpt = None,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    fmt: FormatOpt = "png",
    dpi: DpiOpt = 150,
    titles: TitlesOpt = True,
    out: OutOpt = Path("outputs"),
    shared: Any = None,
) -> None:
    """Trace images or a data set: which patches merge into which supertoken, and at which block each token exits."""
    from tokenscope import api

    with _user_errors("run"):
        options = _resolved(shared)
        with _progress("tracing") as progress:
            result = api.run(images, **options, labels=labels, dataset=dataset, data_root=data_root, split=split, seeds=seeds,
                             scene_size=scene_size, size=size, window=window, stride=stride, figures=figures,
                             animation=animation, animation_limit=animation_limit, baseline=baseline,
                             render_workers=render_workers, out=out, resume=resume,
                             progress=progress, every=every, start=start, end=end, max_frames=max_frames,
                             frames=frames, fps=fps, figure_format=fmt, figure_dpi=dpi, figure_titles=titles)
    if result.rank != 0:  # under torchrun, rank 0 reports for the whole job
        raise typer.Exit(3 if any(r.error for r in result.images) else 0)
    _warn(result.warnings)
    table = Table(title=f"tokenscope run: {result.model}" + (f", method {result.method}" if result.method else ""),
                  title_justify="left")
    for col in ("image", "patches", "tokens", "reduction", "tokens/block", "merged", "pruned", "exited", "GFLOPs",
                "baseline GFLOPs", "forward"):
        table.add_column(col, justify="left" if col == "image" else "right")
    shown = [r for r in result.images if r.summary is not None]
    for r in shown[:20]:
        s = r.summary
        table.add_row(Path(s["image"]).name, str(s["patches"]), str(s["tokens"]), f"{s['reduction']:.2f}x",
                      f"{s['mean_tokens_per_block']:.0f}", *_fate_cells(s), f"{s['gflops']:.2f}",
                      f"{s['baseline_gflops']:.2f}", f"{1e3 * s['forward_s']:.0f} ms")
    if len(shown) > 20:
        table.add_row(f"... {len(shown) - 20} more", "", "", "", "", "", "", "", "", "", "")
    if result.tables is not None and len(shown) > 1:
        t = result.tables.summary
        table.add_row("ALL", str(t["patches"]), str(t["tokens"]), f"{t['token_reduction']:.2f}x",
                      f"{t['mean_tokens_per_block']:.0f}", *_fate_cells(t),
                      f"{t['gflops_per_image']:.2f}/img", f"{t['baseline_gflops_per_image']:.2f}/img", "")
    out_console.print(table)
    if result.tables is not None and "step_miou" in result.tables.summary:
        _print_run_miou(result)
    out_console.print(f"outputs: [bold]{escape(str(result.run_dir))}[/]  (GFLOPs: 2 per multiply-add, policy included)", highlight=False)
    out_console.print(f"explore it: [bold]tokenscope view {escape(str(result.run_dir))}[/]", highlight=False)
    _print_tails(result.tables.summary if result.tables is not None else {})
    if _report_failures(result.images):
        raise typer.Exit(3)


def _print_run_miou(result: Any) -> None:
    """mIoU with and without reduction, each with its 95% interval, the paired change, the image
    count and, when the classes did not simply agree, the condition it was scored under."""
    t = result.tables.summary
    n = (t.get("step_miou_ci") or {}).get("images", t.get("images", 0))
    base = f", without reduction {_pts(t['baseline_miou'])}{_ci_text(t.get('baseline_miou_ci'))}" if "baseline_miou" in t else ""
    change = t.get("miou_change_ci")
    delta = f"; change {_ci_value(change, signed=True)}" if change else ""
    tag = result.class_space.tag if result.class_space is not None else ""
    how = "95% bootstrap CI" if n > 1 else "no CI"
    out_console.print(f"mIoU with {result.method or 'STEP'} {_pts(t['step_miou'])}{_ci_text(t.get('step_miou_ci'))}"
                      f"{base}{delta} ({n} image{'s' if n != 1 else ''}, {how}{'; ' + tag if tag else ''})",
                      highlight=False, soft_wrap=True)
    if n < 10:
        err_console.print(f"[bold yellow]note:[/] an mIoU over {n} image{'s' if n != 1 else ''} says little about a data set; "
                          "its interval is wide or undefined", highlight=False)


@app.command()
def heatmap(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run folder (default: the latest under --out).")] = None,
    kind: Annotated[str, typer.Option(help="merge (superpatch levels, or merged groups), exit (exit block), confidence, segmentation, groups (tokens entering chosen blocks, any shape), histogram, or all.")] = "all",
    blocks: Annotated[Optional[str], typer.Option(help="For groups: blocks to draw, e.g. 1,6,13 (depth + 1 = after the encoder). Default: just after merging blocks, and the end.")] = None,
    out: OutOpt = Path("outputs"),
) -> None:
    """Re-render overlays and histograms from saved traces, without loading any model."""
    from tokenscope import api

    with _user_errors():
        block_list = _parse_blocks(blocks) if blocks is not None else None
        with _progress("rendering") as progress:
            result = api.heatmap(run_dir, kind=kind, out=out, blocks=block_list, progress=progress)
    out_console.print(f"rendered {len(result.rendered)} image(s) from {escape(str(result.run_dir))} into [bold]{escape(str(result.out_dir))}[/]",
                      highlight=False)
    for line in result.failed:
        err_console.print(f"[bold red]error:[/] {escape(_plain(line))}", highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(3)


@app.command()
@shared_options(pick())
def compare(
    images: Annotated[list[str], typer.Argument(help="Image files or folders of images.")],
    baseline: Annotated[str, typer.Option(help="What to compare against: vit = the same weights with no merging and no exits.")] = "vit",
    methods: Annotated[Optional[str], typer.Option("--methods", help="Compare several methods (or operating points) at once, comma-separated, e.g. step,tome,cts,dtop or tome:r=8,tome:r=16: one table and one side-by-side figure per image.")] = None,
    at_block: Annotated[Optional[int], typer.Option("--at-block", help="With --methods: the block whose tokens the figure shows (default: the middle; depth + 1 = after the encoder).")] = None,
    labels: LabelsOpt = None,
    size: SizeOpt = None,
    repeats: Annotated[int, typer.Option(help="Timed forward passes per variant (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed forward passes before timing.")] = 1,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    out: OutOpt = Path("outputs"),
    shared: Any = None,
) -> None:
    """Run the same weights with and without token reduction: tokens, GFLOPs, latency, memory, agreement, mIoU."""
    from tokenscope import api

    with _user_errors():
        options = _resolved(shared)
        with _progress("comparing") as progress:
            result = api.compare(images, **options, baseline=baseline, methods=methods, at_block=at_block,
                                 labels=labels, size=size, window=window, stride=stride, repeats=repeats,
                                 warmup=warmup, out=out, progress=progress)
    _warn(result.warnings)
    if result.methods or result.method_overall:
        _print_methods(result, baseline)
        failed = [r for r in result.method_overall if r.get("status") == "failed"]
        for r in failed:  # the other methods are written; this one is said and fails the command
            err_console.print(f"[bold red]error:[/] method {escape(_plain(r['method']))} failed and is left out: "
                              f"{escape(_plain(r['error']))}", highlight=False, soft_wrap=True)
        if _report_failures(result.images) or failed:
            raise typer.Exit(3)
        return
    table = Table(title=f"STEP vs baseline ({baseline})", title_justify="left")
    cols = ["image", "tokens", "GFLOPs", "latency ms", "peak MiB", "agree"]
    has_miou = any("step_miou" in r for r in result.rows)
    if has_miou:
        cols.append("mIoU")
    for col in cols:
        table.add_column(col, justify="left" if col == "image" else "right")
    for r in [*result.rows, {"image": "ALL", **result.overall}] if result.rows else []:
        cells = [Path(str(r["image"])).name,
                 f"{r.get('base_tokens', 0)} -> {r.get('step_tokens', 0)} ({r['token_reduction']:.2f}x)",
                 f"{r['base_gflops']:.2f} -> {r['step_gflops']:.2f} ({r['flop_reduction']:.2f}x)",
                 f"{r['base_latency_ms']:.0f} -> {r['step_latency_ms']:.0f} ({r['speedup']:.2f}x{_speedup_ci(r)})",
                 f"{r['base_peak_mib']:.0f} -> {r['step_peak_mib']:.0f}", f"{100 * r['agreement']:.1f}%"]
        if has_miou:
            cells.append(f"{100 * r.get('base_miou', float('nan')):.1f} -> {100 * r.get('step_miou', float('nan')):.1f}")
        table.add_row(*cells)
    out_console.print(table)
    o = result.overall
    if "step_miou_ci" in o:
        n = o["step_miou_ci"]["images"]
        tag = result.class_space.tag if result.class_space is not None else ""
        out_console.print(f"ALL mIoU: baseline {100 * o['base_miou']:.2f}{_ci_text(o['base_miou_ci'])}, reduced "
                          f"{100 * o['step_miou']:.2f}{_ci_text(o['step_miou_ci'])}, change "
                          f"{_ci_value(o['miou_change_ci'], signed=True)} "
                          f"({n} image{'s' if n != 1 else ''}, pooled, {'95% bootstrap CI' if n > 1 else 'no CI'}"
                          f"{'; ' + tag if tag else ''})", highlight=False, soft_wrap=True)
    out_console.print(f"outputs: [bold]{escape(str(result.run_dir))}[/]  (ALL: totals over the images; GFLOPs: torch flop counter, 2 per "
                      "multiply-add; latency: median after warm-up, variants interleaved, [95% CI of the speed-up over "
                      "the repeats]; peak: extra memory during the forward pass)", highlight=False)
    if _report_failures(result.images):
        raise typer.Exit(3)


def _print_methods(result: Any, baseline: str) -> None:
    """One row per method, over all images: the comparison `compare --methods` is for."""
    n = len({r["image"] for r in result.rows})
    table = Table(title=f"methods vs baseline ({baseline}): tokens in, GFLOPs and latency are totals over "
                        f"{n} image{'s' if n != 1 else ''}; tokens/block is a mean; merged, pruned and exited are "
                        "shares of the tokens", title_justify="left")
    cols = ["method", "tokens in", "tokens/block", "GFLOPs", "latency ms", "merged", "pruned", "exited", "agree"]
    has_miou = any("miou" in r for r in result.method_overall)
    if has_miou:
        cols += ["mIoU [95% CI]", "change [95% CI]"]
    for col in cols:
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result.method_overall:
        if r.get("status") == "failed":
            table.add_row(r["method"], *(["failed"] + [""] * (len(cols) - 2)))
            continue
        cells = [r["method"], f"{r['tokens']:.0f}", f"{r['mean_tokens_per_block']:.0f} ({r['block_token_reduction']:.2f}x)",
                 f"{r['gflops']:.2f} ({r['flop_reduction']:.2f}x)", f"{r['latency_ms']:.0f} ({r['speedup']:.2f}x{_speedup_ci(r)})",
                 f"{r['merged_pct']:.1f}%", f"{r['pruned_pct']:.1f}%", f"{r['exited_pct']:.1f}%",
                 f"{100 * r['agreement']:.1f}%"]
        if has_miou:
            change = r.get("miou_change_ci")
            cells += [f"{100 * r.get('miou', float('nan')):.2f}{_ci_text(r.get('miou_ci'))}",
                      _ci_value(change, signed=True)]
        table.add_row(*cells)
    out_console.print(table)
    tag = result.class_space.tag if getattr(result, "class_space", None) is not None else ""
    if has_miou:
        out_console.print(f"mIoU pooled over the images, 95% percentile bootstrap CI; change paired against the plain "
                          f"ViT on the same images{'; ' + tag if tag else ''}", highlight=False, soft_wrap=True)
    out_console.print(f"outputs: [bold]{escape(str(result.run_dir))}[/] (methods.csv, tokens_per_block.csv, a methods.png per image; "
                      "GFLOPs: torch flop counter, 2 per multiply-add; latency: median after warm-up)", highlight=False)
    out_console.print(f"explore it: [bold]tokenscope view {escape(str(result.run_dir))}[/] (every method side by side)", highlight=False)


DataOpt = Annotated[str, typer.Option("--data", help="Data set: synthetic (generated street scenes), folder (images/ + masks/), images (no labels: scored against the unreduced model), ade20k, cityscapes or pascal_context.")]
DataRootOpt = Annotated[Optional[str], typer.Option("--data-root", "--root", help="Root folder of a folder/ade20k/cityscapes/pascal_context data set.")]


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Checkpoint to write: NAME.json + NAME.safetensors (+ NAME.train.pt to resume).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Architecture: demo (ViT-Ti, 8 synthetic classes), vitt, vits, vitb, vitl, timm:<vit>.")] = "demo",
    backbone_weights: Annotated[Optional[str], typer.Option(help="Start the encoder from a local timm ViT file (else from scratch).")] = None,
    init: Annotated[Optional[str], typer.Option(help="Fine-tune from a tokenscope checkpoint (NAME.json), a Segmenter/mmseg checkpoint (.pth) or a published model's name; its architecture wins over --model.")] = None,
    freeze: Annotated[Optional[str], typer.Option(help="Keep parts fixed: encoder (a cheap run training exit heads, policy and decoder), or encoder,decoder.")] = None,
    decoder: Annotated[Optional[str], typer.Option(help="Decoder of a new model: linear or mask (Segmenter's mask transformer). Default: linear.")] = None,
    accumulate: Annotated[int, typer.Option(help="Split each process's share of a step's batch into K micro-batches (gradient accumulation); the global batch stays the --crops batch.")] = 1,
    keep_per_class: KeepOpt = None,
    method: Annotated[Optional[str], typer.Option(help="Train with a merging method on: algm, tome, or X+algm / X+tome (X: step, dcts, dtop), with its settings (algm:threshold=0.9). Run the checkpoint with the same --method.")] = None,
    data: DataOpt = "synthetic",
    data_root: DataRootOpt = None,
    train_split: Annotated[str, typer.Option(help="Split to train on (folder data sets ignore it).")] = "train",
    val_split: Annotated[str, typer.Option(help="Split to evaluate on at the end.")] = "val",
    train_seeds: Annotated[str, typer.Option(help="Synthetic scenes to train on, START:STOP.")] = "0:2000",
    val_seeds: Annotated[str, typer.Option(help="Synthetic scenes to evaluate on, START:STOP (never overlap training).")] = "900000:900100",
    size: Annotated[int, typer.Option(help="Side of generated synthetic scenes (training crops are cut from them).")] = 512,
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 3000,
    crops: Annotated[str, typer.Option(help="Crop side x global batch size pairs drawn per step, e.g. 256x8,384x4,512x2 (split over torchrun's processes).")] = "256x8,384x4,512x2",
    lr: Annotated[float, typer.Option(help="Peak learning rate of encoder, decoder and exit heads (AdamW, warm-up + cosine).")] = 1e-3,
    aux_weight: Annotated[float, typer.Option(help="Weight of each exit head's cross-entropy (deep supervision).")] = 0.5,
    warmup: Annotated[int, typer.Option(help="Linear learning-rate warm-up steps before the cosine decay.")] = 150,
    exit_aware_steps: Annotated[int, typer.Option(help="Apply the exits (drop confident tokens) in the last N steps, so later blocks learn without them.")] = 0,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 250,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from --out.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing checkpoint at --out (its files are kept as NAME.backup-STAMP.*); without it, train refuses to write over one.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the evaluation at the end.")] = False,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option(help="Seed for initialisation and batch order.")] = 0,
) -> None:
    """Train a STEP model: encoder + decoder + exit heads (cross-entropy, deep supervision) and the dCTS policy (BCE)."""
    from tokenscope import api

    with _user_errors("train"):
        parts = tuple(p.strip() for p in freeze.split(",") if p.strip()) if freeze else ()
        columns = (TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn(), TextColumn("loss {task.fields[loss]:.3f} seg {task.fields[seg]:.3f} "
                                                     "aux {task.fields[aux]:.3f} policy {task.fields[policy]:.3f}"))
        writer = _is_writer()  # under torchrun only rank 0 shows progress and logs
        with Progress(*columns, console=err_console, disable=not writer) as bar:
            task = bar.add_task("train", total=steps, loss=float("nan"), seg=float("nan"), aux=float("nan"), policy=float("nan"))

            def on_step(step: int, total: int, losses: dict[str, float]) -> None:
                bar.update(task, completed=step, **{k: losses[k] for k in ("loss", "seg", "aux", "policy")})
                if writer and not err_console.is_terminal and (step % 50 == 0 or step == total):  # unattended logs
                    err_console.print(f"step {step}/{total} " + " ".join(f"{k} {losses[k]:.4f}" for k in
                                      ("loss", "seg", "aux", "policy", "seconds")), highlight=False)

            with _progress("evaluating") as eval_progress:
                result = api.train(out, model=model, backbone_weights=backbone_weights, init=init, freeze=parts,
                                   decoder=decoder, data=data, data_root=data_root, train_split=train_split,
                                   val_split=val_split, train_seeds=train_seeds, val_seeds=val_seeds, size=size,
                                   steps=steps, crops=_parse_crops(crops), lr=lr, aux_weight=aux_weight, warmup=warmup,
                                   exit_aware_steps=exit_aware_steps, save_every=save_every, accumulate=accumulate,
                                   resume=resume, overwrite=overwrite,
                                   evaluate_after=not no_eval, device=device, seed=seed, progress=on_step,
                                   eval_progress=eval_progress, keep_per_class=keep_per_class, method=method)
    if not _is_writer():  # under torchrun, rank 0 reports
        return
    out_console.print(f"checkpoint: [bold]{escape(str(result.checkpoint.with_suffix('.json')))}[/] after {result.state.step} steps",
                      highlight=False)
    if result.metrics:
        _print_eval(result.metrics, "evaluation on the validation set")


def _parse_blocks(text: str) -> list[int]:
    from tokenscope.errors import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--blocks {text!r}: expected comma-separated block numbers such as 1,6,13") from None


def _parse_crops(text: str) -> tuple[tuple[int, int], ...]:
    from tokenscope.errors import ConfigError

    try:
        pairs = tuple(tuple(int(v) for v in item.lower().split("x")) for item in text.split(","))
    except ValueError:
        raise ConfigError(f"--crops {text!r}: expected SIDExBATCH pairs such as 256x8,384x4") from None
    if not pairs or any(len(p) != 2 or p[0] < 16 or p[0] % 16 or p[1] < 1 for p in pairs):
        raise ConfigError(f"--crops {text!r}: sides must be multiples of 16, batches >= 1")
    return pairs  # type: ignore[return-value]


def _pts(value: Any, signed: bool = False) -> str:
    from tokenscope.analysis.uncertainty import points

    return points(value, signed)


def _ci_value(ci: dict[str, Any] | None, signed: bool = False) -> str:
    """An interval's value with its bounds: `+0.52 [-0.10, +1.20]`."""
    return "" if not ci else _pts(ci.get("value"), signed) + _ci_text(ci, signed)


def _ci_text(ci: dict[str, Any] | None, signed: bool = False) -> str:
    """` [45.10, 47.30]` from an interval's dict ("" when there is none or it is undefined)."""
    from tokenscope.analysis.uncertainty import bounds_text

    return bounds_text(ci, signed)


def _speedup_ci(r: dict[str, Any]) -> str:
    """` [0.93, 1.08]`: a speed-up's 95% interval over the interleaved repeats, when a row has one."""
    low, high = r.get("speedup_low"), r.get("speedup_high")
    try:
        if low is None or high is None or not (math.isfinite(float(low)) and math.isfinite(float(high))):
            return ""
    except (TypeError, ValueError):
        return ""
    return f" [{float(low):.2f}, {float(high):.2f}]"


def _fate_cells(s: dict[str, Any]) -> list[str]:
    """merged, pruned, exited: shares of the tokens (summaries written before fates had only exits)."""
    return [f"{s.get(f'{kind}_pct', 0.0):.1f}%" for kind in ("merged", "pruned")] + [f"{s['exited_early_pct']:.1f}%"]


def _print_eval(metrics: dict[str, dict[str, Any]], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in ("variant", "images", "mIoU [95% CI]", "mIoU change [95% CI]", "tokens/image", "token reduction",
                "merged", "pruned", "exited", "GFLOPs/image", "ms/image"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, m in metrics.items():
        change = m.get("miou_change_ci")
        table.add_row(name, str(m["images"]), f"{100 * m['miou']:.2f}{_ci_text(m.get('miou_ci'))}",
                      _ci_value(change, signed=True),
                      f"{m['tokens'] / max(m['images'], 1):.0f}",
                      f"{m['token_reduction']:.2f}x", *_fate_cells(m), f"{m['gflops_per_image']:.2f}",
                      f"{m['forward_ms_per_image']:.0f}")
    out_console.print(table)
    first = next(iter(metrics.values()), {})
    ci = first.get("miou_ci") or {}
    if ci:
        out_console.print(f"intervals: {100 * ci['level']:.0f}% percentile bootstrap over {ci['images']} images "
                          f"({ci['resamples']} resamples, seed {ci['seed']}; changes paired on the same images)",
                          highlight=False)
    condition = (first.get("class_space") or {}).get("condition")
    if condition:
        err_console.print(f"[bold yellow]mIoU condition:[/] {escape(str(condition))}", highlight=False, soft_wrap=True)
    for name, m in metrics.items():  # the tail of the latency, not just its mean
        t = m.get("tails", {}).get("latency_ms")
        if t and m["images"] > 1:
            out_console.print(f"{escape(str(name))} latency: p50 {t['p50']:.1f} p95 {t['p95']:.1f} p99 {t['p99']:.1f} max {t['max']:.1f} ms "
                              f"(p99/p50 {t['p99_over_p50']:.2f}; worst {t['worst'][0]['name']})", highlight=False)


@app.command()
@shared_options(pick())
def evaluate(
    data: DataOpt = "synthetic",
    data_root: DataRootOpt = None,
    split: Annotated[str, typer.Option(help="Split of a file data set.")] = "val",
    seeds: Annotated[str, typer.Option(help="Synthetic scenes, START:STOP.")] = "100000:100200",
    size: Annotated[int, typer.Option(help="Side of generated synthetic scenes.")] = 512,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics to this JSON file.")] = None,
    shared: Any = None,
) -> None:
    """mIoU, token reduction, early exits and GFLOPs of STEP vs the same weights without reduction."""
    from tokenscope import api

    with _user_errors():
        options = _resolved(shared)
        scoring = {key: options.pop(key) for key in ("class_map", "ignore_class_mismatch")}
        held = api.load_model(options.pop("model"), options.pop("weights"), **options)
        with _progress("evaluating") as progress:
            metrics = api.evaluate(held, data=data, data_root=data_root, split=split, seeds=seeds, size=size,
                                   window=window, stride=stride, **scoring, json_out=json_out, progress=progress)
    if not _is_writer():
        return
    loaded = held.loaded
    exits_text = "learned exits" if held.exits else "no exits"
    what = f"method {held.method}" if held.method else f"STEP ({held.policy} policy, {exits_text})"
    _print_eval(metrics, f"{loaded.config.name}: {what} vs baseline")


@app.command()
@shared_options(pick(without=("class_map", "ignore_class_mismatch"), adding=("amp",)))
def bench(
    size: Annotated[int, typer.Option(help="Square input side in pixels (a multiple of 16).")] = 1024,
    batch: Annotated[int, typer.Option(help="Images per forward pass (different synthetic scenes, so token counts differ).")] = 1,
    image: Annotated[Optional[str], typer.Option(help="Use this image (repeated) instead of synthetic scenes.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed passes per variant (medians are reported).")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed passes per variant (the first also counts FLOPs and memory).")] = 1,
    loop: Annotated[bool, typer.Option("--loop", help="Also time the same batch one image at a time.")] = False,
    compile_blocks: Annotated[bool, typer.Option("--compile", help="torch.compile the encoder blocks (dynamic shapes); warm-up then includes compilation.")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write all measurements to this JSON file.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Time several operating points against one baseline, side by side, comma-separated, e.g. tome,algm,evit,dcts:budget=2.5: one row each with speed-up, FLOP reduction and their quotient.")] = None,
    shared: Any = None,
) -> None:
    """Speed: baseline vs STEP images/s, latency, memory, GFLOPs, and speed-up / FLOP reduction."""
    from tokenscope import api

    with _user_errors():
        options = _resolved(shared)
        with _progress("benchmarking") as progress:
            result = api.bench(**options, size=size, batch=batch, image=image, threads=threads, repeats=repeats,
                               warmup=warmup, loop=loop, compile_blocks=compile_blocks, json_out=json_out,
                               methods=methods, progress=progress)
        summary = result.summary()
    if methods is not None:
        _print_methods_bench(summary, size, batch)
        if summary["failed"]:
            raise typer.Exit(3)
        return
    table = Table(title=f"bench: {result.model} {size}x{size}, batch {batch}, {result.device}, {result.threads} threads"
                        f"{', bf16' if result.amp else ''}", title_justify="left")
    for col in ("variant", "tokens/img", "tokens/block", "GFLOPs/img", "latency ms", "images/s", "peak MiB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for v in (result.baseline, result.step):
        label = (v.name if v.name == "baseline" else f"method {v.method}" if v.method
                 else f"STEP ({v.policy}{', exits' if v.exits else ''})")
        table.add_row(label, f"{v.tokens_per_image:.0f}", f"{v.mean_tokens_per_block:.0f}", f"{v.gflops_per_image:.1f}",
                      f"{v.latency_ms:.1f}",
                      f"{v.images_per_s(result.batch):.3f}", f"{v.peak_mib:.0f}")
    out_console.print(table)
    s = summary
    ci = s.get("speedup_ci") or {}
    interval = (f" [95% CI {ci['low']:.2f}, {ci['high']:.2f} over {ci['pairs']} interleaved repeats]"
                if ci.get("low") is not None else " (one repeat: no interval)")
    out_console.print(f"speed-up {s['speedup']:.2f}x{interval}  FLOP reduction {s['flop_reduction']:.2f}x  "
                      f"speed-up / FLOP reduction {s['speedup_over_flop_reduction']:.2f}", highlight=False)
    timing = s.get("timing") or {}
    if timing.get("baseline") and timing.get("step"):
        out_console.print("latency median [IQR]: " + "; ".join(
            f"{escape(str(name))} {t['median_ms']:.1f} [{t['q1_ms']:.1f}, {t['q3_ms']:.1f}] ms" for name, t in
            (("baseline", timing["baseline"]), ("reduced", timing["step"]))), highlight=False)
    _warn(s.get("warnings") or [])
    out_console.print(f"recorder overhead {s['recorder_overhead_pct']:+.2f}%  active policy {s['policy_time_pct_of_baseline']:.2f}% "
                      f"of baseline time ({s['policy_flops_pct_of_baseline']:.3f}% of FLOPs)  learned dCTS policy net "
                      f"{s['learned_policy_net_time_pct_of_baseline']:.2f}% of time ({s['learned_policy_net_flops_pct_of_baseline']:.3f}% of FLOPs)",
                      highlight=False)
    out_console.print(f"host synchronisations per forward: baseline {s['baseline'].get('host_syncs', 0)}, reduced "
                      f"{s['step'].get('host_syncs', 0)} (calls that read the device: each one stalls a GPU)",
                      highlight=False)
    out_console.print(f"padding: {s['step'].get('padding_pct', 0.0):.1f}% of the padded batch's slots (images padded to "
                      "the longest); blocks without a step inside run the real tokens only", highlight=False)
    tails = [(name, s[name].get("latency_tail") or {}) for name in ("baseline", "step")]
    if all(t.get("repeats", 0) > 1 for _, t in tails):
        out_console.print("latency over the repeats: " + "; ".join(
            f"{escape(str(name))} p50 {t['p50']:.1f} p99 {t['p99']:.1f} max {t['max']:.1f} ms (p99/p50 {t['p99_over_p50']:.2f})"
            for name, t in tails), highlight=False)
    if s["one_at_a_time_ms"] is not None:
        out_console.print(f"same batch one image at a time: {s['one_at_a_time_ms']:.1f} ms vs padded batch "
                          f"{result.step.latency_ms:.1f} ms", highlight=False)


def _print_methods_bench(s: dict[str, Any], size: int, batch: int) -> None:
    """`bench --methods`: one row per operating point against the one baseline, then what failed."""
    table = Table(title=f"bench: {s['model']} {size}x{size}, batch {batch}, {s['device']}, {s['threads']} threads"
                        f"{', bf16' if s['amp'] else ''}; {s['timing']['rounds']} interleaved rounds",
                  title_justify="left")
    for col in ("operating point", "tokens/block", "GFLOPs/img", "latency ms", "speed-up", "FLOP reduction",
                "quotient", "padding %", "host syncs"):
        table.add_column(col, justify="left" if col == "operating point" else "right")
    b = s["baseline"]
    table.add_row("baseline (vit)", f"{b['mean_tokens_per_block']:.0f}", f"{b['gflops_per_image']:.1f}",
                  f"{b['latency_ms']:.1f}", "1.00x", "1.00x", "-", "0.0", str(b["host_syncs"]))
    for p in s["points"]:
        ci = p["speedup_ci"]
        interval = f" [{ci['low']:.2f}, {ci['high']:.2f}]" if ci.get("low") is not None else ""
        table.add_row(escape(p["name"]), f"{p['mean_tokens_per_block']:.0f}", f"{p['gflops_per_image']:.1f}",
                      f"{p['latency_ms']:.1f}", f"{p['speedup']:.2f}x{interval}", f"{p['flop_reduction']:.2f}x",
                      f"{p['speedup_over_flop_reduction']:.2f}", f"{p['padding_pct']:.1f}", str(p["host_syncs"]))
    out_console.print(table)
    out_console.print("quotient = speed-up / FLOP reduction (1.0: time falls exactly as FLOPs do); padding: share of "
                      "the padded batch's slots that are padding (blocks without a step inside run the real tokens "
                      "only)", highlight=False)
    _warn(s.get("warnings") or [])
    for name, line in s["failed"].items():  # the other points are timed; this one is said and fails the command
        err_console.print(f"[bold red]error:[/] method {escape(_plain(name))} failed and is left out: "
                          f"{escape(_plain(line))}", highlight=False, soft_wrap=True)


@app.command()
@shared_options(pick(without=SWEPT))
def sweep(
    merge: Annotated[str, typer.Option("--merge-thresholds", help="Merge thresholds to try (one value for all levels each).")] = "0.3,0.5,0.7,0.9",
    exit_: Annotated[str, typer.Option("--exit-thresholds", help="Exit thresholds to try (ignored when the exits are off).")] = "0.8,0.9,0.95,0.99",
    sizes: Annotated[Optional[str], typer.Option(help="Input sizes (long side) to try, e.g. 384,512; default: as generated/stored.")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="Sweep methods instead of thresholds, e.g. step,dcts,dtop,cts,tome,algm: three operating points per bare name, one per name with settings (tome:r=16); all on one Pareto plot.")] = None,
    data: DataOpt = "synthetic",
    data_root: DataRootOpt = None,
    split: Annotated[str, typer.Option(help="Split of a file data set.")] = "val",
    seeds: Annotated[str, typer.Option(help="Synthetic scenes, START:STOP.")] = "100000:100050",
    scene_size: Annotated[int, typer.Option(help="Side of generated synthetic scenes.")] = 512,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    fmt: FormatOpt = "png",
    dpi: DpiOpt = 150,
    titles: TitlesOpt = True,
    out: OutOpt = Path("outputs"),
    shared: Any = None,
) -> None:
    """Sweep merge/exit thresholds (and sizes): mIoU [95% CI] vs GFLOPs and measured throughput, with Pareto plots."""
    from tokenscope import api
    from tokenscope.jobs.sweep import parse_floats
    from tokenscope.render.figures import FigureStyle

    with _user_errors():
        style = FigureStyle.parse(fmt, dpi, titles)
        size_list = [int(v) for v in parse_floats(sizes, "--sizes")] if sizes else [None]
        with _progress("sweeping") as progress:
            result = api.sweep(**shared, merge_thresholds=parse_floats(merge, "--merge-thresholds"),
                               exit_thresholds=parse_floats(exit_, "--exit-thresholds"), sizes=size_list, data=data,
                               data_root=data_root, split=split, seeds=seeds, scene_size=scene_size, window=window,
                               stride=stride, out=out, methods=methods, style=style, progress=progress)
    if result.folder is None:  # not rank 0 of a torchrun job
        return
    _print_sweep_table(result.table, "sweep")
    out_console.print(f"outputs: [bold]{escape(str(result.folder))}[/]", highlight=False)
    for name, why in result.failed.items():  # the other points are written; this one is said and fails the command
        err_console.print(f"[bold red]error:[/] point {escape(_plain(name))} failed and is left out: "
                          f"{escape(_plain(why))}", highlight=False, soft_wrap=True)
    if result.failed:
        raise typer.Exit(3)


def _print_sweep_table(df: Any, title: str) -> None:
    """One row per operating point: mIoU and its change with 95% intervals, cost, speed."""
    table = Table(title=f"{title} (mIoU: pooled over {int(df['images'].iloc[0]) if len(df) else 0} images, "
                        "[95% bootstrap CI]; change: paired, against the plain ViT)", title_justify="left")
    for col in ("size", "point", "mIoU [95% CI]", "change [95% CI]", "GFLOPs/img", "images/s", "tokens/block", "merged",
                "pruned", "exited"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for _, r in df.iterrows():
        ci = {"low": r["miou_low"], "high": r["miou_high"]}
        ch = {"low": r["miou_change_low"], "high": r["miou_change_high"]}
        change = "" if r["is_baseline"] else f"{_pts(r['miou_change'], signed=True)}{_ci_text(ch, signed=True)}"
        table.add_row(str(r["size"]) if r["size"] else "native", str(r["point"]), f"{100 * r['miou']:.2f}{_ci_text(ci)}", change,
                      f"{r['gflops_per_image']:.2f}",
                      f"{r['images_per_s']:.2f}", f"{r['mean_tokens_per_block']:.0f} ({r['block_token_reduction']:.2f}x)",
                      *_fate_cells(r))
    out_console.print(table)
    condition = str(df["class_condition"].iloc[0]) if len(df) and "class_condition" in df else ""
    if condition and condition != "nan":
        err_console.print(f"[bold yellow]mIoU condition:[/] {escape(str(condition))} (see sweep.json)", highlight=False)


@app.command("table")
def table_cmd(
    folder: Annotated[Path, typer.Argument(help="A sweep folder, a `compare --methods` folder, or a run folder (with --kind classes).")],
    kind: Annotated[str, typer.Option(help="methods (one row per operating point), classes (a run's per-class fates, cost and IoU), agreement (a compare folder: early decisions against the unreduced model) or boundary (fates against the distance to a class boundary).")] = "methods",
    fmt: Annotated[str, typer.Option("--format", help="markdown, latex (booktabs) or csv.")] = "markdown",
    out: Annotated[Optional[Path], typer.Option(help="Also write the table to this file (never overwritten).")] = None,
    figure: Annotated[Optional[Path], typer.Option(help="Also draw the table's figure into this .png/.pdf/.svg file (classes, boundary; never overwritten).")] = None,
    columns: Annotated[Optional[str], typer.Option(help="Keep these columns, in this order: comma-separated starts of their headers, e.g. method,mIoU,GFLOPs.")] = None,
    wide: Annotated[bool, typer.Option("--wide", help="LaTeX: a table* spanning both columns of a two-column paper.")] = False,
) -> None:
    """Print a comparison table for a paper: units, per image or total in every header, intervals and conditions as notes."""
    from tokenscope import api

    with _user_errors():
        text = api.table(folder, kind=kind, format=fmt, out=out, figure=figure, columns=columns, wide=wide)
    sys.stdout.write(text)
    if out is not None:
        err_console.print(f"table: [bold]{escape(str(out))}[/]", highlight=False)
    if figure is not None:
        err_console.print(f"figure: [bold]{escape(str(figure))}[/]", highlight=False)


@app.command()
def report(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run folder (default: the latest under --out).")] = None,
    gallery: Annotated[int, typer.Option(help="Images shown in the gallery.")] = 24,
    animations: Annotated[int, typer.Option(help="Gallery images that also show their token animation (GIF).")] = 6,
    out: OutOpt = Path("outputs"),
) -> None:
    """Write one self-contained HTML report (images embedded) of a run folder."""
    from tokenscope import api

    problems: list[str] = []
    with _user_errors():
        path = api.report(run_dir, gallery=gallery, animations=animations, out=out, problems=problems)
    out_console.print(f"report: [bold]{escape(str(path))}[/] ({path.stat().st_size / 2**20:.1f} MiB, opens from disk in any browser)",
                      highlight=False)
    _fail_on_problems(problems)


@app.command()
@shared_options(pick(without=TUNED))
def tune(
    out: Annotated[Path, typer.Option(help="The operating-point file to write (JSON; never overwritten).")],
    method: Annotated[str, typer.Option(help="The method whose settings are searched: step, dcts, dtop, cts, tome, algm, or budget (dcts at a forced token reduction).")] = "step",
    max_gflops: Annotated[Optional[float], typer.Option(help="Target: at most this many GFLOPs per image.")] = None,
    p95_latency_ms: Annotated[Optional[float], typer.Option(help="Target: 95% of images within this latency (ms).")] = None,
    min_speedup: Annotated[Optional[float], typer.Option(help="Target: at least this speed-up of the mean latency over the unreduced model.")] = None,
    max_miou_drop: Annotated[float, typer.Option(help="Accuracy limit: mIoU points the point may lose against the unreduced model.")] = 1.0,
    data: DataOpt = "synthetic",
    data_root: DataRootOpt = None,
    calib_split: Annotated[str, typer.Option(help="Split of a file data set to choose on.")] = "train",
    held_split: Annotated[str, typer.Option(help="Split of a file data set to report on.")] = "val",
    calib_seeds: Annotated[str, typer.Option(help="Synthetic scenes to choose on, START:STOP.")] = "200000:200040",
    held_seeds: Annotated[str, typer.Option(help="Synthetic scenes to report on, START:STOP (never the calibration ones).")] = "300000:300040",
    scene_size: Annotated[int, typer.Option(help="Side of generated synthetic scenes.")] = 512,
    window: WindowOpt = None,
    stride: StrideOpt = None,
    shared: Any = None,
) -> None:
    """Choose the cheapest operating point that meets a target within an accuracy limit; exit 0 when
    it meets it on held-out images too, 4 when no point meets it on the calibration images, 5 when
    the chosen one misses it on the held-out images."""
    from tokenscope.data.datasets import parse_seeds
    from tokenscope.jobs.setup import ModelOptions
    from tokenscope.jobs.tune import Target
    from tokenscope.jobs.tune import tune as run_tune

    with _user_errors(), _progress("tuning") as progress:
        if data == "synthetic" and set(parse_seeds(calib_seeds)) & set(parse_seeds(held_seeds)):
            raise TokenscopeError("--calib-seeds and --held-seeds overlap: the held-out report would not be held out")
        class_map = shared.pop("class_map")
        opts = ModelOptions(**shared, class_map=None if class_map is None else str(class_map))
        result = run_tune(opts, method, Target(max_gflops, p95_latency_ms, min_speedup, max_miou_drop), out, data,
                          data_root, calib_split, held_split, calib_seeds, held_seeds, scene_size, progress,
                          window=window, stride=stride)
    table = Table(title=f"tune {method} on the calibration images", title_justify="left")
    for col in ("operating point", "mIoU [95% CI]", "drop", "change [95% CI]", "GFLOPs", "p95 ms", "speed-up", "meets"):
        table.add_column(col, justify="left" if col in ("operating point", "meets") else "right")
    for m in result.calibration:
        table.add_row(m.point, f"{m.miou:.2f}{_ci_text(m.miou_ci)}", f"{m.miou_drop:+.2f}",
                      _ci_value(m.change_ci, signed=True), f"{m.gflops:.2f}", f"{m.p95_ms:.1f}",
                      f"{m.speedup:.2f}x", "yes" if m.ok else ", ".join(k for k, v in m.meets.items() if not v) + " missed")
    out_console.print(table)
    if result.chosen is None:
        err_console.print("[bold red]error:[/] no operating point meets the target on the calibration images "
                          "(nothing written)", highlight=False)
        raise typer.Exit(result.exit_code)
    h = result.held_out
    assert h is not None
    out_console.print(f"chosen: [bold]{escape(str(result.chosen.point))}[/] -> {escape(str(result.path))}", highlight=False)
    n = h.miou_ci.get("images", 0)
    out_console.print(f"held out: mIoU {h.miou:.2f}{_ci_text(h.miou_ci)} (change against unreduced "
                      f"{_ci_value(h.change_ci, signed=True)} over {n} image{'s' if n != 1 else ''}"
                      f"{', 95% CI' if n > 1 else ', no CI'}), {h.gflops:.2f} GFLOPs, p95 "
                      f"{h.p95_ms:.1f} ms, speed-up {h.speedup:.2f}x: target {'met' if h.ok else 'NOT met'}"
                      + ("" if h.ok else " (" + ", ".join(k for k, v in h.meets.items() if not v) + ")"), highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command()
def view(
    run_dir: Annotated[Optional[Path], typer.Argument(help="A run or compare folder (default: the latest run under --out).")] = None,
    serve: Annotated[bool, typer.Option("--serve", help="Serve the folder on 127.0.0.1 and load each image's data only when opened (large runs).")] = False,
    port: Annotated[int, typer.Option(help="Port for --serve (0 = a free one).")] = 0,
    out: OutOpt = Path("outputs"),
) -> None:
    """Write the interactive explorer of a run (explorer.html: opens from disk, no network), or serve it."""
    from tokenscope.jobs.view import serve as serve_folder
    from tokenscope.jobs.view import write_view

    if not 0 <= port <= 65535:
        _fail(ConfigError(f"--port {port}: a TCP port is 0 (a free one) to 65535"))
    with _user_errors(), _progress("explorer") as update:
        result = write_view(run_dir, out=out, served=serve, progress=update)
    if not serve:
        out_console.print(f"explorer: [bold]{escape(str(result.page))}[/] ({result.page.stat().st_size / 2**20:.1f} MiB, "
                          "opens from disk in any browser)", highlight=False)
        _fail_on_problems(result.problems)
        return
    for line in result.problems:  # served anyway: the page shows each in place of its image
        err_console.print(f"[bold red]error:[/] {escape(_plain(line))}", highlight=False, soft_wrap=True)
    try:
        server, _ = serve_folder(result.run_dir, port)
    except OSError as exc:
        _fail(TokenscopeError(f"cannot serve on 127.0.0.1:{port} ({exc.strerror or exc})"))
    url = f"http://127.0.0.1:{server.server_address[1]}/{result.page.name}"
    out_console.print(f"serving {escape(str(result.run_dir))} at [bold]{escape(str(url))}[/] (Ctrl-C stops)", highlight=False)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


@app.command()
def models(
    fetch: Annotated[Optional[str], typer.Option(help="Download, check and convert this published model now (with a progress bar).")] = None,
    offline: Annotated[bool, typer.Option(help="With --fetch: no network, only a file already in place (also TOKENSCOPE_OFFLINE=1).")] = False,
) -> None:
    """List the named models: built-in architectures and published Segmenter checkpoints."""
    from tokenscope import api
    from tokenscope.models.published import cache_root

    if fetch is not None:
        _fetch_published(fetch, offline or None)
    df = api.list_models()
    table = Table(title=f"models (published ones download once into {cache_root()})", title_justify="left")
    for col in ("name", "kind", "arch", "classes", "data set", "decoder", "published mIoU", "weights", "also as"):
        table.add_column(col, justify="right" if col in ("classes", "published mIoU") else "left")
    for _, r in df.iterrows():
        miou = "" if r["published_miou"] is None or r["published_miou"] != r["published_miou"] else f"{r['published_miou']:.2f}"
        hf = r.get("hf")
        table.add_row(r["name"], r["kind"], str(r["arch"]), str(r["classes"]), str(r["data set"]), str(r["decoder"]),
                      miou, str(r["weights"]), hf if isinstance(hf, str) else "")
    out_console.print(table)
    out_console.print("any Hugging Face EoMT folder runs too: --model hf:ORG/NAME (the hub cache, else downloaded) or "
                      "--weights DIR (docs/models.md)", highlight=False)


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list: name, kind, settings with defaults, ladder, search, reference, source.")] = False,
) -> None:
    """List the token-reduction methods: built-in and installed plug-ins, with their settings."""
    from tokenscope import api

    listing = api.list_methods()
    if as_json:
        sys.stdout.write(json.dumps([m.describe() for m in listing.methods], indent=1) + "\n")
    else:
        table = Table(title="methods (settings go after the name: --method tome:r=16)", title_justify="left")
        for col in ("name", "kind", "settings (default)", "what it does", "source"):
            table.add_column(col, overflow="fold")
        for m in listing.methods:
            settings = ", ".join(f"{x.name}={x.default_text}" for x in m.settings)
            table.add_row(m.name, m.kind, settings or "-", m.summary, m.source.split(" (")[0])
        out_console.print(table)
    _warn(listing.problems)


@contextmanager
def _download_progress(item: str) -> Iterator[Callable[[int, int, str], None]]:
    """A download bar: bytes so far and in all, speed, time left."""
    columns = (TextColumn("[bold]downloading"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[item]}", markup=False))
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("download", total=None, item=item)

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total or None, item=name)

        yield update


def _fetch_published(name: str, offline: bool | None = None) -> None:
    from tokenscope.models.resolve import convert_published
    from tokenscope.models.published import ensure_published

    with _user_errors(), _download_progress(name) as update:
        path = ensure_published(name, convert_published, progress=update, offline=offline)
    out_console.print(f"{escape(str(name))}: [bold]{escape(str(path))}[/]", highlight=False)


data_app = typer.Typer(help="Data sets in the cache: fetch (download, verify, unpack), check a tree, list.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="ade20k (downloaded: 923 MB), or cityscapes / pascal_context (says how to get them).")],
    url: Annotated[Optional[str], typer.Option(help="A mirror of the archive (it must still match the published hash).")] = None,
    keep_archive: Annotated[bool, typer.Option(help="Keep the downloaded zip after unpacking.")] = False,
    offline: Annotated[bool, typer.Option(help="No network: only use a file already in place (also TOKENSCOPE_OFFLINE=1).")] = False,
) -> None:
    """Download, verify and unpack a data set into the cache; then --data NAME finds it without --data-root."""
    from tokenscope import api
    from tokenscope.data.fetch import SOURCES, dataset_dir

    if name in SOURCES and not SOURCES[name].url:  # needs an account: say how, do not fail
        out_console.print(SOURCES[name].manual.format(dest=dataset_dir(name)), highlight=False)
        return
    with _user_errors(), _download_progress(name) as update:
        path = api.fetch_data(name, url=url, keep_archive=keep_archive, offline=offline or None, progress=update)
    out_console.print(f"{escape(str(name))}: [bold]{escape(str(path))}[/] (use it with --data {escape(str(name))})", highlight=False)


@data_app.command("check")
def data_check(
    name: Annotated[str, typer.Argument(help="ade20k, cityscapes, pascal_context or folder.")],
    root: Annotated[Optional[Path], typer.Option("--root", "--data-root", help="The tree to check (default: the cached one).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Read at most this many image/label pairs per split (counts stay complete).")] = None,
    show: Annotated[int, typer.Option(help="How many problems to print.")] = 10,
) -> None:
    """Validate a data-set tree: image and label counts per split, label values in range, sizes agree."""
    from tokenscope import api

    if show < 0 or (limit is not None and limit < 1):
        _fail(ConfigError("--show must be >= 0 and --limit >= 1"))
    with _user_errors(), _progress("checking") as update:
        report = api.check_data(name, root=root, limit=limit, progress=update)
    table = Table(title=f"{name} at {report.root}", title_justify="left")
    for col in ("split", "images", "pairs", "checked", "problems"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for s in report.splits:
        table.add_row(s.split, str(s.images), str(s.pairs), str(s.checked), str(len(s.problems)))
    out_console.print(table)
    problems = report.problems
    for line in problems[:show]:
        err_console.print(f"[bold red]problem:[/] {escape(str(line))}", highlight=False, soft_wrap=True)
    if len(problems) > show:
        err_console.print(f"... and {len(problems) - show} more (--show {len(problems)} lists them)")
    if problems:
        raise typer.Exit(1)


@data_app.command("list")
def data_list() -> None:
    """The data sets tokenscope knows: cached or not, where, and their size on disk."""
    from tokenscope import api

    df = api.list_data()
    table = Table(title="data sets", title_justify="left")
    for col in ("name", "cached", "size", "download", "path"):
        table.add_column(col)
    for _, r in df.iterrows():
        table.add_row(r["name"], "yes" if r["cached"] else "no", f"{r['bytes'] / 2**20:,.0f} MiB" if r["cached"] else "",
                      r["download"], r["path"])
    out_console.print(table)


import_app = typer.Typer(help="Convert foreign checkpoints into tokenscope checkpoints (safetensors + json).",
                         no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("segmenter")
def import_segmenter_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="Segmenter checkpoint.pth (variant.yml beside it) or an mmsegmentation Segmenter .pth (config .py beside it).")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write: NAME.json + NAME.safetensors.")],
    config: Annotated[Optional[Path], typer.Option(help="The variant.yml / mmseg config, if not beside the checkpoint.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Model name shown in outputs (default: the --out file name).")] = None,
) -> None:
    """Convert a Segmenter checkpoint once, so later runs load safetensors and never unpickle anything."""
    from tokenscope import api
    from tokenscope.schema import read_json

    with _user_errors():
        written = api.import_segmenter(checkpoint, out, config=config, name=name)
        doc = read_json(written, "checkpoint description")
    _warn(doc["metadata"].get("notes", []))
    cfg = doc["config"]
    kw = cfg["timm_kwargs"]
    out_console.print(
        f"imported {checkpoint.name} ({doc['metadata']['layout']} layout): ViT width {kw['embed_dim']}, {kw['depth']} blocks, "
        f"patch {kw['patch_size']}, {cfg['decoder']} decoder, {cfg['num_classes']} classes"
        f"{' of ' + cfg['dataset'] if cfg['dataset'] else ''}, trained at {cfg['img_size']} px, "
        f"windows {cfg['window']} / stride {cfg['stride']}", highlight=False)
    out_console.print(f"checkpoint: [bold]{escape(str(written))}[/] (run it with --weights)", highlight=False)


def version_callback(value: bool) -> None:
    if value:
        out_console.print(f"tokenscope {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                               help="Print the version and exit.")] = False) -> None:
    """tokenscope: where do the tokens go in token-reduction ViT segmenters?"""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
