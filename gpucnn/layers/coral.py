"""CoralHead: the output layer of CORAL ordinal regression (see gpucnn.kernels.coral for the maths)."""
from __future__ import annotations

import numpy as np

from ..kernels import coral as K
from .base import Layer, check_input, check_same_device, init_uniform

__all__ = ["CoralHead"]


class CoralHead(Layer):
    """(N, in_features) -> (N, num_classes - 1) logits of the binary tasks "rank > k": ONE weight vector shared by
    every task (weight (1, in_features)) and a bias per task, which start at ``arange(K-1, 0, -1) / (K-1)``, as
    coral-pytorch's do. Train it with ``losses.CoralLoss``; ``losses.coral_predict`` turns logits into ranks."""

    def __init__(self, in_features: int, num_classes: int, dtype="float32", rng=None):
        super().__init__()
        if not (isinstance(in_features, (int, np.integer)) and in_features >= 1):
            raise ValueError(f"CoralHead: expected a positive integer in_features, got {in_features!r}")
        if not (isinstance(num_classes, (int, np.integer)) and num_classes >= 2):
            raise ValueError(f"CoralHead: expected num_classes >= 2 ordered classes, got {num_classes!r}")
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"CoralHead: dtype must be float32 or float64, got {self.dtype}")
        tasks = self.num_classes - 1
        self.params["weight"] = init_uniform((1, self.in_features), self.in_features, self.dtype, rng, "default")
        self.params["bias"] = (np.arange(tasks, 0, -1) / tasks).astype(self.dtype)
        self.grads = {k: None for k in self.params}
        self.needs_input_grad = True
        self._x = None

    def config(self):
        return {"in_features": self.in_features, "num_classes": self.num_classes, "dtype": self.dtype.name}

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"CoralHead: expected an input shape ({self.in_features},), got {tuple(input_shape)}"
                             + ("; use Flatten first" if len(input_shape) > 1 else ""))
        return (self.num_classes - 1,)

    def forward(self, x, training=True):
        check_input(self.name, x, 2, f"(N, {self.in_features})", dtype=self.dtype, channels=self.in_features,
                    channel_name="features")
        check_same_device(self.name, x, self.params["weight"])
        self._x = x
        return K.coral_forward(x, self.params["weight"], self.params["bias"])

    def backward(self, gy):
        x = self._need("_x")
        expected = (x.shape[0], self.num_classes - 1)
        if tuple(gy.shape) != expected:
            raise ValueError(f"CoralHead: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {expected}")
        gw_out, gb_out = self._grad_out("weight", gy), self._grad_out("bias", gy)
        gx, gw, gb = K.coral_backward(x, self.params["weight"], gy, self.needs_input_grad, gw_out, gb_out)
        self.grads["weight"], self.grads["bias"] = gw, gb
        return gx
