"""Pictures of what a CNN computes, sees and learns, and of how it trained.

    viz.plot_filters(model)                         # the first layer's kernels, as in the AlexNet paper
    viz.plot_feature_maps(model, image)             # every conv layer's maps for one image
    viz.plot_top5(model, images, labels, classes)   # each image beside its five most probable classes
    viz.plot_nearest_neighbours(model, queries, train_images)   # neighbours in the last hidden layer
    viz.plot_deconv(model, images, layer_index, channels)       # Zeiler & Fergus's deconvnet
    viz.plot_history(history)                       # learning curves from Sequential.fit

Each ``plot_*`` takes a model (a :class:`gpucnn.Sequential`) or arrays on any device and returns a
``matplotlib.figure.Figure``, written to ``path`` when one is given. Figures are built with
``matplotlib.figure.Figure`` directly, not pyplot: nothing needs a display, no window ever opens, and no
figure lingers in pyplot's global list. A returned Figure still shows inline in Jupyter.

Images are drawn in grey (RGB for three channels); signed quantities (weights, tanh feature maps,
deconvnet patterns) with a diverging map centred on zero, so that white means 0, red positive, blue
negative. Models take raw images (uint8 or float), as ``Sequential.predict`` does.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from . import backend
from .kernels import conv as conv_kernels
from .kernels import pool as pool_kernels
from .layers import (AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, LeakyReLU, LocalResponseNorm, MaxPool2D,
                     ReLU, Sigmoid, Tanh)

__all__ = ["plot_history", "plot_filters", "plot_feature_maps", "plot_top5", "plot_nearest_neighbours",
           "plot_deconv", "features", "nearest_neighbours", "deconv_project", "receptive_field",
           "DeconvProjection"]

SIGNED_CMAP = "RdBu_r"      # diverging: blue negative, white zero, red positive
ACTIVATIONS = (ReLU, LeakyReLU, Tanh, Sigmoid)


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


def _last_hidden(model) -> int:
    """How many layers lead to the last hidden layer's features: all up to the last Dense (the classifier)."""
    layers = _layers(model)
    dense = [i for i, layer in enumerate(layers) if isinstance(layer, Dense)]
    return dense[-1] if dense else len(layers) - 1


# ---------------------------------------------------------------------------------------------- learning curves

