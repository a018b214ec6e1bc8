"""2-D convolution (cross-correlation, as PyTorch), forward and backward, by im2col and GEMM.

    y[n, o, oh, ow] = b[o] + sum_{c, kh, kw} w[o, c, kh, kw] * xpad[n, c, oh*SH + kh, ow*SW + kw]

im2col copies every receptive field into a column of ``col``; the convolution is then one matrix product
with the weights seen as a (Cout, Cin*KH*KW) matrix. Backward is two more products with the same ``col``:
``gw = gy @ col.T`` (the weight-sharing sum over every position and image) and ``gcol = w.T @ gy``, whose
columns col2im adds back onto the input positions they were copied from (the input gradient).

The layout of ``col`` is (Cin*KH*KW, OH*OW*N): rows ordered (c, kh, kw) as in the weight, columns
(oh, ow, n) with the **batch innermost**. Every GEMM is then a plain 2-D product, and on the CPU im2col
and col2im move runs of OW*N contiguous numbers per (c, kh, kw, oh) instead of runs of OW (2-3x faster
on LeNet's layers). The price is one transpose of y and one of gy between (Cout, OH, OW, N) and NCHW,
each the size of an activation: ``col`` is Cin*KH*KW/Cout times larger (4x and 9x in LeNet-5).

GPU: Numba kernels for im2col (a thread per ``col`` element), col2im (a thread per input element that
gathers every (kh, kw, oh, ow) it was copied to: deterministic, no atomics, no zero fill) and the bias
gradient (a block per output channel, a tree reduction in shared memory); cuBLAS for the GEMMs. CPU:
NumPy, im2col as one copy of a ``sliding_window_view``, col2im as a loop over (kh, kw) of strided adds,
OpenBLAS for the GEMMs (small ones split into a GEMM per output row, which OpenBLAS runs faster).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import backend
from ..backend import cuda, gpu_kernel, launch, matmul, on_gpu, xp
from .activation import activation_forward, bias_activation


def _two(v) -> tuple:
    """``2 -> (2, 2)``; a pair stays a pair (kernel functions take either, as the layers do)."""
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    if size + 2 * pad < kernel:
        raise ValueError(f"conv: kernel {kernel} is larger than the padded input {size} + 2*{pad}")
    return (size + 2 * pad - kernel) // stride + 1


# ---------------------------------------------------------------------------------------- GPU kernels
# ``col`` reaches the kernels as its 6-d view (C, KH, KW, OH, OW, N), so that indices read as names.

@gpu_kernel
def _im2col_kernel(x, col, SH, SW, PH, PW):
    i = cuda.grid(1)
    if i >= col.size:
        return
    H, W = x.shape[2], x.shape[3]
    KH, KW, OH, OW, N = col.shape[1], col.shape[2], col.shape[3], col.shape[4], col.shape[5]
    n = i % N
    ow = (i // N) % OW
    oh = (i // (N * OW)) % OH
    kw = (i // (N * OW * OH)) % KW
    kh = (i // (N * OW * OH * KW)) % KH
    c = i // (N * OW * OH * KW * KH)
    h = oh * SH - PH + kh
    w = ow * SW - PW + kw
    if 0 <= h < H and 0 <= w < W:
        col[c, kh, kw, oh, ow, n] = x[n, c, h, w]
    else:
        col[c, kh, kw, oh, ow, n] = 0      # the zero padding exists only here, never as an array


@gpu_kernel
def _col2im_kernel(col, gx, SH, SW, PH, PW):
    i = cuda.grid(1)
    if i >= gx.size:
        return
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    KH, KW, OH, OW = col.shape[1], col.shape[2], col.shape[3], col.shape[4]
    w = i % W
    h = (i // W) % H
    c = (i // (W * H)) % C
    n = i // (W * H * C)
    hp = h + PH                 # position in the padded input
    wp = w + PW
    # the outputs whose window covers (hp, wp): oh*SH <= hp <= oh*SH + KH - 1, at offset kh = hp - oh*SH
    oh_start, oh_end = max((hp - KH + SH) // SH, 0), min(hp // SH + 1, OH)
    ow_start, ow_end = max((wp - KW + SW) // SW, 0), min(wp // SW + 1, OW)
    acc = gx.dtype.type(0)
    for oh in range(oh_start, oh_end):
        for ow in range(ow_start, ow_end):
            acc += col[c, hp - oh * SH, wp - ow * SW, oh, ow, n]
    gx[n, c, h, w] = acc


@gpu_kernel
def _bias_grad_kernel(gy2, gb):
    # One block per output channel c sums the row gy2[c, :]: each thread a strided partial sum (reads
    # coalesced), then a tree in shared memory (blockDim.x entries, a power of two, sized at launch).
    # A fixed order, so the result is the same every run.
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    partial = cuda.shared.array(0, dtype=gy2.dtype)
    acc = gy2.dtype.type(0)
    for j in range(t, gy2.shape[1], threads):
        acc += gy2[c, j]
    partial[t] = acc
    cuda.syncthreads()
    half = threads // 2
    while half > 0:
        if t < half:
            partial[t] += partial[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        gb[c] = partial[0]


# ---------------------------------------------------------------------------------------- im2col, col2im

def im2col(x, KH: int, KW: int, stride, padding):
    """The (C*KH*KW, OH*OW*N) matrix whose column (oh, ow, n) is the receptive field of output (oh, ow)
    of image n, zero padding included; rows in the weight's (c, kh, kw) order."""
    N, C, H, W = x.shape
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    OH, OW = _output_size(H, KH, SH, PH), _output_size(W, KW, SW, PW)
    if on_gpu(x):
        col = backend.empty((C, KH, KW, OH, OW, N), x.dtype, x)
        launch(_im2col_kernel, col.size, xp(x).ascontiguousarray(x), col, SH, SW, PH, PW)
        return col.reshape(C * KH * KW, OH * OW * N)
    # batch innermost from the start, so that the copy below moves contiguous runs of OW*N numbers
    xt = np.zeros((C, H + 2 * PH, W + 2 * PW, N), dtype=x.dtype)
    xt[:, PH:PH + H, PW:PW + W, :] = x.transpose(1, 2, 3, 0)
    windows = sliding_window_view(xt, (KH, KW), axis=(1, 2))[:, ::SH, ::SW]   # (C, OH, OW, N, KH, KW)
    col = np.empty((C, KH, KW, OH, OW, N), dtype=x.dtype)
    np.copyto(col, windows.transpose(0, 4, 5, 1, 2, 3))
    return col.reshape(C * KH * KW, OH * OW * N)


