"""Pooling: max and average over KH x KW windows, forward and backward.

Output size per axis: O = floor((W - K + 2P) / S) + 1. Callers keep 2P <= K (as PyTorch), so every window
holds at least one real input element.

Max pooling records the *switches*: for each output, the flat index ``h * W + w`` in its input's H x W
plane of the element that won (PyTorch's ``return_indices`` convention, so a deconvnet unpools with them
without knowing kernel, stride or padding). Padded positions never win. Ties go to the first maximum in
window order (row by row), as in PyTorch. A NaN wins over every number, so a diverging net is not hidden;
the first NaN of a window is its switch (PyTorch's CPU code keeps the last: only which NaN differs).

Average pooling divides by KH*KW always: padded zeros count (PyTorch's ``count_include_pad=True``).

GPU: Numba kernels. Forward runs a thread per output element. Backward runs a thread per *input* element
that gathers every window covering it: deterministic, no atomics, and overlapping windows (AlexNet's 3x3
stride 2) need nothing special. CPU: NumPy, a loop over the KH*KW window offsets of whole-array operations
on strided views (``sliding_window_view``), never over pixels.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import backend
from ..backend import cuda, gpu_device, gpu_kernel, launch, on_gpu


def _output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    out = (size - kernel + 2 * pad) // stride + 1
    if size - kernel + 2 * pad < 0 or out < 1:
        raise ValueError(f"pool: kernel {kernel} is larger than the padded input {size} + 2*{pad}")
    return out


def _output_shape(x_shape, kernel, stride, padding):
    if any(2 * p > k for p, k in zip(padding, kernel)):
        # a window wholly in the padding would read outside the input in the GPU kernels
        raise ValueError(f"pool: padding {tuple(padding)} must be at most half the kernel {tuple(kernel)}")
    N, C, H, W = x_shape
    return (N, C, _output_size(H, kernel[0], stride[0], padding[0]),
            _output_size(W, kernel[1], stride[1], padding[1]))


# ---------------------------------------------------------------------------------------- GPU kernels
# Each thread decomposes its flat index into named indices; windows are clipped to the real input, so padding is
# never read and never written. The device functions below are the window, tie-break and gather rules of every
# pooling kernel, these and the fused epilogues of gpucnn.kernels.activation.

@gpu_device
def nchw(i, shape):
    """The indices (n, c, h, w) of the flat index i into an array of ``shape`` (N, C, H, W)."""
    C, H, W = shape[1], shape[2], shape[3]
    w = i % W
    h = (i // W) % H
    c = (i // (W * H)) % C
    return i // (W * H * C), c, h, w


@gpu_device
def window(o, stride, pad, kernel, size):
    """The range [start, end) of the input rows (or columns) in output row o's window, clipped to the input."""
    start = o * stride - pad
    return max(start, 0), min(start + kernel, size)


