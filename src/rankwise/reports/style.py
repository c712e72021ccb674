"""Figure plumbing shared by every plot: a pyplot-free Figure, the caption, and atomic PNG/SVG saving.

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot): no global
figure registry to leak memory across a long report, no display needed, safe in threads. The protocol
caption is a text artist *below* the axes with ``gid="caption"``; the saved image is cropped to the
figure's tight bounding box, which includes it, so the caption travels with the PNG/SVG wherever it is
copied, and tests and the HTML report read it back from the figure.

Why the boxes are computed here: ``savefig(bbox_inches="tight")`` lays out and draws the whole figure once
only to measure it, then again to render it. A report saves each figure three times (PNG and SVG with the
caption, PNG without for the HTML page), so :func:`tight_boxes` measures both crops from one layout pass
and every save draws once (4 draws per figure instead of 6; figures are most of a report's build time).
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from rankwise.fileio import atomic_path

CAPTION_GID = "caption"
PAD_INCHES = 0.12
PNG_DPI = 130


class FigureUnavailable(Exception):
    """The document has no data for this figure; the message says why (shown in the report instead)."""


def new_figure(width: float = 7.5, height: float = 4.6) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def set_caption(fig: Figure, text: str, fontsize: float = 7.5) -> None:
    """Put ``text`` under the figure, wrapped to its width (one paragraph per line of ``text``)."""
    width_chars = max(40, int(fig.get_figwidth() * 72 / (fontsize * 0.52)))
    lines = []
    for para in text.splitlines():
        lines.extend(textwrap.wrap(para, width_chars) or [""])
    fig.text(0.01, -0.01, "\n".join(lines), ha="left", va="top", fontsize=fontsize, color="#333333",
             gid=CAPTION_GID)
    fig.rankwise_caption = text  # type: ignore[attr-defined]  (read by the HTML report and tests)


def caption(fig: Figure) -> str:
    """The caption set by :func:`set_caption` ("" if none)."""
    return getattr(fig, "rankwise_caption", "")


def tight_boxes(fig: Figure) -> tuple[Bbox, Bbox]:
    """The padded tight crop of ``fig`` in inches with and without its caption, from one layout pass."""
    fig.draw_without_rendering()  # runs the layout engine and measures text, renders nothing
    whole = fig.get_tightbbox()
    with _captions_hidden(fig):
        bare = fig.get_tightbbox()
    return whole.padded(PAD_INCHES), bare.padded(PAD_INCHES)


@contextlib.contextmanager
def _layout_frozen(fig: Figure) -> Iterator[None]:
    """Keep the layout :func:`tight_boxes` computed while saving: savefig re-runs a layout engine on every save."""
    engine = fig.get_layout_engine()
    fig.set_layout_engine(None)
    try:
        yield
    finally:
        fig.set_layout_engine(engine)


class _captions_hidden:
    """Hide the caption text while the block runs (the HTML page shows it as text instead)."""

    def __init__(self, fig: Figure) -> None:
        self.hidden = [t for t in fig.texts if t.get_gid() == CAPTION_GID and t.get_visible()]

    def __enter__(self) -> None:
        for t in self.hidden:
            t.set_visible(False)

    def __exit__(self, *exc: object) -> None:
        for t in self.hidden:
            t.set_visible(True)


def save_figure(fig: Figure, folder: str | Path, name: str, formats: tuple[str, ...] = ("png", "svg"),
                box: Bbox | None = None) -> dict[str, Path]:
    """Write ``folder/name.png`` and ``.svg`` atomically (caption included); returns the paths by format.

    ``box``: the crop from :func:`tight_boxes` when the caller has it (saves a layout pass per format)."""
    box = box if box is not None else tight_boxes(fig)[0]
    out: dict[str, Path] = {}
    for fmt in formats:
        path = Path(folder) / f"{name}.{fmt}"
        with atomic_path(path, suffix=f".{fmt}") as tmp, _layout_frozen(fig):
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches=box,
                        metadata={"Software": "rankwise"} if fmt == "png" else {"Creator": "rankwise"})
        out[fmt] = path
    return out


def png_bytes(fig: Figure, with_caption: bool = True, box: Bbox | None = None) -> bytes:
    """The PNG of a figure in memory; the HTML report embeds it without the caption (shown as page text).

    ``box``: the matching crop from :func:`tight_boxes` when the caller has it."""
    import io

    if box is None:
        box = tight_boxes(fig)[0 if with_caption else 1]
    buf = io.BytesIO()
    with _layout_frozen(fig), (contextlib.nullcontext() if with_caption else _captions_hidden(fig)):
        fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches=box)
    return buf.getvalue()
