"""Drawing PNGs off-screen: the one place that picks matplotlib's backend and writes a figure to disk (the
evaluation's curves, the label-efficiency plot, the impact report, the pacing simulation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no screen needed); imported on first use, not at start-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path, dpi: int) -> Path:
    """Lay ``fig`` out, write it to ``path`` (creating its folder) and close it; returns the path written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=dpi)
    pyplot().close(fig)
    return p
