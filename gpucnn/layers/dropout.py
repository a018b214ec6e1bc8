"""Dropout: in training, zero each element with probability p and scale the rest by 1/(1-p); in evaluation,
the identity (so the expected activation is the same in both)."""
from __future__ import annotations

import numbers

from .. import backend
from ..kernels import dropout as K
from .base import Layer, check_input

__all__ = ["Dropout"]


class Dropout(Layer):
    """Dropout(p=0.5, seed=0): p is the probability of DROPPING an element, 0 <= p < 1.

    The mask is a hash of (seed, step, element index), so it needs no random state: ``step`` counts the
    training forwards (incremented after each), and the same (seed, step) gives the same mask on every
    device. Evaluation (training=False) and p = 0 return the input itself.
    """

    def __init__(self, p: float = 0.5, seed: int = 0):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, numbers.Real):
            raise TypeError(f"{self.name}: p (the drop probability) must be a number, got {p!r}")
        if not 0 <= p < 1:
            raise ValueError(f"{self.name}: p is the probability of dropping an element and must be in [0, 1), "
                             f"got {p!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{self.name}: seed must be an int, got {seed!r}")
        self.p = float(p)
        self.seed = int(seed)
        self.step = 0
        self._shape = None     # the last forward's input shape; None until a forward
        self._mask = None      # the last training forward's scaled mask; None when that pass was the identity
        self._keys = None      # on the GPU path: the device array the kernel reads the keys from

    def forward(self, x, training=True):
        check_input(self.name, x, None, "of any shape")
        self._shape = tuple(x.shape)
        if not training or self.p == 0:
            self._mask = None
            self.save_for_backward()        # backward passes the gradient through
            if training:
                self.step += 1
            return x
        if self._keys is None or backend.is_cupy(self._keys) != backend.is_cupy(x):
            self._keys = K.keys_buffer(x)
        y, mask = K.dropout_forward(x, self.p, self.seed, self.step, keys=self._keys)
        self._mask = self.save_for_backward(mask)
        self.step += 1
        return y

    def replay_step(self):
        """A training forward replayed from a CUDA graph: this step's keys into the array the graph's
        kernel reads, and the step counted, as forward does."""
        if self.p > 0 and self._keys is not None:
            K.write_keys(self._keys, self.p, self.seed, self.step)
        self.step += 1

    def backward(self, gy):
        shape = self._need("_shape")
        if tuple(gy.shape) != shape:
            raise ValueError(f"{self.name}: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {shape}")
        if self._mask is None:
            return gy
        return K.dropout_backward(gy, self._mask)

    def config(self):
        return {"p": self.p, "seed": self.seed}
