"""matplotlib for the charts kataru writes (bench, serving, training losses, evaluations): off-screen, and a
one-line error naming the fix where it is not installed."""

from __future__ import annotations

from typing import Any

from kataru.errors import KataruError


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files, no display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KataruError("charts need matplotlib: pip install 'kataru[bench]' (or pip install matplotlib)") from None
    return plt
