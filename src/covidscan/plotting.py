"""Figures without pyplot: every plot covidscan draws is a ``Figure`` on its own Agg canvas.

pyplot keeps global state (the backend, a list of open figures), and ``matplotlib.use("Agg")``
would switch a notebook user's backend behind their back. A ``Figure`` with a ``FigureCanvasAgg``
needs neither: nothing global changes, nothing has to be closed, and threads (the web API) can draw
at the same time. This is matplotlib's documented "embedding" use (``matplotlib.figure.Figure``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from covidscan.runtime import atomic_path


def new_figure(**kwargs: Any) -> Figure:
    """A ``Figure(**kwargs)`` (figsize, layout, ...) attached to an Agg canvas."""
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, **kwargs: Any) -> Path:
    """Write ``figure`` atomically (a report never points at a half-written image); kwargs go to savefig."""
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, **kwargs)
    return path
