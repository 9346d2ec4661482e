"""The model options every command and API function shares, declared once.

`--model`, `--weights`, `--method`, `--policy`, ... mean the same on `run`, `compare`, `evaluate`,
`bench`, `sweep` and `tune`, and as keywords of `tokenscope.run`, `.compare`, ... Each is declared
here, once (name, type, default, help); `with_options` adds the ones a function takes to its
signature (as keyword-only parameters, so typer and `help()` and the API's argument checks see
them) and hands their values to it as one dict. The command line builds its typed options from the
same table (cli.py), so a new shared option or a changed default is one edit.

Light on purpose: the command line imports it before anything heavy.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar, Union

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class SharedOption:
    """One shared option: its keyword, its types on the command line and in the API, its default, its help."""

    name: str
    cli_type: Any
    api_type: Any
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    """The command line's spelling when it is not `--<name with dashes>` (`--model`, `-m`)."""
    api: bool = True
    """Whether the Python API takes it (`--operating-point` is the command line's own: a file it reads)."""


MODEL_OPTIONS: dict[str, SharedOption] = {o.name: o for o in (
    SharedOption("model", str, Union[str, Any], "demo",
                 "Model: demo (shipped), a published Segmenter model (see `tokenscope models`; downloaded once), "
                 "vitt, vits, vitb, vitl, timm:<vit name>, or hf:ORG/NAME (a Hugging Face EoMT repository).",
                 ("--model", "-m")),
    SharedOption("weights", Optional[str], Optional[str], None,
                 "Weights: a tokenscope checkpoint (NAME.json/.safetensors), a Segmenter or mmsegmentation checkpoint "
                 "(.pth, read without running code), a Hugging Face model folder, a timm ViT file "
                 "(.safetensors/.pth/.npz), or 'hub' to download timm's backbone."),
    SharedOption("backbone", Optional[str], Optional[str], None,
                 "The DINOv3 model an EoMT-DINOv3 release of deltas adds to: its folder (config.json + "
                 "model.safetensors) or hf:ORG/NAME, e.g. hf:facebook/dinov3-vitl16-pretrain-lvd1689m."),
    SharedOption("random_init", bool, bool, False,
                 "Random weights, for architecture and speed studies only (predictions are noise).", ("--random-init",)),
    SharedOption("policy", Optional[str], Optional[str], None,
                 "Merge policy: learned (dCTS network), oracle (ground truth, needs --labels), uniform (colour-variance "
                 "quadtree), none (16x16 grid). Default: learned if trained, else uniform."),
    SharedOption("merge_threshold", Optional[str], Optional[Union[float, str, Sequence[float]]], None,
                 "Merge a block when its policy score reaches this; one value, or 4 comma-separated for superpatch "
                 "levels 1-4 (32..256 px).", ("--merge-threshold",)),
    SharedOption("exit_threshold", Optional[float], Optional[float], None,
                 "A token exits at a gate when its top-1 probability reaches this (default: the model's, 0.95).",
                 ("--exit-threshold",)),
    SharedOption("exits", Optional[str], Optional[Union[bool, str]], None,
                 "Early exits: learned (auxiliary heads after the exit blocks) or none (True / False in Python). "
                 "Default: learned if trained.",
                 ("--exits",)),
    SharedOption("budget", Optional[float], Optional[float], None,
                 "Force this token reduction (e.g. 2.5): uniform-policy scores thresholded per image to patches/R "
                 "tokens (--policy budget)."),
    SharedOption("keep_per_class", Optional[int], Optional[int], None,
                 "DToP's context rule: at each gate the K most confident qualifying tokens of every predicted class "
                 "stay in the sequence (0 = off).", ("--keep-per-class",)),
    SharedOption("method", Optional[str], Optional[str], None,
                 "The operating point: a method with its settings after colons, e.g. step, tome:r=16, "
                 "algm:threshold=0.92, cts:groups=300, X+tome, or a method file ./my_rule.py:frac=0.2. `tokenscope "
                 "methods` lists them with their settings. Default: --policy/--exits decide.", ("--method",)),
    SharedOption("operating_point", Optional[Path], None, None,
                 "An operating point written by `tokenscope tune` (a method with its settings); instead of --method.",
                 ("--operating-point",), api=False),
    SharedOption("device", str, str, "auto", "auto (GPU if present), cpu or cuda."),
    SharedOption("amp", bool, bool, True, "bf16 autocast on CUDA (no effect on the CPU).", ("--amp/--no-amp",)),
    SharedOption("seed", int, int, 0, "Seed for random weights."),
    SharedOption("class_map", Optional[Path], Optional[Union[str, Path]], None,
                 "A file mapping the data's classes to the model's (JSON {\"data id or name\": model id or name} or CSV "
                 "data_id,model_id; the rest is ignored), for models whose classes are not the data set's. Recorded "
                 "and printed beside every mIoU.", ("--class-map",)),
    SharedOption("ignore_class_mismatch", bool, bool, False,
                 "Score even though the model's classes are not the data's (labels outside the model's classes are "
                 "skipped); recorded and printed beside every mIoU.", ("--ignore-class-mismatch",)),
)}