def plot_history(history: dict, path=None, title=None):
    """Loss and accuracy per epoch, training and validation side by side; returns the Figure.

    ``history`` holds lists keyed "loss", "accuracy", "val_loss", "val_accuracy" (any may be missing
    or empty); with ``path`` the figure is also written there (e.g. "curves.png"); ``title`` goes on top.
    """
    fig = _figure(10, 4)
    panels = [("loss", "loss"), ("accuracy", "accuracy")]
    for k, (key, name) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for prefix, label, style in (("", "train", "o-"), ("val_", "validation", "s--")):
            values = [math.nan if v is None else float(v) for v in (history.get(prefix + key) or [])]
            if any(v == v for v in values):  # fit without validation gives lists of None: no line
                ax.plot(range(1, len(values) + 1), values, style, label=label, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ---------------------------------------------------------------------------------------------- filters

def _conv_weights(model_or_weights):
    """(weights (O, C, KH, KW) on the host, a phrase saying where they come from)."""
    obj = model_or_weights
    if hasattr(obj, "layers"):
        convs = [(i, layer) for i, layer in enumerate(obj.layers) if isinstance(layer, Conv2D)]
        if not convs:
            raise ValueError("plot_filters: the model has no Conv2D layer")
        i, layer = convs[0]
        return backend.to_numpy(layer.params["weight"]), f"first conv layer (layer {i})"
    if isinstance(obj, Conv2D):
        return backend.to_numpy(obj.params["weight"]), "Conv2D"
    w = backend.to_numpy(obj)
    if w.ndim != 4:
        raise ValueError(f"plot_filters: expected a model, a Conv2D or weights (out, in, KH, KW), got shape {w.shape}")
    return w, "weights"


def plot_filters(model_or_weights, path=None, max_filters: int = 96):
    """The kernels of a model's first Conv2D (or of a Conv2D, or of weights (out, in, KH, KW)) as a grid.

    One input channel: each kernel on the diverging map, one scale for all, with a colour bar. Three
    (RGB): each kernel as a colour patch, stretched to its own range (as the AlexNet paper shows its
    96 first-layer kernels). More: one row per kernel, one tile per input channel.
    """
    w, where = _conv_weights(model_or_weights)
    O, C, KH, KW = w.shape
    shown = min(O, max_filters)
    title = f"{where}: {O} kernels of {C}x{KH}x{KW}" + (f" (first {shown} shown)" if shown < O else "")
    if C in (1, 3):
        cols = _grid_columns(shown)
        rows = math.ceil(shown / cols)
        fig = _figure(max(4.0, 1.1 * cols + (1.0 if C == 1 else 0.0)), 1.1 * rows + 1.2)
        axes = fig.subplots(rows, cols, squeeze=False)
        vmax = float(np.abs(w[:shown]).max())
        im = None
        for k, ax in enumerate(axes.flat):
            if k >= shown:
                ax.set_visible(False)
                continue
            if C == 1:
                im = _show_signed(ax, w[k, 0], vmax)
            else:
                ax.imshow(_unit_rgb(w[k]), interpolation="nearest")
                _bare(ax)
            ax.set_title(str(k), fontsize=8, pad=2)
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    else:
        rows, cols = min(shown, 16), min(C, 16)
        if rows < O or cols < C:
            title += f" (kernels 0-{rows - 1}, input channels 0-{cols - 1} shown)"
        fig = _figure(0.8 * cols + 1.5, 0.8 * rows + 0.8)
        axes = fig.subplots(rows, cols, squeeze=False)
        vmax = float(np.abs(w[:rows, :cols]).max())
        for o in range(rows):
            for c in range(cols):
                im = _show_signed(axes[o, c], w[o, c], vmax)
            axes[o, 0].set_ylabel(f"kernel {o}", fontsize=7)
        for c in range(cols):
            axes[0, c].set_title(f"in {c}", fontsize=7)
        fig.colorbar(im, ax=axes, shrink=0.8, label="weight")
    fig.suptitle(title)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------- feature maps

def plot_feature_maps(model, image, path=None, max_maps: int = 16):
    """The feature maps of one raw image (C, H, W) at every Conv2D layer of ``model``: the input on top,
    then one block per conv layer (after the activation that follows it, where one does), at most
    ``max_maps`` maps each. Non-negative maps (ReLU) are grey, signed ones (tanh) diverging."""
    layers = _layers(model)
    image = backend.to_numpy(image)
    if image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"plot_feature_maps: expected one image (C, H, W), got a batch of {image.shape[0]}")
        image = image[0]
    outputs = []
    x = backend.asarray(image[None])
    x = model.prepare(x) if hasattr(model, "prepare") else x
    for layer in layers:
        x = layer.forward(x, training=False)
        outputs.append(x)
    blocks = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Conv2D):
            continue
        j = i + 1 if i + 1 < len(layers) and isinstance(layers[i + 1], ACTIVATIONS) else i
        maps = backend.to_numpy(outputs[j][0])
        KH, KW = layer.kernel_size
        label = f"layer {i}: Conv2D {layer.in_channels}\u2192{layer.out_channels}, {KH}x{KW}" + \
                (f" + {layers[j].name}" if j != i else "") + \
                f": {maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]}" + \
                (f" (first {max_maps} shown)" if maps.shape[0] > max_maps else "")
        blocks.append((label, maps[:max_maps]))
    if not blocks:
        raise ValueError("plot_feature_maps: the model has no Conv2D layer")

    cols = max(_grid_columns(len(m)) for _, m in blocks)
    rows = [1] + [math.ceil(len(m) / cols) for _, m in blocks]
    fig = _figure(1.1 * cols + 1.6, 1.25 * sum(rows) + 0.5 * len(rows))
    subfigs = fig.subfigures(len(rows), 1, height_ratios=[r + 0.45 for r in rows])
    ax = subfigs[0].subplots(1, 1)
    _show_image(ax, image)
    subfigs[0].suptitle("input image", fontsize=10)
    for sf, (label, maps), r in zip(subfigs[1:], blocks, rows[1:]):
        axes = sf.subplots(r, cols, squeeze=False)
        signed = float(maps.min()) < 0
        vmax = float(np.abs(maps).max()) or 1.0
        im = None
        for k, a in enumerate(axes.flat):
            if k >= len(maps):
                a.set_visible(False)
                continue
            if signed:
                im = _show_signed(a, maps[k], vmax)
            else:
                im = a.imshow(maps[k], cmap="gray", vmin=0, vmax=vmax)
                _bare(a)
            a.set_title(f"map {k}", fontsize=7, pad=2)
        sf.colorbar(im, ax=axes, shrink=0.9, aspect=12)
        sf.suptitle(label, fontsize=10)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------- top-5

