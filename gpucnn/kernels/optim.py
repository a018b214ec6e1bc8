"""Optimizer updates, in place over (param, grad, state): SGD (momentum, Nesterov) and Adam / AdamW.

Each update is one fused pass over a whole parameter array: on the GPU one CuPy ElementwiseKernel
launch that reads grad and the state and writes param and the state; on the CPU in-place NumPy.
The arithmetic is PyTorch's (torch.optim.SGD, Adam, AdamW with their defaults otherwise), so a
model trained here and there takes the same steps.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import on_gpu
from ..elementwise import ElementwiseKernel

# ---------------------------------------------------------------------------- GPU: elementwise kernels
# param and the state are outputs that are also read: CuPy passes outputs by reference, so the
# kernel updates them where they lie.
_sgd_k = ElementwiseKernel("T grad, T lr, T weight_decay", "T param",
                           "param -= lr * (grad + weight_decay * param)", "optim_sgd")
_sgd_momentum_k = ElementwiseKernel(
    "T grad, T lr, T momentum, T weight_decay, bool nesterov", "T param, T velocity",
    """T g = grad + weight_decay * param;
    velocity = momentum * velocity + g;
    param -= lr * (nesterov ? g + momentum * velocity : velocity)""",
    "optim_sgd_momentum")
# The bias corrections are computed from `step` in the kernel, so that `step` (and lr) are the only
# scalars that change from one step to the next.
_adam_k = ElementwiseKernel(
    "T grad, T lr, T beta1, T beta2, T eps, T weight_decay, T step, bool decoupled", "T param, T m, T v",
    """T g = decoupled ? grad : grad + weight_decay * param;
    if (decoupled) param *= T(1) - lr * weight_decay;
    m = beta1 * m + (T(1) - beta1) * g;
    v = beta2 * v + (T(1) - beta2) * g * g;
    T bias1 = T(1) - pow(beta1, step);
    T bias2 = T(1) - pow(beta2, step);
    param -= lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps)""",
    "optim_adam")


# ---------------------------------------------------------------------------- checks
def _check(fn: str, param, **arrays):
    for name, a in arrays.items():
        if tuple(a.shape) != tuple(param.shape) or a.dtype != param.dtype:
            raise ValueError(f"{fn}: {name} must match param (shape {tuple(param.shape)}, {param.dtype}), "
                             f"got shape {tuple(a.shape)}, {a.dtype}")


# ---------------------------------------------------------------------------- the functions optimizers call
def sgd_update(param, grad, velocity, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
               nesterov: bool = False):
    """One step of PyTorch's SGD, in place on ``param`` and ``velocity``:

        g = grad + weight_decay * param
        v = momentum * v + g;  step = g + momentum * v if nesterov else v   (with momentum)
        param -= lr * step                                                  (step = g without)

    PyTorch's first step sets v = g; a velocity that starts at zeros gives exactly that. ``velocity``
    may be None when momentum is 0.
    """
    if momentum and velocity is None:
        raise ValueError(f"sgd_update: momentum {momentum} needs a velocity array (zeros at the first step), "
                         "got None")
    if nesterov and not momentum:
        raise ValueError("sgd_update: Nesterov momentum needs momentum > 0, got momentum 0")
    _check("sgd_update", param, grad=grad, **({"velocity": velocity} if momentum else {}))
    if on_gpu(param):
        if momentum:
            _sgd_momentum_k(grad, lr, momentum, weight_decay, bool(nesterov), param, velocity)
        else:
            _sgd_k(grad, lr, weight_decay, param)
        return
    t = param.dtype.type
    g = grad + t(weight_decay) * param if weight_decay else grad
    if momentum:
        velocity *= t(momentum)
        velocity += g
        step = g + t(momentum) * velocity if nesterov else velocity
    else:
        step = g
    param -= t(lr) * step


def adam_update(param, grad, m, v, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                step: int, decoupled: bool = False):
    """One step of PyTorch's Adam (``decoupled=False``: weight decay added to the gradient) or AdamW
    (``decoupled=True``: ``param *= 1 - lr * weight_decay`` first), in place on ``param``, ``m``, ``v``:

        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

    ``step`` counts from 1 (the bias corrections); m and v start at zeros.
    """
    if step < 1:
        raise ValueError(f"adam_update: step counts from 1 (it sets the bias corrections), got {step}")
    _check("adam_update", param, grad=grad, m=m, v=v)
    if on_gpu(param):
        _adam_k(grad, lr, beta1, beta2, eps, weight_decay, step, bool(decoupled), param, m, v)
        return
    t = param.dtype.type
    if decoupled:
        param *= t(1 - lr * weight_decay)
        g = grad
    else:
        g = grad + t(weight_decay) * param if weight_decay else grad
    m *= t(beta1)
    m += t(1 - beta1) * g
    v *= t(beta2)
    v += t(1 - beta2) * (g * g)
    denom = np.sqrt(v)
    denom /= t(math.sqrt(1 - beta2 ** step))
    denom += t(eps)
    update = m / denom
    update *= t(lr / (1 - beta1 ** step))
    param -= update