def col2im(col, x_shape, KH: int, KW: int, stride, padding):
    """The inverse scatter of :func:`im2col`: an x-shaped array where each input element is the sum of
    every entry of ``col`` that im2col copied from it (entries copied from the padding are dropped)."""
    N, C, H, W = x_shape
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    OH, OW = _output_size(H, KH, SH, PH), _output_size(W, KW, SW, PW)
    col6 = col.reshape(C, KH, KW, OH, OW, N)
    if on_gpu(col):
        gx = backend.empty((N, C, H, W), col.dtype, col)
        launch(_col2im_kernel, gx.size, xp(col).ascontiguousarray(col6), gx, SH, SW, PH, PW)
        return gx
    gxt = np.zeros((C, H + 2 * PH, W + 2 * PW, N), dtype=col.dtype)
    for kh in range(KH):
        for kw in range(KW):
            # output (oh, ow) read the padded input at (oh*SH + kh, ow*SW + kw)
            gxt[:, kh:kh + SH * OH:SH, kw:kw + SW * OW:SW] += col6[:, kh, kw]
    return np.ascontiguousarray(gxt[:, PH:PH + H, PW:PW + W].transpose(3, 0, 1, 2))


# ---------------------------------------------------------------------------------------- the passes

def conv2d_forward(x, w, b, stride, padding, activation: str = "identity", slope: float = 0.01):
    """``y = act(conv(x, w) + b)`` for x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout,) or None.

    Returns ``(y, col)``: y is (N, Cout, OH, OW); ``col`` is :func:`im2col` of x, kept for backward.
    """
    N = x.shape[0]
    Cout, _, KH, KW = w.shape
    col = im2col(x, KH, KW, stride, padding)
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    OH, OW = _output_size(x.shape[2], KH, SH, PH), _output_size(x.shape[3], KW, SW, PW)
    y = _matmul_by_rows(w.reshape(Cout, -1), col, OH)                      # (Cout, OH*OW*N)
    y = _to_nchw(y.reshape(Cout, OH, OW, N))
    if b is not None:
        return bias_activation(y, b, activation, slope), col
    if activation != "identity":
        y = activation_forward(activation, y, slope)
    return y, col


