"""tokenscope: where do the tokens go in token-reduction ViT segmenters (STEP: dCTS + early exits,
and beside it CTS, DToP, ToMe and ALGM)?

    import tokenscope as ts

    model = ts.load_model("demo")                     # or a published Segmenter, e.g.
                                                      # ts.load_model("segmenter-vit-l-mask-ade20k")
    tr = ts.trace(model, "street.png")                # one checked Trace; shows itself in a notebook
    tr.summary()                                      # tokens, reduction, exits, GFLOPs (dict)
    tr.tokens()                                       # one row per (super)token (DataFrame)
    tr.blocks()                                       # tokens entering / leaving each block (DataFrame)
    ts.plot.merge(tr)                                 # supertokens overlay (RGB array)
    ts.plot.histogram(tr)                             # tokens per block (matplotlib Figure)
    tr.save("out/street"); ts.load_trace("out/street")

Models
    load_model(model="demo", weights=None, *, device="auto", policy=None, exits=None,
               merge_threshold=None, exit_threshold=None, budget=None, random_init=False,
               method=None) -> Model
    method: the operating point, a method with its settings after colons ("step", "tome:r=16",
            "algm:threshold=0.92", "cts:groups=300", "dtop+tome", "./rule.py:frac=0.2")
    Model.configure(policy=..., exits=..., merge_threshold=..., exit_threshold=..., method=...)
    list_models() -> DataFrame                         built-in and published models
    list_methods() -> .methods, .problems              token-reduction methods (built-in and plug-ins)
    from_timm(vit, decoder="linear"|nn.Linear|module, num_classes=, class_names=, mean=, std=) -> Model
                                                       your own ViT segmenter; Model.save(path) -> checkpoint

Tracing (images: paths, numpy arrays, PIL images or tensors on any device)
    trace(model, image, *, labels=None, size=None) -> Trace        one forward, whole image
    trace_many(model, images, *, labels=None, size=None, batch_size=8, progress=None) -> [Trace]
    predict(model, image, *, labels=None, window=None, stride=None) -> ImagePrediction
                                                       Segmenter's sliding windows: .traces, .label_map
    load_trace(folder) -> Trace;  Trace.save(folder)
    tabulate(traces) -> tables (.images, .classes, .levels, .blocks, .summary)

Pictures: ts.plot.merge / exit / confidence / segmentation / groups(trace, block) (RGB arrays),
          histogram / token_flow (figures). With ToMe/ALGM, Trace.cover_at(block) says which token
          covers each patch as a block begins.

What the command line does, as functions (each returns what the command prints and writes)
    run(images, *, model="demo", ..., out="outputs") -> RunResult      (run folders, tables, figures)
    compare(images, *, baseline="vit", methods=None, ...) -> CompareResult   (methods="step,tome,cts")
    evaluate(model, *, data="synthetic", ...) -> {"step": {...}, "baseline": {...}}
    heatmap(run_dir) / report(run_dir) / import_segmenter(checkpoint, out)
    view(trace or run_dir) -> the interactive explorer (inline in a notebook; explorer.html for a run)
    fetch_data("ade20k") / check_data(name, root=None) / list_data()     data sets in the cache
    train(out, *, init=None, data="synthetic", ...) / bench(*, model, size, batch, method, ...)
    sweep(*, methods=None, ...)                        methods: every method's operating points

Errors are raised as TokenscopeError subclasses with a one-line message: ImageError (an input
image or label map), CheckpointError (weights), ConfigError (options), RunFolderError (outputs),
DownloadError (a download failed or did not match its hash).
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = ("Model", "Trace", "load_model", "trace", "trace_many", "predict", "load_trace", "tabulate", "run",
        "compare", "evaluate", "heatmap", "report", "import_segmenter", "list_models", "list_methods", "from_timm", "train", "bench", "sweep", "table",
        "view", "fetch_data", "check_data", "list_data", "read_operating_point")
_ERRORS = ("TokenscopeError", "ImageError", "CheckpointError", "ConfigError", "RunFolderError", "DownloadError")
__all__ = ["__version__", "plot", *_API, *_ERRORS]


def __getattr__(name: str) -> Any:
    """Import the API on first use, so `import tokenscope` (and the CLI's start) stays light."""
    if name in _API:
        from tokenscope import api

        return getattr(api, name)
    if name in _ERRORS:
        from tokenscope import errors

        return getattr(errors, name)
    if name == "plot":
        import importlib

        return importlib.import_module("tokenscope.plot")
    raise AttributeError(f"module 'tokenscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def _api_property(name: str) -> property:
    def get(self: types.ModuleType) -> Any:
        from tokenscope import api

        return getattr(api, name)

    def keep_subpackage(self: types.ModuleType, subpackage: Any) -> None:
        self.__dict__[f"_{name}_subpackage"] = subpackage

    return property(get, keep_subpackage)


_SHADOWED = ("trace", "train")
"""API functions named like a subpackage (tokenscope/trace/, tokenscope/train/)."""


class _Package(types.ModuleType):
    """`ts.trace` and `ts.train` are the API functions although `tokenscope.trace` and
    `tokenscope.train` are subpackages too: a class property wins over the module attribute that
    importing a subpackage sets (the subpackages stay importable with `from tokenscope.train.trainer
    import ...`)."""


for _name in _SHADOWED:
    setattr(_Package, _name, _api_property(_name))

sys.modules[__name__].__class__ = _Package
