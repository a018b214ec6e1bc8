"""Dense (fully connected) and Flatten, the layers that end a CNN: (N, C, H, W) -> (N, C*H*W) -> (N, out)."""
from __future__ import annotations

import numpy as np

from ..kernels import dense as K
from .base import Act, Layer, check_input, check_same_device, init_uniform

__all__ = ["Dense", "Flatten"]


class Dense(Layer):
    """y = x W^T + b: weight (out_features, in_features), bias (out_features,), input (N, in_features).

    Weight and bias start as U(+-1/sqrt(in_features)), PyTorch's default (``init`` picks another).
    ``needs_input_grad = False`` (as on Conv2D) makes backward skip dL/dx and return None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype="float32",
                 init="default", rng=None):
        super().__init__()
        if not (isinstance(in_features, (int, np.integer)) and isinstance(out_features, (int, np.integer))
                and in_features >= 1 and out_features >= 1):
            raise ValueError(f"Dense: expected positive integer in_features and out_features, "
                             f"got {in_features!r} and {out_features!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.use_bias = bool(bias)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"Dense: dtype must be float32 or float64, got {self.dtype}")
        self.init = init if isinstance(init, str) else "default"   # a callable is not JSON; the weights are saved
        self.params["weight"] = init_uniform((self.out_features, self.in_features), self.in_features,
                                             self.dtype, rng, init)
        if self.use_bias:
            self.params["bias"] = init_uniform((self.out_features,), self.in_features, self.dtype, rng, init)
        self.grads = {k: None for k in self.params}
        self.needs_input_grad = True
        self._x = self._y = None
        self._act = ("identity", 0.0)

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.use_bias,
                "dtype": self.dtype.name, "init": self.init}

    def output_shape(self, input_shape):
        if len(input_shape) != 1:
            raise ValueError(f"Dense: expected an input shape ({self.in_features},), got {tuple(input_shape)}"
                             + ("; use Flatten first" if len(input_shape) > 1 else ""))
        if input_shape[0] != self.in_features:
            raise ValueError(f"Dense: expected {self.in_features} input features, got {input_shape[0]} "
                             f"(input shape {tuple(input_shape)})")
        return (self.out_features,)

    def macs(self, input_shape) -> int:
        """Multiply-adds of the weights for one sample (no bias): in_features * out_features."""
        self.output_shape(input_shape)
        return self.in_features * self.out_features

    def absorbs(self, *epilogues) -> bool:
        """An activation, computed in the bias kernel after the GEMM (Layer.absorbs)."""
        return type(self) is Dense and tuple(type(e) for e in epilogues) == (Act,)

    def forward(self, x, training=True, activation=None):
        """x W^T + b for x (N, in_features). A Sequential passes the activation layer's epilogue (an Act) to apply
        it in the bias kernel; backward then takes the gradient of the activation's output."""
        check_input(self.name, x, None, f"(N, {self.in_features})", dtype=self.dtype)
        if x.ndim != 2:
            hint = "; use Flatten first to turn (N, C, H, W) into (N, C*H*W)" if x.ndim > 2 else \
                   "; a single sample is x.reshape(1, -1)"
            raise ValueError(f"Dense: expected a 2-d input (N, {self.in_features}), got shape {tuple(x.shape)}{hint}")
        check_input(self.name, x, 2, f"(N, {self.in_features})", channels=self.in_features,
                    channel_name="features")
        check_same_device(self.name, x, self.params["weight"])
        kind, slope = (activation.kind, activation.slope) if activation is not None else ("identity", 0.0)
        y = K.dense_forward(x, self.params["weight"], self.params.get("bias"), kind, slope)
        self._x, self._y = self.save_for_backward(x, y if kind != "identity" else None)
        self._act = (kind, slope)
        return y

    def backward(self, gy):
        x = self._need("_x")
        expected = (x.shape[0], self.out_features)
        if tuple(gy.shape) != expected:
            raise ValueError(f"Dense: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {expected}")
        if gy.dtype != self.dtype:
            raise TypeError(f"Dense: backward got a {gy.dtype} gradient but the layer is {self.dtype.name}")
        kind, slope = self._act
        gw_out = self._grad_out("weight", gy)
        gb_out = self._grad_out("bias", gy) if self.use_bias else None
        gx, gw, gb = K.dense_backward(x, self.params["weight"], gy, need_gx=self.needs_input_grad,
                                      need_gb=self.use_bias, y=self._y, activation=kind, slope=slope,
                                      gw_out=gw_out, gb_out=gb_out)
        self.grads["weight"] = gw_out if gw_out is not None else gw
        if self.use_bias:
            self.grads["bias"] = gb_out if gb_out is not None else gb
        return gx


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...): a reshape, so no copy for a contiguous input; backward
    reshapes the gradient back."""

    def __init__(self):
        super().__init__()
        self._x_shape = None

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, x, training=True):
        check_input(self.name, x, None, "(N, ...)")
        if x.ndim < 2:
            raise ValueError(f"Flatten: expected an input (N, ...) with a batch axis and at least 2 dims, "
                             f"got shape {tuple(x.shape)}")
        self._x_shape = tuple(x.shape)
        self.save_for_backward()        # backward reads only the shape (the output is a view of x)
        return x.reshape(x.shape[0], -1)

    def backward(self, gy):
        x_shape = self._need("_x_shape")
        expected = (x_shape[0], int(np.prod(x_shape[1:])))
        if tuple(gy.shape) != expected:
            raise ValueError(f"Flatten: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {expected}")
        return gy.reshape(x_shape)