def conv2d_backward(x_shape, col, w, gy, stride, padding, need_gx: bool = True, need_gb: bool = True,
                    need_gw: bool = True):
    """``(gx, gw, gb)`` from ``gy`` = dL/d(conv output before the activation), shape (N, Cout, OH, OW).

    gw sums over every output position and image (the weights are shared); gb sums gy over N, OH, OW.
    gx is None unless ``need_gx`` (the first layer needs none), gb None unless ``need_gb``, gw None unless
    ``need_gw`` (a saliency map wants gx alone).
    """
    Cout, _, KH, KW = w.shape
    N, _, OH, OW = gy.shape
    # gy in col's column order (oh, ow, n): each channel one contiguous row
    gy2 = xp(gy).ascontiguousarray(gy.transpose(1, 2, 3, 0)).reshape(Cout, OH * OW * N)
    gw = _weight_grad(gy2, col, OH).reshape(w.shape) if need_gw else None
    gb = _bias_grad(gy2) if need_gb else None
    gx = None
    if need_gx:
        gcol = _matmul_by_rows(w.reshape(Cout, -1).T, gy2, OH)             # (Cin*KH*KW, OH*OW*N)
        gx = col2im(gcol, x_shape, KH, KW, stride, padding)
    return gx, gw, gb


def _to_nchw(y):
    """A C-contiguous (N, Cout, OH, OW) copy of y (Cout, OH, OW, N): the batch axis moves to the front."""
    if on_gpu(y):
        return xp(y).ascontiguousarray(y.transpose(3, 0, 1, 2))
    # a channel at a time, so that its (OH, OW, N) block stays in cache while it is read across the batch
    # (1.5x faster than one transposing copy on LeNet's first layer, never slower)
    out = np.empty((y.shape[3],) + y.shape[:3], dtype=y.dtype)
    for o in range(y.shape[0]):
        out[:, o] = y[o].transpose(2, 0, 1)
    return out


def _matmul_by_rows(a, b, OH: int):
    """``a @ b`` for b (K, OH*OW*N); on the CPU, when ``a`` is small, computed as OH GEMMs, one per output
    row, each writing its slice of the one result (strided views, no copy).

    Measured with OpenBLAS: 1.5-3x faster than the single GEMM for LeNet's first layer (a is 6 x 25, b
    100k columns long), no faster for larger ``a``.
    """
    if on_gpu(b) or a.size > 1024:
        return matmul(a, b)
    M, K = a.shape
    L = b.shape[1] // OH
    out = np.empty((M, b.shape[1]), dtype=b.dtype)
    matmul(a, b.reshape(K, OH, L).transpose(1, 0, 2), out=out.reshape(M, OH, L).transpose(1, 0, 2))
    return out


def _weight_grad(gy2, col, OH: int):
    """``gy2 @ col.T``, the (Cout, Cin*KH*KW) sum over the OH*OW*N columns."""
    K, Cout = col.shape[0], gy2.shape[0]
    L = col.shape[1] // OH                  # the OW*N columns of one output row
    if on_gpu(col) or 8 * Cout > L:
        return matmul(gy2, col.T)
    # On the CPU the same sum runs as OH GEMMs, one per output row, added afterwards: a batched matmul over
    # strided views of the same arrays, no copy. OpenBLAS runs them up to 4x faster than the one GEMM on
    # LeNet's layers (a 100k-long inner dimension for a 25 x 6 result is its worst case) and no slower on
    # larger ones. The OH partial products (OH x Cin*KH*KW x Cout) are at most 1/8 of col's size.
    rows = matmul(col.reshape(K, OH, L).transpose(1, 0, 2), gy2.reshape(Cout, OH, L).transpose(1, 2, 0))
    return rows.sum(axis=0).T


def _bias_grad(gy2):
    """The sum of each row of gy2 (Cout, L): dL/db."""
    if on_gpu(gy2):
        Cout, L = gy2.shape
        threads = 32                   # a power of two, up to 256, no larger than a row needs
        while threads < min(L, 256):
            threads *= 2
        gb = backend.empty((Cout,), gy2.dtype, gy2)
        launch(_bias_grad_kernel, Cout * threads, gy2, gb, threads=threads, shared_bytes=threads * gy2.itemsize)
        return gb
    return gy2.sum(axis=1)
