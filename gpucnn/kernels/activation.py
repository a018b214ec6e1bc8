"""Activations: ReLU, LeakyReLU, Tanh, Sigmoid, forward and backward; and the bias add fused with them.

GPU: CuPy ElementwiseKernels (one launch per pass). CPU: NumPy. Backward of ReLU/LeakyReLU reads the
input x; backward of Tanh/Sigmoid reads the output y (tanh' = 1 - y^2, sigmoid' = y (1 - y)).
"""
from __future__ import annotations

import numpy as np

from ..backend import on_gpu, xp
from ..elementwise import ElementwiseKernel

KINDS = ("relu", "leaky_relu", "tanh", "sigmoid", "identity")

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


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"activation: expected one of {KINDS}, got {kind!r}")


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
    if kind != "identity":
        y[...] = _forward_cpu(kind, y, slope)
    return y
