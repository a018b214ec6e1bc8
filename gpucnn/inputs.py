"""What a Sequential does to raw images before its first layer: per-channel standardisation,
``(x - mean) / std``, with the statistics of the training set computed once (:func:`channel_statistics`, in
float64) and applied to every batch in the model's dtype (:func:`standardize`)."""
from __future__ import annotations

import numpy as np

from . import backend


def channel_statistics(images):
    """``(mean, std)`` per channel (axis 1) of host ``images``, float64, in chunks (no float64 copy of the whole
    set), or from exact integer sums for uint8 images; a constant channel gets std 1."""
    images = backend.to_numpy(images)
    if images.dtype == np.uint8 and images.size:
        # 8-bit images: exact integer sums of x and x^2 (255^2 fits uint16, the sums uint64), a few cheap
        # passes where the float64 route below costs most of a second on 60,000 MNIST images
        C = images.shape[1]
        rows = max(1, (1 << 22) // max(1, images[0].size))
        s1, s2 = np.zeros(C, np.uint64), np.zeros(C, np.uint64)
        for i in range(0, len(images), rows):
            for c in range(C):
                sq = images[i:i + rows, c].astype(np.uint16)
                s1[c] += np.add.reduce(sq, axis=None, dtype=np.uint64)
                np.multiply(sq, sq, out=sq)
                s2[c] += np.add.reduce(sq, axis=None, dtype=np.uint64)
        n = images.size // C
        mean = s1.astype(np.float64) / n
        std = np.sqrt(np.maximum(s2.astype(np.float64) / n - mean * mean, 0.0))
        std[std == 0] = 1.0
        return mean, std
    axes = (0,) + tuple(range(2, images.ndim))
    per_channel = images.size // max(images.shape[1], 1)
    rows = max(1, (1 << 22) // max(1, images[0].size))
    bshape = (1, -1) + (1,) * (images.ndim - 2)
    total = np.zeros(images.shape[1])
    for i in range(0, len(images), rows):
        total += images[i:i + rows].sum(axis=axes, dtype=np.float64)
    mean = total / per_channel
    sq = np.zeros(images.shape[1])
    for i in range(0, len(images), rows):
        d = images[i:i + rows].astype(np.float64) - mean.reshape(bshape)
        d *= d
        sq += d.sum(axis=axes)
    std = np.sqrt(sq / per_channel)
    std[std == 0] = 1.0
    return mean, std


def standardize(xb, dtype, mean, std, cache=None):
    """``(x, cache)``: the batch ``xb`` in ``dtype`` (always a new array), minus ``mean``, times 1/``std``, per
    channel. ``cache`` (what the last call returned, or None) keeps mean and 1/std on xb's device in ``dtype``,
    made once; it is made again when the statistics or the device change."""
    made_for = (backend.is_cupy(xb), xb.ndim)
    if cache is None or cache[0] != made_for or cache[1] is not mean or cache[2] is not std:
        shape = (1, -1) + (1,) * (xb.ndim - 2)
        put = backend.asarray if backend.is_cupy(xb) else np.asarray
        m = put(np.asarray(mean, np.float64).astype(dtype).reshape(shape))
        inv = put((1.0 / np.asarray(std, np.float64)).astype(dtype).reshape(shape))
        cache = (made_for, mean, std, m, inv)
    x = xb.astype(dtype)
    x -= cache[3]
    x *= cache[4]
    return x, cache
