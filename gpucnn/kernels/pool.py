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
from ..backend import cuda, gpu_kernel, launch, on_gpu


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
# Each thread decomposes its flat index into named indices; windows are clipped to the real input, so
# padding is never read and never written.

@gpu_kernel
def _maxpool2d_forward_kernel(x, y, switches, KH, KW, SH, SW, PH, PW):
    i = cuda.grid(1)
    if i >= y.size:
        return
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    OH, OW = y.shape[2], y.shape[3]
    ow = i % OW
    oh = (i // OW) % OH
    c = (i // (OW * OH)) % C
    n = i // (OW * OH * C)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    h_start, h_end = max(h0, 0), min(h0 + KH, H)
    w_start, w_end = max(w0, 0), min(w0 + KW, W)
    best = x[n, c, h_start, w_start]
    arg = h_start * W + w_start
    for h in range(h_start, h_end):
        for w in range(w_start, w_end):
            v = x[n, c, h, w]
            # strict '>': the first maximum keeps the switch; a NaN beats numbers, the first NaN stays
            if v > best or (v != v and best == best):
                best = v
                arg = h * W + w
    y[n, c, oh, ow] = best
    switches[n, c, oh, ow] = arg


@gpu_kernel
def _maxpool2d_backward_kernel(gy, switches, gx, KH, KW, SH, SW, PH, PW):
    i = cuda.grid(1)
    if i >= gx.size:
        return
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    OH, OW = gy.shape[2], gy.shape[3]
    w = i % W
    h = (i // W) % H
    c = (i // (W * H)) % C
    n = i // (W * H * C)
    # the outputs whose window covers (h, w): oh*SH - PH <= h <= oh*SH - PH + KH - 1
    oh_start, oh_end = max((h + PH - KH + SH) // SH, 0), min((h + PH) // SH + 1, OH)
    ow_start, ow_end = max((w + PW - KW + SW) // SW, 0), min((w + PW) // SW + 1, OW)
    me = h * W + w
    acc = gx.dtype.type(0)
    for oh in range(oh_start, oh_end):
        for ow in range(ow_start, ow_end):
            if switches[n, c, oh, ow] == me:
                acc += gy[n, c, oh, ow]
    gx[n, c, h, w] = acc


@gpu_kernel
def _avgpool2d_forward_kernel(x, y, KH, KW, SH, SW, PH, PW):
    i = cuda.grid(1)
    if i >= y.size:
        return
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    OH, OW = y.shape[2], y.shape[3]
    ow = i % OW
    oh = (i // OW) % OH
    c = (i // (OW * OH)) % C
    n = i // (OW * OH * C)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    acc = y.dtype.type(0)
    for h in range(max(h0, 0), min(h0 + KH, H)):
        for w in range(max(w0, 0), min(w0 + KW, W)):
            acc += x[n, c, h, w]
    y[n, c, oh, ow] = acc / y.dtype.type(KH * KW)   # padded zeros count: always divide by KH*KW


@gpu_kernel
def _avgpool2d_backward_kernel(gy, gx, KH, KW, SH, SW, PH, PW):
    i = cuda.grid(1)
    if i >= gx.size:
        return
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    OH, OW = gy.shape[2], gy.shape[3]
    w = i % W
    h = (i // W) % H
    c = (i // (W * H)) % C
    n = i // (W * H * C)
    oh_start, oh_end = max((h + PH - KH + SH) // SH, 0), min((h + PH) // SH + 1, OH)
    ow_start, ow_end = max((w + PW - KW + SW) // SW, 0), min((w + PW) // SW + 1, OW)
    acc = gx.dtype.type(0)
    for oh in range(oh_start, oh_end):
        for ow in range(ow_start, ow_end):
            acc += gy[n, c, oh, ow]
    gx[n, c, h, w] = acc / gx.dtype.type(KH * KW)


# ---------------------------------------------------------------------------------------- CPU twins

def _pad(x, padding, value):
    """``x`` with ``padding`` rows/columns of ``value`` around each H x W plane (``x`` itself when none)."""
    PH, PW = padding
    if PH == 0 and PW == 0:
        return x
    N, C, H, W = x.shape
    out = np.full((N, C, H + 2 * PH, W + 2 * PW), value, dtype=x.dtype)
    out[:, :, PH:PH + H, PW:PW + W] = x
    return out


def _windows(a, kernel, stride, writeable=False):
    """The (N, C, OH, OW, KH, KW) view of every pooling window of the (padded) array ``a``; no copy.

    ``_windows(a)[..., kh, kw]`` is the (N, C, OH, OW) view of the element at offset (kh, kw) of every
    window: the unit the CPU code works in, one vectorised operation per window offset.
    """
    (KH, KW), (SH, SW) = kernel, stride
    return sliding_window_view(a, (KH, KW), axis=(2, 3), writeable=writeable)[:, :, ::SH, ::SW]


def _maxpool2d_forward_cpu(x, kernel, stride, padding):
    N, C, OH, OW = _output_shape(x.shape, kernel, stride, padding)
    H, W = x.shape[2:]
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    win = _windows(_pad(x, padding, -np.inf), kernel, stride)
    offsets = [(kh, kw) for kh in range(KH) for kw in range(KW)]     # window order
    # One strided copy per window offset into a contiguous stack; every later pass is then over
    # contiguous memory (a ufunc over a strided (N, C, OH, OW) view runs row by row, OW at a time,
    # and costs several times more).
    stack = np.empty((len(offsets), N, C, OH, OW), dtype=x.dtype)
    for k, (kh, kw) in enumerate(offsets):
        stack[k] = win[..., kh, kw]
    y = stack.max(axis=0)                                            # NaN-propagating, as the GPU's

    # The switch is the first offset in window order that holds the maximum. Its number is the count of
    # leading misses; a window that misses up to the last offset hits there, so the last is never
    # compared. Where y is NaN every element compares unequal, so NaNs are made hits: the first NaN wins.
    miss = stack[:-1] != y
    if np.isnan(y).any():
        miss &= ~np.isnan(stack[:-1])
    rows = np.arange(OH) * SH - PH                                   # first row of each window
    cols = np.arange(OW) * SW - PW
    if PH or PW:                                                     # a padded -inf never ties a real -inf
        for k, (kh, kw) in enumerate(offsets[:-1]):
            miss[k] |= ~(((rows + kh >= 0) & (rows + kh < H))[:, None] & ((cols + kw >= 0) & (cols + kw < W)))
    first = np.zeros((N, C, OH, OW), dtype=np.min_scalar_type(len(offsets)))   # uint8 for usual windows
    still_missing = np.ones((N, C, OH, OW), dtype=bool)
    for k in range(len(offsets) - 1):
        still_missing &= miss[k]
        first += still_missing
    offset_flat = np.array([kh * W + kw for kh, kw in offsets], dtype=np.int32)
    switches = np.take(offset_flat, first)
    switches += (rows[:, None] * W + cols).astype(np.int32)
    return y, switches


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
    (KH, KW) = kernel
    win = _windows(_pad(x, padding, 0), kernel, stride)
    y = win[..., 0, 0].copy()
    for kh in range(KH):
        for kw in range(KW):
            if kh or kw:
                y += win[..., kh, kw]
    y /= x.dtype.type(KH * KW)
    return y


def _avgpool2d_backward_cpu(gy, x_shape, kernel, stride, padding):
    N, C, H, W = x_shape
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    g = gy / gy.dtype.type(KH * KW)
    gx = np.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=gy.dtype)
    gwin = _windows(gx, kernel, stride, writeable=True)
    overlapping = SH < KH or SW < KW
    for kh in range(KH):
        for kw in range(KW):
            if overlapping:
                gwin[..., kh, kw] += g  # one offset's view never overlaps itself, so += is exact
            else:
                gwin[..., kh, kw] = g   # each input element is in one window at most: no read needed
    if PH or PW:
        gx = np.ascontiguousarray(gx[:, :, PH:PH + H, PW:PW + W])
    return gx


# ---------------------------------------------------------------------------------------- the functions layers call

def maxpool2d_forward(x, kernel, stride, padding):
    """Max over each window of (N, C, H, W) ``x``; returns ``(y, switches)``, switches int32 flat
    indices ``h * W + w`` into each input plane (see the module docstring)."""
    if not on_gpu(x):
        return _maxpool2d_forward_cpu(x, kernel, stride, padding)
    x = backend.xp(x).ascontiguousarray(x)
    shape = _output_shape(x.shape, kernel, stride, padding)
    y = backend.empty(shape, x.dtype, x)
    switches = backend.empty(shape, np.int32, x)
    launch(_maxpool2d_forward_kernel, y.size, x, y, switches, *kernel, *stride, *padding)
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
    launch(_maxpool2d_backward_kernel, gx.size, gy, switches, gx, *kernel, *stride, *padding)
    return gx


def avgpool2d_forward(x, kernel, stride, padding):
    """Mean over each window of (N, C, H, W) ``x``, padded zeros included (divide by KH*KW)."""
    if not on_gpu(x):
        return _avgpool2d_forward_cpu(x, kernel, stride, padding)
    x = backend.xp(x).ascontiguousarray(x)
    y = backend.empty(_output_shape(x.shape, kernel, stride, padding), x.dtype, x)
    launch(_avgpool2d_forward_kernel, y.size, x, y, *kernel, *stride, *padding)
    return y


def avgpool2d_backward(gy, x_shape, kernel, stride, padding):
    """dL/dx: each input element receives gy / (KH*KW) from every window that covers it."""
    x_shape = tuple(int(s) for s in x_shape)
    if not on_gpu(gy):
        return _avgpool2d_backward_cpu(gy, x_shape, kernel, stride, padding)
    gy = backend.xp(gy).ascontiguousarray(gy)
    gx = backend.empty(x_shape, gy.dtype, gy)
    launch(_avgpool2d_backward_kernel, gx.size, gy, gx, *kernel, *stride, *padding)
    return gx
