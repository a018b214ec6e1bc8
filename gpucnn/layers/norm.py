"""Normalisation layers: LocalResponseNorm (AlexNet) and BatchNorm2D, on (N, C, H, W) inputs."""
from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..kernels import norm as K
from .base import Layer, check_input, check_same_device

__all__ = ["LocalResponseNorm", "BatchNorm2D"]

_NCHW = "(N, C, H, W)"


def _check_sample_shape(layer: str, input_shape, channels=None):
    """The errors forward would raise, from the shape without the batch axis (for output_shape)."""
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"{layer}: expected a 4-d input {_NCHW}, got a sample shape {shape} "
                         f"(expected (C, H, W) without the batch axis)")
    if channels is not None and shape[0] != channels:
        raise ValueError(f"{layer}: expected {channels} input channels, got {shape[0]} (sample shape {shape})")
    return shape


def _real(layer: str, what: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{layer}: {what} must be a number, got {v!r}")
    return float(v)


class LocalResponseNorm(Layer):
    """AlexNet's local response normalisation across channels: ``b = a / (k + alpha * S)^beta``, S the
    plain sum of a^2 over channels c - size//2 .. c + (size-1)//2 (clipped at the channel edges).

    PyTorch's LocalResponseNorm divides alpha by size (it uses the mean of a^2, not the sum): ours with
    ``alpha`` equals PyTorch's with ``alpha * size``. No parameters; float32 or float64 input.
    """

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"LocalResponseNorm: size must be an int (channels in the window), got {size!r}")
        if size < 1:
            raise ValueError(f"LocalResponseNorm: size must be at least 1 (channels in the window), got {size}")
        alpha, beta, k = (_real(self.name, n, v) for n, v in (("alpha", alpha), ("beta", beta), ("k", k)))
        # k + alpha * S must stay positive for the fractional power: k > 0 and alpha >= 0 make sure of it
        if alpha < 0:
            raise ValueError(f"LocalResponseNorm: alpha must be >= 0, got {alpha}")
        if k <= 0:
            raise ValueError(f"LocalResponseNorm: k must be > 0 (it keeps k + alpha*S positive), got {k}")
        self.size, self.alpha, self.beta, self.k = int(size), alpha, beta, k
        self._x = self._y = self._scale = None

    def forward(self, x, training=True):
        check_input(self.name, x, 4, _NCHW)
        y, scale = K.lrn_forward(x, self.size, self.alpha, self.beta, self.k)
        self._x, self._y, self._scale = self.save_for_backward(x, y, scale)
        return y

    def backward(self, gy):
        x = self._need("_x")
        if tuple(gy.shape) != tuple(x.shape):
            raise ValueError(f"{self.name}: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {tuple(x.shape)}")
        return K.lrn_backward(x, self._y, self._scale, gy, self.size, self.alpha, self.beta, self.k)

    def output_shape(self, input_shape):
        return _check_sample_shape(self.name, input_shape)

    def config(self):
        return {"size": self.size, "alpha": self.alpha, "beta": self.beta, "k": self.k}


class BatchNorm2D(Layer):
    """Batch normalisation per channel: ``y = gamma * (x - mean) / sqrt(var + eps) + beta``.

    Training uses the batch's mean and (biased) variance over N, H, W and updates the buffers
    ``running_mean``/``running_var`` as PyTorch does (``running = (1 - momentum) * running +
    momentum * batch``, the variance unbiased); ``training=False`` uses the running statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, dtype="float32"):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 1:
            raise ValueError(f"BatchNorm2D: num_features must be a positive int (the input's channels), "
                             f"got {num_features!r}")
        eps, momentum = _real(self.name, "eps", eps), _real(self.name, "momentum", momentum)
        if eps <= 0:
            raise ValueError(f"BatchNorm2D: eps must be > 0 (it keeps 1/sqrt(var + eps) finite), got {eps}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"BatchNorm2D: momentum must be in [0, 1], got {momentum}")
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.dtype = np.dtype(dtype)
        C = self.num_features
        self.params = {"gamma": backend.asarray(np.ones(C), dtype=self.dtype),
                       "beta": backend.asarray(np.zeros(C), dtype=self.dtype)}
        self.grads = {"gamma": None, "beta": None}
        self.buffers = {"running_mean": backend.asarray(np.zeros(C), dtype=self.dtype),
                        "running_var": backend.asarray(np.ones(C), dtype=self.dtype)}
        self._cache = None
        self._trained = True     # the mode of the last forward, which backward differentiates

    def forward(self, x, training=True):
        check_input(self.name, x, 4, _NCHW, dtype=self.dtype, channels=self.num_features)
        gamma, beta = self.params["gamma"], self.params["beta"]
        check_same_device(self.name, x, gamma)
        N, C, H, W = x.shape
        if training and N * H * W < 2:
            raise ValueError(f"{self.name}: training needs more than one value per channel to estimate a "
                             f"variance (N*H*W >= 2), got input shape {tuple(x.shape)}")
        for name, buf in self.buffers.items():
            # the running statistics follow the layer's dtype (check_backward switches it to float64)
            if buf.dtype != self.dtype:
                self.buffers[name] = buf.astype(self.dtype)
        y, self._cache = K.batchnorm_forward(x, gamma, beta, self.buffers["running_mean"],
                                             self.buffers["running_var"], self.eps, self.momentum, training)
        self.save_for_backward(*self._cache)
        self._trained = bool(training)
        return y

    def backward(self, gy):
        xhat = self._need("_cache")[0]
        if tuple(gy.shape) != tuple(xhat.shape):
            raise ValueError(f"{self.name}: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {tuple(xhat.shape)}")
        gx, self.grads["gamma"], self.grads["beta"] = K.batchnorm_backward(
            gy, self._cache, self.params["gamma"], self._trained,
            ggamma_out=self._grad_out("gamma", gy), gbeta_out=self._grad_out("beta", gy))
        return gx

    def output_shape(self, input_shape):
        return _check_sample_shape(self.name, input_shape, self.num_features)

    def config(self):
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum,
                "dtype": self.dtype.name}
