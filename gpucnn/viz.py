"""Pictures of training: learning curves from the history that ``Sequential.fit`` returns.

Figures are built with ``matplotlib.figure.Figure`` directly, not pyplot: nothing needs a display, no
window ever opens, and no figure lingers in pyplot's global list. A returned Figure still shows inline
in Jupyter; ``path`` saves it (the format follows the extension).
"""
from __future__ import annotations

import math

__all__ = ["plot_history"]


def plot_history(history: dict, path=None):
    """Loss and accuracy per epoch, training and validation side by side; returns the Figure.

    ``history`` holds lists keyed "loss", "accuracy", "val_loss", "val_accuracy" (any may be missing
    or empty); with ``path`` the figure is also written there (e.g. "curves.png").
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    panels = [("loss", "loss"), ("accuracy", "accuracy")]
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for prefix, label, style in (("", "train", "o-"), ("val_", "validation", "s--")):
            values = [math.nan if v is None else float(v) for v in (history.get(prefix + key) or [])]
            if any(v == v for v in values):  # fit without validation gives lists of None: no line
                ax.plot(range(1, len(values) + 1), values, style, label=label, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
