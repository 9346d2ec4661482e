"""`tokenscope bench`: inputs and model for a speed run, then `analysis.bench.run_bench`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokenscope.analysis.bench import BenchResult, MethodsBenchResult, Progress, run_bench, run_methods_bench
from tokenscope.data.images import check_size, load_prepared, prepare_image
from tokenscope.data.synthetic import synthetic_scene
from tokenscope.errors import ConfigError
from tokenscope.jobs.setup import ModelOptions, load_model, method_setting
from tokenscope.models.methods.point import resolve_list


MAX_BENCH_PIXELS = 8 * 4096 * 4096
"""Largest batch x size^2 bench will generate (eight 4096 px images: 1.6 GB of float32 input)."""


def check_bench_shape(size: int, batch: int, patch: int = 16) -> None:
    """The size rule of `run`, a multiple of the patch, and a batch that fits in memory, checked
    before any image is made (so `--size 100000` is one line, not a failed 112 GiB allocation)."""
    check_size(size, patch)
    if size % patch:
        raise ConfigError(f"--size must be a multiple of the {patch}-pixel patch, got {size}")
    if batch < 1:
        raise ConfigError("--batch must be >= 1")
    if batch * size * size > MAX_BENCH_PIXELS:
        raise ConfigError(f"--batch {batch} at --size {size} is {batch * size * size / 2**20:.0f} Mpx of input, "
                          f"over the {MAX_BENCH_PIXELS / 2**20:.0f} Mpx bench allows; lower one of them")


def bench_images(size: int, batch: int, image: str | None, seed: int = 0, patch: int = 16) -> torch.Tensor:
    """`batch` different synthetic scenes (so token counts differ per image), or one file repeated."""
    check_bench_shape(size, batch, patch)
    if image is not None:
        p = load_prepared(image, size=size, patch=patch)
        if p.padded_hw != (size, size):
            rgb = np.full((size, size, 3), 0.5, np.float32)
            h, w = p.input_hw
            rgb[:h, :w] = p.tensor_rgb.transpose(1, 2, 0)[:h, :w]
            p = prepare_image(rgb, image, patch=patch)
        return torch.from_numpy(np.stack([p.tensor_rgb] * batch))
    scenes = [prepare_image(synthetic_scene(seed + i, size, size).image, f"scene{i}", patch=patch).tensor_rgb
              for i in range(batch)]
    return torch.from_numpy(np.stack(scenes))


def _check(opts: ModelOptions, size: int, batch: int, repeats: int, warmup: int, threads: int | None) -> None:
    """What bench refuses before a model is built."""
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(threads)
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    if opts.policy == "oracle":
        raise ConfigError("bench has no labels for the oracle policy; use --budget, uniform or learned")
    check_bench_shape(size, batch, 1)  # the patch-independent part, before a model is built


def bench(opts: ModelOptions, size: int = 1024, batch: int = 1, image: str | None = None, repeats: int = 3,
          warmup: int = 1, threads: int | None = None, loop: bool = False, compile_blocks: bool = False,
          progress: Progress | None = None) -> BenchResult:
    _check(opts, size, batch, repeats, warmup, threads)
    loaded, device = load_model(opts)
    x = bench_images(size, batch, image, patch=loaded.model.patch_size).to(device)
    m = loaded.model
    if compile_blocks:
        m.compile_blocks()
    result = run_bench(m, x, device, loaded.setting, repeats=repeats, warmup=warmup,
                       amp=opts.amp, loop=loop, progress=progress)
    result.model = loaded.config.name
    return result


def bench_methods(opts: ModelOptions, methods: str, size: int = 1024, batch: int = 1, image: str | None = None,
                  repeats: int = 3, warmup: int = 1, threads: int | None = None,
                  progress: Progress | None = None) -> MethodsBenchResult:
    """`bench --methods a,b,c`: every operating point against one baseline on one batch, timed side by
    side (analysis.bench.run_methods_bench). The shared options apply to each point as in `compare
    --methods`; `--method` names one point and is refused beside a list."""
    if opts.method is not None:
        raise ConfigError("--methods lists the operating points to time; leave out --method")
    _check(opts, size, batch, repeats, warmup, threads)
    parsed = resolve_list(methods)
    loaded, device = load_model(opts)
    points = [(m.label, method_setting(loaded, opts, m.text)) for m in parsed]
    x = bench_images(size, batch, image, patch=loaded.model.patch_size).to(device)
    result = run_methods_bench(loaded.model, x, device, points, repeats=repeats, warmup=warmup, amp=opts.amp,
                               progress=progress)
    result.model = loaded.config.name
    return result


def bench_json_path(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p
