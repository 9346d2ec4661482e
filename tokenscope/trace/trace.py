"""The Trace: what happened to every token of one image. The contract between model and renderers.

On disk a trace is two files in one folder (format "tokenscope-trace", version 2; version 1,
written before in-network merging existed, still loads: it simply has no merges):

- `trace.json`: `{"format", "version", "meta": {...}, "arrays": [names]}`; `meta` holds the image
  (source, original/input/padded size, patch grid), the model (name, arch, depth, exit blocks,
  thresholds, policy, exits on/off, weights id, class names), FLOPs and timings;
- `trace.npz`: the arrays below, by name.

| array | shape | meaning |
|---|---|---|
| token_of_patch | (gh, gw) int32 | token id of every patch (patch side = padded size / grid) |
| token_level | (T,) int8 | superpatch level (side 2**level patches) |
| token_row, token_col | (T,) int32 | top-left patch of the token |
| token_exit_block | (T,) int16 | blocks the token went through (depth = reached the end) |
| token_confidence | (T,) float32 | top-1 probability of its final prediction |
| token_class | (T,) int32 | its predicted class |
| block_tokens_in | (depth,) int32 | patch-derived tokens entering each block (hooks) |
| block_flops | (depth,) int64 | FLOPs of each block (2 per multiply-add) |
| label_map | (h, w) int32 | predicted class per pixel at the input size |
| policy_score_l1..l4 | (gh>>k, gw>>k) float32 | the policy's merge score per aligned block |
| patch_labels | (gh, gw) int32, optional | ground-truth majority class of each patch (255 = none), when labels were given |
| token_held_at | (T,) int16, optional | the first gate that held the token back although it qualified to exit (keep-per-class rule; 0 = never) |
| token_merged_at | (T,) int16, v2 with merging | the block inside which the token merged into another (0 = never) |
| token_merged_into | (T,) int32, v2 with merging | the token it merged into (-1 = none) |
| block_tokens_mid | (depth,) int32, v2 with merging or pruning | tokens left for each block's MLP after merging or pruning inside it |
| token_pruned_at | (T,) int16, v2 with pruning | the block at which a pruning step removed the token (0 = never); its exit block is that block and its prediction the decoder's, from the features it had then |

Tokens are the policy's partition (one per supertoken or patch). In-network merging (ToMe, ALGM)
joins tokens inside blocks; the merge forest (`token_merged_at`, `token_merged_into`) is the
compressed record of which token covers every patch at every block (`cover_at`). A merged-away
token reports the exit block, class and confidence of the token it finally belongs to. Pruning
(EViT, a user's rule) removes tokens inside or after a block (`meta.pruning` says where): a pruned
token stops there like an exit, without a gate; its prediction comes from the decoder.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tokenscope.errors import ConfigError, RunFolderError, TokenscopeError
from tokenscope.schema import number, read_json, whole
from tokenscope.storage import atomic_write, writing

TRACE_FORMAT = "tokenscope-trace"
TRACE_VERSION = 2
TRACE_JSON = "trace.json"
TRACE_NPZ = "trace.npz"
IMAGE_FILES = ("image.png", "image.jpg")
"""The processed image saved beside a trace: PNG, or JPEG for the frames of a video (already
lossy-compressed; a JPEG is written fifteen times faster, and a clip writes one per frame)."""


def image_beside(folder: str | os.PathLike[str]) -> Path:
    """The image file saved beside the trace in `folder` (image.png when there is none, for the
    caller's message about a missing file)."""
    d = Path(folder)
    for name in IMAGE_FILES:
        if (d / name).is_file():
            return d / name
    return d / IMAGE_FILES[0]


def resolve_chains(step: np.ndarray) -> np.ndarray:
    """Follow `step` (token -> the token it merged into, or itself) to the end of every chain.

    Merges only go to tokens still live, so chains are acyclic; pointer doubling ends them in
    O(log T) rounds (T rounds at most, should a damaged trace hold a cycle)."""
    owner = np.asarray(step, dtype=np.int64)
    for _ in range(max(len(owner), 1)):
        nxt = owner[owner]
        if np.array_equal(nxt, owner):
            break
        owner = nxt
    return owner


class TraceInconsistency(AssertionError):
    """A trace breaks the accounting invariant: a bug, never a user error."""


def narrowest(a: np.ndarray) -> np.ndarray:
    """Class maps stored as uint8/uint16 when their values fit (loading widens them again): a
    1024 px label map compresses and decompresses four times faster, and a video run saves and
    re-reads one per frame."""
    if a.size == 0 or a.dtype.kind not in "iu" or int(a.min()) < 0:
        return a
    top = int(a.max())
    return a.astype(np.uint8) if top < 256 else a.astype(np.uint16) if top < 65536 else a


def _write_npz(file: Any, arrays: dict[str, np.ndarray]) -> None:
    """What np.savez_compressed writes (np.load reads it), at deflate level 1: half the time of
    numpy's level 6 for files a third larger (about 10 KB at 512 px), paid once per image or frame."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, a in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(a), allow_pickle=False)


def _write_file(path: Path, mode: str, write: Callable[[Any], None], atomic: bool) -> None:
    """`write(file)` into `path`: through a temporary file renamed over it (`atomic`), or in place
    when the folder itself appears atomically (a run's partial image folder)."""
    if not atomic:
        with writing(path), open(path, mode) as f:
            write(f)
        return
    atomic_write(path, write, mode, file_mode=0o644)


MAX_MEMBER_BYTES = 1 << 30
"""The largest array a trace holds unpacked (a 16384 x 16384 label map as int32 is 1 GiB)."""


def check_meta(meta: "TraceMeta", arrays: dict[str, np.ndarray], where: Path) -> None:
    """The meta must agree with the arrays it describes and stay in sizes a trace can have: a hand-edited
    trace.json (a 100,000 x 100,000 grid, a depth of "x", a billion classes) is one line, never an
    allocation of terabytes or a TypeError deep in a renderer."""
    def fail(msg: str) -> None:
        raise RunFolderError(f"{where}: {msg}; re-run the image")

    for name in ("original_hw", "input_hw", "padded_hw", "grid"):
        v = getattr(meta, name)
        if len(v) != 2 or not all(whole(x, 0, 1 << 20) for x in v):
            fail(f"meta.{name} must be two whole numbers, got {list(v)[:4]!r}")
    for name in ("source", "model", "arch", "policy", "weights", "method", "device"):
        if not isinstance(getattr(meta, name), str):
            fail(f"meta.{name} must be text, got {type(getattr(meta, name)).__name__}")
    for name in ("flops", "timings"):
        value = getattr(meta, name)
        if not isinstance(value, dict) or not all(isinstance(k, str) and number(v) for k, v in value.items()):
            fail(f"meta.{name} must map names to numbers")
    for name in ("merging", "pruning"):
        if not isinstance(getattr(meta, name), dict):
            fail(f"meta.{name} must be a JSON object")
    if not isinstance(meta.exits, bool) or not number(meta.exit_threshold) or not all(
            number(v) for v in meta.merge_thresholds) or not all(isinstance(c, str) for c in meta.class_names):
        fail("meta.exits, exit_threshold, merge_thresholds or class_names has the wrong type")
    for name in ("num_prefix_tokens", "keep_per_class", "queries", "queries_join_at"):
        if not whole(getattr(meta, name), 0, 1 << 16):
            fail(f"meta.{name} must be a whole number, got {getattr(meta, name)!r}")
    if not whole(meta.depth, 1, 4096) or not whole(meta.num_classes, 1, 65535):
        fail(f"meta.depth {meta.depth!r} or meta.num_classes {meta.num_classes!r} is not a plausible whole number")
    if not all(whole(k, 1, meta.depth) for k in meta.exit_after):
        fail(f"meta.exit_after {list(meta.exit_after)[:8]!r} must be blocks 1..{meta.depth}")
    if tuple(arrays["token_of_patch"].shape) != tuple(meta.grid):
        fail(f"meta.grid {list(meta.grid)} disagrees with token_of_patch {list(arrays['token_of_patch'].shape)}")
    if tuple(arrays["label_map"].shape) != tuple(meta.input_hw):
        fail(f"meta.input_hw {list(meta.input_hw)} disagrees with label_map {list(arrays['label_map'].shape)}")
    gh, gw = meta.grid
    ph, pw = meta.padded_hw
    if gh == 0 or gw == 0 or ph % gh or pw % gw or ph // gh != pw // gw or ph // gh > 1024:
        fail(f"meta.padded_hw {list(meta.padded_hw)} is not the grid {list(meta.grid)} of square patches")
    if arrays["block_tokens_in"].shape != (meta.depth,):
        fail(f"meta.depth {meta.depth} disagrees with block_tokens_in ({arrays['block_tokens_in'].shape[0]} blocks)")


_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[biufc]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), \}\s*$")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, as np.load gives them, in half its time: numpy parses every
    member's header with the Python compiler (a third of reading a trace), where the headers
    tokenscope writes (plain numbers, C order) need one regular expression. Anything else goes
    through np.load."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.file_size > MAX_MEMBER_BYTES:  # checked before a byte is inflated (a zip bomb says so here)
                raise ValueError(f"member {info.filename} would unpack to {info.file_size} bytes, more than a trace "
                                 f"holds ({MAX_MEMBER_BYTES})")
            data = zf.read(info)
            name = info.filename.removesuffix(".npy")
            if data[:6] != b"\x93NUMPY":
                raise ValueError(f"{info.filename} is not a numpy array")
            start = 10 if data[6] == 1 else 12
            size = int.from_bytes(data[8:start], "little")
            m = _NPY_HEADER.match(data[start:start + size].decode("latin1"))
            if m is None:
                out[name] = np.load(io.BytesIO(data), allow_pickle=False)
                continue
            shape = tuple(int(x) for x in m.group(2).split(",") if x.strip())
            flat = np.frombuffer(data, dtype=np.dtype(m.group(1)), count=math.prod(shape), offset=start + size)
            out[name] = flat.reshape(shape).copy()
    return out


