"""How figures are written: file format (png, or pdf/svg as vector files for papers), resolution
and whether titles are drawn (a paper's caption says what a title would)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenscope.errors import ConfigError
from tokenscope.storage import atomic_write, text_of

FORMATS = ("png", "pdf", "svg")


@dataclass(frozen=True)
class FigureStyle:
    format: str = "png"
    dpi: int = 150
    titles: bool = True

    @classmethod
    def parse(cls, fmt: str, dpi: int = 150, titles: bool = True) -> "FigureStyle":
        """The style from command-line values, or one error naming what is allowed."""
        f = str(fmt).lower().lstrip(".")
        if f not in FORMATS:
            raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
        if not 20 <= int(dpi) <= 1200:
            raise ConfigError(f"--dpi {dpi}: choose a resolution between 20 and 1200")
        return cls(f, int(dpi), bool(titles))

    def path(self, path: Path) -> Path:
        """`path` with this style's suffix (figures are named as PNGs by their callers)."""
        return Path(path).with_suffix(f".{self.format}")

    def save(self, fig: Any, path: Path, **kw: Any) -> Path:
        """Write `fig` in this style (vector formats keep text as text: fonts embedded, not outlined);
        without titles, the axes' and figure's titles are cleared first (a caption says them)."""
        out = self.path(path)
        if not self.titles:
            for ax in fig.axes:
                ax.set_title("")
            if getattr(fig, "_suptitle", None) is not None:
                fig._suptitle.set_text("")
        if self.format == "png":
            save_figure(fig, out, dpi=self.dpi, **kw)
        else:
            import matplotlib

            with matplotlib.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none"}):
                save_figure(fig, out, **kw)
        return out


def _drawable_text(fig: Any) -> None:
    """Text from file names that are not valid UTF-8 (`bad\\xffname.png` arrives as a lone surrogate) shown
    with a replacement character: the font renderer refuses surrogates and would abort the whole run."""
    from matplotlib.text import Text

    for t in fig.findobj(Text):
        text = t.get_text()
        if text_of(text) != text:
            t.set_text(text_of(text))


def save_figure(fig: Any, path: Path, **kw: Any) -> Path:
    """`fig.savefig` through the one atomic writer (a full disk is one line, no half-written file)."""
    _drawable_text(fig)
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kw), mode="wb")


DEFAULT_STYLE = FigureStyle()