def plot_top5(model, images, labels=None, classes=None, path=None, columns: int = 4):
    """Each raw image beside a bar chart of its five most probable classes (the AlexNet paper's figure 4,
    left): the true class's bar red when it is among the five, the others blue; the title says the true
    class (green when the top-1 guess is right, red otherwise)."""
    images = _as_batch(backend.to_numpy(images))
    probs = backend.to_numpy(model.predict_proba(images))
    n, n_classes = probs.shape
    k = min(5, n_classes)
    labels = None if labels is None else backend.to_numpy(labels).astype(np.int64).reshape(-1)
    if labels is not None and len(labels) != n:
        raise ValueError(f"plot_top5: {n} images but {len(labels)} labels")
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    fig = _figure(3.6 * cols, 1.7 * rows + 0.4)
    grid = fig.add_gridspec(rows, 2 * cols, width_ratios=[1, 1.5] * cols)
    for i in range(n):
        r, c = divmod(i, cols)
        order = np.argsort(-probs[i], kind="stable")[:k]
        truth = None if labels is None else int(labels[i])
        ax_img = fig.add_subplot(grid[r, 2 * c])
        title = None if truth is None else _class_name(classes, truth)
        _show_image(ax_img, images[i], title)
        if truth is not None:
            ax_img.title.set_color("tab:green" if order[0] == truth else "tab:red")
        ax = fig.add_subplot(grid[r, 2 * c + 1])
        colours = ["tab:red" if truth is not None and o == truth else "tab:blue" for o in order]
        ax.barh(np.arange(k), probs[i, order], color=colours, height=0.7)
        ax.set_yticks(np.arange(k), [_class_name(classes, o) for o in order], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"], fontsize=7)
        ax.tick_params(axis="y", length=0)
        for s in ("top", "right"):
            ax.spines[s].set_visible(False)
        for rank, o in enumerate(order):
            p = float(probs[i, o])
            inside = p > 0.75              # a long bar carries its number inside, in white
            ax.text(p - 0.02 if inside else p + 0.02, rank, f"{p:.2f}", va="center", fontsize=7,
                    ha="right" if inside else "left", color="white" if inside else "black")
    fig.suptitle("five most probable classes per image" +
                 (" (title: the true class, green when the top guess is right; red bar: the true class)"
                  if labels is not None else ""))
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------- nearest neighbours

def nearest_neighbours(model, queries, train_images, k: int = 5, batch_size: int = 256):
    """``(indices, distances)``, each (Q, k): the ``k`` training images whose last-hidden-layer features
    are nearest (Euclidean) to each query's, nearest first."""
    upto = _last_hidden(model)
    queries, train_images = _as_batch(queries), _as_batch(train_images)
    fq = features(model, queries, upto, batch_size).reshape(len(queries), -1)
    ft = features(model, train_images, upto, batch_size).reshape(len(train_images), -1)
    if not 1 <= k <= len(ft):
        raise ValueError(f"nearest_neighbours: k must be from 1 to the {len(ft)} training images, got {k}")
    fq, ft = fq.astype(np.float64), ft.astype(np.float64)
    # |q - t|^2 = |q|^2 + |t|^2 - 2 q.t, one matrix product for every pair
    d2 = (fq * fq).sum(1)[:, None] + (ft * ft).sum(1)[None, :] - 2.0 * (fq @ ft.T)
    idx = np.argsort(d2, axis=1, kind="stable")[:, :k]
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, idx, axis=1), 0.0))
    return idx, dist


def plot_nearest_neighbours(model, queries, train_images, k: int = 5, path=None, train_labels=None,
                            query_labels=None, classes=None):
    """For each query image (a row), the ``k`` training images nearest to it in the last hidden layer's
    feature space (the AlexNet paper's figure 4, right), with their distances and, given labels, classes."""
    queries = _as_batch(backend.to_numpy(queries))
    train_images = _as_batch(backend.to_numpy(train_images))
    idx, dist = nearest_neighbours(model, queries, train_images, k)
    upto = _last_hidden(model)
    q = len(queries)
    fig = _figure(1.35 * (k + 1) + 0.3, 1.45 * q + 0.6)
    axes = fig.subplots(q, k + 1, squeeze=False)
    for r in range(q):
        title = "query" + ("" if query_labels is None else f"\n{_class_name(classes, query_labels[r])}")
        _show_image(axes[r, 0], queries[r], title, fontsize=8)
        axes[r, 0].title.set_fontweight("bold")
        for j in range(k):
            t = int(idx[r, j])
            name = "" if train_labels is None else f"{_class_name(classes, train_labels[t])}\n"
            _show_image(axes[r, j + 1], train_images[t], f"{name}d={dist[r, j]:.2f}", fontsize=8)
    layer = _layers(model)[upto - 1] if upto > 0 else None
    fig.suptitle(f"nearest training images in the last hidden layer's feature space "
                 f"(output of layer {upto - 1}{', ' + layer.name if layer is not None else ''}; "
                 f"{len(train_images)} training images searched)", fontsize=10)
    return _finish(fig, path)


