"""Activation layers: ReLU, LeakyReLU, Tanh, Sigmoid, and ActivationLayer for any registered activation (any input
shape, no parameters). What each computes is its record in gpucnn.kernels.activations."""
from __future__ import annotations

from ..kernels import activation as K
from ..kernels.activations import get
from .base import Act, Layer, check_input

__all__ = ["ReLU", "LeakyReLU", "Tanh", "Sigmoid", "ActivationLayer"]


class _Activation(Layer):
    kind = "identity"
    slope = 0.0

    def __init__(self):
        super().__init__()
        self._x = self._y = None

    @property
    def keeps(self) -> str:
        """What backward reads: the input ("x") or the output ("y"), as the activation's record says."""
        return get(self.kind).reads

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

    def fusable(self) -> bool:
        """Whether a Sequential may compute this layer in the epilogue of the Conv2D or Dense before it: only our
        own classes (a user's subclass may compute something else), and only where the activation's derivative
        can be read from its output, all the fused backward keeps (Activation.fuses: not a LeakyReLU with a
        negative slope)."""
        return type(self) in _OURS and get(self.kind).fuses(self.slope)

    def epilogue(self):
        """This activation as a value a Conv2D or Dense computes in its bias kernel, where it is fusable."""
        return Act(self.kind, self.slope) if self.fusable() else None


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
    kind = "tanh"


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)); backward uses the output: y (1 - y)."""
    kind = "sigmoid"


class ActivationLayer(_Activation):
    """The activation registered as ``kind`` (gpucnn.kernels.activations.register) as a layer, e.g.
    ``ActivationLayer("softplus")``; ``slope`` is passed to its functions (LeakyReLU's)."""

    def __init__(self, kind: str, slope: float = 0.0):
        super().__init__()
        get(kind)                       # a ValueError naming the registered kinds
        self.kind, self.slope = kind, float(slope)

    def config(self):
        return {"kind": self.kind, "slope": self.slope}


_OURS = (ReLU, LeakyReLU, Tanh, Sigmoid, ActivationLayer)
