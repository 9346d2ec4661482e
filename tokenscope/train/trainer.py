"""Training STEP models: encoder + decoder + exit heads jointly, and the dCTS policy beside them.

- Encoder, decoder and exit heads: cross-entropy of the final head plus `aux_weight` times the
  cross-entropy of each exit head on every token that reaches it (deep supervision). The encoder
  sees oracle partitions from the ground truth with a random share of the one-class blocks
  withheld per image, so it learns supertokens and plain patches alike.
- Exit-aware steps: for the last `exit_aware_steps` steps the gates really remove confident tokens,
  as at inference. Without them the later blocks only ever saw full sequences and lose accuracy
  when the easy tokens (and the context they carried) are gone; with them, the final loss reaches
  exited tokens through their gate's prediction, as in DToP.
- Policy: binary cross-entropy per level against ground-truth block homogeneity (CTS's target).

Batches are global and counted in images: each step draws its crop size and its images from a
generator seeded by (seed, step), and every image draws its crop and its withheld merges from its
own seed (seed, step, position). Under torchrun each rank takes every world_size-th image of the
batch and, with `accumulate` K, splits its share into K micro-batches; DistributedDataParallel
averages the gradients. So a step is the same whatever the number of processes or micro-batches
(up to float rounding, and to the policy network's BatchNorm statistics, which are per process
on the CPU; on CUDA they are synchronised), and a run can resume with another world size.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from tokenscope import dist
from tokenscope.data.datasets import Sample, SegmentationDataset
from tokenscope.data.images import IGNORE_INDEX, PAD_RGB
from tokenscope.errors import CheckpointError, ConfigError
from tokenscope.models.methods.facts import facts_of
from tokenscope.models.methods.point import resolve
from tokenscope.models.checkpoints import LoadedModel, checkpoint_paths, load_checkpoint, save_checkpoint
from tokenscope.models.partition import MAX_LEVEL, block_homogeneity
from tokenscope.models.sequence import token_grid, unmerge
from tokenscope.models.step_vit import ReductionSetting, StepOutput, StepViT
from tokenscope.storage import atomic_write

TrainProgress = Callable[[int, int, dict[str, float]], None]
"""progress(step, total_steps, latest losses)"""


@dataclass
class TrainSettings:
    """Hyper-parameters and bookkeeping of one training run."""

    steps: int = 3000
    crops: tuple[tuple[int, int], ...] = ((256, 8), (384, 4), (512, 2))
    """(square crop side, batch size) pairs; each step draws one, keeping tokens per step similar."""
    lr: float = 1e-3
    policy_lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 150
    aux_weight: float = 0.5
    policy_weight: float = 1.0
    seed: int = 0
    save_every: int = 250
    exit_aware_steps: int = 0
    """The last N steps apply the exits during training (see the module docstring)."""
    init: str = ""
    """Checkpoint or published model the run started from ("" = backbone weights or scratch); kept for resumes."""
    freeze: tuple[str, ...] = ()
    """Parts kept fixed: `encoder` (patch embedding, blocks, final norm), `decoder`. A frozen
    encoder makes a cheap run that trains the exit heads and the policy (and the decoder, unless
    frozen too) on top of an already trained segmenter."""
    accumulate: int = 1
    """Micro-batches per step and process (gradient accumulation); the global batch is unchanged."""
    method: str = ""
    """A merging method to train with (`algm`, `tome`, `dcts+algm`, ...; "" = STEP alone): its merging
    runs in every training forward, on the policy the method uses (the oracle stands in for a
    learned one, the plain grid for none)."""
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def schedule(self) -> dict[str, object]:
        """What must match for a resume: everything but how the work is split across processes."""
        return schedule_of(self.to_dict())

    def check(self) -> None:
        """Refuse settings that cannot train a usable model, before any step (the message gives the range)."""
        def number(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
            ok = math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number in "
                                  f"{'(' if low_open else '['}{low:g}, {high:g}], got {value:g}")
        number("lr", float(self.lr), 0.0, MAX_LR, low_open=True)
        number("aux_weight", float(self.aux_weight), 0.0, 100.0)
        if self.steps < 1:
            raise ConfigError("--steps must be >= 1")
        if not 0 <= self.exit_aware_steps <= self.steps:
            raise ConfigError(f"--exit-aware-steps must be in 0..{self.steps} (--steps), got {self.exit_aware_steps}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.accumulate < 1:
            raise ConfigError(f"--accumulate must be >= 1, got {self.accumulate}")
        if self.save_every < 1:
            raise ConfigError(f"--save-every must be >= 1, got {self.save_every}")
        if not self.crops:
            raise ConfigError("--crops needs at least one SIDExBATCH pair, e.g. 256x8")
        for side, batch in self.crops:
            if not (16 <= side <= MAX_CROP_SIDE and side % 16 == 0 and 1 <= batch <= MAX_CROP_BATCH
                    and side * side * batch <= MAX_CROP_PIXELS):
                raise ConfigError(f"--crops {side}x{batch}: sides are multiples of 16 from 16 to {MAX_CROP_SIDE}, "
                                  f"batches 1 to {MAX_CROP_BATCH}, at most {MAX_CROP_PIXELS // 2**20} Mpixels a step")


MAX_LR = 1.0
"""Above this AdamW diverges at once; the recipes use 1e-4 to 1e-3."""
DIVERGED_FACTOR = 20.0
"""A loss this many times the first step's is divergence, not a spike: the run stops with an error instead of
saving weights that only grow worse (an --lr of 1 took the loss from 5 to 608 in six steps)."""
MAX_CROP_SIDE = 4096
MAX_CROP_BATCH = 1024
MAX_CROP_PIXELS = 64 * 2**20
"""A step's crops in pixels (side x side x batch): 64 Mpixels is 64 crops of 1024 px, far above any recipe."""