@dataclass
class TraceMeta:
    """Everything about the run of one image that is not an array."""

    source: str
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    grid: tuple[int, int]
    model: str
    arch: str
    depth: int
    num_prefix_tokens: int
    exit_after: tuple[int, ...]
    exit_threshold: float
    merge_thresholds: tuple[float, ...]
    policy: str
    exits: bool
    weights: str
    num_classes: int
    class_names: tuple[str, ...] = ()
    class_colours: tuple[tuple[int, int, int], ...] = ()
    device: str = "cpu"
    keep_per_class: int = 0
    """Tokens of each class held back at every gate (DToP's context rule; 0 = off)."""
    method: str = ""
    """Token-reduction method (step, dcts, dtop, cts, tome, algm, X+tome, ...); "" in version-1 traces."""
    merging: dict[str, Any] = field(default_factory=dict)
    """In-network merging settings (kind, blocks, r, thresholds, prop_attn, order, count); empty without merging."""
    queries: int = 0
    """Queries of a head inside the encoder (EoMT's), never image tokens; 0 for other models."""
    queries_join_at: int = 0
    """1-based block from which those queries go through the encoder (the query blocks); 0 = none."""
    pruning: dict[str, Any] = field(default_factory=dict)
    """Pruning steps: the method's settings and the blocks they act `inside` and `after`; empty without pruning."""
    flops: dict[str, int] = field(default_factory=dict)
    """Measured or modelled FLOPs by part: policy, embed, blocks, gates, decoder, total, baseline_total."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds, where measured (e.g. forward)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceMeta":
        kw = dict(d)
        for key in ("original_hw", "input_hw", "padded_hw", "grid", "exit_after", "merge_thresholds", "class_names"):
            kw[key] = tuple(kw.get(key, ()))
        kw["class_colours"] = tuple(tuple(int(v) for v in c) for c in kw.get("class_colours", ()))
        return cls(**kw)

    @property
    def method_name(self) -> str:
        """The method, or for version-1 traces the one their policy and exits amount to."""
        if self.method:
            return self.method
        if self.policy == "none":
            return "dtop" if self.exits else "vit"
        return "step" if self.exits else "dcts"

    @property
    def merge_blocks(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.merging.get("blocks", ()))

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else f"class_{c}"


OPTIONAL_MERGE_ARRAYS = {"token_merged_at": np.int16, "token_merged_into": np.int32, "block_tokens_mid": np.int32,
                         "token_pruned_at": np.int16}
ARRAYS = ("token_of_patch", "token_level", "token_row", "token_col", "token_exit_block", "token_confidence",
          "token_class", "block_tokens_in", "block_flops", "label_map")
DTYPES = {"token_of_patch": np.int32, "token_level": np.int8, "token_row": np.int32, "token_col": np.int32,
          "token_exit_block": np.int16, "token_confidence": np.float32, "token_class": np.int32,
          "block_tokens_in": np.int32, "block_flops": np.int64, "label_map": np.int32}


@dataclass
class Trace:
    """One image's token accounting (see the module docstring for the fields)."""

    meta: TraceMeta
    token_of_patch: np.ndarray
    token_level: np.ndarray
    token_row: np.ndarray
    token_col: np.ndarray
    token_exit_block: np.ndarray
    token_confidence: np.ndarray
    token_class: np.ndarray
    block_tokens_in: np.ndarray
    block_flops: np.ndarray
    label_map: np.ndarray
    policy_scores: list[np.ndarray] = field(default_factory=list)
    patch_labels: np.ndarray | None = None
    token_held_at: np.ndarray | None = None
    token_merged_at: np.ndarray | None = None
    token_merged_into: np.ndarray | None = None
    block_tokens_mid: np.ndarray | None = None
    token_pruned_at: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ARRAYS:
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=DTYPES[name]))
        self.policy_scores = [np.asarray(s, dtype=np.float32) for s in self.policy_scores]
        if self.patch_labels is not None:
            self.patch_labels = np.ascontiguousarray(self.patch_labels, dtype=np.int32)
        if self.token_held_at is not None:
            self.token_held_at = np.ascontiguousarray(self.token_held_at, dtype=np.int16)
        for name, dtype in OPTIONAL_MERGE_ARRAYS.items():
            if getattr(self, name) is not None:
                setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))

    # ---- derived views -------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.token_level.shape[0])

    @property
    def patch_size(self) -> int:
        """Side of one patch in pixels, from the padded size and the grid (16 for traces of ViT/16)."""
        return int(self.meta.padded_hw[0] // max(self.meta.grid[0], 1))

    @property
    def num_patches(self) -> int:
        return int(self.token_of_patch.size)

    @property
    def token_side(self) -> np.ndarray:
        return (1 << self.token_level.astype(np.int32)).astype(np.int32)

    @property
    def token_patches(self) -> np.ndarray:
        return self.token_side**2

    @property
    def exited_early(self) -> np.ndarray:
        return self.token_exit_block < self.meta.depth

    @property
    def reduction(self) -> float:
        """Patches per token: how many times fewer tokens than 16x16 patching."""
        return self.num_patches / max(self.num_tokens, 1)

    @property
    def has_merges(self) -> bool:
        """Whether the trace records in-network merging (version 2 with a merging method)."""
        return self.token_merged_at is not None

    @property
    def survivors(self) -> np.ndarray:
        """(T,) bool: tokens never merged into another, i.e. the groups that exit or reach the end
        (every token without in-network merging)."""
        if self.token_merged_at is None:
            return np.ones(self.num_tokens, dtype=bool)
        return self.token_merged_at == 0

    @property
    def mean_tokens_per_block(self) -> float:
        """Tokens the average encoder block works on (exits and merges included): the number that
        FLOPs follow, comparable across methods."""
        return float(self.tokens_in_block().mean()) if self.meta.depth else 0.0

    def entering(self, block: int) -> np.ndarray:
        """(T,) bool: the tokens that enter block `block` (1-based) as their own token: neither
        exited at an earlier gate nor merged into another inside an earlier block."""
        alive = self.token_exit_block >= block
        if self.token_merged_at is not None:
            alive &= (self.token_merged_at == 0) | (self.token_merged_at >= block)
        return alive

    def final_owner(self) -> np.ndarray:
        """(T,) the token whose prediction each token ends with (itself unless merged away)."""
        return self.owner_before(self.meta.depth + 1)

    def owner_before(self, block: int) -> np.ndarray:
        """(T,) the token standing for each token as block `block` (1-based) begins; merges made
        inside that block or later are not applied yet. depth + 1 = after the encoder."""
        if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or not 1 <= block <= self.meta.depth + 1:
            raise ConfigError(f"block {block!r}: blocks are counted from 1 to {self.meta.depth + 1} (depth + 1 = after "
                              "the encoder)")
        t = self.num_tokens
        own = np.arange(t)
        if self.token_merged_at is None or self.token_merged_into is None:
            return own
        at = self.token_merged_at.astype(np.int64)
        return resolve_chains(np.where((at > 0) & (at < block), self.token_merged_into.astype(np.int64), own))

    def cover_at(self, block: int) -> np.ndarray:
        """(gh, gw) which token covers each patch as block `block` begins (1-based; the policy's
        partition at block 1, merged groups later; depth + 1 = after the encoder)."""
        return self.owner_before(block)[self.token_of_patch]

    def merges_per_block(self) -> np.ndarray:
        """(depth,) tokens merged away inside each block."""
        out = np.zeros(self.meta.depth, dtype=np.int64)
        if self.token_merged_at is not None:
            at = self.token_merged_at[self.token_merged_at > 0].astype(np.int64)
            np.add.at(out, at - 1, 1)
        return out

    def tokens_in_block(self) -> np.ndarray:
        """(depth,) tokens each block worked on: entering it, or after its in-block merge, averaged
        over the block's attention and MLP halves (for token counts that match FLOPs)."""
        tin = self.block_tokens_in.astype(np.float64)
        mid = tin if self.block_tokens_mid is None else self.block_tokens_mid.astype(np.float64)
        return (tin + mid) / 2

    def gate_exits(self) -> dict[int, int]:
        """Tokens leaving at each gate (a merged group counts once)."""
        return {k: int(np.sum(self.survivors & (self.token_exit_block == k))) for k in self.meta.exit_after}

    def per_patch(self, values: np.ndarray) -> np.ndarray:
        """Broadcast a per-token array to the patch grid (un-merging)."""
        return np.asarray(values)[self.token_of_patch]

    # ---- the accounting invariant --------------------------------------------------------
    def assert_consistent(self) -> None:
        """Every patch belongs to exactly one token, every token exits exactly once, and the
        per-block counts recorded by hooks equal what the exits imply."""
        m = self.meta
        gh, gw = m.grid
        t = self.num_tokens

        def fail(msg: str) -> None:
            raise TraceInconsistency(f"{m.source}: {msg}")

        if self.token_of_patch.shape != (gh, gw):
            fail(f"token_of_patch has shape {self.token_of_patch.shape}, grid is {(gh, gw)}")
        for name in ("token_row", "token_col", "token_exit_block", "token_confidence", "token_class"):
            if getattr(self, name).shape != (t,):
                fail(f"{name} has shape {getattr(self, name).shape}, expected ({t},)")
        if t == 0:
            fail("no tokens")
        if self.token_of_patch.min() < 0 or self.token_of_patch.max() >= t:
            fail("token_of_patch refers to tokens that do not exist")
        side = self.token_side
        if np.any(self.token_row % side) or np.any(self.token_col % side):
            fail("a supertoken is not aligned to its level's grid")
        if np.any(self.token_row + side > gh) or np.any(self.token_col + side > gw):
            fail("a supertoken sticks out of the patch grid")
        if int(np.sum(side.astype(np.int64) ** 2)) != gh * gw:
            fail(f"tokens cover {int(np.sum(side.astype(np.int64) ** 2))} patches, the grid has {gh * gw}")
        owns = np.ones(t, dtype=bool)  # token i's whole square maps to i (one level at a time, no loop over tokens)
        covered = np.zeros(gh * gw, dtype=np.int64)
        for s in np.unique(side).tolist():
            idx = np.nonzero(side == s)[0]
            dr, dc = np.divmod(np.arange(s * s), s)
            rows = self.token_row[idx, None].astype(np.int64) + dr
            cols = self.token_col[idx, None].astype(np.int64) + dc
            owns[idx] = np.all(self.token_of_patch[rows, cols] == idx[:, None], axis=1)
            covered += np.bincount((rows * gw + cols).ravel(), minlength=gh * gw)
        if not owns.all():
            i = int(np.argmin(owns))
            fail(f"token {i} (level {self.token_level[i]}) does not own its square at patch "
                 f"({self.token_row[i]}, {self.token_col[i]})")
        if not np.all(covered == 1):
            fail("some patches belong to no token")
        pruned = np.zeros(t, dtype=bool) if self.token_pruned_at is None else self.token_pruned_at > 0
        if self.token_pruned_at is not None:
            self._check_prunes(fail)
        if self.has_merges:  # a token merged into one that was pruned later left with it
            pruned = pruned | pruned[self.final_owner()]
        allowed = set(int(k) for k in m.exit_after) | {m.depth}
        seen = set(np.unique(self.token_exit_block[~pruned]).tolist())
        if not seen <= allowed:
            fail(f"exit blocks {sorted(seen - allowed)} are neither gates {list(m.exit_after)} nor the end ({m.depth})")
        if not m.exits and np.any((self.token_exit_block != m.depth) & ~pruned):
            fail("tokens exited early although exits were off")
        if self.block_tokens_in.shape != (m.depth,) or self.block_flops.shape != (m.depth,):
            fail("per-block arrays do not have one entry per block")
        if self.has_merges:
            self._check_merges(fail)
        implied = np.array([np.sum(self.entering(b)) for b in range(1, m.depth + 1)], dtype=np.int64)
        if not np.array_equal(implied, self.block_tokens_in.astype(np.int64)):
            fail(f"tokens entering blocks {self.block_tokens_in.tolist()} differ from what exits and merges imply "
                 f"{implied.tolist()}")
        if self.block_tokens_mid is not None:
            mid = implied - self.merges_per_block() - self.pruned_inside_per_block()
            if not np.array_equal(mid, self.block_tokens_mid.astype(np.int64)):
                fail(f"tokens after in-block merging {self.block_tokens_mid.tolist()} differ from entering minus "
                     f"merged {mid.tolist()}")
        if self.label_map.shape != tuple(m.input_hw):
            fail(f"label map is {self.label_map.shape}, input size is {tuple(m.input_hw)}")
        if self.patch_labels is not None and self.patch_labels.shape != (gh, gw):
            fail(f"patch_labels has shape {self.patch_labels.shape}, grid is {(gh, gw)}")
        if self.token_held_at is not None:
            held = self.token_held_at.astype(np.int64)
            if held.shape != (t,):
                fail(f"token_held_at has shape {held.shape}, expected ({t},)")
            if not set(np.unique(held).tolist()) <= {0} | set(int(k) for k in m.exit_after):
                fail("a token was held back at a block that has no gate")
            if np.any((held > 0) & (self.token_exit_block <= held)):
                fail("a token held back at a gate exited there or earlier")

    def _check_prunes(self, fail: Any) -> None:
        """Pruning rules: a pruned token stops where it was pruned, at a block where pruning acts."""
        m, t = self.meta, self.num_tokens
        at = self.token_pruned_at.astype(np.int64)  # type: ignore[union-attr]
        if at.shape != (t,):
            fail(f"token_pruned_at has shape {at.shape}, expected ({t},)")
        if self.block_tokens_mid is None:
            fail("a trace with token_pruned_at needs block_tokens_mid")
        where = set(int(k) for k in m.pruning.get("inside", ())) | set(int(k) for k in m.pruning.get("after", ()))
        used = set(np.unique(at[at > 0]).tolist())
        if not used <= where:
            fail(f"tokens pruned at blocks {sorted(used - where)} but pruning acts at {sorted(where)}")
        if np.any((at > 0) & (self.token_exit_block != at)):
            fail("a pruned token's exit block is not the block that pruned it")

    def pruned_inside_per_block(self) -> np.ndarray:
        """(depth,) tokens pruned inside each block (before its MLP)."""
        out = np.zeros(self.meta.depth, dtype=np.int64)
        if self.token_pruned_at is not None:
            inside = set(int(k) for k in self.meta.pruning.get("inside", ()))
            at = self.token_pruned_at.astype(np.int64)
            sel = at[(at > 0) & np.isin(at, sorted(inside))]
            np.add.at(out, sel - 1, 1)
        return out

    def pruned_per_block(self) -> np.ndarray:
        """(depth,) tokens pruned at each block (inside it or after it)."""
        out = np.zeros(self.meta.depth, dtype=np.int64)
        if self.token_pruned_at is not None:
            at = self.token_pruned_at.astype(np.int64)
            np.add.at(out, at[at > 0] - 1, 1)
        return out

    def _check_merges(self, fail: Any) -> None:
        """Version-2 rules: merges happen in merging blocks, into tokens still live there, and at
        every block each patch is covered by exactly one token that is live or has exited."""
        m, t = self.meta, self.num_tokens
        if self.token_merged_into is None or self.block_tokens_mid is None:
            fail("a trace with token_merged_at needs token_merged_into and block_tokens_mid")
        at = self.token_merged_at.astype(np.int64)  # type: ignore[union-attr]
        into = self.token_merged_into.astype(np.int64)  # type: ignore[union-attr]
        if at.shape != (t,) or into.shape != (t,) or self.block_tokens_mid.shape != (m.depth,):  # type: ignore[union-attr]
            fail("merge arrays do not have one entry per token (per block for block_tokens_mid)")
        if not set(np.unique(at).tolist()) <= {0} | set(m.merge_blocks):
            fail(f"tokens merged in blocks {sorted(set(np.unique(at).tolist()) - {0})} but merging acts in {list(m.merge_blocks)}")
        if np.any((at > 0) != (into >= 0)) or np.any(into >= t):
            fail("token_merged_into must name a token exactly for the tokens that merged")
        src = np.nonzero(at > 0)[0]
        dst = into[src]
        if np.any(dst == src):
            fail("a token merged into itself")
        if np.any((at[dst] != 0) & (at[dst] <= at[src])):
            fail("a token merged into one that had already merged away (or did so in the same block)")
        if np.any(self.token_exit_block[src] < at[src]):
            fail("a token merged after its group had exited")
        owner = self.final_owner()
        if np.any(at[owner] != 0):
            fail("a merge chain does not end in a token that stayed")
        rebuilt = bool(m.merging.get("reconstructed"))  # a reconstruction gives merged tokens their own prediction
        for name in ("token_exit_block",) if rebuilt else ("token_exit_block", "token_class", "token_confidence"):
            values = getattr(self, name)
            if not np.array_equal(values[owner], values):
                fail(f"{name} of a merged token differs from the token it ended in")
        for block in range(1, m.depth + 2):
            own = self.owner_before(block)
            live = (at == 0) | (at >= block)
            if not live[own].all():
                fail(f"at block {block} a patch is covered by a token that had merged away")
            area = np.bincount(own[self.token_of_patch].ravel(), minlength=t)
            if int(area.sum()) != self.num_patches or np.any(area[~live] != 0):
                fail(f"at block {block} the live tokens do not cover every patch exactly once")

    # ---- persistence ---------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str], atomic: bool = True) -> None:
        """Write trace.json + trace.npz into `folder`, each file replaced atomically (`atomic=False`:
        written in place, for a folder that is itself renamed into place once complete)."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in ARRAYS}
        for k, s in enumerate(self.policy_scores, start=1):
            arrays[f"policy_score_l{k}"] = s
        if self.patch_labels is not None:
            arrays["patch_labels"] = self.patch_labels
        if self.token_held_at is not None:
            arrays["token_held_at"] = self.token_held_at
        for name in OPTIONAL_MERGE_ARRAYS:
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        doc = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "meta": asdict(self.meta), "arrays": sorted(arrays)}
        for name in ("label_map", "patch_labels"):
            if name in arrays:
                arrays[name] = narrowest(arrays[name])
        _write_file(d / TRACE_NPZ, "wb", lambda f: _write_npz(f, arrays), atomic)
        _write_file(d / TRACE_JSON, "w", lambda f: json.dump(doc, f, indent=1), atomic)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "Trace":
        d = Path(folder)
        try:
            doc = read_json(d / TRACE_JSON, TRACE_JSON, kind=object)
        except FileNotFoundError:
            raise RunFolderError(f"{d}: no {TRACE_JSON} here; is this an image folder of a tokenscope run?") from None
        if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
            raise RunFolderError(f"{d / TRACE_JSON}: not a tokenscope trace")
        version = doc.get("version", 0)
        if not isinstance(version, int) or not 1 <= version <= TRACE_VERSION:
            raise RunFolderError(f"{d / TRACE_JSON}: trace version {version!r} is unknown to this tokenscope "
                                 f"(it reads versions 1..{TRACE_VERSION})")
        if not (d / TRACE_NPZ).is_file():
            raise RunFolderError(f"{d / TRACE_NPZ}: missing")
        try:
            arrays = _read_npz(d / TRACE_NPZ)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunFolderError(f"{d / TRACE_NPZ}: damaged ({first}); re-run the image") from None
        missing = [a for a in ARRAYS if a not in arrays]
        if missing:
            raise RunFolderError(f"{d / TRACE_NPZ}: missing arrays {missing}")
        scores = [arrays[f"policy_score_l{k}"] for k in range(1, 9) if f"policy_score_l{k}" in arrays]
        try:
            meta = TraceMeta.from_dict(doc["meta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RunFolderError(f"{d / TRACE_JSON}: damaged meta ({type(exc).__name__}: {exc})") from None
        check_meta(meta, arrays, d / TRACE_JSON)
        return cls(meta=meta, policy_scores=scores, patch_labels=arrays.get("patch_labels"),
                   token_held_at=arrays.get("token_held_at"),
                   **{name: arrays.get(name) for name in OPTIONAL_MERGE_ARRAYS},
                   **{a: arrays[a] for a in ARRAYS})


def trace_folders(image_dir: str | os.PathLike[str]) -> list[Path]:
    """The folders holding the traces of one image folder: its sliding-window folders (`w00`, `w01`,
    ...) when it has no trace of its own, else the folder itself."""
    d = Path(image_dir)
    if (d / TRACE_JSON).exists() or not d.is_dir():
        return [d]
    windows = sorted(p for p in d.iterdir() if p.is_dir() and p.name[:1] == "w" and p.name[1:].isdigit())
    return windows or [d]


def trace_damage(folder: str | os.PathLike[str]) -> str | None:
    """A one-line description of what is wrong with the trace files of an image folder (or of its
    window folders `w00`, `w01`, ...), or None when they look whole. Cheap: the JSON is parsed, the
    npz's zip directory read and each member's first 128 bytes (its array header: a pickled object
    array is refused) inflated, no array whole (about 0.7 ms a folder here; 10,000 images in seconds)."""
    d = Path(folder)
    if not d.is_dir():
        return f"{d}: image folder missing"
    for t in trace_folders(d):
        try:
            doc = read_json(t / TRACE_JSON, TRACE_JSON, kind=object)
        except FileNotFoundError:
            return f"{t}: no {TRACE_JSON}"
        except TokenscopeError as exc:
            return str(exc)
        if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
            return f"{t / TRACE_JSON}: not a tokenscope trace"
        if not isinstance(doc.get("version"), int) or not 1 <= doc["version"] <= TRACE_VERSION:
            return f"{t / TRACE_JSON}: trace version {doc.get('version')!r} is unknown to this tokenscope"
        npz = t / TRACE_NPZ
        if not npz.is_file():
            return f"{t}: no {TRACE_NPZ}"
        if not zipfile.is_zipfile(npz):
            return f"{npz}: damaged (not a whole npz file)"
        try:
            with zipfile.ZipFile(npz) as zf:
                for info in zf.infolist():
                    if info.file_size > MAX_MEMBER_BYTES:
                        return f"{npz}: damaged (member {info.filename} would unpack to {info.file_size} bytes)"
                    with zf.open(info) as member:
                        head = member.read(128)
                    if b"'descr': '|O'" in head:  # tokenscope never writes object arrays: never unpickled
                        return f"{npz}: damaged (member {info.filename} is a pickled object array)"
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
            return f"{npz}: damaged ({type(exc).__name__})"
    return None

