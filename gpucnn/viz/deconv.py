"""Zeiler & Fergus's deconvnet: a feature map's strongest unit projected back to pixel space through the layers
below it, the receptive field that bounds it, and the picture of each map's strongest patterns."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from ..kernels import conv as conv_kernels
from ..kernels import pool as pool_kernels
from ..layers import (AvgPool2D, BatchNorm2D, Conv2D, Dropout, LeakyReLU, LocalResponseNorm, MaxPool2D, ReLU,
                      Sigmoid, Tanh)
from .common import (_as_batch, _bare, _figure, _finish, _forward, _layers, _show_image, _show_signed, _unit_rgb,
                     features)


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
    """The conv's input gradient for output gradient ``g`` (N, Cout, OH, OW): the transposed filters applied by the
    layer's convolution algorithm's grad_input (per group), which needs no forward cache."""
    gz = backend.xp(g).ascontiguousarray(g.transpose(1, 2, 3, 0))           # the GEMM layout (Cout, OH, OW, N)
    saved = conv_kernels.Saved(conv_kernels.GEMM, x_shape, layer.kernel_size, layer.stride, layer.padding, None,
                               groups=getattr(layer, "groups", 1))
    return conv_kernels.GEMM.grad_input(saved, layer.params["weight"], gz)


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