# ---------------------------------------------------------------------------------------------- deconvnet

class DeconvProjection(NamedTuple):
    """What :func:`deconv_project` returns, one entry per image."""
    pattern: np.ndarray      # the projection in pixel space, the image's shape: nonzero only inside `box`
    activation: np.ndarray   # the strongest activation of the chosen map, the unit projected
    unit: np.ndarray         # its (h, w) in the feature map, (..., 2)
    box: np.ndarray          # its receptive field in the image, (h0, h1, w0, w1) half-open, (..., 4)


def receptive_field(model, layer_index: int, h, w, image_size=None):
    """The input pixels that unit (h, w) of layer ``layer_index``'s output can see, as half-open
    ``(h0, h1, w0, w1)`` clipped to the image (``image_size`` (H, W), default the model's input shape).

    Going back through a conv or pool of kernel K, stride S and padding P, output rows a..b come from
    input rows a*S - P .. b*S - P + K - 1; every other layer keeps the rows. ``h`` and ``w`` may be arrays.
    """
    layers = _layers(model)
    if image_size is None:
        image_size = model.input_shape[1:]
    h0 = h1 = np.asarray(h, dtype=np.int64)
    w0 = w1 = np.asarray(w, dtype=np.int64)
    for layer in reversed(layers[:layer_index + 1]):
        if isinstance(layer, Conv2D):
            (KH, KW), (SH, SW), (PH, PW) = layer.kernel_size, layer.stride, layer.padding
        elif isinstance(layer, (MaxPool2D, AvgPool2D)):
            (KH, KW), (SH, SW), (PH, PW) = layer.kernel, layer.stride, layer.padding
        else:
            continue
        h0, h1 = h0 * SH - PH, h1 * SH - PH + KH - 1
        w0, w1 = w0 * SW - PW, w1 * SW - PW + KW - 1
    H, W = image_size
    return np.stack([np.clip(h0, 0, H), np.clip(h1 + 1, 0, H), np.clip(w0, 0, W), np.clip(w1 + 1, 0, W)], -1)


def _transposed_conv(layer, g, x_shape):
    """The conv's input gradient for output gradient ``g``: the transposed filters ``W^T g`` scattered back
    onto the input positions by col2im (what conv2d_backward computes as gx, without needing its cache)."""
    w = layer.params["weight"]
    Cout, _, KH, KW = w.shape
    xp = backend.xp(g)
    g2 = xp.ascontiguousarray(g.transpose(1, 2, 3, 0)).reshape(Cout, -1)    # col's column order (oh, ow, n)
    gcol = backend.matmul(w.reshape(Cout, -1).T, g2)
    return conv_kernels.col2im(gcol, x_shape, KH, KW, layer.stride, layer.padding)


