"""Optimizers (SGD, Adam, AdamW), learning-rate schedules and gradient clipping.

    opt = gc.optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.fit(..., optimizer=opt, scheduler=gc.optim.CosineSchedule(total_epochs=10))

An optimizer walks the model's layers and updates each ``layer.params[name]`` in place from
``layer.grads[name]`` with a kernel of :mod:`gpucnn.kernels.optim` (one launch per parameter on the GPU).
Its state (velocities; Adam's m, v and step count) is kept per parameter under the key
``"<layer index>.<param name>"`` and created on the parameter's device at the first step (so move the
model before training, not between steps). ``state_dict()``/``load_state_dict()`` save and restore it all.
The update rules are PyTorch's (torch.optim.SGD, Adam, AdamW), so results can be compared step by step.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .kernels import optim as K

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "StepSchedule", "CosineSchedule", "clip_grad_norm"]


def _layers(model):
    """The layers of a Sequential (anything with ``.layers``) or of a plain list of layers."""
    return list(model.layers) if hasattr(model, "layers") else list(model)


class Optimizer:
    """Base class: holds the learning rate and the per-parameter state; subclasses write ``_update``."""

    slots: tuple = ()           # names of the per-parameter state arrays

    def __init__(self, model, lr: float):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"{type(self).__name__}: lr must be a positive number, got {lr!r}")
        self.model = model
        self.lr = float(lr)         # the rate in use now (a schedule changes it per epoch)
        self.base_lr = float(lr)    # the rate a schedule starts from
        self.state: dict = {}       # "i.name" -> {slot: array, "step": int}

    def hyper(self) -> dict:
        """The hyperparameters, as plain values (saved with the state)."""
        return {}

    def parameters(self):
        """(key, layer, name) for every parameter, in layer order."""
        for i, layer in enumerate(_layers(self.model)):
            for name in layer.params:
                yield f"{i}.{name}", layer, name

    def step(self):
        """Update every parameter in place from its gradient (call after ``model.backward``)."""
        for key, layer, name in self.parameters():
            p, g = layer.params[name], layer.grads.get(name)
            if g is None:
                raise RuntimeError(f"{type(self).__name__}.step: parameter {key} ({layer.name}.{name}) has no "
                                   "gradient; run forward and backward before step()")
            st = self.state.get(key)
            if st is None:
                xp = backend.xp(p)
                st = self.state[key] = {s: xp.zeros_like(p) for s in self._slots_in_use()}
                st["step"] = 0
            st["step"] += 1
            self._update(p, g, st)

    def _slots_in_use(self):
        return self.slots

    def _update(self, p, g, st):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to continue: class, hyperparameters, rates and per-parameter state (host arrays)."""
        return {"type": type(self).__name__, "hyper": self.hyper(), "lr": self.lr, "base_lr": self.base_lr,
                "state": {k: {s: (v if isinstance(v, int) else backend.to_numpy(v).copy()) for s, v in st.items()}
                          for k, st in self.state.items()}}

    def load_state_dict(self, d: dict):
        """Restore :meth:`state_dict`'s output; arrays go to each parameter's device. PyTorch-like, the
        saved hyperparameters and rates replace the constructor's."""
        name = type(self).__name__
        if d.get("type") != name:
            raise ValueError(f"{name}.load_state_dict: the state is of a {d.get('type')} optimizer, not {name}")
        params = {key: layer.params[pname] for key, layer, pname in self.parameters()}
        state = {}
        for key, st in d["state"].items():
            if key not in params:
                raise ValueError(f"{name}.load_state_dict: the state has parameter {key}, which the model lacks")
            p = params[key]
            new = {}
            for s, v in st.items():
                if s == "step":
                    new[s] = int(v)
                    continue
                if tuple(v.shape) != tuple(p.shape) or v.dtype != p.dtype:
                    raise ValueError(f"{name}.load_state_dict: state {key}.{s} is {v.dtype}{tuple(v.shape)}, "
                                     f"the parameter is {p.dtype}{tuple(p.shape)}")
                new[s] = backend.asarray(v) if backend.is_cupy(p) else np.array(v, copy=True)
            state[key] = new
        for k, v in d.get("hyper", {}).items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.lr, self.base_lr = float(d["lr"]), float(d["base_lr"])
        self.state = state

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in {"lr": self.base_lr, **self.hyper()}.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (heavy-ball or Nesterov) and L2 weight decay:
    ``g += wd * p; v = momentum * v + g; p -= lr * (g + momentum * v if nesterov else v)``."""

    slots = ("velocity",)

    def __init__(self, model, lr: float = 0.01, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(model, lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov=True needs a momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = float(momentum), float(weight_decay), bool(nesterov)

    def hyper(self):
        return {"momentum": self.momentum, "weight_decay": self.weight_decay, "nesterov": self.nesterov}

    def _slots_in_use(self):
        return self.slots if self.momentum else ()   # plain SGD keeps no velocity

    def _update(self, p, g, st):
        K.sgd_update(p, g, st.get("velocity"), self.lr, self.momentum, self.weight_decay, self.nesterov)


class Adam(Optimizer):
    """Adam (Kingma & Ba): running means of g and g^2, bias-corrected; weight decay added to g (L2)."""

    slots = ("m", "v")
    decoupled = False

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(model, lr)
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"{type(self).__name__}: betas must be in [0, 1), got {betas!r}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0 and weight_decay >= 0, "
                             f"got {eps!r} and {weight_decay!r}")
        self.betas, self.eps, self.weight_decay = (float(b1), float(b2)), float(eps), float(weight_decay)

    def hyper(self):
        return {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def _update(self, p, g, st):
        K.adam_update(p, g, st["m"], st["v"], self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay,
                      st["step"], decoupled=self.decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p -= lr * wd * p`` apart from the gradient."""

    decoupled = True

    def __init__(self, model, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(model, lr, betas, eps, weight_decay)


# ----------------------------------------------------------------------------------------------
# learning-rate schedules: per epoch, a pure function of the epoch (so a resumed run needs no state)


class StepSchedule:
    """``base_lr * gamma ** (epoch // step_size)``: divide the rate by 1/gamma every ``step_size`` epochs."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        if not (isinstance(step_size, int) and step_size >= 1):
            raise ValueError(f"StepSchedule: step_size must be an int >= 1, got {step_size!r}")
        self.step_size, self.gamma = step_size, float(gamma)

    def lr(self, epoch: int, base_lr: float) -> float:
        return base_lr * self.gamma ** (epoch // self.step_size)

    def __repr__(self):
        return f"StepSchedule(step_size={self.step_size}, gamma={self.gamma})"


class CosineSchedule:
    """Linear warm-up over ``warmup_epochs`` (to base_lr), then half a cosine from base_lr down towards
    ``min_lr`` at ``total_epochs`` (PyTorch's CosineAnnealingLR with T_max = total - warmup)."""

    def __init__(self, total_epochs: int, min_lr: float = 0.0, warmup_epochs: int = 0):
        if not (isinstance(total_epochs, int) and total_epochs >= 1):
            raise ValueError(f"CosineSchedule: total_epochs must be an int >= 1, got {total_epochs!r}")
        if not (isinstance(warmup_epochs, int) and 0 <= warmup_epochs < total_epochs):
            raise ValueError("CosineSchedule: warmup_epochs must be an int in [0, total_epochs), "
                             f"got {warmup_epochs!r}")
        self.total_epochs, self.min_lr, self.warmup_epochs = total_epochs, float(min_lr), warmup_epochs

    def lr(self, epoch: int, base_lr: float) -> float:
        if epoch < self.warmup_epochs:
            return base_lr * (epoch + 1) / (self.warmup_epochs + 1)
        t = min(epoch - self.warmup_epochs, self.total_epochs - self.warmup_epochs)
        span = self.total_epochs - self.warmup_epochs
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * t / span)) / 2

    def __repr__(self):
        return (f"CosineSchedule(total_epochs={self.total_epochs}, min_lr={self.min_lr}, "
                f"warmup_epochs={self.warmup_epochs})")


