"""Colours: colour-blind-safe (Okabe-Ito) for levels and exit points, a stable palette for classes."""

from __future__ import annotations

import numpy as np

OKABE_ITO = {
    "orange": (230, 159, 0), "sky": (86, 180, 233), "green": (0, 158, 115), "yellow": (240, 228, 66),
    "blue": (0, 114, 178), "vermillion": (213, 94, 0), "purple": (204, 121, 167), "grey": (153, 153, 153),
}

LEVEL_COLOURS = [OKABE_ITO[c] for c in ("grey", "sky", "green", "orange", "purple")]
"""RGB per superpatch level 0..4 (level 0 = a single 16x16 patch)."""

LEVEL_LABELS = ["16 px (1 patch)", "32 px (2x2)", "64 px (4x4)", "128 px (8x8)", "256 px (16x16)"]
"""Level names for ViT/16; `level_labels(patch)` gives them for other patch sizes."""


def level_labels(patch: int = 16) -> list[str]:
    """Names of superpatch levels 0..4 in pixels for a ViT with `patch`-pixel patches."""
    return [f"{patch << k} px ({'1 patch' if k == 0 else f'{1 << k}x{1 << k}'})" for k in range(5)]

METHOD_COLOURS = ["grey", "blue", "vermillion", "green", "orange", "purple", "sky", "yellow"]
"""Okabe-Ito names, the pool method colours are taken from."""

METHOD_STYLES = {"vit": ("grey", "X"), "baseline": ("grey", "X"), "step": ("vermillion", "o"), "dcts": ("orange", "s"),
                 "dtop": ("green", "D"), "cts": ("yellow", "^"), "tome": ("blue", "v"), "algm": ("sky", "<"),
                 "evit": ("purple", ">")}
"""Colour (Okabe-Ito name) and marker of each built-in method, the same in every figure."""
_MARKERS = "oDs^v<>pPh*"


def method_style(name: str) -> tuple[tuple[int, int, int], str]:
    """(RGB, marker) of a method by its name (settings after ':' ignored), never by its position in a list:
    a method keeps its look across every figure of a paper. Other names (composites, plug-ins) get a
    fixed pick from their name's checksum."""
    import zlib

    base = str(name).split(":", 1)[0]
    if base in METHOD_STYLES:
        colour, marker = METHOD_STYLES[base]
        return OKABE_ITO[colour], marker
    h = zlib.crc32(base.encode())
    pool = [c for c in METHOD_COLOURS if c != "grey"]
    return OKABE_ITO[pool[h % len(pool)]], _MARKERS[(h // len(pool)) % len(_MARKERS)]

EXIT_COLOURS = [OKABE_ITO[c] for c in ("vermillion", "yellow", "green", "sky", "purple", "orange")]
FINAL_COLOUR = OKABE_ITO["blue"]


FATE_COLOURS = {"merged": OKABE_ITO["sky"], "pruned": OKABE_ITO["vermillion"], "exited": OKABE_ITO["green"],
                "reached_end": FINAL_COLOUR}
"""One colour per fate (trace/fates.py), the same in every figure."""


def fate_colour(column: str, depth: int) -> tuple[int, int, int]:
    """Colour of a fate-and-place column (merged_b3, pruned_b7, exited_gate4, reached_end): the fate's
    colour, lighter for later blocks, so a bar reads as families and the blocks inside a family stay apart."""
    if column == "reached_end":
        return FATE_COLOURS["reached_end"]
    fate, _, where = column.rpartition("_")
    block = int(where.removeprefix("gate").removeprefix("b"))
    base = np.array(FATE_COLOURS[fate], dtype=np.float64)
    mix = 0.6 * (block - 1) / max(depth - 1, 1)
    return tuple(int(round(v)) for v in base * (1 - mix) + 255 * mix)  # type: ignore[return-value]


def exit_colours(exit_after: tuple[int, ...] | list[int]) -> list[tuple[int, int, int]]:
    """One colour per gate in order, then the colour for tokens that reached the end."""
    return [EXIT_COLOURS[i % len(EXIT_COLOURS)] for i in range(len(exit_after))] + [FINAL_COLOUR]


def class_palette(num_classes: int, colours: tuple[tuple[int, int, int], ...] = (), seed: int = 7) -> np.ndarray:
    """(max(num_classes, 256), 3) uint8 RGB, the same for every run of a model; a model's own
    class colours, when it has them, come first."""
    base = np.array([
        (70, 130, 180), (128, 64, 128), (70, 70, 70), (107, 142, 35), (0, 0, 142), (220, 20, 60),
        (153, 153, 153), (250, 170, 30), (152, 251, 152), (244, 35, 232), (102, 102, 156), (190, 153, 153),
        (220, 220, 0), (255, 0, 0), (0, 60, 100), (119, 11, 32), (0, 80, 100), (0, 0, 230), (81, 0, 81),
    ], dtype=np.uint8)
    n = max(num_classes, 256)
    rng = np.random.default_rng(seed)
    extra = rng.integers(30, 250, size=(n, 3), dtype=np.int64).astype(np.uint8)
    extra[: len(base)] = base
    if colours:
        extra[: len(colours)] = np.asarray(colours, dtype=np.uint8)
    extra[255] = (0, 0, 0)
    return extra
