"""Activations: ReLU, LeakyReLU, Tanh, Sigmoid, forward and backward; and the bias add fused with them.

GPU: CuPy ElementwiseKernels (one launch per pass). CPU: NumPy. Backward of ReLU/LeakyReLU reads the
input x; backward of Tanh/Sigmoid reads the output y (tanh' = 1 - y^2, sigmoid' = y (1 - y)).

The epilogues of conv and dense layers live here too, because the activation is what they fuse:

* forward, ``bias_activation`` (in place, any (N, C, ...) layout), ``bias_activation_nchw`` (a conv's GEMM
  output (C, OH, OW, N) to act(z + b) in NCHW: the layout change rides along) and
  ``bias_activation_pool`` (the same followed by max or average pooling, in one pass: conv -> act -> pool);
* backward, ``activation_bias_backward`` and ``pool_activation_bias_backward``: the gradient through the
  pooling (if any) and the activation, written in the layout the weight-gradient GEMM wants, and summed
  per channel into the bias gradient, all in one Numba kernel (a block per channel, a tree reduction in
  shared memory: deterministic, no atomics). Dense layers use their own variant, a thread per feature
  (gpucnn.kernels.dense), which suits an (N, F) gradient better.

The fused backward reads the activation's *output* for every kind: ReLU and LeakyReLU (slope >= 0) are
positive exactly where their input is, so y says where the gradient passes.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import backend
from ..backend import cuda, gpu_device, gpu_kernel, launch, on_gpu, xp
from .reduce import block_sum
from ..elementwise import ElementwiseKernel

KINDS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")
_CODE = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}   # the kinds inside Numba kernels

# ---------------------------------------------------------------------------- GPU: elementwise kernels
# The C expression of each activation and of its derivative, shared by the plain and the fused kernels.
_ACT = {
    "relu": "v > T(0) ? v : T(0)",
    "leaky_relu": "v > T(0) ? v : slope * v",
    "tanh": "tanh(v)",
    "sigmoid": "T(1) / (T(1) + exp(-v))",
    "identity": "v",
}
_DACT = {  # derivative times gy; x is the input, y the output
    "relu": "x > T(0) ? gy : T(0)",
    "leaky_relu": "x > T(0) ? gy : slope * gy",
    "tanh": "gy * (T(1) - y * y)",
    "sigmoid": "gy * y * (T(1) - y)",
}

_forward_k = {k: ElementwiseKernel("T x, T slope", "T y", f"T v = x; y = {e}", f"activation_{k}_fwd")
              for k, e in _ACT.items() if k != "identity"}
_backward_k = {k: ElementwiseKernel("T x, T y, T gy, T slope", "T gx", f"gx = {e}", f"activation_{k}_bwd")
               for k, e in _DACT.items()}
# y <- act(y + b[c]) in place, c the channel of element i in an (N, C, inner) layout: the bias add of
# conv (inner = H*W) and dense (inner = 1) fused with the activation that follows, one launch.
_bias_act_k = {k: ElementwiseKernel("raw T b, int64 C, int64 inner, T slope", "T y",
                                    f"T v = y + b[(i / inner) % C]; y = {e}", f"activation_bias_{k}")
               for k, e in _ACT.items()}


# ---------------------------------------------------------------------------- GPU: Numba kernels (fused)
# ``kind`` is a code from _CODE. The activation and its derivative are device functions, written once here
# and called by every fused kernel (the conv and dense epilogues, their backward twins).

@gpu_device
def act(kind, v, slope, zero, one):
    """act(v) for the activation ``kind``; sigmoid takes the branch whose exp cannot overflow. ``zero``
    and ``one`` come typed like v, so a float32 kernel stays in float32 arithmetic."""
    if kind == 1:
        return v if v > zero else zero
    if kind == 2:
        return v if v > zero else slope * v
    if kind == 3:
        return math.tanh(v)
    if kind == 4:
        if v >= zero:
            return one / (one + math.exp(-v))
        e = math.exp(v)
        return e / (one + e)
    return v


@gpu_device
def act_grad(kind, g, y, slope, zero, one):
    """g * act'(x), from the activation's output y = act(x) (for ReLU, y > 0 exactly where x > 0)."""
    if kind == 1:
        return g if y > zero else zero
    if kind == 2:
        return g if y > zero else slope * g
    if kind == 3:
        return g * (one - y * y)
    if kind == 4:
        return g * y * (one - y)
    return g

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
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        h_start, h_end = max(h0, 0), min(h0 + KH, H)
        w_start, w_end = max(w0, 0), min(w0 + KW, W)
        acc = zero
        best = zero
        arg = h_start * W + w_start
        first = True
        for h in range(h_start, h_end):
            for w in range(w_start, w_end):
                v = act(kind, z[c, h, w, n] + bias, slope, zero, one)
                a[c, h, w, n] = v
                # as the max pooling kernel: strict '>' keeps the first maximum; a NaN wins, the first NaN stays
                if first or v > best or (v != v and best == best):
                    best = v
                    arg = h * W + w
                    first = False
                acc += v
        if is_max:
            p[n, c, oh, ow] = best
            switches[n, c, oh, ow] = arg
        else:
            p[n, c, oh, ow] = acc / z.dtype.type(KH * KW)   # padded zeros count (count_include_pad)


@gpu_kernel
def _act_bias_grad_kernel(gy, y, gz, gb, kind, slope, gemm_layout, write_gz):
    """Block per channel c of gy, y (N, C, HW): gz = gy * act'(y), written as (N, C, HW) or, with
    ``gemm_layout``, as a conv's (C, HW, N); gb[c] = the sum of gz over n and hw (a tree in shared memory)."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, HW = gy.shape[0], gy.shape[2]
    zero = gy.dtype.type(0)
    one = gy.dtype.type(1)
    partial = cuda.shared.array(0, dtype=gy.dtype)
    acc = zero
    for j in range(t, N * HW, threads):
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
    block_sum(partial, t, threads)
    if t == 0:
        gb[c] = partial[0]