# ----------------------------------------------------------------------------------------------
# gradient clipping


def clip_grad_norm(model, max_norm: float):
    """Scale all gradients by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` their global L2 norm; returns
    the norm before clipping (a 0-d array on the gradients' device).

    Computed on the device: on the GPU the scale stays a device scalar, so clipping never waits for the
    GPU; on the CPU the scale is read (free) and the multiplications are skipped when it is 1.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    grads = [(layer, name, g) for layer in _layers(model) for name, g in layer.grads.items() if g is not None]
    if not grads:
        raise RuntimeError("clip_grad_norm: no gradients; run backward first")
    g0 = grads[0][2]
    xp = backend.xp(g0)
    sq = xp.zeros((), dtype=g0.dtype)
    for _, _, g in grads:
        flat = g.reshape(-1)
        sq += xp.dot(flat, flat)        # BLAS dot: no temporary g*g array
    norm = xp.sqrt(sq)
    scale = xp.minimum(float(max_norm) / (norm + 1e-6), 1)   # Python scalars are weak: stays in g's dtype
    if backend.on_gpu(g0):
        for layer, name, g in grads:
            layer.grads[name] = g * scale
    elif scale < 1:
        for layer, name, g in grads:
            layer.grads[name] = g * g.dtype.type(scale)
    return norm
