"""Dense (fully connected): y = act(x W^T + b) on (N, in_features) inputs, forward and backward.

Forward is one GEMM and the bias add fused with the activation that follows (one elementwise launch,
:func:`gpucnn.kernels.activation.bias_activation`). Backward is the activation's backward fused with the
bias gradient gb = sum over the batch (one Numba kernel), then two GEMMs, gw = gz^T x and gx = gz W.

The bias gradient is our own kernel rather than a GEMM with a ones vector: it reads the gradient once
either way (the work is memory-bound and tiny), it also applies the activation's derivative, it is our
code that the "sim" tests run (a GEMM there is NumPy's), it sums in a fixed order (the same result every
run), and it needs no ones vector to allocate and keep per batch size. A block is 32 neighbouring features
(a warp's lanes: each row's read is coalesced) by a few rows, and the batch is split into chunks of rows over
many blocks (one block for the whole gradient took 82-127 us on an H200); the chunks' sums are added by the
last block of each 32 features (gpucnn.kernels.reduce).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import cuda, gpu_kernel, matmul, on_gpu
from .activation import activation_forward, bias_activation
from .activations import act_grad, dispatching, get
from .reduce import chunk_of, grid_sums, launch_reduction, split


_LANES = 32         # features a block takes: a warp's lanes


@dispatching
@gpu_kernel
def _bias_grad_kernel(gy, y, gz, gb, partials, tickets, kind, slope, write_gz):
    """Block (tile of 32 features, chunk of rows), thread (r, lane): for f = tile*32 + lane of gy, y (N, F) and
    rows r, r + rows, ... of the chunk, gz[n, f] = gy[n, f] * act'(y[n, f]) (``kind`` as in
    gpucnn.kernels.activations, act' from the activation's output y); gb[f] = the sum over the batch
    (reduce.grid_sums: the rows of the block, then the chunks, in a fixed order)."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, F = gy.shape
    tiles = (F + _LANES - 1) // _LANES
    tile, chunk, chunks, start, end = chunk_of(N, tiles)
    lane = t % _LANES
    f = tile * _LANES + lane
    zero = gy.dtype.type(0)
    one = gy.dtype.type(1)
    partial = cuda.shared.array(0, dtype=gy.dtype)
    acc = zero
    if f < F:
        for n in range(start + t // _LANES, end, threads // _LANES):
            g = act_grad(kind, gy[n, f], y[n, f], slope, zero, one)
            if write_gz:
                gz[n, f] = g
            acc += g
    partial[t] = acc
    if grid_sums(partial, t, threads, _LANES, partials, tickets, tile, chunk, chunks) and t < _LANES and f < F:
        gb[f] = partial[t]


def _gemm(a, b, out=None):
    """a @ b. BLAS reads transposed views in place (no copies); on the GPU path the output comes from
    backend.empty (unless ``out`` is given), so gpucnn.profile counts its bytes and a training step's
    workspace supplies it."""
    if out is None and on_gpu(a):
        out = backend.empty((a.shape[0], b.shape[1]), a.dtype, a)
    return matmul(a, b, out=out)


def dense_forward(x, w, b, activation="identity", slope=0.01):
    """act(x W^T + b) for x (N, in), w (out, in), b (out,) or None; a new (N, out) array."""
    y = _gemm(x, w.T)
    if b is not None:
        return bias_activation(y, b, activation, slope)
    if activation != "identity":
        return activation_forward(activation, y, slope)
    return y


def dense_backward(x, w, gy, need_gx=True, need_gb=True, y=None, activation="identity", slope=0.01,
                   gw_out=None, gb_out=None):
    """``(gx, gw, gb)`` from gy (N, out): gx = gz W, gw = gz^T x, gb = sum_n gz; None where not needed.

    Without ``activation`` gz is gy, the gradient of x W^T + b. With it, gy is the gradient of the
    activation's output ``y`` and gz = gy * act'(y) is computed with gb in one pass. ``gw_out`` and
    ``gb_out`` are arrays to write gw and gb into (a flat gradient buffer's views).
    """
    gz, gb = _activation_bias_backward(gy, y, activation, slope, need_gb, gb_out)
    gw = _gemm(gz.T, x, out=gw_out)
    gx = _gemm(gz, w) if need_gx else None
    return gx, gw, gb


def _activation_bias_backward(gy, y, kind, slope, need_gb, gb_out):
    """(gz, gb): gz = gy * act'(y) (gy itself for "identity") and gb = its sum over the batch (into gb_out)."""
    activation = get(kind)
    if on_gpu(gy):
        gy = backend.xp(gy).ascontiguousarray(gy)
        write_gz = kind != "identity"
        gz = backend.empty(gy.shape, gy.dtype, gy) if write_gz else gy
        gb = gb_out if (need_gb and gb_out is not None) else backend.empty((gy.shape[1],), gy.dtype, gy)
        N, F = gy.shape
        tiles = -(-F // _LANES)
        rows = 2 if backend.sim_sized() else 8         # a block: 32 features by 8 rows (2 on "sim": Python threads)
        chunks = split(N, tiles, rows, gy.size)
        launch_reduction(_bias_grad_kernel, (gy, gy if y is None or not write_gz else y, gz, gb),
                         (activation.code, gy.dtype.type(slope), write_gz), (tiles * _LANES, chunks, gy.dtype),
                         tiles, gy, rows * _LANES, tiles * chunks, rows * _LANES * gy.itemsize)
        return gz, (gb if need_gb else None)
    gz = gy if kind == "identity" else activation.numpy_grad(gy, y, slope, np.empty_like(gy))
    return gz, (gz.sum(axis=0, out=gb_out) if need_gb else None)
