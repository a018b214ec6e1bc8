"""Optimizer updates, in place over (param, grad, state): SGD (momentum, Nesterov) and Adam / AdamW.

Each update is one fused pass over a whole parameter array: on the GPU one CuPy ElementwiseKernel
launch that reads grad and the state and writes param and the state; on the CPU in-place NumPy. The
optimizers of gpucnn.optim pass every parameter of a model at once (one flat array, see
FlatParameters), so a training step ends with ONE update launch. The scalars (learning rate, momentum,
Adam's bias corrections) reach the GPU kernels through a small device array, ``hyper``, so that a CUDA
graph replaying the update reads their current values. ``clip_by_norm`` clips a flat gradient in place.
The arithmetic is PyTorch's (torch.optim.SGD, Adam, AdamW with their defaults otherwise), so a
model trained here and there takes the same steps.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import cuda, gpu_kernel, on_gpu
from ..elementwise import ElementwiseKernel
from .reduce import grid_total, launch_reduction, reduction_grid

# ---------------------------------------------------------------------------- GPU: elementwise kernels
# param and the state are outputs that are also read: CuPy passes outputs by reference, so the kernel
# updates them where they lie. Every scalar comes from ``hyper``, a small array on the device, not from
# the launch's arguments: a CUDA graph that replays the update then reads the learning rate (a schedule
# changes it) and Adam's bias corrections (they change every step) as they are now, not as they were
# when the graph was captured. The layouts of ``hyper`` are sgd_hyper's and adam_hyper's.
_sgd_k = ElementwiseKernel("T grad, raw T hyper", "T param",
                           "param -= hyper[0] * (grad + hyper[2] * param)", "optim_sgd")
_sgd_momentum_k = ElementwiseKernel(
    "T grad, raw T hyper", "T param, T velocity",
    """T lr = hyper[0];
    T momentum = hyper[1];
    T g = grad + hyper[2] * param;
    velocity = momentum * velocity + g;
    param -= lr * (hyper[3] != T(0) ? g + momentum * velocity : velocity)""",
    "optim_sgd_momentum")
_adam_k = ElementwiseKernel(
    "T grad, raw T hyper", "T param, T m, T v",
    """bool decoupled = hyper[10] != T(0);
    T g = decoupled ? grad : grad + hyper[6] * param;
    if (decoupled) param *= hyper[9];
    m = hyper[1] * m + hyper[2] * g;
    v = hyper[3] * v + hyper[4] * (g * g);
    param -= hyper[7] * (m / (sqrt(v) / hyper[8] + hyper[5]))""",
    "optim_adam")
# gradient clipping over one flat gradient: the norm and the scale (_clip_norm_kernel), then g *= scale
_scale_k = ElementwiseKernel("raw T norm_and_scale", "T g", "g *= norm_and_scale[1]", "optim_scale")

@gpu_kernel
def _clip_norm_kernel(g, out, partials, tickets, max_norm):
    """The sum of g^2 over many blocks (float64; reduce.grid_total); the last block writes the norm sqrt(sum) into
    out[0] and the scale min(1, max_norm / (norm + 1e-6)) into out[1]."""
    t = cuda.threadIdx.x
    part = cuda.shared.array(0, dtype=partials.dtype)
    if grid_total(g, True, part, t, cuda.blockDim.x, partials, tickets) and t == 0:
        norm = math.sqrt(part[0])
        out[0] = norm
        out[1] = min(max_norm / (norm + 1e-6), 1.0)


# ---------------------------------------------------------------------------- checks
def _check(fn: str, param, **arrays):
    for name, a in arrays.items():
        if tuple(a.shape) != tuple(param.shape) or a.dtype != param.dtype:
            raise ValueError(f"{fn}: {name} must match param (shape {tuple(param.shape)}, {param.dtype}), "
                             f"got shape {tuple(a.shape)}, {a.dtype}")


# ---------------------------------------------------------------------------- the functions optimizers call
def sgd_hyper(lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> list:
    """The numbers an SGD update reads from its ``hyper`` array: [lr, momentum, weight_decay, nesterov]."""
    return [lr, momentum, weight_decay, 1.0 if nesterov else 0.0]


def adam_hyper(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
               decoupled: bool = False) -> list:
    """The numbers an Adam update reads from its ``hyper`` array, computed in double on the host:
    [lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, lr / (1 - beta1^step),
    sqrt(1 - beta2^step), 1 - lr * weight_decay, decoupled]."""
    return [lr, beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, lr / (1 - beta1 ** step),
            math.sqrt(1 - beta2 ** step), 1 - lr * weight_decay if decoupled else 1.0, 1.0 if decoupled else 0.0]


def sgd_update(param, grad, velocity, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
               nesterov: bool = False, hyper=None):
    """One step of PyTorch's SGD, in place on ``param`` and ``velocity``:

        g = grad + weight_decay * param
        v = momentum * v + g;  step = g + momentum * v if nesterov else v   (with momentum)
        param -= lr * step                                                  (step = g without)

    PyTorch's first step sets v = g; a velocity that starts at zeros gives exactly that. ``velocity``
    may be None when momentum is 0. ``hyper``: on the GPU path, the same numbers already on the device
    (``sgd_hyper``'s list, written by the optimizer each step), which the kernel reads instead of the
    arguments; without it the arguments are put on the device first.
    """
    if momentum and velocity is None:
        raise ValueError(f"sgd_update: momentum {momentum} needs a velocity array (zeros at the first step), "
                         "got None")
    if nesterov and not momentum:
        raise ValueError("sgd_update: Nesterov momentum needs momentum > 0, got momentum 0")
    _check("sgd_update", param, grad=grad, **({"velocity": velocity} if momentum else {}))
    if on_gpu(param):
        if hyper is None:
            hyper = backend.scalars(sgd_hyper(lr, momentum, weight_decay, nesterov), param.dtype, param)
        if momentum:
            _sgd_momentum_k(grad, hyper, param, velocity)
        else:
            _sgd_k(grad, hyper, param)
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
                step: int, decoupled: bool = False, hyper=None):
    """One step of PyTorch's Adam (``decoupled=False``: weight decay added to the gradient) or AdamW
    (``decoupled=True``: ``param *= 1 - lr * weight_decay`` first), in place on ``param``, ``m``, ``v``:

        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)

    ``step`` counts from 1 (the bias corrections); m and v start at zeros. ``hyper``: as in sgd_update
    (``adam_hyper``'s list on the device).
    """
    if step < 1:
        raise ValueError(f"adam_update: step counts from 1 (it sets the bias corrections), got {step}")
    _check("adam_update", param, grad=grad, m=m, v=v)
    if on_gpu(param):
        if hyper is None:
            hyper = backend.scalars(adam_hyper(lr, beta1, beta2, eps, weight_decay, step, decoupled),
                                    param.dtype, param)
        _adam_k(grad, hyper, param, m, v)
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


def clip_by_norm(grad, max_norm: float):
    """Scale the flat gradient ``grad`` in place by ``min(1, max_norm / (norm + 1e-6))``; returns its L2 norm
    before clipping as a 0-d array on its device. Two launches on the GPU (the norm and the scale, then the
    multiply), no host copy; the CPU skips the multiply when nothing is clipped."""
    if on_gpu(grad):
        threads, chunks = reduction_grid(grad.size, 1)
        out = backend.empty((2,), grad.dtype, grad)
        launch_reduction(_clip_norm_kernel, (grad, out), (float(max_norm),), (1, chunks, np.float64), 1, grad, threads,
                         chunks, threads * 8)
        _scale_k(out, grad)
        return out[0:1].reshape(())
    norm = np.sqrt(np.dot(grad, grad))
    scale = min(float(max_norm) / (float(norm) + 1e-6), 1.0)
    if scale < 1:
        grad *= grad.dtype.type(scale)
    return np.asarray(norm)
