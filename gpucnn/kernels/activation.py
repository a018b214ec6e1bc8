"""Activations, forward and backward; and the bias add fused with them.

Each activation is one record of :mod:`gpucnn.kernels.activations` (its C, Numba and NumPy code); the kernels
here take it from there, by name. GPU: CuPy ElementwiseKernels made from the record's C strings (one launch
per pass). CPU: the record's NumPy functions. Backward reads what the record says: the input x for
ReLU/LeakyReLU, the output y for Tanh/Sigmoid (tanh' = 1 - y^2, sigmoid' = y (1 - y)).

The epilogues of conv and dense layers live here too, because the activation is what they fuse:

* forward, ``bias_activation`` (in place, any (N, C, ...) layout), ``bias_activation_nchw`` (a conv's GEMM
  output (C, OH, OW, N) to act(z + b) in NCHW: the layout change rides along) and
  ``bias_activation_pool`` (the same followed by max or average pooling, in one pass: conv -> act -> pool);
* backward, ``activation_bias_backward`` and ``pool_activation_bias_backward``: the gradient through the
  pooling (if any) and the activation, written in the layout the weight-gradient GEMM wants, and summed
  per channel into the bias gradient, all in one Numba kernel (many blocks per channel, each a tree in shared
  memory, the last block of a channel adding their partial sums: gpucnn.kernels.reduce; deterministic, no
  atomic additions). Dense layers use their own variant (gpucnn.kernels.dense), features along the threads
  of a warp, which suits an (N, F) gradient better.

The pooling's window, tie-break and switch rules are gpucnn.kernels.pool's (its device functions and NumPy
helpers). The fused backward reads the activation's *output* for every kind, which is why only kinds whose
derivative can be read from y fuse (``Activation.fuses``; see gpucnn.kernels.activations).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import cuda, gpu_kernel, launch, on_gpu, xp
from . import pool as P
from .activations import TABLE, act, act_grad, dispatching, get
from .pool import gather, max_wins, window
from .reduce import chunk_of, filling_threads, grid_sums, launch_reduction, reduction_grid

KINDS = tuple(TABLE)            # the built-in kinds; gpucnn.kernels.activations.register adds more


# ---------------------------------------------------------------------------- GPU: Numba kernels (fused)
# ``kind`` is an activation's code (Activation.code): act and act_grad dispatch on it.

@dispatching
@gpu_kernel
def _bias_act_nchw_kernel(z, b, y, kind, slope, has_bias):
    """Thread per element of y (N, C, HW): y[n, c, hw] = act(z[c, hw, n] + b[c]), z a conv's GEMM output.
    (A grid-stride loop: see backend.launch.)"""
    N, C, HW = y.shape
    zero = y.dtype.type(0)
    one = y.dtype.type(1)
    for i in range(cuda.grid(1), N * C * HW, cuda.gridsize(1)):
        hw = i % HW
        c = (i // HW) % C
        n = i // (HW * C)
        v = z[c, hw, n]
        if has_bias:
            v += b[c]
        y[n, c, hw] = act(kind, v, slope, zero, one)


@dispatching
@gpu_kernel
def _bias_act_pool_kernel(z, b, a, p, switches, kind, slope, has_bias, is_max, KH, KW, SH, SW, PH, PW):
    """Thread per pooled output, in (c, oh, ow, n) order so that neighbouring threads read neighbouring
    numbers of z (C, H, W, N): a = act(z + b) over its window (kept for backward, in z's layout), then
    the window's max (and its switch h*W + w) or mean into p (N, C, OH, OW). Overlapping windows write
    the same value of ``a`` twice; positions no window covers are never written (nor read by backward).
    (A grid-stride loop: see backend.launch.)"""
    C, H, W, N = z.shape
    OH, OW = p.shape[2], p.shape[3]
    zero = z.dtype.type(0)
    one = z.dtype.type(1)
    for i in range(cuda.grid(1), C * OH * OW * N, cuda.gridsize(1)):
        n = i % N
        ow = (i // N) % OW
        oh = (i // (N * OW)) % OH
        c = i // (N * OW * OH)
        bias = b[c] if has_bias else zero
        h_start, h_end = window(oh, SH, PH, KH, H)
        w_start, w_end = window(ow, SW, PW, KW, W)
        acc = zero
        best = zero
        arg = h_start * W + w_start
        first = True
        for h in range(h_start, h_end):
            for w in range(w_start, w_end):
                v = act(kind, z[c, h, w, n] + bias, slope, zero, one)
                a[c, h, w, n] = v
                if first or max_wins(v, best):
                    best = v
                    arg = h * W + w
                    first = False
                acc += v
        if is_max:
            p[n, c, oh, ow] = best
            switches[n, c, oh, ow] = arg
        else:
            p[n, c, oh, ow] = acc / z.dtype.type(KH * KW)   # padded zeros count (count_include_pad)


@dispatching
@gpu_kernel
def _act_bias_grad_kernel(gy, y, gz, gb, partials, tickets, kind, slope, gemm_layout, write_gz):
    """Blocks per channel c of gy, y (N, C, HW), each taking a chunk of its N*HW values: gz = gy * act'(y),
    written as (N, C, HW) or, with ``gemm_layout``, as a conv's (C, HW, N); gb[c] = the sum of gz over n and hw
    (reduce.grid_sums: a tree per block, the chunks' partials added by the last block, a fixed order)."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, C, HW = gy.shape
    c, chunk, chunks, start, end = chunk_of(N * HW, C)
    zero = gy.dtype.type(0)
    one = gy.dtype.type(1)
    partial = cuda.shared.array(0, dtype=gy.dtype)
    acc = zero
    for j in range(start + t, end, threads):
        if gemm_layout:         # j walks gz in its (hw, n) order: the writes are coalesced
            hw = j // N
            n = j - hw * N
        else:                   # j walks gy in its (n, hw) order
            n = j // HW
            hw = j - n * HW
        g = act_grad(kind, gy[n, c, hw], y[n, c, hw], slope, zero, one)
        if write_gz:
            if gemm_layout:
                gz[c, hw, n] = g
            else:
                gz[n, c, hw] = g
        acc += g
    partial[t] = acc
    if grid_sums(partial, t, threads, 1, partials, tickets, c, chunk, chunks) and t == 0:
        gb[c] = partial[0]


@dispatching
@gpu_kernel
def _pool_act_bias_grad_kernel(gp, switches, a, gz, gb, partials, tickets, kind, slope, is_max, KH, KW, SH, SW, PH,
                               PW):
    """Blocks per channel c, each taking a chunk of its pre-pool positions (h, w, n) of a (C, H, W, N): gather the
    pooled gradient gp (N, C, OH, OW) of the windows that cover it (max: only where the switch names it; avg:
    divided by KH*KW), times act'(a); write gz (C, H, W, N) and sum it per channel into gb[c] (as
    _act_bias_grad_kernel)."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    C, H, W, N = a.shape
    c, chunk, chunks, start, end = chunk_of(H * W * N, C)
    zero = a.dtype.type(0)
    one = a.dtype.type(1)
    partial = cuda.shared.array(0, dtype=a.dtype)
    acc = zero
    for j in range(start + t, end, threads):
        n = j % N
        w = (j // N) % W
        h = j // (N * W)
        g, covered = gather(gp, switches, n, c, h, w, W, is_max, KH, KW, SH, SW, PH, PW)
        if covered:             # forward wrote ``a`` only where a window reads it
            g = act_grad(kind, g, a[c, h, w, n], slope, zero, one)
        gz[c, h, w, n] = g
        acc += g
    partial[t] = acc
    if grid_sums(partial, t, threads, 1, partials, tickets, c, chunk, chunks) and t == 0:
        gb[c] = partial[0]


# ---------------------------------------------------------------------------- CPU twins of the pool epilogues
# In the GEMM layout (C, H, W, N): gpucnn.kernels.pool's helpers with H, W at axes 1 and 2, where every window
# offset is a strided view with contiguous runs of N numbers; only the (smaller) pooled result is transposed.
_CHWN = (1, 2)


def _bias_act_pool_cpu(z, b, kind, slope, mode, kernel, stride, padding):
    """z (C, H, W, N) made act(z + b) in place; returns ``(z, p, switches)``, p and switches (None for "avg")
    in NCHW."""
    if b is not None:
        z += b.reshape(-1, 1, 1, 1)
    get(kind).numpy_forward(z, slope, z)
    if mode == "avg":
        p, switches = P._avg_cpu(z, kernel, stride, padding, _CHWN), None
    else:
        p, switches = P._max_cpu(z, kernel, stride, padding, _CHWN)
        switches = np.ascontiguousarray(switches.transpose(3, 0, 1, 2))
    return z, np.ascontiguousarray(p.transpose(3, 0, 1, 2)), switches


def _pool_act_bias_backward_cpu(gp, switches, a, kind, slope, mode, kernel, stride, padding):
    """``(gz, gb)``: the pooled gradient gp (N, C, OH, OW) spread over each window offset of a's (C, H, W, N),
    times act'(a); and its sum per channel."""
    C, H, W, N = a.shape
    g = np.ascontiguousarray(gp.transpose(1, 2, 3, 0))                      # (C, OH, OW, N)
    sw = None if mode == "avg" else np.ascontiguousarray(switches.transpose(1, 2, 3, 0))
    gz = np.empty(a.shape, dtype=a.dtype)
    activation = get(kind)
    if P._tiles(kernel, stride, padding, (H, W), g.shape[1:3]):
        # seen as (C, OH, KH, OW, KW, N), every position takes its window's gradient by broadcasting, so act' and
        # the spreading are one pass (no zero fill, no per-offset passes)
        tiled = lambda x: x.reshape(P._tiled_shape(x.shape, kernel, _CHWN))
        activation.numpy_grad(P._spread_tiled(g, sw, W, kernel, _CHWN), tiled(a), slope, tiled(gz))
    else:
        if mode == "avg":
            g /= g.dtype.type(kernel[0] * kernel[1])
        P._spread_cpu(g, sw, a.shape, kernel, stride, padding, _CHWN, out=gz)
        activation.numpy_grad(gz, a, slope, gz)
    return gz, gz.reshape(C, -1).sum(axis=1)


def _typed(a, slope):
    return a.dtype.type(slope)


def _dummy(like, dtype, ndim):
    """A one-element array standing for an argument a kernel does not use (Numba needs its type)."""
    return backend.empty((1,) * ndim, dtype, like)


# ---------------------------------------------------------------------------- the functions layers call
def activation_forward(kind: str, x, slope: float = 0.01):
    """y = act(x), elementwise, a new array."""
    activation = get(kind)
    if kind == "identity":
        return x.copy()
    if on_gpu(x):
        return activation.kernels["forward"](x, slope)
    return activation.numpy_forward(x, slope, np.empty_like(x))


def activation_backward(kind: str, x, y, gy, slope: float = 0.01):
    """dL/dx from dL/dy; the activation's derivative reads ``x`` or ``y`` as its record says (``reads``: x for
    ReLU/LeakyReLU, y for Tanh/Sigmoid): pass what you kept."""
    activation = get(kind)
    if kind == "identity":
        return gy.copy()
    v = x if activation.reads == "x" else y
    if on_gpu(gy):
        return activation.kernels["backward"](v, gy, slope)
    return activation.numpy_grad(gy, v, slope, np.empty_like(gy))


def bias_activation(y, b, kind: str = "identity", slope: float = 0.01):
    """In place: ``y[n, c, ...] = act(y[n, c, ...] + b[c])`` for y of shape (N, C, ...); returns y.

    Conv and dense call this after their GEMM: on the GPU it is one fused kernel, so the biased
    pre-activation never makes a round trip through memory.
    """
    activation = get(kind)
    C = y.shape[1]
    inner = int(np.prod(y.shape[2:])) if y.ndim > 2 else 1
    if on_gpu(y):
        activation.kernels["bias"](b, C, inner, slope, y)
        return y
    y += b.reshape((1, C) + (1,) * (y.ndim - 2))
    return activation.numpy_forward(y, slope, y)


def bias_activation_nchw(z, b, kind: str = "identity", slope: float = 0.01):
    """``y[n, c, oh, ow] = act(z[c, oh, ow, n] + b[c])``: a conv's GEMM output (C, OH, OW, N) to its NCHW
    output in one pass (b may be None). On the CPU z is used as scratch."""
    activation = get(kind)
    C, OH, OW, N = z.shape
    if on_gpu(z):
        y = backend.empty((N, C, OH, OW), z.dtype, z)
        launch(_bias_act_nchw_kernel, y.size, z.reshape(C, OH * OW, N), _dummy(z, z.dtype, 1) if b is None else b,
               y.reshape(N, C, OH * OW), activation.code, _typed(z, slope), b is not None, grid_stride=True)
        return y
    # a channel at a time, so that its (OH, OW, N) block stays in cache while it is read across the batch
    # (1.5x faster than one transposing copy on LeNet's first layer); the bias add rides along
    y = np.empty((N, C, OH, OW), dtype=z.dtype)
    for c in range(C):
        if b is None:
            y[:, c] = z[c].transpose(2, 0, 1)
        else:
            np.add(z[c].transpose(2, 0, 1), b[c], out=y[:, c])
    return activation.numpy_forward(y, slope, y)


def bias_activation_pool(z, b, kind: str, slope: float, pool):
    """conv -> act -> pool in one pass: from a conv's GEMM output z (C, H, W, N) and bias b (or None),
    ``a = act(z + b)`` (kept for backward, z's layout) and its pooling p (N, C, OH, OW).

    ``pool`` is ``(mode, kernel, stride, padding)``, mode "max" or "avg" (the same conventions as
    gpucnn.kernels.pool: switches h*W + w, first maximum wins, padded zeros count in the mean).
    Returns ``(a, p, switches)``, switches None for "avg". On the CPU z becomes ``a`` (in place).
    """
    activation = get(kind)
    mode, kernel, stride, padding = pool
    if mode not in ("max", "avg"):
        raise ValueError(f"bias_activation_pool: pool mode must be 'max' or 'avg', got {mode!r}")
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    C, H, W, N = z.shape
    if 2 * PH > KH or 2 * PW > KW or H + 2 * PH < KH or W + 2 * PW < KW:
        raise ValueError(f"pool: kernel {tuple(kernel)} with padding {tuple(padding)} does not fit the input "
                         f"{H}x{W}")
    if not on_gpu(z):
        return _bias_act_pool_cpu(z, b, kind, slope, mode, kernel, stride, padding)
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    a = backend.empty(z.shape, z.dtype, z)
    p = backend.empty((N, C, OH, OW), z.dtype, z)
    switches = backend.empty((N, C, OH, OW), np.int32, z) if mode == "max" else _dummy(z, np.int32, 4)
    bias = _dummy(z, z.dtype, 1) if b is None else b
    launch(_bias_act_pool_kernel, p.size, z, bias, a, p, switches, activation.code, _typed(z, slope), b is not None,
           mode == "max", KH, KW, SH, SW, PH, PW, threads=filling_threads(p.size, z.size), grid_stride=True)
    return a, p, (switches if mode == "max" else None)


def _reduce(kernel, channels, per_channel, like, arrays, scalars):
    """Launch a per-channel reduction kernel over blocks of 256 threads at most (ptxas gives
    _pool_act_bias_grad_kernel 80 to 94 registers a thread: 1,024 failed on an H200, 256 leave room), many blocks
    a channel (reduce.split): LeNet's first layer has 6 channels of 200,000 values at batch 256."""
    threads, chunks = reduction_grid(per_channel, channels)
    launch_reduction(kernel, arrays, scalars, (channels, chunks, like.dtype), channels, like, threads,
                     channels * chunks, threads * like.itemsize)


def activation_bias_backward(gy, y, kind: str = "identity", slope: float = 0.01, layout: str = "same",
                             need_gb: bool = True, gb_out=None):
    """``(gz, gb)``: gz = gy * act'(y), the gradient before the activation, and gb its sum over every axis
    but the channel axis 1 (the bias gradient; None unless ``need_gb``).

    gy, y: (N, C, ...) - the gradient of the activation's output and that output (y unused for
    "identity"). ``layout="same"``: gz is (N, C, ...) like gy (for "identity" gz is gy itself);
    ``layout="gemm"``: gz is (C, ..., N), the column order of a conv's im2col matrix. ``gb_out``: an
    array of shape (C,) to write gb into (a flat gradient buffer's view).
    """
    activation = get(kind)
    if layout not in ("same", "gemm"):
        raise ValueError(f"activation_bias_backward: layout must be 'same' or 'gemm', got {layout!r}")
    N, C = gy.shape[0], gy.shape[1]
    inner = tuple(gy.shape[2:])
    HW = int(np.prod(inner)) if inner else 1
    if on_gpu(gy):
        gy = xp(gy).ascontiguousarray(gy)
        write_gz = kind != "identity" or layout == "gemm"
        if not write_gz:
            gz = gy
        elif layout == "gemm":
            gz = backend.empty((C,) + inner + (N,), gy.dtype, gy)
        else:
            gz = backend.empty(gy.shape, gy.dtype, gy)
        gb = gb_out if (need_gb and gb_out is not None) else backend.empty((C,), gy.dtype, gy)
        y_ = gy if y is None or kind == "identity" else y
        gz3 = gz.reshape(C, HW, N) if layout == "gemm" else gz.reshape(N, C, HW)
        _reduce(_act_bias_grad_kernel, C, N * HW, gy, (gy.reshape(N, C, HW), y_.reshape(N, C, HW), gz3, gb),
                (activation.code, _typed(gy, slope), layout == "gemm", write_gz))
        return gz, (gb if need_gb else None)
    if layout == "gemm":
        gz = np.empty((C,) + inner + (N,), dtype=gy.dtype)
        for c in range(C):      # a channel at a time, as bias_activation_nchw (cache-friendly)
            gc = gz[c]
            gc[...] = np.moveaxis(gy[:, c], 0, -1)
            if kind != "identity":
                activation.numpy_grad(gc, np.moveaxis(y[:, c], 0, -1), slope, gc)
        gb = gz.reshape(C, -1).sum(axis=1, out=gb_out) if need_gb else None
        return gz, gb
    g = gy if kind == "identity" else activation.numpy_grad(gy, y, slope, np.empty_like(gy))
    gb = g.reshape(N, C, HW).sum(axis=(0, 2), out=gb_out) if need_gb else None
    return g, gb


def pool_activation_bias_backward(gp, switches, a, kind: str, slope: float, pool, need_gb: bool = True,
                                  gb_out=None):
    """The backward of :func:`bias_activation_pool`: ``(gz, gb)`` with gz (C, H, W, N) = the pooled
    gradient gp (N, C, OH, OW) routed back through the pooling and the activation, in the layout of a
    conv's GEMM, and gb its sum per channel (None unless ``need_gb``; written into ``gb_out`` when given)."""
    activation = get(kind)
    mode, kernel, stride, padding = pool
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    C, H, W, N = a.shape
    if on_gpu(gp):
        gp = xp(gp).ascontiguousarray(gp)
        gz = backend.empty(a.shape, a.dtype, a)
        gb = gb_out if (need_gb and gb_out is not None) else backend.empty((C,), a.dtype, a)
        sw = switches if mode == "max" else _dummy(a, np.int32, 4)
        _reduce(_pool_act_bias_grad_kernel, C, H * W * N, a, (gp, sw, a, gz, gb),
                (activation.code, _typed(a, slope), mode == "max", KH, KW, SH, SW, PH, PW))
        return gz, (gb if need_gb else None)
    gz, gb = _pool_act_bias_backward_cpu(gp, switches, a, kind, slope, mode, kernel, stride, padding)
    if gb_out is not None and need_gb:
        gb_out[...] = gb
        gb = gb_out
    return gz, (gb if need_gb else None)
