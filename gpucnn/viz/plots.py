"""The AlexNet paper's pictures and the learning curves: a model's first-layer filters, its feature maps for
one image, each image's five most probable classes, its nearest neighbours in the last hidden layer's features,
and loss and accuracy per epoch."""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..layers import Conv2D, Dense, LeakyReLU, ReLU, Sigmoid, Tanh
from .common import (_as_batch, _bare, _class_name, _figure, _finish, _grid_columns, _layers, _show_image,
                     _show_signed, _unit_rgb, features)

ACTIVATIONS = (ReLU, LeakyReLU, Tanh, Sigmoid)


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

def _last_hidden(model) -> int:
    """How many layers lead to the last hidden layer's features: all up to the last Dense (the classifier)."""
    layers = _layers(model)
    dense = [i for i, layer in enumerate(layers) if isinstance(layer, Dense)]
    return dense[-1] if dense else len(layers) - 1


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
