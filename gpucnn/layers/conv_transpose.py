"""ConvTranspose2D: the transposed convolution ("deconvolution"), the adjoint of Conv2D, which upsamples.

It is a convolution's input gradient run forward, so it runs the same algorithm objects with their passes
swapped (as Caffe's deconvolution layer swaps which GEMM runs): its forward is the algorithm's ``grad_input``, its
input gradient the algorithm's ``forward``, its weight gradient the algorithm's ``grad_weight`` with the roles of
the convolution's input (here: the output gradient) and output gradient (here: the input) exchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..kernels import activation as A
from ..kernels import conv as K
from .base import check_input, check_same_device, pair
from .conv import ConvLayer

__all__ = ["ConvTranspose2D"]


class _Forward(NamedTuple):
    """What ConvTranspose2D.forward keeps for backward."""
    conv: K.Saved           # the convolution this layer transposes: its algorithm and geometry (nothing lowered)
    xz: object              # the input in the convolution's GEMM layout (C, H, W, N): its output gradient
    y_shape: tuple          # the shape forward returned


class ConvTranspose2D(ConvLayer):
    """``y = conv_transpose(x, weight) + bias``: weight (in_channels, out_channels // groups, KH, KW), bias
    (out_channels,); the same as PyTorch's ``conv_transpose2d``. Each input element adds its weighted KH x KW
    window into the output, windows ``stride`` apart; ``padding`` crops P rows and columns from each border.
    Output size per axis: O = (H - 1) * S - 2P + K + output_padding, where ``output_padding`` (0 <= it < S)
    picks among the sizes a stride-S convolution maps back to H. Conv2D(out, in, K, S, P) maps that output
    back to the input's size, and its backward is this layer's forward.

    ``groups``, ``algorithm`` (a 3x3 stride-1 layer may run "winograd"), ``needs_input_grad`` and the rest as
    Conv2D. A Sequential does not fuse the activation after it into its epilogue (its output is made by col2im
    in NCHW, not in the GEMM layout the fused epilogues read): the activation runs as its own layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dtype="float32", init="default", rng=None,
                 algorithm: str = "gemm"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, bias, dtype, init, rng, algorithm,
                         groups)
        self.output_padding = pair(output_padding, "output_padding", self.name)
        if not all(0 <= p < s for p, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"{self.name}: output_padding must be >= 0 and smaller than the stride along each axis, "
                             f"got output_padding {self.output_padding} with stride {self.stride}")

    def _weight_shape(self) -> tuple:
        return (self.in_channels, self.out_channels // self.groups) + self.kernel_size

    def output_shape(self, input_shape):
        _, H, W = self._input_channels(input_shape)
        return (self.out_channels,) + tuple(
            self._output_size(size, K, S, P, OP, axis) for size, K, S, P, OP, axis in
            zip((H, W), self.kernel_size, self.stride, self.padding, self.output_padding, ("height", "width")))

    def _output_size(self, size, K, S, P, OP, axis) -> int:
        out = (size - 1) * S - 2 * P + K + OP
        if out < 1:
            raise ValueError(f"{self.name}: the output {axis} O = (H - 1)*S - 2P + K + output_padding = "
                             f"({size} - 1)*{S} - 2*{P} + {K} + {OP} = {out} < 1: the padding crops more than the "
                             "input and kernel cover")
        return out

    def macs(self, input_shape) -> int:
        """Every weight once per input position: weight.size * H * W (a convolution's count, run backwards)."""
        _, H, W = self._input_channels(input_shape)
        return int(np.prod(self._weight_shape())) * H * W

    def forward(self, x, training=True):
        """The transposed convolution of x (N, in_channels, H, W): the convolution's input gradient for x as its
        output gradient (three launches on the GPU path: x to the GEMM layout, the GEMMs and col2im, the bias)."""
        check_input(self.name, x, 4, "(N, C, H, W)", self.dtype, self.in_channels)
        w = self.params["weight"]
        check_same_device(self.name, x, w)
        y_shape = (x.shape[0],) + self.output_shape(tuple(x.shape[1:]))
        conv = K.Saved(self._algorithm(), y_shape, self.kernel_size, self.stride, self.padding, None,
                       groups=self.groups)
        # x moved to the layout a convolution's backward gives its GEMMs (conv's backward does this very move)
        xz, _ = A.activation_bias_backward(x, None, "identity", layout="gemm", need_gb=False)
        y = conv.algorithm.grad_input(conv, w, xz)
        if self.bias:
            A.bias_activation(y, self.params["bias"])           # in place
        self._saved = _Forward(conv, xz, y_shape)
        self.save_for_backward(xz)                  # (y is the output; what grad_input made ends inside it)
        return y

    def backward(self, gy):
        s = self._saved_for(gy)
        gb_out = self._grad_out("bias", gy) if self.bias else None
        gy, gb = A.activation_bias_backward(gy, None, "identity", need_gb=self.bias, gb_out=gb_out)
        algo, w, c = s.conv.algorithm, self.params["weight"], s.conv
        if self.needs_input_grad:
            # gx is the convolution of gy (in the GEMM layout, then NCHW); forward lowered gy for gw on the way
            z, low = algo.forward(gy, w, c.stride, c.padding, c.groups)
            gx = A.bias_activation_nchw(z, None)
        else:
            gx = None
            low = K.Saved(algo, gy.shape, c.kernel, c.stride, c.padding,
                          algo.lower(gy, c.kernel, c.stride, c.padding, c.groups), groups=c.groups)
        gw_out = self._grad_out("weight", gy)
        # the convolution's weight gradient, its input being gy and its output gradient x (what this backward made
        # and does not return, z and the lowering, ends when it returns: gpucnn.step)
        gw = algo.grad_weight(low, s.xz, gw_out)
        self.grads["weight"] = gw_out if gw_out is not None else gw
        if self.bias:
            self.grads["bias"] = gb_out if gb_out is not None else gb
        return gx

    def config(self):
        return {**super().config(), "output_padding": list(self.output_padding)}