def deconv_project(model, image, layer_index: int, channel: int) -> DeconvProjection:
    """Zeiler & Fergus (2014): project feature map ``channel`` of layer ``layer_index``'s output back to
    pixel space, for one raw image (C, H, W) or each image of a batch (N, C, H, W).

    The strongest activation of the map is kept and every other activation zeroed; the signal then goes
    back through the layers in reverse: max-unpooling puts each value where the pooling's recorded switch
    says its maximum came from, ReLU rectifies it (negative parts dropped), and a convolution applies its
    filters transposed. Biases are not used. Dropout and normalisation layers pass the signal unchanged.
    Returns a :class:`DeconvProjection` whose ``pattern`` has the image's shape and is zero outside the
    unit's receptive field ``box``.
    """
    layers = _layers(model)
    if not isinstance(layer_index, (int, np.integer)) or not 0 <= layer_index < len(layers):
        raise ValueError(f"deconv_project: layer_index must be from 0 to {len(layers) - 1}, got {layer_index!r}")
    for i, layer in enumerate(layers[:layer_index + 1]):
        if isinstance(layer, (Tanh, Sigmoid)):
            raise ValueError(f"deconv_project: layer {i} is {layer.name}; the deconvnet rectifies with ReLU, so the "
                             "model must use ReLU (e.g. gpucnn.models.lenet5(activation='relu', pool='max'))")
        if not isinstance(layer, (Conv2D, MaxPool2D, AvgPool2D, ReLU, LeakyReLU, Dropout, LocalResponseNorm,
                                  BatchNorm2D)):
            raise ValueError(f"deconv_project: layer {i} ({layer.name}) cannot be inverted by a deconvnet; "
                             "layer_index must point at a feature map (a conv, activation or pool output)")
    images = backend.to_numpy(image)
    single = images.ndim == 3
    images = images[None] if single else images
    shapes = []
    a = _forward(model, layers[:layer_index + 1], images, keep=shapes)
    N, C = a.shape[:2]
    if not 0 <= channel < C:
        raise ValueError(f"deconv_project: channel must be from 0 to {C - 1} (layer {layer_index} has {C} maps), "
                         f"got {channel!r}")
    xp = backend.xp(a)
    maps = a[:, channel].reshape(N, -1)
    best = maps.argmax(axis=1)                                    # the strongest unit of each image's map
    rows = xp.arange(N)
    strongest = maps[rows, best]
    g = xp.zeros_like(a)
    g.reshape(N, C, -1)[rows, channel, best] = strongest
    for layer, x_shape in zip(reversed(layers[:layer_index + 1]), reversed(shapes)):
        if isinstance(layer, Conv2D):
            g = _transposed_conv(layer, g, x_shape)
        elif isinstance(layer, MaxPool2D):
            g = pool_kernels.maxpool2d_backward(g, layer.switches, x_shape, layer.kernel, layer.stride, layer.padding)
        elif isinstance(layer, AvgPool2D):
            g = pool_kernels.avgpool2d_backward(g, x_shape, layer.kernel, layer.stride, layer.padding)
        elif isinstance(layer, (ReLU, LeakyReLU)):
            g = xp.maximum(g, 0)
    best = backend.to_numpy(best)
    W_out = a.shape[3]
    unit = np.stack([best // W_out, best % W_out], -1)
    box = receptive_field(model, layer_index, unit[:, 0], unit[:, 1], images.shape[2:])
    out = DeconvProjection(backend.to_numpy(g), backend.to_numpy(strongest), unit, box)
    if single:
        out = DeconvProjection(out.pattern[0], out.activation[0], out.unit[0], out.box[0])
    return out


def plot_deconv(model, images, layer_index: int, channels, top: int = 4, path=None):
    """For each feature map in ``channels`` of layer ``layer_index``: the ``top`` images (of ``images``)
    that activate it most, each as its deconvnet pattern beside the image patch that caused it (both cut
    to the unit's receptive field), as in Zeiler & Fergus's figure 2."""
    images = _as_batch(backend.to_numpy(images))
    channels = [int(c) for c in np.atleast_1d(channels)]
    acts = features(model, images, layer_index + 1)
    if acts.ndim != 4:
        raise ValueError(f"plot_deconv: layer {layer_index} gives shape {acts.shape[1:]}, not feature maps")
    strength = acts.reshape(len(acts), acts.shape[1], -1).max(axis=2)       # (N, maps)
    top = min(top, len(images))
    fig = _figure(1.25 * 2 * top + 1.0, 1.45 * len(channels) + 0.8)
    grid = fig.add_gridspec(len(channels), 2 * top)
    for r, c in enumerate(channels):
        chosen = np.argsort(-strength[:, c], kind="stable")[:top]
        proj = deconv_project(model, images[chosen], layer_index, c)
        for j, n in enumerate(chosen):
            h0, h1, w0, w1 = (int(v) for v in proj.box[j])
            ax = fig.add_subplot(grid[r, 2 * j])
            pattern = proj.pattern[j][:, h0:h1, w0:w1]
            if pattern.shape[0] == 1:
                _show_signed(ax, pattern[0])
            else:
                ax.imshow(_unit_rgb(pattern))
                _bare(ax)
            ax.set_title(f"pattern, a={float(proj.activation[j]):.2g}", fontsize=7, pad=2)
            if j == 0:
                ax.set_ylabel(f"map {c}", fontsize=9)
            ax2 = fig.add_subplot(grid[r, 2 * j + 1])
            _show_image(ax2, images[n][:, h0:h1, w0:w1], f"image {n}", fontsize=7)
            ax2.title.set_position((0.5, 1.0))
    layers = _layers(model)
    after = f" after layer {layer_index - 1}'s {layers[layer_index - 1].name}" if layer_index > 0 else ""
    fig.suptitle(f"deconvnet: feature maps of layer {layer_index} ({layers[layer_index].name}{after}). "
                 f"Each row: one map's {top} strongest activations a among {len(images)} images,\nprojected to pixel space "
                 f"(left; red: brighter, blue: darker) beside the image patch in the unit's "
                 f"receptive field (right)", fontsize=9)
    return _finish(fig, path)
