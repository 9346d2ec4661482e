"""`tokenscope bench`: inputs and model for a speed run, then `analysis.bench.run_bench`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tokenscope.analysis.bench import BenchResult, Progress, run_bench
from tokenscope.data.images import load_prepared, prepare_image
from tokenscope.data.synthetic import synthetic_scene
from tokenscope.errors import ConfigError
from tokenscope.jobs.setup import ModelOptions, load_model


def bench_images(size: int, batch: int, image: str | None, seed: int = 0) -> torch.Tensor:
    """`batch` different synthetic scenes (so token counts differ per image), or one file repeated."""
    if size < 16 or size % 16:
        raise ConfigError(f"--size must be a positive multiple of 16, got {size}")
    if batch < 1:
        raise ConfigError("--batch must be >= 1")
    if image is not None:
        p = load_prepared(image, size=size)
        if p.padded_hw != (size, size):
            rgb = np.full((size, size, 3), 0.5, np.float32)
            h, w = p.input_hw
            rgb[:h, :w] = p.tensor_rgb.transpose(1, 2, 0)[:h, :w]
            p = prepare_image(rgb, image)
        return torch.from_numpy(np.stack([p.tensor_rgb] * batch))
    scenes = [prepare_image(synthetic_scene(seed + i, size, size).image, f"scene{i}").tensor_rgb for i in range(batch)]
    return torch.from_numpy(np.stack(scenes))


def bench(opts: ModelOptions, size: int = 1024, batch: int = 1, image: str | None = None, repeats: int = 3,
          warmup: int = 1, threads: int | None = None, loop: bool = False, compile_blocks: bool = False,
          progress: Progress | None = None) -> BenchResult:
    if threads is not None:
        if threads < 1:
            raise ConfigError("--threads must be >= 1")
        torch.set_num_threads(threads)
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    if opts.policy == "oracle":
        raise ConfigError("bench has no labels for the oracle policy; use --budget, uniform or learned")
    loaded, device = load_model(opts)
    x = bench_images(size, batch, image).to(device)
    m = loaded.model
    if compile_blocks:
        m.compile_blocks()
    return run_bench(m, x, device, m.active_policy, m.exits_enabled, repeats=repeats, warmup=warmup,
                     amp=opts.amp, loop=loop, progress=progress)


def bench_json_path(path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p