SPLIT_FIELDS = ("rank", "world_size", "accumulate")
"""Settings that say how a step's work is split, not what the step is."""


def schedule_of(settings: dict[str, object]) -> dict[str, object]:
    """A settings dict without SPLIT_FIELDS: what a resumed run must match."""
    return {k: v for k, v in settings.items() if k not in SPLIT_FIELDS}


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def pixel_exit_blocks(out: StepOutput, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, H, W): the block each pixel's token left after (depth if it never exited), so a gate's
    deep-supervision loss only covers tokens that actually reached it."""
    per_patch = unmerge(out.exit_block[..., None], token_grid(out.partitions, out.exit_block.device))
    return F.interpolate(per_patch.float(), size=tuple(size), mode="nearest")[:, 0].long()


FREEZABLE = ("encoder", "decoder")


def frozen_parameters(model: StepViT, part: str) -> list[nn.Parameter]:
    """The parameters of one freezable part of a StepViT."""
    if part == "decoder":
        return list(model.decoder.parameters())
    params = [*model.embed.parameters(), *model.blocks.parameters(), *model.norm.parameters(), *model.norm_pre.parameters()]
    params += [t for t in (model.cls_token, model.reg_token) if isinstance(t, nn.Parameter)]
    return params


def _unwrap(model: nn.Module) -> StepViT:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def random_crop(sample: Sample, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A side x side crop (padded with the mean colour / ignore when the image is smaller), maybe flipped."""
    img, lab = sample.image, sample.labels
    h, w = lab.shape
    ph, pw = max(side, h), max(side, w)
    if (ph, pw) != (h, w):
        pad_img = np.empty((ph, pw, 3), np.float32)
        pad_img[:] = PAD_RGB
        pad_img[:h, :w] = img
        pad_lab = np.full((ph, pw), IGNORE_INDEX, np.int32)
        pad_lab[:h, :w] = lab
        img, lab = pad_img, pad_lab
    y = int(rng.integers(0, ph - side + 1))
    x = int(rng.integers(0, pw - side + 1))
    img, lab = img[y:y + side, x:x + side], lab[y:y + side, x:x + side]
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


