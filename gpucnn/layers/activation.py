"""Activation layers: ReLU, LeakyReLU, Tanh, Sigmoid (any input shape, no parameters)."""
from __future__ import annotations

from ..kernels import activation as K
from .base import Layer, check_input

__all__ = ["ReLU", "LeakyReLU", "Tanh", "Sigmoid"]


class _Activation(Layer):
    kind = "identity"
    keeps = "x"          # what backward reads: the input ("x") or the output ("y")
    slope = 0.0

    def __init__(self):
        super().__init__()
        self._x = self._y = None

    def forward(self, x, training=True):
        check_input(self.name, x, None, "of any shape")
        y = K.activation_forward(self.kind, x, self.slope)
        self._x, self._y = (x, None) if self.keeps == "x" else (None, y)
        return y

    def backward(self, gy):
        kept = self._need("_" + self.keeps)
        if tuple(gy.shape) != tuple(kept.shape):
            raise ValueError(f"{self.name}: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {tuple(kept.shape)}")
        return K.activation_backward(self.kind, self._x, self._y, gy, self.slope)


class ReLU(_Activation):
    """max(x, 0)."""
    kind = "relu"


class LeakyReLU(_Activation):
    """x for x > 0, slope * x otherwise (slope 0.01 as PyTorch)."""
    kind = "leaky_relu"

    def __init__(self, slope: float = 0.01):
        super().__init__()
        self.slope = float(slope)

    def config(self):
        return {"slope": self.slope}


class Tanh(_Activation):
    """tanh(x); backward uses the output: 1 - y^2."""
    kind, keeps = "tanh", "y"


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)); backward uses the output: y (1 - y)."""
    kind, keeps = "sigmoid", "y"
