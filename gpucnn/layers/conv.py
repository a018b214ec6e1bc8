"""Conv2D: a 2-D convolution layer (cross-correlation, as PyTorch) on NCHW images, grouped or not; and what it
shares with ConvTranspose2D (gpucnn.layers.conv_transpose): arguments, checks, parameters, the algorithm."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import memory
from ..kernels import activation as A
from ..kernels import conv as K
from .base import Act, Layer, Pool, check_input, check_same_device, conv_output_size, init_uniform, pair

__all__ = ["Conv2D"]


class _Forward(NamedTuple):
    """What Conv2D.forward keeps for backward."""
    conv: K.Saved           # the convolution's: which algorithm ran, its lowered input (or x to lower again)
    act: tuple              # (kind, slope) of the activation computed in the epilogue
    a: object               # the activation's output where its derivative reads it, else None
    pool: tuple | None      # the pooling computed in the epilogue, (kind, kernel, stride, padding)
    switches: object        # max pooling's argmax, else None
    y_shape: tuple          # the shape forward returned


class _RecomputeAlias(type):
    """Conv2D.RECOMPUTE_ABOVE, kept for code that reads or sets it: an alias of the step runner's recompute
    policy, gpucnn.step.RECOMPUTE_ABOVE (deleting it, as monkeypatch's undo does, restores the default)."""

    @property
    def RECOMPUTE_ABOVE(cls):
        from .. import step
        return step.RECOMPUTE_ABOVE

    @RECOMPUTE_ABOVE.setter
    def RECOMPUTE_ABOVE(cls, value):
        from .. import step
        step.RECOMPUTE_ABOVE = value

    @RECOMPUTE_ABOVE.deleter
    def RECOMPUTE_ABOVE(cls):
        from .. import step
        step.RECOMPUTE_ABOVE = step.DEFAULT_RECOMPUTE_ABOVE


class ConvLayer(Layer, metaclass=_RecomputeAlias):
    """What a convolution layer and its transpose share: the arguments and their checks, the weight and bias, the
    algorithm (an object of gpucnn.kernels.conv.ALGORITHMS), the saved config. A subclass says which way round
    its weight is (``_weight_shape``) and writes forward, backward, output_shape and ``macs(input_shape)``: the
    weights' multiply-adds for one image, no bias (gpucnn.Sequential.summary adds them up)."""

    ALGORITHMS = tuple(K.ALGORITHMS)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 dtype="float32", init="default", rng=None, algorithm: str = "gemm", groups: int = 1):
        super().__init__()
        name = self.name
        for what, v in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name}: {what} must be an int, got {v!r}")
            if v < 1:
                raise ValueError(f"{name}: {what} must be positive, got {v}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                             f"divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size = pair(kernel_size, "kernel_size", name)
        self.stride = pair(stride, "stride", name)
        self.padding = pair(padding, "padding", name)
        if min(self.kernel_size) < 1:
            raise ValueError(f"{name}: kernel_size must be positive, got {kernel_size!r}")
        if min(self.stride) < 1:
            raise ValueError(f"{name}: stride must be positive, got {stride!r}")
        if min(self.padding) < 0:
            raise ValueError(f"{name}: padding must be zero or positive, got {padding!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}: dtype must be float32 or float64, got {self.dtype.name}")
        self.bias = bool(bias)
        self.init = init
        self.needs_input_grad = True
        self.algorithm = algorithm
        self._algorithm()

        shape = self._weight_shape()
        fan_in = int(np.prod(shape[1:]))            # what one output reads: (channels per group) * KH * KW
        self.params["weight"] = init_uniform(shape, fan_in, self.dtype, rng, init)
        if self.bias:
            self.params["bias"] = init_uniform((self.out_channels,), fan_in, self.dtype, rng, init)
        self.grads = {k: None for k in self.params}
        self._saved = None          # what forward keeps for backward

    def _weight_shape(self) -> tuple:
        return (self.out_channels, self.in_channels // self.groups) + self.kernel_size

    def _algorithm(self):
        """The algorithm object ``self.algorithm`` names, once it is known to compute this layer's shape."""
        algo = K.ALGORITHMS.get(self.algorithm) if isinstance(self.algorithm, str) else None
        if algo is None:
            raise ValueError(f"{self.name}: algorithm must be one of {self.ALGORITHMS}, got {self.algorithm!r}")
        if not algo.supports(self.kernel_size, self.stride):
            (KH, KW), (SH, SW) = self.kernel_size, self.stride
            raise ValueError(f"{self.name}: algorithm {algo.name!r} ({algo.title}) computes {algo.limits}; "
                             f"this layer has a {KH}x{KW} kernel with stride ({SH}, {SW}): use algorithm 'gemm'")
        return algo

    def _input_channels(self, input_shape):
        """(C, H, W) of one image, checked against in_channels."""
        if len(input_shape) != 3:
            raise ValueError(f"{self.name}: expected an input shape (C, H, W), got {tuple(input_shape)}")
        C, H, W = input_shape
        if C != self.in_channels:
            raise ValueError(f"{self.name}: expected {self.in_channels} input channels, got {C} "
                             f"(input shape {tuple(input_shape)})")
        return C, H, W

    def _saved_for(self, gy):
        """What forward saved, once ``gy`` is known to be the gradient of what it returned (shape and dtype)."""
        s = self._need("_saved")
        if tuple(gy.shape) != s.y_shape:
            raise ValueError(f"{self.name}: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {s.y_shape}")
        if gy.dtype != self.dtype:
            raise TypeError(f"{self.name}: backward got a {gy.dtype} gradient, expected {self.dtype} as the "
                            "forward output")
        return s

    def describe(self) -> str:
        """The layer in summary()'s "layer" column: its class, and its groups where it has more than one."""
        return self.name if self.groups == 1 else f"{self.name}(groups={self.groups})"

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "bias": self.bias, "dtype": self.dtype.name,
                # a callable initialiser cannot be saved; a loaded model's weights replace it anyway
                "init": self.init if isinstance(self.init, str) else "default",
                # only when not the default, so checkpoints written before these existed still match
                **({"groups": self.groups} if self.groups != 1 else {}),
                **({"algorithm": self.algorithm} if self.algorithm != "gemm" else {})}


class Conv2D(ConvLayer):
    """``y = conv(x, weight) + bias``: weight (out_channels, in_channels // groups, KH, KW), bias (out_channels,).

    ``kernel_size``, ``stride`` and ``padding`` are an int or an (H, W) pair; padding is zeros. Output size
    per axis: O = floor((W - K + 2P) / S) + 1. Set ``needs_input_grad = False`` on a network's first layer:
    backward then skips the input gradient (nothing upstream wants it) and returns None.

    ``groups``: G independent convolutions side by side (AlexNet's two towers, Krizhevsky et al. 2012): input
    channels g*C/G .. (g+1)*C/G make output channels g*Cout/G .. (g+1)*Cout/G; G times fewer weights and
    multiply-adds. Both channel counts must be multiples of G; the same result as PyTorch's ``groups``.

    ``algorithm``: "gemm" (im2col + GEMM, any shape), "winograd" (F(2x2, 3x3): 3x3 kernels with stride 1
    only; 4 multiplications per output and channel instead of 9, see gpucnn.kernels.winograd) or "direct" (forward
    straight from the input, no im2col matrix: kernels and strides up to 16, for small-channel layers such as
    LeNet's; backward by im2col + GEMM, see gpucnn.kernels.direct). All give the same result within float
    rounding; the attribute may be changed between steps. Each is an object of gpucnn.kernels.conv.ALGORITHMS,
    which forward and backward call.
    """

    @property
    def switches(self):
        """Max pooling's argmax when forward computed a MaxPool2D in its epilogue (a deconvnet reads them)."""
        return self._saved.switches if self._saved is not None else None

    def output_shape(self, input_shape):
        _, H, W = self._input_channels(input_shape)
        (KH, KW), (SH, SW), (PH, PW) = self.kernel_size, self.stride, self.padding
        OH = conv_output_size("Conv2D", H, KH, SH, PH, "height")
        OW = conv_output_size("Conv2D", W, KW, SW, PW, "width")
        return (self.out_channels, OH, OW)

    def macs(self, input_shape) -> int:
        """Every weight once per output position: weight.size * OH * OW."""
        _, OH, OW = self.output_shape(input_shape)
        return int(np.prod(self._weight_shape())) * OH * OW

    def absorbs(self, *epilogues) -> bool:
        """An activation, a pooling, or both in that order: computed in the bias kernel after the GEMM (Layer.absorbs)."""
        kinds = tuple(type(e) for e in epilogues)
        return type(self) is Conv2D and kinds in ((Act,), (Pool,), (Act, Pool))

    def forward(self, x, training=True, activation=None, pool=None):
        """The convolution of x (N, C, H, W). A Sequential passes the epilogue of the activation layer that
        follows (an Act, or anything with ``kind`` and ``slope``) and of the pooling after that (a Pool) to compute
        them in the same epilogue kernel; backward then takes the gradient of what this call returned (the pooled
        output) and differentiates all of it."""
        check_input("Conv2D", x, 4, "(N, C, H, W)", self.dtype, self.in_channels)
        w = self.params["weight"]
        check_same_device("Conv2D", x, w)
        out = self.output_shape(tuple(x.shape[1:]))
        kind, slope = (activation.kind, activation.slope) if activation is not None else ("identity", 0.0)
        b = self.params.get("bias")
        z, conv = self._algorithm().forward(x, w, self.stride, self.padding, self.groups)
        if not memory.keep_for_backward(conv.lowered):     # the step runner's recompute policy
            conv.drop(x)                                    # backward makes it again from x
        if pool is None:
            y = A.bias_activation_nchw(z, b, kind, slope)
            a, switches, spec, y_shape = (y if kind != "identity" else None), None, None, (x.shape[0],) + out
        else:
            spec = Pool(pool.kind, pool.kernel, pool.stride, pool.padding)
            a, y, switches = A.bias_activation_pool(z, b, kind, slope, spec)
            y_shape = tuple(y.shape)
        self._saved = _Forward(conv, (kind, slope), a, spec, switches, y_shape)
        self.save_for_backward(conv.lowered, conv.x, *conv.extra, a, switches)     # (z, not kept, ends here)
        return y

    def backward(self, gy):
        s = self._saved_for(gy)
        s.conv.relower()                # forward's lowered input, made again from x if forward dropped it
        kind, slope = s.act
        gb_out = self._grad_out("bias", gy) if self.bias else None
        if s.pool is None:
            gz, gb = A.activation_bias_backward(gy, s.a, kind, slope, layout="gemm", need_gb=self.bias,
                                                gb_out=gb_out)
        else:
            gz, gb = A.pool_activation_bias_backward(gy, s.switches, s.a, kind, slope, s.pool,
                                                     need_gb=self.bias, gb_out=gb_out)
        gw_out = self._grad_out("weight", gy)
        gx, gw = s.conv.algorithm.backward(s.conv, self.params["weight"], gz, need_gx=self.needs_input_grad,
                                           gw_out=gw_out, overwrite=not self.retain_saved)
        self.grads["weight"] = gw_out if gw_out is not None else gw
        if self.bias:
            self.grads["bias"] = gb_out if gb_out is not None else gb
        return gx