EVERY = tuple(n for n in MODEL_OPTIONS if n != "amp")
"""The shared options `run` takes (all but `amp`, which `bench` and `load_model` add)."""


SWEPT = ("merge_threshold", "exit_threshold", "method", "budget", "operating_point")
"""What `sweep` varies itself (its thresholds, its methods): not shared options there."""
TUNED = ("merge_threshold", "exit_threshold", "exits", "method", "budget", "operating_point")
"""What `tune` searches itself (its `--method` names the method whose settings it searches)."""


def pick(*, without: tuple[str, ...] = (), adding: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`EVERY` shared option but `without` (a command that varies them itself, as sweep varies thresholds),
    and `adding` others of the table (`amp`)."""
    unknown = (set(without) | set(adding)) - set(MODEL_OPTIONS)
    if unknown:
        raise ValueError(f"not shared options: {sorted(unknown)}")
    return tuple(n for n in MODEL_OPTIONS if (n in EVERY or n in adding) and n not in without)


def with_options(names: tuple[str, ...], annotate: Callable[[SharedOption], Any], into: str = "shared",
                 api: bool = False, first: bool = False) -> Callable[[F], F]:
    """Give a function the shared options `names` as parameters annotated by `annotate`, and call it with
    their values as one dict `into=` (a name the function declares last). `api`: only the options the
    Python API takes. They come as keyword-only parameters after the function's own, or with `first`
    right after its required ones (a command's --help then lists them first)."""
    options = [MODEL_OPTIONS[n] for n in names if not api or MODEL_OPTIONS[n].api]

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)  # typer reads a given __signature__ as it is: real types
        own = [p for name, p in sig.parameters.items() if name != into]
        taken = {p.name for p in own} & {o.name for o in options}
        if taken:
            raise TypeError(f"{fn.__qualname__} declares shared options itself: {sorted(taken)}")
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if first else inspect.Parameter.KEYWORD_ONLY
        extra = [inspect.Parameter(o.name, kind, default=o.default, annotation=annotate(o)) for o in options]
        defaults = {o.name: o.default for o in options}

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name, default) for name, default in defaults.items()}
            return fn(*args, **kwargs, **{into: values})

        variadic = [p for p in own if p.kind == inspect.Parameter.VAR_KEYWORD]  # **kwargs stays last
        own = [p for p in own if p.kind != inspect.Parameter.VAR_KEYWORD]
        if first:
            required = [p for p in own if p.default is inspect.Parameter.empty]
            if any(p.kind != inspect.Parameter.POSITIONAL_OR_KEYWORD for p in own):
                raise TypeError(f"{fn.__qualname__}: shared options go first only among plain parameters")
            params = [*required, *extra, *(p for p in own if p.default is not inspect.Parameter.empty)]
        else:
            params = [*own, *extra]
        wrapper.__signature__ = sig.replace(parameters=[*params, *variadic])  # type: ignore[attr-defined]
        annotations = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k != into}
        wrapper.__annotations__ = {**annotations, **{p.name: p.annotation for p in extra}}
        return wrapper  # type: ignore[return-value]

    return decorate
