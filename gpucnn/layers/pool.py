"""Pooling layers: MaxPool2D and AvgPool2D over (N, C, H, W) inputs (no parameters).

Both take ``kernel_size``, ``stride`` (default: the kernel size, windows side by side) and ``padding``
(at most half the kernel); each is an int or an (H, W) pair. Windows may overlap (AlexNet's 3x3 stride 2).
"""
from __future__ import annotations

from ..kernels import pool as K
from .base import Layer, Pool, check_input, conv_output_size, pair

__all__ = ["MaxPool2D", "AvgPool2D"]


class _Pool2D(Layer):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel = pair(kernel_size, "kernel_size", self.name)
        self.stride = self.kernel if stride is None else pair(stride, "stride", self.name)
        self.padding = pair(padding, "padding", self.name)
        if min(self.kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{self.name}: expected kernel_size >= 1, stride >= 1 and padding >= 0, got "
                             f"kernel_size={self.kernel}, stride={self.stride}, padding={self.padding}")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel)):
            raise ValueError(f"{self.name}: padding {self.padding} must be at most half the kernel size "
                             f"{self.kernel}: with more, a window can lie wholly in the padding and pool no "
                             "input at all (PyTorch refuses it too)")
        self._x_shape = None

    def epilogue(self):
        """This pooling as a value a Conv2D computes in its epilogue (only gpucnn's own two classes). In a
        Sequential the stage then holds what this layer would have kept (its ``switches``): gpucnn.step.Stage."""
        return Pool(self.kind, self.kernel, self.stride, self.padding) if type(self) in (MaxPool2D, AvgPool2D) \
            else None

    def config(self):
        plain = lambda p: p[0] if p[0] == p[1] else list(p)
        return {"kernel_size": plain(self.kernel), "stride": plain(self.stride), "padding": plain(self.padding)}

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ValueError(f"{self.name}: expected an input shape (C, H, W), got {tuple(input_shape)}")
        C, H, W = input_shape
        return (C,
                conv_output_size(self.name, H, self.kernel[0], self.stride[0], self.padding[0], "height"),
                conv_output_size(self.name, W, self.kernel[1], self.stride[1], self.padding[1], "width"))

    def _check_forward(self, x):
        check_input(self.name, x, 4, "(N, C, H, W)")
        self.output_shape(tuple(x.shape[1:]))

    def _check_gy(self, gy, x_shape):
        expected = (x_shape[0],) + self.output_shape(x_shape[1:])
        if tuple(gy.shape) != expected:
            raise ValueError(f"{self.name}: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {expected}")


class MaxPool2D(_Pool2D):
    """The maximum of each window. ``layer.switches`` (after forward) holds, per output, the flat index
    ``h * W + w`` of the winning element in its input plane: backward routes the gradient there, and a
    deconvnet unpools with it. Padded positions never win; ties go to the first maximum in window order."""
    kind = "max"

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)
        self.switches = None

    def forward(self, x, training=True):
        self._check_forward(x)
        y, switches = K.maxpool2d_forward(x, self.kernel, self.stride, self.padding)
        self.switches = self.save_for_backward(switches)
        self._x_shape = tuple(x.shape)
        return y

    def backward(self, gy):
        switches = self._need("switches")
        self._check_gy(gy, self._x_shape)
        return K.maxpool2d_backward(gy, switches, self._x_shape, self.kernel, self.stride, self.padding)


class AvgPool2D(_Pool2D):
    """The mean of each window; padded zeros count (divide by KH*KW always, PyTorch's default)."""
    kind = "avg"

    def forward(self, x, training=True):
        self._check_forward(x)
        self._x_shape = tuple(x.shape)
        self.save_for_backward()        # backward reads nothing but the shape
        return K.avgpool2d_forward(x, self.kernel, self.stride, self.padding)

    def backward(self, gy):
        x_shape = self._need("_x_shape")
        self._check_gy(gy, x_shape)
        return K.avgpool2d_backward(gy, x_shape, self.kernel, self.stride, self.padding)