@gpu_device
def covering(i, stride, pad, kernel, out_size):
    """The range [start, end) of the outputs whose window covers input row (or column) i:
    o*S - P <= i <= o*S - P + K - 1."""
    return max((i + pad - kernel + stride) // stride, 0), min((i + pad) // stride + 1, out_size)


@gpu_device
def max_wins(v, best):
    """Whether v takes a window's maximum from best: strict '>' keeps the first maximum; a NaN beats numbers, and
    the first NaN stays."""
    return v > best or (v != v and best == best)


@gpu_device
def gather(gy, switches, n, c, h, w, W, is_max, KH, KW, SH, SW, PH, PW):
    """(g, covered): the gradient input (h, w) of plane (n, c), W wide, receives from the outputs gy[n, c] whose
    windows cover it (max: only those whose switch names it; avg: each divided by KH*KW), and whether any window
    covers it. Every pooling backward gathers so: deterministic, no atomics, overlapping windows included."""
    OH, OW = gy.shape[2], gy.shape[3]
    oh_start, oh_end = covering(h, SH, PH, KH, OH)
    ow_start, ow_end = covering(w, SW, PW, KW, OW)
    me = h * W + w
    g = gy.dtype.type(0)
    for oh in range(oh_start, oh_end):
        for ow in range(ow_start, ow_end):
            if not is_max or switches[n, c, oh, ow] == me:
                g += gy[n, c, oh, ow]
    if not is_max:
        g = g / gy.dtype.type(KH * KW)
    return g, oh_start < oh_end and ow_start < ow_end


@gpu_kernel
def _pool2d_forward_kernel(x, y, switches, is_max, KH, KW, SH, SW, PH, PW):
    """Thread per output: its window's max and the max's switch h*W + w (``is_max``), or its mean (padded zeros
    count: always divide by KH*KW; switches unused)."""
    i = cuda.grid(1)
    if i >= y.size:
        return
    H, W = x.shape[2], x.shape[3]
    n, c, oh, ow = nchw(i, y.shape)
    h_start, h_end = window(oh, SH, PH, KH, H)
    w_start, w_end = window(ow, SW, PW, KW, W)
    best = x[n, c, h_start, w_start]
    arg = h_start * W + w_start
    acc = y.dtype.type(0)
    for h in range(h_start, h_end):
        for w in range(w_start, w_end):
            v = x[n, c, h, w]
            if max_wins(v, best):
                best = v
                arg = h * W + w
            acc += v
    if is_max:
        y[n, c, oh, ow] = best
        switches[n, c, oh, ow] = arg
    else:
        y[n, c, oh, ow] = acc / y.dtype.type(KH * KW)


@gpu_kernel
def _pool2d_backward_kernel(gy, switches, gx, is_max, KH, KW, SH, SW, PH, PW):
    """Thread per input element: what :func:`gather` collects for it."""
    i = cuda.grid(1)
    if i >= gx.size:
        return
    n, c, h, w = nchw(i, gx.shape)
    gx[n, c, h, w] = gather(gy, switches, n, c, h, w, gx.shape[3], is_max, KH, KW, SH, SW, PH, PW)[0]


# ---------------------------------------------------------------------------------------- CPU twins
# Written for any layout: ``axes`` names the H and W axes (2, 3 in NCHW; the fused epilogues of
# gpucnn.kernels.activation pool a conv's GEMM output (C, H, W, N), axes 1, 2).

def _on_axes(shape, axes, values):
    """``shape`` with the sizes at ``axes`` replaced by ``values``."""
    shape = list(shape)
    shape[axes[0]], shape[axes[1]] = values
    return tuple(shape)


def _plane(a2, ndim, axes):
    """The (OH, OW) array a2 shaped to broadcast against an ndim-array whose H and W are at ``axes``."""
    return a2.reshape(_on_axes((1,) * ndim, axes, a2.shape))


def _pad(x, padding, value, axes=(2, 3)):
    """``x`` with ``padding`` rows/columns of ``value`` around each H x W plane (``x`` itself when none)."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return x
    H, W = x.shape[axes[0]], x.shape[axes[1]]
    out = np.full(_on_axes(x.shape, axes, (H + 2 * PH, W + 2 * PW)), value, dtype=x.dtype)
    out[_on_axes((slice(None),) * x.ndim, axes, (slice(PH, PH + H), slice(PW, PW + W)))] = x
    return out


def _crop(a, padding, axes):
    """The view of ``a`` without its padding."""
    (PH, PW), (H, W) = padding, (a.shape[axes[0]], a.shape[axes[1]])
    return a[_on_axes((slice(None),) * a.ndim, axes, (slice(PH, H - PH), slice(PW, W - PW)))]


def _tiles(kernel, stride, padding, in_hw, out_hw) -> bool:
    """Whether the windows tile the input exactly (LeNet's 2x2 pooling): then every window is a reshape."""
    return tuple(stride) == tuple(kernel) and not any(padding) and tuple(in_hw) == (
        out_hw[0] * kernel[0], out_hw[1] * kernel[1])


def _tiled_shape(shape, kernel, axes):
    """``shape`` with H and W split into (OH, KH) and (OW, KW): the view of tiling windows (axes consecutive)."""
    (KH, KW), (a0, a1) = kernel, axes
    return shape[:a0] + (shape[a0] // KH, KH, shape[a1] // KW, KW) + shape[a1 + 1:]


def _windows(a, kernel, stride, axes=(2, 3), writeable=False):
    """The view of every pooling window of the (padded) array ``a``, the window offsets (KH, KW) last; no copy.

    ``_windows(a)[..., kh, kw]`` is the view of the element at offset (kh, kw) of every window, OH and OW at
    ``axes``: the unit the CPU code works in, one vectorised operation per window offset.
    """
    (KH, KW), (SH, SW) = kernel, stride
    H, W = a.shape[axes[0]], a.shape[axes[1]]
    if a.flags.c_contiguous and _tiles(kernel, stride, (0, 0), (H, W), (H // KH, W // KW)):   # a reshape
        split = a.reshape(_tiled_shape(a.shape, kernel, axes))
        k0, k1 = axes[0] + 1, axes[1] + 2
        return np.moveaxis(split, (k0, k1), (-2, -1))
    win = sliding_window_view(a, (KH, KW), axis=axes, writeable=writeable)
    return win[_on_axes((slice(None),) * a.ndim, axes, (slice(None, None, SH), slice(None, None, SW)))]


def _window_first(out_hw, W, stride, padding):
    """(OH, OW): the flat index h*W + w of each window's first position (negative in the padding)."""
    rows = np.arange(out_hw[0]) * stride[0] - padding[0]
    cols = np.arange(out_hw[1]) * stride[1] - padding[1]
    return rows, cols, (rows[:, None] * W + cols).astype(np.int32)


def _max_cpu(x, kernel, stride, padding, axes=(2, 3)):
    """``(y, switches)``: the max of every window of x (H, W at ``axes``) and its switch h*W + w."""
    H, W = x.shape[axes[0]], x.shape[axes[1]]
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    win = _windows(_pad(x, padding, -np.inf, axes), kernel, stride, axes)
    offsets = [(kh, kw) for kh in range(KH) for kw in range(KW)]     # window order
    # One strided copy per window offset into a contiguous stack; every later pass is then over
    # contiguous memory (a ufunc over a strided (N, C, OH, OW) view runs row by row, OW at a time,
    # and costs several times more).
    out_shape = _on_axes(x.shape, axes, (OH, OW))
    stack = np.empty((len(offsets),) + out_shape, dtype=x.dtype)
    for k, (kh, kw) in enumerate(offsets):
        stack[k] = win[..., kh, kw]
    y = stack.max(axis=0)                                            # NaN-propagating, as the GPU's

    # The switch is the first offset in window order that holds the maximum. Its number is the count of
    # leading misses; a window that misses up to the last offset hits there, so the last is never
    # compared. Where y is NaN every element compares unequal, so NaNs are made hits: the first NaN wins.
    miss = stack[:-1] != y
    if np.isnan(y).any():
        miss &= ~np.isnan(stack[:-1])
    rows, cols, first_flat = _window_first((OH, OW), W, stride, padding)
    if PH or PW:                                                     # a padded -inf never ties a real -inf
        for k, (kh, kw) in enumerate(offsets[:-1]):
            inside = ((rows + kh >= 0) & (rows + kh < H))[:, None] & ((cols + kw >= 0) & (cols + kw < W))
            miss[k] |= ~_plane(inside, x.ndim, axes)
    first = np.zeros(out_shape, dtype=np.min_scalar_type(len(offsets)))   # uint8 for usual windows
    still_missing = np.ones(out_shape, dtype=bool)
    for k in range(len(offsets) - 1):
        still_missing &= miss[k]
        first += still_missing
    offset_flat = np.array([kh * W + kw for kh, kw in offsets], dtype=np.int32)
    switches = np.take(offset_flat, first)
    switches += _plane(first_flat, x.ndim, axes)
    return y, switches


def _avg_cpu(x, kernel, stride, padding, axes=(2, 3)):
    """The mean of every window of x (H, W at ``axes``), padded zeros included."""
    (KH, KW) = kernel
    win = _windows(_pad(x, padding, 0, axes), kernel, stride, axes)
    y = win[..., 0, 0].copy()
    for kh in range(KH):
        for kw in range(KW):
            if kh or kw:
                y += win[..., kh, kw]
    y /= x.dtype.type(KH * KW)
    return y


def _winner_offset(switches, W, stride, padding, axes):
    """Each window's winner as its offset kh*W + kw from the window's first position (switches h*W + w)."""
    out_hw = (switches.shape[axes[0]], switches.shape[axes[1]])
    return switches - _plane(_window_first(out_hw, W, stride, padding)[2], switches.ndim, axes)


def _spread_cpu(g, switches, x_shape, kernel, stride, padding, axes=(2, 3), out=None):
    """The backward of pooling by window offsets: every window's gradient g (for "avg" already divided by KH*KW;
    for "max", switches given, only at its switch) added into the input's shape at each offset's strided view.
    Into ``out`` when given."""
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    H, W = x_shape[axes[0]], x_shape[axes[1]]
    if out is not None and not (PH or PW):
        gx = out
        gx[...] = 0
    else:
        gx = np.zeros(_on_axes(x_shape, axes, (H + 2 * PH, W + 2 * PW)), dtype=g.dtype)
    gwin = _windows(gx, kernel, stride, axes, writeable=True)
    overlapping = SH < KH or SW < KW
    rel = None if switches is None else _winner_offset(switches, W, stride, padding, axes)
    for kh in range(KH):
        for kw in range(KW):
            part = g if rel is None else g * (rel == kh * W + kw)
            if overlapping:
                gwin[..., kh, kw] += part   # one offset's view never overlaps itself, so += is exact
            else:
                gwin[..., kh, kw] = part    # each input element is in one window at most: no read needed
    if not (PH or PW):
        return gx
    if out is None:
        return np.ascontiguousarray(_crop(gx, padding, axes))
    out[...] = _crop(gx, padding, axes)
    return out


def _spread_tiled(g, switches, W, kernel, axes):
    """When the windows tile the input (``_tiles``): every input position's gradient, as an array that broadcasts
    against the input's tiled view (``_tiled_shape``): "avg", g / (KH*KW), no bigger than g; "max" (switches
    given), g where the offset is its window's switch, else 0."""
    (KH, KW), split = kernel, (axes[0] + 1, axes[1] + 2)     # where KH and KW stand in the tiled view
    g6 = np.expand_dims(g, split)
    if switches is None:
        return g6 / g.dtype.type(KH * KW)
    offsets = np.arange(KH)[:, None] * W + np.arange(KW)
    offsets = np.expand_dims(offsets, tuple(i for i in range(g.ndim + 2) if i not in split))
    rel = np.expand_dims(_winner_offset(switches, W, kernel, (0, 0), axes), split)
    return g6 * (rel == offsets)


def _maxpool2d_forward_cpu(x, kernel, stride, padding):
    _output_shape(x.shape, kernel, stride, padding)       # the same errors as the GPU path
    return _max_cpu(x, kernel, stride, padding)


def _maxpool2d_backward_cpu(gy, switches, x_shape, kernel, stride, padding):
    N, C, H, W = x_shape
    gx = np.zeros(N * C * H * W, dtype=gy.dtype)
    # Every output sends its gradient to its switch. np.add.at accumulates repeated indices (overlapping
    # windows can share a winner) in output order, the order the GPU gathers in.
    plane = np.arange(N * C, dtype=np.intp)[:, None] * (H * W)
    target = (switches.reshape(N * C, -1) + plane).reshape(-1)
    np.add.at(gx, target, np.ascontiguousarray(gy).reshape(-1))
    return gx.reshape(x_shape)


def _avgpool2d_forward_cpu(x, kernel, stride, padding):
    _output_shape(x.shape, kernel, stride, padding)       # the same errors as the GPU path
    return _avg_cpu(x, kernel, stride, padding)


def _avgpool2d_backward_cpu(gy, x_shape, kernel, stride, padding):
    return _spread_cpu(gy / gy.dtype.type(kernel[0] * kernel[1]), None, x_shape, kernel, stride, padding)


# ---------------------------------------------------------------------------------------- the functions layers call

def _no_switches(like):
    """The switches argument of an average pooling's kernel (unused; Numba needs its type)."""
    return backend.empty((1, 1, 1, 1), np.int32, like)


def maxpool2d_forward(x, kernel, stride, padding):
    """Max over each window of (N, C, H, W) ``x``; returns ``(y, switches)``, switches int32 flat
    indices ``h * W + w`` into each input plane (see the module docstring)."""
    if not on_gpu(x):
        return _maxpool2d_forward_cpu(x, kernel, stride, padding)
    x = backend.xp(x).ascontiguousarray(x)
    shape = _output_shape(x.shape, kernel, stride, padding)
    y = backend.empty(shape, x.dtype, x)
    switches = backend.empty(shape, np.int32, x)
    launch(_pool2d_forward_kernel, y.size, x, y, switches, True, *kernel, *stride, *padding)
    return y, switches


def maxpool2d_backward(gy, switches, x_shape, kernel, stride, padding):
    """dL/dx: each output's gradient goes to the input element its switch names (summed where
    overlapping windows share a winner)."""
    x_shape = tuple(int(s) for s in x_shape)
    if not on_gpu(gy):
        return _maxpool2d_backward_cpu(gy, switches, x_shape, kernel, stride, padding)
    xp = backend.xp(gy)
    gy, switches = xp.ascontiguousarray(gy), xp.ascontiguousarray(switches)
    gx = backend.empty(x_shape, gy.dtype, gy)
    launch(_pool2d_backward_kernel, gx.size, gy, switches, gx, True, *kernel, *stride, *padding)
    return gx


def avgpool2d_forward(x, kernel, stride, padding):
    """Mean over each window of (N, C, H, W) ``x``, padded zeros included (divide by KH*KW)."""
    if not on_gpu(x):
        return _avgpool2d_forward_cpu(x, kernel, stride, padding)
    x = backend.xp(x).ascontiguousarray(x)
    y = backend.empty(_output_shape(x.shape, kernel, stride, padding), x.dtype, x)
    launch(_pool2d_forward_kernel, y.size, x, y, _no_switches(x), False, *kernel, *stride, *padding)
    return y


def avgpool2d_backward(gy, x_shape, kernel, stride, padding):
    """dL/dx: each input element receives gy / (KH*KW) from every window that covers it."""
    x_shape = tuple(int(s) for s in x_shape)
    if not on_gpu(gy):
        return _avgpool2d_backward_cpu(gy, x_shape, kernel, stride, padding)
    gy = backend.xp(gy).ascontiguousarray(gy)
    gx = backend.empty(x_shape, gy.dtype, gy)
    launch(_pool2d_backward_kernel, gx.size, gy, _no_switches(gy), gx, False, *kernel, *stride, *padding)
    return gx
