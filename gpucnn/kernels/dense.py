"""Dense (fully connected): y = x W^T + b on (N, in_features) inputs, forward and backward.

Forward is one GEMM and the bias add fused with the activation that follows (one elementwise launch,
:func:`gpucnn.kernels.activation.bias_activation`). Backward is two GEMMs, gx = gy W and gw = gy^T x,
and the bias gradient gb = sum over the batch of gy.

The bias gradient on the GPU is a Numba kernel with a thread per output feature summing its column of gy,
rather than a GEMM with a ones vector: it reads gy once either way (the work is memory-bound and tiny),
it is our own code that the "sim" tests run (a GEMM there is NumPy's), it sums in a fixed order (the same
result every run), and it needs no ones vector to allocate and keep per batch size.
"""
from __future__ import annotations

from .. import backend
from ..backend import cuda, gpu_kernel, launch, matmul, on_gpu
from .activation import activation_forward, bias_activation


@gpu_kernel
def _bias_grad_kernel(gy, gb):
    f = cuda.grid(1)
    if f >= gb.size:
        return
    # neighbouring threads read neighbouring columns of the same row: coalesced loads
    acc = gb.dtype.type(0)
    for n in range(gy.shape[0]):
        acc += gy[n, f]
    gb[f] = acc


def _gemm(a, b):
    """a @ b. BLAS reads transposed views in place (no copies); on the GPU path the output comes from
    backend.empty, so gpucnn.profile counts its bytes on "sim" too."""
    if on_gpu(a):
        return matmul(a, b, out=backend.empty((a.shape[0], b.shape[1]), a.dtype, a))
    return matmul(a, b)


def dense_forward(x, w, b, activation="identity", slope=0.01):
    """act(x W^T + b) for x (N, in), w (out, in), b (out,) or None; a new (N, out) array."""
    y = _gemm(x, w.T)
    if b is not None:
        return bias_activation(y, b, activation, slope)
    if activation != "identity":
        return activation_forward(activation, y, slope)
    return y


def dense_backward(x, w, gy, need_gx=True, need_gb=True):
    """``(gx, gw, gb)`` from gy (N, out): gx = gy W, gw = gy^T x, gb = sum_n gy; None where not needed."""
    gw = _gemm(gy.T, x)
    gx = _gemm(gy, w) if need_gx else None
    gb = None
    if need_gb:
        if on_gpu(gy):
            gy = backend.xp(gy).ascontiguousarray(gy)
            gb = backend.empty((gy.shape[1],), gy.dtype, gy)
            launch(_bias_grad_kernel, gb.size, gy, gb)
        else:
            gb = gy.sum(axis=0)
    return gx, gw, gb
