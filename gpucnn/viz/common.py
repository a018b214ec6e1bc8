"""What every picture of gpucnn.viz shares: figures that need no display, images and signed maps drawn one
way, and :func:`features`, a model run up to one of its layers on raw images."""
from __future__ import annotations

import math

import numpy as np

from .. import backend

SIGNED_CMAP = "RdBu_r"      # diverging: blue negative, white zero, red positive


# ---------------------------------------------------------------------------------------------- helpers

def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), layout="constrained")


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _layers(model) -> list:
    return list(model.layers) if hasattr(model, "layers") else list(model)


def _bare(ax):
    """An image axis: no ticks, a thin frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_linewidth(0.5)


def _as_batch(images):
    """A batch (N, C, H, W) from a batch or from one image (C, H, W)."""
    if images.ndim == 3:
        return images[None]
    if images.ndim != 4:
        raise ValueError(f"viz: expected images (N, C, H, W) or one image (C, H, W), got shape {tuple(images.shape)}")
    return images


def _show_image(ax, img, title=None, fontsize=9):
    """Draw one raw (C, H, W) image: grey for one channel (uint8 on its 0-255 scale), RGB for three."""
    img = backend.to_numpy(img)
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim == 2:
        lims = {"vmin": 0, "vmax": 255} if img.dtype == np.uint8 else {}
        ax.imshow(img, cmap="gray", **lims)
    elif img.ndim == 3 and img.shape[0] == 3:
        ax.imshow(_unit_rgb(img))
    else:
        raise ValueError(f"viz: cannot draw an image of shape {img.shape} (expected 1 or 3 channels)")
    _bare(ax)
    if title:
        ax.set_title(title, fontsize=fontsize)


def _unit_rgb(img):
    """(3, H, W) as (H, W, 3) in [0, 1]: uint8 divided by 255, anything else stretched min to max."""
    rgb = np.asarray(img).transpose(1, 2, 0)
    if rgb.dtype == np.uint8:
        return rgb / 255.0
    lo, hi = float(rgb.min()), float(rgb.max())
    return (rgb - lo) / (hi - lo) if hi > lo else np.zeros(rgb.shape)


def _show_signed(ax, a, vmax=None):
    """A signed 2-D array on the diverging map, symmetric about 0 (``vmax`` shared, or its own)."""
    if vmax is None:
        vmax = float(np.abs(a).max())
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(a, cmap=SIGNED_CMAP, vmin=-vmax, vmax=vmax)
    _bare(ax)
    return im


def _grid_columns(n: int, widest: int = 8) -> int:
    """Columns for n tiles: one row up to ``widest``, else about square."""
    return n if n <= widest else max(widest, math.ceil(math.sqrt(n)))


def _class_name(classes, k) -> str:
    return str(classes[k]) if classes is not None else str(int(k))


# ---------------------------------------------------------------------------------------------- activations

def features(model, x, upto: int, batch_size: int = 256):
    """The output of the first ``upto`` layers of ``model`` for raw images ``x`` (N, C, H, W), or for one
    image (C, H, W), as a host NumPy array; run ``batch_size`` images at a time with ``training=False``.

    ``upto`` counts layers: 0 gives the input as the first layer sees it (standardised when fit computed
    statistics), ``len(model.layers)`` the logits. ``upto`` = the index of the last Dense layer gives the
    last hidden layer's features, the space AlexNet's nearest neighbours are found in.
    """
    layers = _layers(model)
    if not isinstance(upto, (int, np.integer)) or isinstance(upto, bool) or not 0 <= upto <= len(layers):
        raise ValueError(f"features: upto must be an int from 0 to {len(layers)} (the number of layers), got {upto!r}")
    if not hasattr(x, "ndim"):
        x = np.asarray(x)
    single = x.ndim == 3
    x = _as_batch(x)
    outs = []
    for i in range(0, len(x), batch_size):
        outs.append(backend.to_numpy(_forward(model, layers[:upto], x[i:i + batch_size])))
    if not outs:
        raise ValueError("features: got no images")
    out = np.concatenate(outs)
    return out[0] if single else out


def _forward(model, layers, xb, keep=None):
    """Raw batch -> the model's input (dtype, standardisation) -> ``layers`` with training=False.

    ``keep``: a list that receives every layer's input shape, in order (the deconvnet needs them).
    """
    if not backend.is_cupy(xb):
        xb = backend.asarray(xb)
    x = model.prepare(xb) if hasattr(model, "prepare") else xb
    for layer in layers:
        if keep is not None:
            keep.append(tuple(x.shape))
        x = layer.forward(x, training=False)
    return x
