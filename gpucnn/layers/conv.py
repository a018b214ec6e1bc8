"""Conv2D: a 2-D convolution layer (cross-correlation, as PyTorch) on NCHW images."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import activation as A
from ..kernels import conv as K
from ..kernels import winograd as WG
from .base import Layer, check_input, check_same_device, conv_output_size, init_uniform, pair

__all__ = ["Conv2D"]


class Conv2D(Layer):
    """``y = conv(x, weight) + bias``: weight (out_channels, in_channels, KH, KW), bias (out_channels,).

    ``kernel_size``, ``stride`` and ``padding`` are an int or an (H, W) pair; padding is zeros. Output size
    per axis: O = floor((W - K + 2P) / S) + 1. Set ``needs_input_grad = False`` on a network's first layer:
    backward then skips the input gradient (nothing upstream wants it) and returns None.

    ``algorithm``: "gemm" (im2col + GEMM, any shape) or "winograd" (F(2x2, 3x3): 3x3 kernels with stride 1
    only; 4 multiplications per output and channel instead of 9, see gpucnn.kernels.winograd). Both give the
    same result within float rounding; the attribute may be changed between steps.
    """

    ALGORITHMS = ("gemm", "winograd")
    # Bytes. In a training step on the GPU path, forward's lowered input (im2col's matrix; Winograd's V) is
    # kept for backward's weight gradient only when it is at most this large; a larger one is released at
    # once and backward lowers the input again (one more launch, a pass over memory). Kept, every layer's
    # matrix is alive at the step's peak (2.1 GiB of AlexNet's 3.3 at batch 128, bench/memory.py); dropped,
    # the workspace holds one at a time. LeNet-5's (20 MiB at batch 256) stay. 0: always recompute.
    RECOMPUTE_ABOVE = 64 * 2 ** 20

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 dtype="float32", init="default", rng=None, algorithm: str = "gemm"):
        super().__init__()
        for what, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"Conv2D: {what} must be an int, got {v!r}")
            if v < 1:
                raise ValueError(f"Conv2D: {what} must be positive, got {v}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size", "Conv2D")
        self.stride = pair(stride, "stride", "Conv2D")
        self.padding = pair(padding, "padding", "Conv2D")
        if min(self.kernel_size) < 1:
            raise ValueError(f"Conv2D: kernel_size must be positive, got {kernel_size!r}")
        if min(self.stride) < 1:
            raise ValueError(f"Conv2D: stride must be positive, got {stride!r}")
        if min(self.padding) < 0:
            raise ValueError(f"Conv2D: padding must be zero or positive, got {padding!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"Conv2D: dtype must be float32 or float64, got {self.dtype.name}")
        self.bias = bool(bias)
        self.init = init
        self.needs_input_grad = True
        self.algorithm = algorithm
        self._check_algorithm()

        KH, KW = self.kernel_size
        fan_in = self.in_channels * KH * KW
        self.params["weight"] = init_uniform((self.out_channels, self.in_channels, KH, KW), fan_in,
                                             self.dtype, rng, init)
        if self.bias:
            self.params["bias"] = init_uniform((self.out_channels,), fan_in, self.dtype, rng, init)
        self.grads = {k: None for k in self.params}
        self._col = self._x_shape = self._y_shape = self._a = self._pool = self.switches = None
        self._x = None              # the input, kept instead of the lowered input when that is recomputed
        self._algo = algorithm
        self._act = ("identity", 0.0)

    def _check_algorithm(self):
        if self.algorithm not in self.ALGORITHMS:
            raise ValueError(f"Conv2D: algorithm must be one of {self.ALGORITHMS}, got {self.algorithm!r}")
        if self.algorithm == "winograd" and not WG.winograd_supported(self.kernel_size, self.stride):
            (KH, KW), (SH, SW) = self.kernel_size, self.stride
            raise ValueError(f"Conv2D: algorithm 'winograd' (F(2x2, 3x3)) computes 3x3 convolutions with stride 1; "
                             f"this layer has a {KH}x{KW} kernel with stride ({SH}, {SW}): use algorithm 'gemm'")

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D: expected an input shape (C, H, W), got {tuple(input_shape)}")
        C, H, W = input_shape
        if C != self.in_channels:
            raise ValueError(f"Conv2D: expected {self.in_channels} input channels, got {C} "
                             f"(input shape {tuple(input_shape)})")
        (KH, KW), (SH, SW), (PH, PW) = self.kernel_size, self.stride, self.padding
        OH = conv_output_size("Conv2D", H, KH, SH, PH, "height")
        OW = conv_output_size("Conv2D", W, KW, SW, PW, "width")
        return (self.out_channels, OH, OW)

    def forward(self, x, training=True, activation=None, pool=None):
        """The convolution of x (N, C, H, W). A Sequential passes the activation layer that follows (and the
        pooling layer after that) to compute them in the same epilogue kernel; backward then takes the
        gradient of what this call returned (the pooled output) and differentiates all of it."""
        check_input("Conv2D", x, 4, "(N, C, H, W)", self.dtype, self.in_channels)
        w = self.params["weight"]
        check_same_device("Conv2D", x, w)
        out = self.output_shape(tuple(x.shape[1:]))
        kind, slope = (activation.kind, activation.slope) if activation is not None else ("identity", 0.0)
        b = self.params.get("bias")
        self._check_algorithm()
        self._algo = self.algorithm             # backward must differentiate what forward ran
        if self._algo == "winograd":
            z, self._col = WG.winograd_gemm(x, w, self.padding)
        else:
            z, self._col = K.conv2d_gemm(x, w, self.stride, self.padding)
        lowered = self._col[0] if self._algo == "winograd" else self._col
        self._x = None
        if backend.in_workspace() and backend.on_gpu(x) and lowered.nbytes > self.RECOMPUTE_ABOVE:
            backend.release(lowered)                # backward makes it again from x (see RECOMPUTE_ABOVE)
            self._x = x
            self._col = (None, self._col[1]) if self._algo == "winograd" else None
        if pool is None:
            y = A.bias_activation_nchw(z, b, kind, slope)
            self._a, self.switches, self._pool = (y if kind != "identity" else None), None, None
            self._y_shape = (x.shape[0],) + out
        else:
            spec = ("max" if pool.name == "MaxPool2D" else "avg", pool.kernel, pool.stride, pool.padding)
            self._a, y, self.switches = A.bias_activation_pool(z, b, kind, slope, spec)
            self._pool = spec
            self._y_shape = tuple(y.shape)
        if z is not self._a:            # (the CPU's epilogue computes ``a`` in z's memory)
            backend.release(z)
        self._act = (kind, slope)
        self._x_shape = tuple(x.shape)
        return y

    def backward(self, gy):
        col = self._lowered()
        if tuple(gy.shape) != self._y_shape:
            raise ValueError(f"Conv2D: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {self._y_shape}")
        if gy.dtype != self.dtype:
            raise TypeError(f"Conv2D: backward got a {gy.dtype} gradient, expected {self.dtype} as the forward output")
        kind, slope = self._act
        gb_out = self._grad_out("bias", gy) if self.bias else None
        if self._pool is None:
            gz, gb = A.activation_bias_backward(gy, self._a, kind, slope, layout="gemm", need_gb=self.bias,
                                                gb_out=gb_out)
        else:
            gz, gb = A.pool_activation_bias_backward(gy, self.switches, self._a, kind, slope, self._pool,
                                                     need_gb=self.bias, gb_out=gb_out)
        gw_out = self._grad_out("weight", gy)
        w = self.params["weight"]
        if self._algo == "winograd":
            gx, gw = WG.winograd_gemm_backward(self._x_shape, col, w, gz, self.padding,
                                               need_gx=self.needs_input_grad, gw_out=gw_out)
        else:
            gx, gw = K.conv2d_gemm_backward(self._x_shape, col, w, gz, self.stride, self.padding,
                                            need_gx=self.needs_input_grad, gw_out=gw_out)
        self.grads["weight"] = gw_out if gw_out is not None else gw
        if self.bias:
            self.grads["bias"] = gb_out if gb_out is not None else gb
        # in a training step nothing reads these again: their memory may serve the layers below (the lowered
        # input itself, im2col's matrix or Winograd's V, was released by the kernel function after gw's GEMM)
        backend.release(gz, *(col[1:] if isinstance(col, tuple) else ()), self._a, self.switches)
        return gx

    def _lowered(self):
        """What backward's weight gradient reads: forward's lowered input, or the same made again from the
        input when forward dropped it (RECOMPUTE_ABOVE)."""
        if self._x is None:
            return self._need("_col")
        x, self._x = self._x, None
        if self._algo == "winograd":
            return WG.winograd_lower(x, self.padding), self._col[1]
        KH, KW = self.kernel_size
        return K.im2col(x, KH, KW, self.stride, self.padding)

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "bias": self.bias, "dtype": self.dtype.name,
                # a callable initialiser cannot be saved; a loaded model's weights replace it anyway
                "init": self.init if isinstance(self.init, str) else "default",
                # only when not the default, so checkpoints written before the switch existed still match
                **({"algorithm": self.algorithm} if self.algorithm != "gemm" else {})}
