"""Figure plumbing shared by every plot: a pyplot-free Figure, the caption, and atomic PNG/SVG saving.

Figures are built with ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot): no global
figure registry to leak memory across a long report, no display needed, safe in threads. The protocol
caption is a text artist *below* the axes with ``gid="caption"``; ``bbox_inches="tight"`` grows the saved
image to include it, so the caption travels with the PNG/SVG wherever it is copied, and tests and the
HTML report read it back from the figure.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from rankwise.fileio import atomic_path

CAPTION_GID = "caption"
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


def save_figure(fig: Figure, folder: str | Path, name: str, formats: tuple[str, ...] = ("png", "svg")
                ) -> dict[str, Path]:
    """Write ``folder/name.png`` and ``.svg`` atomically (caption included); returns the paths by format."""
    out: dict[str, Path] = {}
    for fmt in formats:
        path = Path(folder) / f"{name}.{fmt}"
        with atomic_path(path, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.12,
                        metadata={"Software": "rankwise"} if fmt == "png" else {"Creator": "rankwise"})
        out[fmt] = path
    return out


def png_bytes(fig: Figure, with_caption: bool = True) -> bytes:
    """The PNG of a figure in memory; the HTML report embeds it without the caption (shown as page text)."""
    import io

    hidden = [] if with_caption else [t for t in fig.texts if t.get_gid() == CAPTION_GID and t.get_visible()]
    for t in hidden:
        t.set_visible(False)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.12)
    finally:
        for t in hidden:
            t.set_visible(True)
    return buf.getvalue()
