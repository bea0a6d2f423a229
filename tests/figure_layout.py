"""Layout checks of a drawn matplotlib figure, from the renderer's own extents: every piece of text inside the
canvas (nothing cut), and no legend over a title or over another legend.

`capture_figures` records every figure that vopd saves (Figure.savefig is wrapped), so a test can run the real
code path that writes a PNG and then check the figure it drew.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

TOLERANCE = 1.0  # pixels


def _texts(fig: Figure) -> list[tuple[str, Text]]:
    out: list[tuple[str, Text]] = []
    if fig._suptitle is not None and fig._suptitle.get_text():
        out.append(("suptitle", fig._suptitle))
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for t in (ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label):
            if t.get_text():
                out.append((f"axes {i} {t.get_text()[:30]!r}", t))
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for loc, t in zip(axis.get_ticklocs(), axis.get_ticklabels(), strict=False):
                if t.get_text() and t.get_visible() and lo - 1e-9 <= loc <= hi + 1e-9:  # ticks drawn
                    out.append((f"axes {i} tick {t.get_text()[:20]!r}", t))
    return out


def _legends(fig: Figure) -> list[tuple[str, object]]:
    out = [(f"figure legend {i}", leg) for i, leg in enumerate(fig.legends)]
    out += [(f"axes {i} legend", ax.get_legend()) for i, ax in enumerate(fig.axes)
            if ax.get_visible() and ax.get_legend() is not None]
    return out


def _overlap(a: Bbox, b: Bbox) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > TOLERANCE) and (min(a.y1, b.y1) - max(a.y0, b.y0) > TOLERANCE)


def layout_problems(fig: Figure) -> list[str]:
    """What is wrong with the figure's layout, as it is drawn now; [] when nothing is."""
    canvas_ = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)
    canvas_.draw()  # the layout engine runs here, as in savefig
    renderer = canvas_.get_renderer()
    canvas = fig.bbox
    problems = []
    boxes = [(name, t.get_window_extent(renderer)) for name, t in _texts(fig)]
    boxes += [(name, leg.get_window_extent(renderer)) for name, leg in _legends(fig)]
    for name, box in boxes:
        if (box.x0 < canvas.x0 - TOLERANCE or box.y0 < canvas.y0 - TOLERANCE or box.x1 > canvas.x1 + TOLERANCE
                or box.y1 > canvas.y1 + TOLERANCE):
            problems.append(f"{name} is cut by the canvas edge: {box.bounds} outside {canvas.bounds}")
    titles = [(n, b) for n, b in boxes if n == "suptitle" or (n.startswith("axes") and " tick " not in n
                                                               and "legend" not in n)]
    legends = [(n, b) for n, b in boxes if "legend" in n]
    for i, (ln, lb) in enumerate(legends):
        for tn, tb in titles:
            if _overlap(lb, tb):
                problems.append(f"{ln} overlaps {tn}")
        for on, ob in legends[i + 1:]:
            if _overlap(lb, ob):
                problems.append(f"{ln} overlaps {on}")
    return problems


@contextlib.contextmanager
def capture_figures() -> Iterator[list[Figure]]:
    """Every Figure saved inside the block, in order."""
    saved: list[Figure] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = savefig
    try:
        yield saved
    finally:
        Figure.savefig = original
