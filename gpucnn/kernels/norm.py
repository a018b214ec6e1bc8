"""Normalisation: local response normalisation (AlexNet) and batch normalisation, forward and backward.

LRN, on (N, C, H, W), with the window W(c) = [c - size//2, c + (size-1)//2] clipped to [0, C):

    scale[c] = k + alpha * sum_{j in W(c)} x[j]^2          y[c] = x[c] * scale[c]^-beta
    gx[c]    = gy[c] * scale[c]^-beta - 2 alpha beta x[c] * sum_{j : c in W(j)} gy[j] y[j] / scale[j]

``c in W(j)`` means j in [c - (size-1)//2, c + size//2]: the backward gathers over the mirrored window.
GPU: one Numba thread per element for each pass. CPU: NumPy, one shifted slice-add per window offset.

Batch norm, per channel c over the N*H*W values of a batch (M of them):

    xhat = (x - mean) / sqrt(var + eps)     y = gamma * xhat + beta      (var biased, as PyTorch)
    training: gx = gamma / sqrt(var + eps) * (gy - (sum gy + xhat * sum gy*xhat) / M)
    eval:     gx = gamma / sqrt(running_var + eps) * gy      (the statistics are constants then)

GPU: the per-channel sums run in a Numba kernel with many blocks per channel (each a shared-memory tree, the
last block of a channel adding their partial sums: gpucnn.kernels.reduce); the elementwise normalise and the
input gradient are CuPy ElementwiseKernels.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import cuda, empty, gpu_kernel, launch, on_gpu
from ..elementwise import ElementwiseKernel
from .pool import nchw
from .reduce import (block_sum, chunk_of, grid_sums, last_to_arrive, launch_reduction, reduction_grid,
                     sum_partials)


# ============================================================================ local response normalisation
def _window(size: int):
    """(lo, hi): the window of channel c is c - lo .. c + hi (PyTorch's placement for an even size too)."""
    return size // 2, (size - 1) // 2


# ---------------------------------------------------------------------------- GPU: Numba kernels
# Scalars arrive typed like x (see _typed), so a float32 kernel does float32 arithmetic throughout.
@gpu_kernel
def _lrn_forward_kernel(x, y, scale, lo, hi, alpha, beta, k):
    i = cuda.grid(1)
    if i >= x.size:
        return
    n, c, h, w = nchw(i, x.shape)
    s = k
    for j in range(max(0, c - lo), min(x.shape[1], c + hi + 1)):
        v = x[n, j, h, w]
        s += alpha * v * v
    scale[n, c, h, w] = s
    y[n, c, h, w] = x[n, c, h, w] * math.pow(s, -beta)


@gpu_kernel
def _lrn_backward_kernel(x, y, scale, gy, gx, lo, hi, two_alpha_beta, beta):
    i = cuda.grid(1)
    if i >= x.size:
        return
    n, c, h, w = nchw(i, x.shape)
    xc = x[n, c, h, w]
    g = gy[n, c, h, w] * math.pow(scale[n, c, h, w], -beta)
    # every output j whose window holds c: the window mirrored (hi before c, lo after)
    for j in range(max(0, c - hi), min(x.shape[1], c + lo + 1)):
        g -= two_alpha_beta * xc * gy[n, j, h, w] * y[n, j, h, w] / scale[n, j, h, w]
    gx[n, c, h, w] = g


# ---------------------------------------------------------------------------- CPU twins
def _window_sum_cpu(a, lo: int, hi: int):
    """out[:, c] = sum of a[:, j] for j in c - lo .. c + hi, clipped at the channel edges."""
    out = a.copy()
    C = a.shape[1]
    for d in range(-lo, hi + 1):      # one vectorised slice-add per offset: size is small
        if d == 0 or abs(d) >= C:
            continue
        out[:, max(0, -d):C - max(0, d)] += a[:, max(0, d):C - max(0, -d)]
    return out


def _lrn_forward_cpu(x, size, alpha, beta, k):
    lo, hi = _window(size)
    t = x.dtype.type
    scale = _window_sum_cpu(x * x, lo, hi)
    scale *= t(alpha)
    scale += t(k)
    return x * np.power(scale, t(-beta)), scale


def _lrn_backward_cpu(x, y, scale, gy, size, alpha, beta, k):
    lo, hi = _window(size)
    t = x.dtype.type
    r = gy * y
    r /= scale
    r = _window_sum_cpu(r, hi, lo)    # the mirrored window
    r *= x
    r *= t(2 * alpha * beta)
    gx = gy * np.power(scale, t(-beta))
    gx -= r
    return gx


def _typed(x, *scalars):
    """Python numbers as scalars of x's dtype, so Numba compiles float32 arithmetic for float32 arrays."""
    return tuple(x.dtype.type(s) for s in scalars)


# ---------------------------------------------------------------------------- the functions layers call
def lrn_forward(x, size: int, alpha: float, beta: float, k: float):
    """LRN of x (N, C, H, W): returns (y, scale), ``scale = k + alpha * window sum of x^2`` kept for backward."""
    if not on_gpu(x):
        return _lrn_forward_cpu(x, size, alpha, beta, k)
    lo, hi = _window(size)
    y = empty(x.shape, x.dtype, x)
    scale = empty(x.shape, x.dtype, x)
    launch(_lrn_forward_kernel, x.size, x, y, scale, lo, hi, *_typed(x, alpha, beta, k))
    return y, scale


def lrn_backward(x, y, scale, gy, size: int, alpha: float, beta: float, k: float):
    """dL/dx of LRN from dL/dy, given the forward's input x, output y and ``scale``."""
    if not on_gpu(gy):
        return _lrn_backward_cpu(x, y, scale, gy, size, alpha, beta, k)
    lo, hi = _window(size)
    gx = empty(x.shape, x.dtype, x)
    launch(_lrn_backward_kernel, x.size, x, y, scale, gy, gx, lo, hi, *_typed(x, 2 * alpha * beta, beta))
    return gx


# ============================================================================ batch normalisation
# Many blocks reduce one channel (gpucnn.kernels.reduce): blocks of up to _BLOCK threads (a power of two, the
# tree halves it), as many a channel as fill the GPU; the last block of a channel adds their partial sums.
_BLOCK = 256


# ---------------------------------------------------------------------------- GPU: Numba kernels
# Partial sums are float64 for both dtypes: they run over N*H*W values (tens of thousands), where a
# float32 running sum loses digits; the cost, one float64 add per value read, hides behind the loads.
@gpu_kernel
def _bn_stats_kernel(x, mean, inv_std, running_mean, running_var, partials, tickets, eps, momentum):
    """Blocks per channel c of x (N, C, H*W), each a chunk of its M = N*H*W values: the chunk's sum and the
    squares of its deviations from the chunk's own mean (two passes over the chunk: stable for any mean) into
    partials[c] and partials[C + c]. The channel's last block combines them in a fixed order (Chan, Golub and
    LeVeque: M2 = sum over chunks of M2_k + (S_k - n_k mean)^2 / n_k) into the mean, 1/sqrt(var + eps) and the
    running statistics (unbiased variance), written by thread 0."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, C, HW = x.shape
    M = N * HW
    c, chunk, chunks, start, end = chunk_of(M, C)
    part = cuda.shared.array(0, dtype=partials.dtype)     # float64

    s = 0.0
    for idx in range(start + t, end, threads):     # consecutive threads read consecutive addresses
        n = idx // HW
        s += x[n, c, idx - n * HW]
    part[t] = s
    block_sum(part, t, threads)
    total = part[0]
    mu = total / max(end - start, 1)
    cuda.syncthreads()                     # all have read part[0] before the second pass overwrites it

    s = 0.0
    for idx in range(start + t, end, threads):
        n = idx // HW
        d = x[n, c, idx - n * HW] - mu
        s += d * d
    part[t] = s
    block_sum(part, t, threads)
    if t == 0:
        partials[c, chunk] = total
        partials[C + c, chunk] = part[0]
    if not last_to_arrive(part, t, tickets, c, chunks):
        return
    sum_partials(part, t, threads, 1, partials, c, chunks)
    mu = part[0] / M
    span = (M + chunks - 1) // chunks
    s = 0.0
    for k in range(t, chunks, threads):
        s += partials[C + c, k]
        size = min(span, M - k * span)
        if size > 0:
            d = partials[c, k] - size * mu
            s += d * d / size
    cuda.syncthreads()                     # all have read part[0]
    part[t] = s
    block_sum(part, t, threads)
    if t == 0:
        var = part[0] / M
        mean[c] = mu
        inv_std[c] = 1.0 / math.sqrt(var + eps)
        running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mu
        running_var[c] = (1.0 - momentum) * running_var[c] + momentum * var * M / (M - 1)


@gpu_kernel
def _bn_grad_sums_kernel(gy, xhat, gsum, gxsum, partials, tickets):
    """Blocks per channel c, each a chunk of its values: gsum[c] = sum of gy and gxsum[c] = sum of gy * xhat over
    channel c (arrays (N, C, H*W)); two reduce.grid_sums, the second on partials and tickets C + c."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, C, HW = gy.shape
    c, chunk, chunks, start, end = chunk_of(N * HW, C)
    part = cuda.shared.array(0, dtype=partials.dtype)     # float64
    part_g = part[:threads]
    part_gx = part[threads:]

    s_g = 0.0
    s_gx = 0.0
    for idx in range(start + t, end, threads):
        n = idx // HW
        hw = idx - n * HW
        g = gy[n, c, hw]
        s_g += g
        s_gx += g * xhat[n, c, hw]
    part_g[t] = s_g
    part_gx[t] = s_gx
    if grid_sums(part_g, t, threads, 1, partials, tickets, c, chunk, chunks) and t == 0:
        gsum[c] = part_g[0]
    if grid_sums(part_gx, t, threads, 1, partials, tickets, C + c, chunk, chunks) and t == 0:
        gxsum[c] = part_gx[0]


# ---------------------------------------------------------------------------- GPU: elementwise kernels
# c = (i / inner) % C is the channel of flat element i of an (N, C, H*W) array.
_bn_normalise_k = ElementwiseKernel(
    "T x, raw T mean, raw T inv_std, raw T gamma, raw T beta, int64 C, int64 inner", "T xhat, T y",
    "long long c = (i / inner) % C; T h = (x - mean[c]) * inv_std[c]; xhat = h; y = gamma[c] * h + beta[c]",
    "norm_bn_normalise")
_bn_inv_std_k = ElementwiseKernel("T var, T eps", "T inv_std", "inv_std = T(1) / sqrt(var + eps)",
                                  "norm_bn_inv_std")
# inv_m = 1/M in training and 0 in eval, where the statistics are constants and only gy's term remains.
_bn_grad_input_k = ElementwiseKernel(
    "T gy, T xhat, raw T gamma, raw T inv_std, raw T gsum, raw T gxsum, T inv_m, int64 C, int64 inner", "T gx",
    "long long c = (i / inner) % C; gx = gamma[c] * inv_std[c] * (gy - (gsum[c] + xhat * gxsum[c]) * inv_m)",
    "norm_bn_grad_input")


# ---------------------------------------------------------------------------- CPU twins
def _per_channel(a):
    """a (C,) as (1, C, 1, 1), to broadcast over (N, C, H, W)."""
    return a.reshape(1, -1, 1, 1)


def _channel_sum(a):
    """Sum over N, H, W of a (N, C, H, W): the inner axis first, where the values are contiguous."""
    N, C = a.shape[:2]
    return a.reshape(N, C, -1).sum(axis=2).sum(axis=0)


def _batchnorm_forward_cpu(x, gamma, beta, running_mean, running_var, eps, momentum, training):
    t = x.dtype.type
    if training:
        M = x.size // x.shape[1]
        mean = _channel_sum(x) / t(M)
        xhat = x - _per_channel(mean)                 # centred first: a two-pass variance, stable
        var = _channel_sum(xhat * xhat) / t(M)
        inv_std = 1 / np.sqrt(var + t(eps))
        running_mean *= t(1 - momentum)
        running_mean += t(momentum) * mean
        running_var *= t(1 - momentum)
        running_var += t(momentum * M / (M - 1)) * var
    else:
        inv_std = 1 / np.sqrt(running_var + t(eps))
        xhat = x - _per_channel(running_mean)
    xhat *= _per_channel(inv_std)
    y = xhat * _per_channel(gamma)
    y += _per_channel(beta)
    return y, (xhat, inv_std)


def _batchnorm_backward_cpu(gy, cache, gamma, training):
    xhat, inv_std = cache
    gbeta = _channel_sum(gy)
    ggamma = _channel_sum(gy * xhat)
    if training:
        M = gy.size // gy.shape[1]
        gx = xhat * _per_channel(ggamma)
        gx += _per_channel(gbeta)
        gx *= gy.dtype.type(-1 / M)
        gx += gy
    else:
        gx = gy.copy()
    gx *= _per_channel(gamma * inv_std)
    return gx, ggamma, gbeta


# ---------------------------------------------------------------------------- the functions layers call
def batchnorm_forward(x, gamma, beta, running_mean, running_var, eps: float, momentum: float, training: bool):
    """Batch norm of x (N, C, H, W): returns (y, cache), cache = (xhat, inv_std) for backward.

    Training normalises with the batch's statistics and updates ``running_mean``/``running_var`` in
    place (``running = (1 - momentum) * running + momentum * batch``, the variance unbiased, as PyTorch);
    eval normalises with the running statistics and leaves them alone.
    """
    if not on_gpu(x):
        return _batchnorm_forward_cpu(x, gamma, beta, running_mean, running_var, eps, momentum, training)
    N, C, H, W = x.shape
    inv_std = empty((C,), x.dtype, x)
    if training:
        mean = empty((C,), x.dtype, x)
        threads, chunks = reduction_grid(N * H * W, C, _BLOCK)
        launch_reduction(_bn_stats_kernel, (x.reshape(N, C, H * W), mean, inv_std, running_mean, running_var),
                         (float(eps), float(momentum)), (2 * C, chunks, np.float64), C, x, threads, C * chunks,
                         threads * 8)
    else:
        mean = running_mean
        _bn_inv_std_k(running_var, eps, inv_std)
    xhat, y = _bn_normalise_k(x, mean, inv_std, gamma, beta, C, H * W)
    return y, (xhat, inv_std)


def batchnorm_backward(gy, cache, gamma, training: bool, ggamma_out=None, gbeta_out=None):
    """dL/dx, dL/dgamma, dL/dbeta of batch norm from dL/dy and the forward's cache (xhat, inv_std).

    ``training`` must be the mode of the forward: in training the batch statistics depend on x too.
    ``ggamma_out``/``gbeta_out``: arrays (C,) to write the parameter gradients into (flat-buffer views).
    """
    if not on_gpu(gy):
        gx, ggamma, gbeta = _batchnorm_backward_cpu(gy, cache, gamma, training)
        for out, g in ((ggamma_out, ggamma), (gbeta_out, gbeta)):
            if out is not None:
                out[...] = g
        return gx, (ggamma if ggamma_out is None else ggamma_out), (gbeta if gbeta_out is None else gbeta_out)
    xhat, inv_std = cache
    N, C, H, W = gy.shape
    ggamma = ggamma_out if ggamma_out is not None else empty((C,), gy.dtype, gy)
    gbeta = gbeta_out if gbeta_out is not None else empty((C,), gy.dtype, gy)
    threads, chunks = reduction_grid(N * H * W, C, _BLOCK)
    launch_reduction(_bn_grad_sums_kernel, (gy.reshape(N, C, H * W), xhat.reshape(N, C, H * W), gbeta, ggamma), (),
                     (2 * C, chunks, np.float64), 2 * C, gy, threads, C * chunks, 2 * threads * 8)
    inv_m = 1.0 / (N * H * W) if training else 0.0
    gx = _bn_grad_input_k(gy, xhat, gamma, inv_std, gbeta, ggamma, inv_m, C, H * W)
    return gx, ggamma, gbeta