class CompactCache:
    """Samples kept as uint8 after first use: synthetic scenes cost more to make than to store."""

    def __init__(self, dataset: SegmentationDataset, enabled: bool) -> None:
        self.dataset = dataset
        self.enabled = enabled
        self._store: dict[int, tuple[np.ndarray, np.ndarray, str]] = {}

    def __getitem__(self, i: int) -> Sample:
        if i in self._store:
            img, lab, name = self._store[i]
            return Sample(name, img.astype(np.float32) / 255.0, lab.astype(np.int32))
        s = self.dataset[i]
        if self.enabled and s.labels.max(initial=0) <= 255:
            self._store[i] = ((s.image * 255 + 0.5).astype(np.uint8), s.labels.astype(np.uint8), s.name)
            return self[i]
        return s


class Trainer:
    """Owns the model, optimiser and data for one run; `fit()` trains and checkpoints."""

    def __init__(self, loaded: LoadedModel, dataset: SegmentationDataset, settings: TrainSettings, out: str | Path,
                 device: torch.device, cache: bool = True, setting: ReductionSetting | None = None) -> None:
        """`setting`: what every training forward runs besides the training policy and exits (a method's
        steps, when training with one); the model's own when None."""
        self.ctx = dist.context(device.type)  # rank 0 of 1 unless started by torchrun
        settings = replace(settings, rank=self.ctx.rank, world_size=self.ctx.world_size)
        settings.check()
        if len(dataset) == 0:
            raise ConfigError("the training data set is empty")
        split = settings.world_size * settings.accumulate
        for side, batch in settings.crops:
            if batch % split:
                raise ConfigError(f"--crops {side}x{batch}: a global batch of {batch} cannot be split over "
                                  f"{settings.world_size} process(es) x {settings.accumulate} micro-batch(es)")
            batch //= split
            # the policy network's coarsest level has one cell per 256x256 px; BatchNorm needs two values
            if batch * max(1, side // 256) ** 2 < 2:
                raise ConfigError(f"--crops {side}x{batch * split}: one {side}-px crop per micro-batch leaves the policy "
                                  "network's coarsest level a single cell, too few for batch normalisation; use a "
                                  "larger batch or crops >= 512 px")
        self.loaded = loaded
        self.model: nn.Module = loaded.model.to(device)
        self.setting = (loaded.model.default_setting() if setting is None else setting).to(device)
        self.data = CompactCache(dataset, cache)
        self.n = len(dataset)
        self.s = settings
        self.train_policy = self._training_policy()
        self.out = Path(out)
        self.device = device
        self.state = TrainState()
        self._saved_step = 0
        """The last step written as a checkpoint by this run (0: none yet)."""
        m = _unwrap(self.model)
        for part in settings.freeze:
            if part not in FREEZABLE:
                raise ConfigError(f"--freeze {part!r}: choose from {', '.join(FREEZABLE)}")
            for p in frozen_parameters(m, part):
                p.requires_grad_(False)
        policy_params = list(m.policies["learned"].parameters())
        ids = {id(p) for p in policy_params}
        other = [p for p in m.parameters() if id(p) not in ids and p.requires_grad]
        decay = [p for p in other if p.ndim > 1]
        no_decay = [p for p in other if p.ndim <= 1]
        self.opt = torch.optim.AdamW([
            {"params": decay, "weight_decay": settings.weight_decay, "lr": settings.lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": settings.lr},
            {"params": policy_params, "weight_decay": 1e-4, "lr": settings.policy_lr},
        ])
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.segmenter_params = other
        self.policy_params = policy_params
        self.amp = device.type == "cuda"
        if self.ctx.active:
            if device.type == "cuda":
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # which parameters get gradients varies by step: crops too small for the coarsest policy
            # levels, gates that no token reaches once exits are on
            self.model = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                             find_unused_parameters=True)

    # ---- schedule and data -------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        if step < self.s.warmup:
            return (step + 1) / self.s.warmup
        t = (step - self.s.warmup) / max(1, self.s.steps - self.s.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def _batch_indices(self, step: int) -> tuple[int, list[int]]:
        """Crop side and the data-set indices of the step's global batch."""
        rng = np.random.default_rng([self.s.seed, step])
        side, batch = self.s.crops[int(rng.integers(len(self.s.crops)))]
        return side, rng.integers(0, self.n, size=batch).tolist()

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's positions in the global batch, split into `accumulate` micro-batches."""
        _, idx = self._batch_indices(step)
        mine = list(range(len(idx)))[self.s.rank::self.s.world_size]
        return [mine[m::self.s.accumulate] for m in range(self.s.accumulate)]

    def batch(self, step: int, positions: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Images, labels and per-image seeds at `positions` of the step's global batch (default: all)."""
        side, idx = self._batch_indices(step)
        positions = list(range(len(idx))) if positions is None else positions
        seeds = [int(np.random.SeedSequence([self.s.seed, step, j]).generate_state(1)[0]) for j in positions]
        crops = [random_crop(self.data[idx[j]], side, np.random.default_rng(seed)) for j, seed in zip(positions, seeds)]
        x = torch.from_numpy(np.stack([c[0] for c in crops]).transpose(0, 3, 1, 2).copy())
        y = torch.from_numpy(np.stack([c[1] for c in crops])).long()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), seeds

    # ---- one step ------------------------------------------------------------------------------
    def _training_policy(self) -> str:
        """The partitions training sees: the oracle's (a learned policy's stand-in), or the plain
        grid for a method that runs without supertokens (tome, algm, dtop+X). Resolved once."""
        if not self.s.method:
            return "oracle"
        plan = resolve(self.s.method).plan(facts_of(_unwrap(self.model), {"policy": True, "exits": True}, "learned"))
        return "none" if plan.policy == "none" else "oracle"

    def exit_aware(self, step: int) -> bool:
        return step >= self.s.steps - self.s.exit_aware_steps

    def losses(self, x: torch.Tensor, y: torch.Tensor, exits: bool = False,
               seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
        m = _unwrap(self.model)
        setting = replace(self.setting, policy=self.train_policy, exits=exits)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(x, y, return_aux=True, sample_seeds=seeds, setting=setting)
            size = y.shape[-2:]
            seg = F.cross_entropy(F.interpolate(out.patch_logits.float(), size=size, mode="bilinear", align_corners=False),
                                  y, ignore_index=IGNORE_INDEX)
            reached = pixel_exit_blocks(out, size) if exits else None
            aux = []
            for block, logits in out.aux_patch_logits.items():
                target = y if reached is None else torch.where(reached >= block, y, torch.full_like(y, IGNORE_INDEX))
                aux.append(F.cross_entropy(F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False),
                                           target, ignore_index=IGNORE_INDEX))
            policy_logits = out.aux_policy_logits
        targets = block_homogeneity(y, MAX_LEVEL, m.patch_size)
        bce = [F.binary_cross_entropy_with_logits(lg.float(), t.float()) for lg, t in zip(policy_logits, targets) if t.numel()]
        aux_loss = torch.stack(aux).sum() if aux else seg.new_zeros(())
        policy_loss = torch.stack(bce).mean() if bce else seg.new_zeros(())
        # levels with no block at this crop size take part with weight zero, so every output of the
        # forward is in the loss (what DistributedDataParallel's bookkeeping expects)
        policy_loss = policy_loss + sum((lg.float().sum() * 0.0 for lg in policy_logits if not lg.numel()),
                                        seg.new_zeros(()))
        total = seg + self.s.aux_weight * aux_loss + self.s.policy_weight * policy_loss
        return {"loss": total, "seg": seg, "aux": aux_loss, "policy": policy_loss}

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step over the global batch: this process's micro-batches, gradients averaged
        over processes by DDP; the losses returned are the global batch's (averaged over processes)."""
        self.model.train()
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * self.lr_factor(step)
        self.opt.zero_grad(set_to_none=True)
        micro = self.micro_batches(step)
        totals: dict[str, float] = {}
        for k, positions in enumerate(micro):
            x, y, seeds = self.batch(step, positions)
            sync = k == len(micro) - 1 or not isinstance(self.model, DDP)
            with contextlib.nullcontext() if sync else self.model.no_sync():  # type: ignore[operator]
                losses = self.losses(x, y, exits=self.exit_aware(step), seeds=seeds)
                (losses["loss"] / len(micro)).backward()
            for name, v in losses.items():
                totals[name] = totals.get(name, 0.0) + float(v.detach()) / len(micro)
        # the segmenter and the policy network have separate objectives: clip them separately
        torch.nn.utils.clip_grad_norm_(self.segmenter_params, 1.0)
        torch.nn.utils.clip_grad_norm_(self.policy_params, 1.0)
        self.opt.step()
        names = sorted(totals)
        mean = dist.all_reduce_sum(self.ctx, np.array([totals[n] for n in names])) / self.ctx.world_size
        return dict(zip(names, (float(v) for v in mean)))

    # ---- checkpoints ---------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        tensors, _ = checkpoint_paths(self.out)
        return tensors.with_suffix(".train.pt")

    def save(self, metadata: dict[str, object] | None = None) -> None:
        m = _unwrap(self.model)
        if not all(bool(torch.isfinite(p).all()) for p in m.parameters()):  # NaN/inf weights: never a checkpoint
            kept = f"the checkpoint of step {self._saved_step} is kept" if self._saved_step else "nothing was written"
            raise ConfigError(f"training diverged by step {self.state.step} (weights are no longer finite); {kept}; "
                              "lower --lr")
        self._saved_step = self.state.step
        if self.s.rank != 0:
            return
        meta = {"train_settings": self.s.to_dict(), "step": self.state.step, **(metadata or {})}
        save_checkpoint(m, self.out, trained={"backbone": True, "decoder": True, "exits": True, "policy": True},
                        metadata=meta)
        blob = {"step": self.state.step, "optimizer": self.opt.state_dict(), "settings": self.s.to_dict(),
                "history": json.dumps(self.state.history)}
        atomic_write(self.state_path, lambda f: torch.save(blob, f), mode="wb")

    def resume(self) -> None:
        """Continue from the checkpoint and optimiser state under `out` (temporary files a killed
        run left beside them are removed first)."""
        if not self.state_path.is_file():
            raise CheckpointError(f"nothing to resume: {self.state_path} does not exist")
        tensors, meta = checkpoint_paths(self.out)
        for name in (self.state_path.name, tensors.name, meta.name):
            for stale in self.state_path.parent.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        loaded = load_checkpoint(self.out)
        _unwrap(self.model).load_state_dict(loaded.model.state_dict())
        try:
            blob = torch.load(self.state_path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises several types for damaged files
            raise CheckpointError(f"{self.state_path}: cannot read training state ({exc})") from None
        if schedule_of(blob["settings"]) != self.s.schedule():
            raise ConfigError("--resume needs the same training settings as the interrupted run "
                              "(the number of processes and --accumulate may change)")
        self.opt.load_state_dict(blob["optimizer"])
        self.state = TrainState(int(blob["step"]), json.loads(blob["history"]))
        self._saved_step = self.state.step

    def fit(self, progress: TrainProgress | None = None) -> TrainState:
        """Train from `state.step` to `steps`, saving every `save_every` steps and at the end."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        while self.state.step < self.s.steps:
            losses = self.step(self.state.step)
            first = self.state.history[0]["loss"] if self.state.history else losses["loss"]
            if not all(math.isfinite(v) for v in losses.values()) or losses["loss"] > DIVERGED_FACTOR * first:
                kept = f"the checkpoint of step {self._saved_step} is kept" if self._saved_step else "nothing was written"
                raise ConfigError(f"training diverged at step {self.state.step} (loss {losses['loss']:.4g}, "
                                  f"{first:.4g} at the first step); {kept}; lower --lr")
            self.state.step += 1
            losses["step"] = self.state.step
            losses["seconds"] = time.perf_counter() - t0
            self.state.history.append(losses)
            if progress:
                progress(self.state.step, self.s.steps, losses)
            if self.state.step % self.s.save_every == 0 or self.state.step == self.s.steps:
                self.save()
        dist.barrier(self.ctx, "final checkpoint written")  # every rank may now read it
        return self.state