@gpu_kernel
def _pool_act_bias_grad_kernel(gp, switches, a, gz, gb, kind, slope, is_max, KH, KW, SH, SW, PH, PW):
    """Block per channel c: for every pre-pool position (h, w, n) of a (C, H, W, N), gather the pooled
    gradient gp (N, C, OH, OW) of the windows that cover it (max: only where the switch names it; avg:
    divided by KH*KW), times act'(a); write gz (C, H, W, N) and sum it per channel into gb[c]."""
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    H, W, N = a.shape[1], a.shape[2], a.shape[3]
    OH, OW = gp.shape[2], gp.shape[3]
    zero = a.dtype.type(0)
    one = a.dtype.type(1)
    partial = cuda.shared.array(0, dtype=a.dtype)
    acc = zero
    for j in range(t, H * W * N, threads):
        n = j % N
        w = (j // N) % W
        h = j // (N * W)
        # the windows covering (h, w): oh*SH - PH <= h <= oh*SH - PH + KH - 1
        oh_start, oh_end = max((h + PH - KH + SH) // SH, 0), min((h + PH) // SH + 1, OH)
        ow_start, ow_end = max((w + PW - KW + SW) // SW, 0), min((w + PW) // SW + 1, OW)
        me = h * W + w
        g = zero
        covered = False
        for oh in range(oh_start, oh_end):
            for ow in range(ow_start, ow_end):
                covered = True
                if not is_max or switches[n, c, oh, ow] == me:
                    g += gp[n, c, oh, ow]
        if not is_max:
            g = g / a.dtype.type(KH * KW)
        if covered:             # forward wrote ``a`` only where a window reads it
            g = act_grad(kind, g, a[c, h, w, n], slope, zero, one)
        gz[c, h, w, n] = g
        acc += g
    partial[t] = acc
    block_sum(partial, t, threads)
    if t == 0:
        gb[c] = partial[0]


# ---------------------------------------------------------------------------- CPU twins
def _forward_cpu(kind, x, slope):
    if kind == "relu":
        return np.maximum(x, 0)
    if kind == "leaky_relu":
        return np.where(x > 0, x, x * x.dtype.type(slope))
    if kind == "tanh":
        return np.tanh(x)
    if kind == "sigmoid":
        # 1/(1+exp(-x)) overflows exp for x << 0 only to inf, which gives the right 0: silence the warning
        with np.errstate(over="ignore"):
            return 1 / (1 + np.exp(-x))
    return x


def _backward_cpu(kind, x, y, gy, slope):
    if kind == "relu":
        return np.where(x > 0, gy, 0).astype(gy.dtype, copy=False)
    if kind == "leaky_relu":
        return np.where(x > 0, gy, gy * gy.dtype.type(slope))
    if kind == "tanh":
        return gy * (1 - y * y)
    if kind == "sigmoid":
        return gy * y * (1 - y)
    return gy


def _act_inplace(v, kind, slope):
    """v <- act(v), in place (the CPU epilogues own v, so no copy is needed)."""
    if kind == "relu":
        np.maximum(v, 0, out=v)
    elif kind == "leaky_relu":
        np.multiply(v, v.dtype.type(slope), out=v, where=v < 0)
    elif kind == "tanh":
        np.tanh(v, out=v)
    elif kind == "sigmoid":
        with np.errstate(over="ignore"):
            np.negative(v, out=v)
            np.exp(v, out=v)
            v += 1
            np.reciprocal(v, out=v)
    return v


def _dact_inplace(g, y, kind, slope):
    """g <- g * act'(from the output y), in place."""
    if kind == "relu":
        np.multiply(g, y > 0, out=g)
    elif kind == "leaky_relu":
        np.multiply(g, g.dtype.type(slope), out=g, where=y <= 0)
    elif kind == "tanh":
        d = y * y
        np.subtract(1, d, out=d)
        g *= d
    elif kind == "sigmoid":
        d = 1 - y
        d *= y
        g *= d
    return g


def _pool_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


def _bias_act_pool_cpu(z, b, kind, slope, mode, kernel, stride, padding):
    """The CPU epilogue conv -> act -> pool, in the GEMM layout (C, H, W, N) where every window offset is a
    strided view with contiguous runs of N numbers; only the (smaller) pooled result is transposed."""
    p, switches = _bias_act_pool_part(z, b, kind, slope, mode, kernel, stride, padding)
    return (z, np.ascontiguousarray(p.transpose(3, 0, 1, 2)),
            None if switches is None else np.ascontiguousarray(switches.transpose(3, 0, 1, 2)))


def _bias_act_pool_part(z, b, kind, slope, mode, kernel, stride, padding):
    """Channels of z (C, H, W, N) made act(z + b) in place; returns their pooling and switches (None for
    "avg"), both (C, OH, OW, N)."""
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    C, H, W, N = z.shape
    OH, OW = _pool_size(H, KH, SH, PH), _pool_size(W, KW, SW, PW)
    a = z
    if b is not None:
        a += b.reshape(C, 1, 1, 1)
    _act_inplace(a, kind, slope)
    src = a
    if PH or PW:
        src = np.full((C, H + 2 * PH, W + 2 * PW, N), -np.inf if mode == "max" else 0, dtype=a.dtype)
        src[:, PH:PH + H, PW:PW + W] = a
    if (SH, SW) == (KH, KW) and not (PH or PW) and (H, W) == (OH * KH, OW * KW):
        win = src.reshape(C, OH, KH, OW, KW, N).transpose(0, 1, 3, 5, 2, 4)   # windows tile: a reshape
    else:
        win = sliding_window_view(src, (KH, KW), axis=(1, 2))[:, ::SH, ::SW]  # (C, OH, OW, N, KH, KW)
    offsets = [(kh, kw) for kh in range(KH) for kw in range(KW)]             # window order
    switches = None
    if mode == "avg":
        p = win[..., 0, 0].copy() if len(offsets) == 1 else win[..., 0, 0] + win[..., offsets[1][0], offsets[1][1]]
        for kh, kw in offsets[2:]:
            p += win[..., kh, kw]
        p /= a.dtype.type(KH * KW)
    else:
        # as pool.py's max: a contiguous stack of the offsets, the max, then the first offset that holds it
        stack = np.empty((len(offsets), C, OH, OW, N), dtype=a.dtype)
        for k, (kh, kw) in enumerate(offsets):
            stack[k] = win[..., kh, kw]
        p = stack.max(axis=0)
        miss = stack[:-1] != p
        if np.isnan(p).any():
            miss &= ~np.isnan(stack[:-1])
        rows = np.arange(OH) * SH - PH
        cols = np.arange(OW) * SW - PW
        if PH or PW:                                    # a padded -inf never ties a real -inf
            for k, (kh, kw) in enumerate(offsets[:-1]):
                inside = ((rows + kh >= 0) & (rows + kh < H))[:, None] & ((cols + kw >= 0) & (cols + kw < W))
                miss[k] |= ~inside[:, :, None]
        first = np.zeros((C, OH, OW, N), dtype=np.min_scalar_type(len(offsets)))
        still_missing = np.ones((C, OH, OW, N), dtype=bool)
        for k in range(len(offsets) - 1):
            still_missing &= miss[k]
            first += still_missing
        offset_flat = np.array([kh * W + kw for kh, kw in offsets], dtype=np.int32)
        switches = np.take(offset_flat, first)
        switches += (rows[:, None] * W + cols).astype(np.int32)[:, :, None]
    return p, switches


def _pool_act_bias_backward_cpu(gp, switches, a, kind, slope, mode, kernel, stride, padding):
    """gz (C, H, W, N) and gb of the CPU epilogue (see _pool_act_bias_backward_part)."""
    gz = np.empty(a.shape, dtype=a.dtype)
    gb = _pool_act_bias_backward_part(gp, switches, a, gz, kind, slope, mode, kernel, stride, padding)
    return gz, gb


def _pool_act_bias_backward_part(gp, switches, a, gz, kind, slope, mode, kernel, stride, padding):
    """Into gz (channels of (C, H, W, N)): the pooled gradient spread over each window offset (a strided
    view per offset, as in pool.py), times act'(a); returns its sum per channel."""
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    C, H, W, N = a.shape
    OH, OW = gp.shape[2], gp.shape[3]
    g = np.ascontiguousarray(gp.transpose(1, 2, 3, 0))                      # (C, OH, OW, N)
    if (SH, SW) == (KH, KW) and not (PH or PW) and (H, W) == (OH * KH, OW * KW):
        return _tiled_pool_act_bias_backward_part(g, switches, a, gz, kind, slope, mode, kernel)
    out = gz
    if PH or PW:
        gz = np.zeros((C, H + 2 * PH, W + 2 * PW, N), dtype=a.dtype)
    else:
        gz[...] = 0
    gwin = sliding_window_view(gz, (KH, KW), axis=(1, 2), writeable=True)[:, ::SH, ::SW]
    overlapping = SH < KH or SW < KW
    if mode == "avg":
        g /= g.dtype.type(KH * KW)
    else:
        # the offset of each window's winner, from its switch (h*W + w) and the window's first row and column
        rows = np.arange(OH) * SH - PH
        cols = np.arange(OW) * SW - PW
        rel = np.ascontiguousarray(switches.transpose(1, 2, 3, 0)) - (rows[:, None] * W + cols)[:, :, None]
    for kh in range(KH):
        for kw in range(KW):
            part = g if mode == "avg" else g * (rel == kh * W + kw)
            if overlapping:
                gwin[..., kh, kw] += part    # one offset's view never overlaps itself, so += is exact
            else:
                gwin[..., kh, kw] = part     # each position is in one window at most
    if PH or PW:
        out[...] = gz[:, PH:PH + H, PW:PW + W]
    _dact_inplace(out, a, kind, slope)
    return out.reshape(C, -1).sum(axis=1)


def _tiled_pool_act_bias_backward_part(g, switches, a, gz, kind, slope, mode, kernel):
    """The same when the windows tile the input exactly (LeNet's 2x2 pooling): seen as (C, OH, KH, OW, KW, N),
    every position takes its window's gradient by broadcasting, so act' and the spreading are one pass each
    (no zero fill, no per-offset passes)."""
    (KH, KW) = kernel
    C, H, W, N = a.shape
    OH, OW = g.shape[1], g.shape[2]
    g6 = g.reshape(C, OH, 1, OW, 1, N)
    if mode == "avg":
        g6 = g6 / g.dtype.type(KH * KW)
    else:
        # each window's winner, from its switch (h*W + w) less the window's first position, against every offset
        first = (np.arange(OH)[:, None] * KH * W + np.arange(OW) * KW).reshape(1, OH, 1, OW, 1, 1)
        offsets = (np.arange(KH)[:, None] * W + np.arange(KW)).reshape(1, 1, KH, 1, KW, 1)
        rel = np.ascontiguousarray(switches.transpose(1, 2, 3, 0)).reshape(C, OH, 1, OW, 1, N) - first
        g6 = g6 * (rel == offsets)
    gz6, a6 = gz.reshape(C, OH, KH, OW, KW, N), a.reshape(C, OH, KH, OW, KW, N)
    if kind == "tanh":                       # gz = g * (1 - a^2), computed in gz's own memory
        np.multiply(a, a, out=gz)
        np.subtract(1, gz, out=gz)
        gz6 *= g6
    elif kind == "sigmoid":                  # gz = g * a * (1 - a)
        np.subtract(1, a, out=gz)
        gz *= a
        gz6 *= g6
    elif kind == "relu":
        np.multiply(g6, a6 > 0, out=gz6)
    else:
        np.copyto(gz6, g6)
        if kind == "leaky_relu":
            np.multiply(gz, gz.dtype.type(slope), out=gz, where=a <= 0)
    return gz.reshape(C, -1).sum(axis=1)


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"activation: expected one of {KINDS}, got {kind!r}")


def _typed(a, slope):
    return a.dtype.type(slope)


def _dummy(like, dtype, ndim):
    """A one-element array standing for an argument a kernel does not use (Numba needs its type)."""
    return backend.empty((1,) * ndim, dtype, like)


# ---------------------------------------------------------------------------- the functions layers call
def activation_forward(kind: str, x, slope: float = 0.01):
    """y = act(x), elementwise, a new array."""
    _check_kind(kind)
    if kind == "identity":
        return x.copy()
    if on_gpu(x):
        return _forward_k[kind](x, slope)
    return _forward_cpu(kind, x, slope)


def activation_backward(kind: str, x, y, gy, slope: float = 0.01):
    """dL/dx from dL/dy; ``x`` is read by ReLU/LeakyReLU, ``y`` by Tanh/Sigmoid (pass what you kept)."""
    _check_kind(kind)
    if kind == "identity":
        return gy.copy()
    x = y if x is None else x
    y = x if y is None else y
    if on_gpu(gy):
        return _backward_k[kind](x, y, gy, slope)
    return _backward_cpu(kind, x, y, gy, slope)


def bias_activation(y, b, kind: str = "identity", slope: float = 0.01):
    """In place: ``y[n, c, ...] = act(y[n, c, ...] + b[c])`` for y of shape (N, C, ...); returns y.

    Conv and dense call this after their GEMM: on the GPU it is one fused kernel, so the biased
    pre-activation never makes a round trip through memory.
    """
    _check_kind(kind)
    C = y.shape[1]
    inner = int(np.prod(y.shape[2:])) if y.ndim > 2 else 1
    if on_gpu(y):
        _bias_act_k[kind](b, C, inner, slope, y)
        return y
    y += b.reshape((1, C) + (1,) * (y.ndim - 2))
    return _act_inplace(y, kind, slope)


def bias_activation_nchw(z, b, kind: str = "identity", slope: float = 0.01):
    """``y[n, c, oh, ow] = act(z[c, oh, ow, n] + b[c])``: a conv's GEMM output (C, OH, OW, N) to its NCHW
    output in one pass (b may be None). On the CPU z is used as scratch."""
    _check_kind(kind)
    C, OH, OW, N = z.shape
    if on_gpu(z):
        y = backend.empty((N, C, OH, OW), z.dtype, z)
        launch(_bias_act_nchw_kernel, y.size, z.reshape(C, OH * OW, N), _dummy(z, z.dtype, 1) if b is None else b,
               y.reshape(N, C, OH * OW), _CODE[kind], _typed(z, slope), b is not None, grid_stride=True)
        return y
    # a channel at a time, so that its (OH, OW, N) block stays in cache while it is read across the batch
    # (1.5x faster than one transposing copy on LeNet's first layer); the bias add rides along
    y = np.empty((N, C, OH, OW), dtype=z.dtype)
    for c in range(C):
        if b is None:
            y[:, c] = z[c].transpose(2, 0, 1)
        else:
            np.add(z[c].transpose(2, 0, 1), b[c], out=y[:, c])
    return _act_inplace(y, kind, slope)


def bias_activation_pool(z, b, kind: str, slope: float, pool):
    """conv -> act -> pool in one pass: from a conv's GEMM output z (C, H, W, N) and bias b (or None),
    ``a = act(z + b)`` (kept for backward, z's layout) and its pooling p (N, C, OH, OW).

    ``pool`` is ``(mode, kernel, stride, padding)``, mode "max" or "avg" (the same conventions as
    gpucnn.kernels.pool: switches h*W + w, first maximum wins, padded zeros count in the mean).
    Returns ``(a, p, switches)``, switches None for "avg". On the CPU z becomes ``a`` (in place).
    """
    _check_kind(kind)
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
    OH, OW = _pool_size(H, KH, SH, PH), _pool_size(W, KW, SW, PW)
    a = backend.empty(z.shape, z.dtype, z)
    p = backend.empty((N, C, OH, OW), z.dtype, z)
    switches = backend.empty((N, C, OH, OW), np.int32, z) if mode == "max" else _dummy(z, np.int32, 4)
    bias = _dummy(z, z.dtype, 1) if b is None else b
    launch(_bias_act_pool_kernel, p.size, z, bias, a, p, switches, _CODE[kind], _typed(z, slope), b is not None,
           mode == "max", KH, KW, SH, SW, PH, PW, grid_stride=True)
    return a, p, (switches if mode == "max" else None)


# The largest block each reduction kernel may launch: a power of two (block_sum halves it) whose registers fit a
# block's 65,536. ptxas gives _act_bias_grad_kernel 40 registers per thread, so 1,024 threads fit; it gives
# _pool_act_bias_grad_kernel 80 (sm_90) to 94 (sm_75, sm_80), and a block of 1,024 threads allows at most 64
# (on an H200 it failed with LAUNCH_OUT_OF_RESOURCES), so that one stops at 512. `gpucnn kernels` prints every kernel's
# registers; tests/test_launch_resources.py checks every launch against them.
_MAX_THREADS = {"_act_bias_grad_kernel": 1024, "_pool_act_bias_grad_kernel": 512}


def _reduce(kernel, channels, per_channel, like, *args):
    # a block per channel; a conv has few channels (6 in LeNet's first layer) and many values per channel
    # (200,000 at batch 256), so the blocks are as large as the kernel's registers allow
    threads = backend.reduction_threads(per_channel, cap=_MAX_THREADS[kernel.name])
    launch(kernel, channels * threads, *args, threads=threads, shared_bytes=threads * like.itemsize)


def activation_bias_backward(gy, y, kind: str = "identity", slope: float = 0.01, layout: str = "same",
                             need_gb: bool = True, gb_out=None):
    """``(gz, gb)``: gz = gy * act'(y), the gradient before the activation, and gb its sum over every axis
    but the channel axis 1 (the bias gradient; None unless ``need_gb``).

    gy, y: (N, C, ...) - the gradient of the activation's output and that output (y unused for
    "identity"). ``layout="same"``: gz is (N, C, ...) like gy (for "identity" gz is gy itself);
    ``layout="gemm"``: gz is (C, ..., N), the column order of a conv's im2col matrix. ``gb_out``: an
    array of shape (C,) to write gb into (a flat gradient buffer's view).
    """
    _check_kind(kind)
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
        _reduce(_act_bias_grad_kernel, C, N * HW, gy, gy.reshape(N, C, HW), y_.reshape(N, C, HW), gz3, gb,
                _CODE[kind], _typed(gy, slope), layout == "gemm", write_gz)
        return gz, (gb if need_gb else None)
    if layout == "gemm":
        gz = np.empty((C,) + inner + (N,), dtype=gy.dtype)
        for c in range(C):      # a channel at a time, as bias_activation_nchw (cache-friendly)
            gz[c] = np.moveaxis(gy[:, c], 0, -1)
            if kind != "identity":
                _dact_inplace(gz[c], np.moveaxis(y[:, c], 0, -1), kind, slope)
        gb = gz.reshape(C, -1).sum(axis=1, out=gb_out) if need_gb else None
        return gz, gb
    g = gy if kind == "identity" else _dact_inplace(gy.copy(), y, kind, slope)
    gb = g.reshape(N, C, HW).sum(axis=(0, 2), out=gb_out) if need_gb else None
    return g, gb


def pool_activation_bias_backward(gp, switches, a, kind: str, slope: float, pool, need_gb: bool = True,
                                  gb_out=None):
    """The backward of :func:`bias_activation_pool`: ``(gz, gb)`` with gz (C, H, W, N) = the pooled
    gradient gp (N, C, OH, OW) routed back through the pooling and the activation, in the layout of a
    conv's GEMM, and gb its sum per channel (None unless ``need_gb``; written into ``gb_out`` when given)."""
    _check_kind(kind)
    mode, kernel, stride, padding = pool
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    C, H, W, N = a.shape
    if on_gpu(gp):
        gp = xp(gp).ascontiguousarray(gp)
        gz = backend.empty(a.shape, a.dtype, a)
        gb = gb_out if (need_gb and gb_out is not None) else backend.empty((C,), a.dtype, a)
        sw = switches if mode == "max" else _dummy(a, np.int32, 4)
        _reduce(_pool_act_bias_grad_kernel, C, H * W * N, a, gp, sw, a, gz, gb, _CODE[kind], _typed(a, slope),
                mode == "max", KH, KW, SH, SW, PH, PW)
        return gz, (gb if need_gb else None)
    gz, gb = _pool_act_bias_backward_cpu(gp, switches, a, kind, slope, mode, kernel, stride, padding)
    if gb_out is not None and need_gb:
        gb_out[...] = gb
        gb = gb_out
    return gz, (gb if need_gb else None)
