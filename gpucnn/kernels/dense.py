"""Dense (fully connected): y = act(x W^T + b) on (N, in_features) inputs, forward and backward.

Forward is one GEMM and the bias add fused with the activation that follows (one elementwise launch,
:func:`gpucnn.kernels.activation.bias_activation`). Backward is the activation's backward fused with the
bias gradient gb = sum over the batch (one Numba kernel with a thread per output feature), then two
GEMMs, gw = gz^T x and gx = gz W.

The bias gradient is our own kernel rather than a GEMM with a ones vector: it reads the gradient once
either way (the work is memory-bound and tiny), it also applies the activation's derivative, it is our
code that the "sim" tests run (a GEMM there is NumPy's), it sums in a fixed order (the same result every
run), and it needs no ones vector to allocate and keep per batch size. A thread per feature (rather than
conv's block per channel) because neighbouring features are neighbours in memory: each step of the
threads' loops over the batch reads one row, coalesced, with no shared memory or synchronisation.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import cuda, gpu_kernel, launch, matmul, on_gpu
from .activation import activation_forward, bias_activation
from .activations import act_grad, dispatching, get


@dispatching
@gpu_kernel
def _bias_grad_kernel(gy, y, gz, gb, kind, slope, write_gz):
    """Thread per feature f of gy, y (N, F): gz[:, f] = gy[:, f] * act'(y[:, f]) (``kind`` as in
    gpucnn.kernels.activations, act' from the activation's output y) and gb[f] = its sum over the batch."""
    f = cuda.grid(1)
    N, F = gy.shape
    if f >= F:
        return
    zero = gy.dtype.type(0)
    one = gy.dtype.type(1)
    acc = zero
    for n in range(N):
        g = act_grad(kind, gy[n, f], y[n, f], slope, zero, one)
        if write_gz:
            gz[n, f] = g
        acc += g
    gb[f] = acc


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
        launch(_bias_grad_kernel, gy.shape[1], gy, gy if y is None or not write_gz else y, gz, gb, activation.code,
               gy.dtype.type(slope), write_gz)
        return gz, (gb if need_gb else None)
    gz = gy if kind == "identity" else activation.numpy_grad(gy, y, slope, np.empty_like(gy))
    return gz, (gz.sum(axis=0, out=gb_out) if need_gb else None)
