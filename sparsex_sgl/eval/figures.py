"""matplotlib for every figure the project draws (quality fronts here, benchmark plots in the harness, which
depends on this package and not the other way round)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display on servers); imported when a figure is drawn,
    so tables and tests that draw nothing do not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
