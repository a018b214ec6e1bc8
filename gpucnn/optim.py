"""Optimizers (SGD, Adam, AdamW), learning-rate schedules and gradient clipping.

    opt = gc.optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.fit(..., optimizer=opt, scheduler=gc.optim.CosineSchedule(total_epochs=10))

Every parameter of the model lives in ONE flat array (:class:`FlatParameters`: each ``layer.params[name]``
is a view into it) and every gradient in another, so an optimizer step is one kernel of
:mod:`gpucnn.kernels.optim` over all of them (one launch on the GPU, whatever the number of layers). Its
state (velocities; Adam's m and v) is flat too, created on the parameters' device at the first step (so
move the model before training, not between steps); ``opt.state`` shows it per parameter, under the key
``"<layer index>.<param name>"``, and ``state_dict()``/``load_state_dict()`` save and restore it that way.
The scalars a step uses (learning rate, Adam's step count) are written to a small device array before
each step, which is what lets a captured CUDA graph replay the update with the current values.
The update rules are PyTorch's (torch.optim.SGD, Adam, AdamW), so results can be compared step by step.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .kernels import optim as K

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "StepSchedule", "CosineSchedule", "clip_grad_norm",
           "FlatParameters"]


def _layers(model):
    """The layers of a Sequential (anything with ``.layers``) or of a plain list of layers."""
    return list(model.layers) if hasattr(model, "layers") else list(model)


class FlatParameters:
    """Every parameter of some layers in one flat array (``param``) and every gradient in another (``grad``).

    Each ``layer.params[name]`` becomes a view into ``param`` (its values copied in) and each
    ``layer.grad_views[name]`` a view into ``grad``, where Conv2D and Dense write their gradients (the
    ``gw_out``/``gb_out`` of their kernels). Views start on a 64-element boundary (aligned GEMM outputs);
    the padding between them stays zero and updates to zero. All parameters must share dtype and device.
    """

    ALIGN = 64

    def __init__(self, layers):
        self.layers = list(layers)
        self.entries = []       # (key, layer, name, offset, shape), in layer order
        self.param = self.grad = None
        found = [(f"{i}.{name}", layer, name, layer.params[name])
                 for i, layer in enumerate(self.layers) for name in layer.params]
        if not found:
            return
        dtypes = sorted({np.dtype(p.dtype).name for *_, p in found})
        devices = {backend.is_cupy(p) for *_, p in found}
        if len(dtypes) > 1 or len(devices) > 1:
            raise TypeError(f"FlatParameters: every parameter must have the same dtype and device to share one "
                            f"buffer, got dtypes {dtypes} on {len(devices)} device(s)")
        offset = 0
        for key, layer, name, p in found:
            self.entries.append((key, layer, name, offset, tuple(p.shape)))
            offset += -(-int(p.size) // self.ALIGN) * self.ALIGN
        xp = backend.xp(found[0][3])
        self.param = xp.zeros(offset, dtype=dtypes[0])
        self.grad = xp.zeros(offset, dtype=dtypes[0])
        for (key, layer, name, o, shape), (*_, p) in zip(self.entries, found):
            view = self.view(self.param, key)
            view[...] = p
            layer.params[name] = view
            layer.grad_views[name] = self.view(self.grad, key)
        self._views = [layer.params[name] for _, layer, name, _, _ in self.entries]

    def view(self, flat, key):
        """The part of the flat array ``flat`` (param, grad or an optimizer slot) that belongs to ``key``."""
        for k, _, _, o, shape in self.entries:
            if k == key:
                return flat[o:o + int(np.prod(shape))].reshape(shape)
        raise KeyError(key)

    def keys(self):
        return [e[0] for e in self.entries]

    def intact(self) -> bool:
        """Whether every layer still holds the views (a parameter replaced by ``to()`` or by hand is not)."""
        return self.param is None or all(layer.params.get(name) is v
                                         for (_, layer, name, _, _), v in zip(self.entries, self._views))

    def gather_grads(self):
        """Make every layer's gradient its view of ``grad``: a gradient computed elsewhere (a layer that does
        not write into its view, or one set by hand) is copied in. Returns the keys with no gradient (their
        views are zeroed, so a norm or an update ignores them)."""
        missing = []
        for key, layer, name, _, _ in self.entries:
            g = layer.grads.get(name)
            gv = layer.grad_views[name]
            if g is None:
                missing.append((key, layer, name))
                gv[...] = 0
            elif g is not gv:
                gv[...] = g
                layer.grads[name] = gv
        return missing


class Optimizer:
    """Base class: holds the learning rate, the step count and the flat state; subclasses write ``_update``
    (one kernel call over the flat arrays) and ``_hyper`` (the scalars that call reads)."""

    slots: tuple = ()           # names of the per-parameter state arrays

    def __init__(self, model, lr: float):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"{type(self).__name__}: lr must be a positive number, got {lr!r}")
        self.model = model
        self.lr = float(lr)         # the rate in use now (a schedule changes it per epoch)
        self.base_lr = float(lr)    # the rate a schedule starts from
        self.steps = 0              # updates made so far (Adam's t counts from 1)
        self.flat_state: dict = {}  # slot -> flat array laid out as the parameters' FlatParameters
        self._own_flat = None       # FlatParameters for a plain list of layers
        self._hyper_buf = None      # the device array the update kernel reads its scalars from

    def hyper(self) -> dict:
        """The hyperparameters, as plain values (saved with the state)."""
        return {}

    def parameters(self):
        """(key, layer, name) for every parameter, in layer order."""
        for i, layer in enumerate(_layers(self.model)):
            for name in layer.params:
                yield f"{i}.{name}", layer, name

    def flat(self) -> FlatParameters:
        """The model's FlatParameters (a Sequential keeps one; for a list of layers the optimizer does),
        made anew when a parameter array was replaced; the state follows it to its device and dtype."""
        if hasattr(self.model, "flat"):
            flat = self.model.flat
        else:
            if self._own_flat is None or not self._own_flat.intact():
                self._own_flat = FlatParameters(_layers(self.model))
            flat = self._own_flat
        if flat.param is not None:
            for s, a in self.flat_state.items():
                if backend.is_cupy(a) != backend.is_cupy(flat.param) or a.dtype != flat.param.dtype:
                    moved = backend.to_numpy(a).astype(flat.param.dtype)
                    self.flat_state[s] = backend.asarray(moved) if backend.is_cupy(flat.param) else moved
        return flat

    @property
    def state(self) -> dict:
        """The state per parameter: ``{"i.name": {slot: view of the flat state, "step": steps}}`` ({} before
        the first step)."""
        if not self.steps:
            return {}
        flat = self.flat()
        return {key: {**{s: flat.view(a, key) for s, a in self.flat_state.items()}, "step": self.steps}
                for key in flat.keys()}

    @state.setter
    def state(self, value: dict):
        """Replace the state: ``{}`` starts afresh (no steps made); otherwise per-parameter state as
        :attr:`state` shows it (host or device arrays)."""
        self._set_state(value, type(self).__name__)

    def step(self):
        """Update every parameter in place from its gradient (call after ``model.backward``)."""
        flat = self.flat()
        if flat.param is None:
            return
        missing = flat.gather_grads()
        if missing:
            key, layer, name = missing[0]
            raise RuntimeError(f"{type(self).__name__}.step: parameter {key} ({layer.name}.{name}) has no "
                               "gradient; run forward and backward before step()")
        self.begin_step(flat)
        self.run_update(flat)

    # The two halves of a step. A CUDA graph captures run_update's launch once; before each replay the
    # model calls begin_step, which advances the count and writes the scalars the replayed kernel reads.

    def begin_step(self, flat=None):
        """The host's half of a step: count it and write this step's scalars to the device array."""
        flat = flat if flat is not None else self.flat()
        if not self.flat_state:
            xp = backend.xp(flat.param)
            self.flat_state = {s: xp.zeros_like(flat.param) for s in self._slots_in_use()}
        self.steps += 1
        if self._hyper_buf is None or backend.is_cupy(self._hyper_buf) != backend.is_cupy(flat.param) \
                or self._hyper_buf.dtype != flat.param.dtype:
            with backend.no_workspace():
                self._hyper_buf = backend.persistent_empty((len(self._hyper()),), flat.param.dtype, flat.param)
        backend.write_scalars(self._hyper_buf, self._hyper())

    def run_update(self, flat=None):
        """The device's half: one update kernel over the flat parameters, gradients and state."""
        flat = flat if flat is not None else self.flat()
        self._update(flat.param, flat.grad, self.flat_state, self._hyper_buf)

    def _slots_in_use(self):
        return self.slots

    def _hyper(self) -> list:
        raise NotImplementedError

    def _update(self, p, g, st, hyper):
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything needed to continue: class, hyperparameters, rates and per-parameter state (host arrays)."""
        return {"type": type(self).__name__, "hyper": self.hyper(), "lr": self.lr, "base_lr": self.base_lr,
                "state": {k: {s: (v if isinstance(v, int) else backend.to_numpy(v).copy()) for s, v in st.items()}
                          for k, st in self.state.items()}}

    def load_state_dict(self, d: dict):
        """Restore :meth:`state_dict`'s output; arrays go to the parameters' device. PyTorch-like, the
        saved hyperparameters and rates replace the constructor's."""
        name = type(self).__name__
        if d.get("type") != name:
            raise ValueError(f"{name}.load_state_dict: the state is of a {d.get('type')} optimizer, not {name}")
        self._set_state(d["state"], name)
        for k, v in d.get("hyper", {}).items():
            setattr(self, k, tuple(v) if isinstance(v, list) else v)
        self.lr, self.base_lr = float(d["lr"]), float(d["base_lr"])

    def _set_state(self, state: dict, name: str):
        """Check per-parameter state against the parameters, then copy it into the flat state arrays."""
        params = {key: layer.params[pname] for key, layer, pname in self.parameters()}
        steps = 0
        for key, st in state.items():
            if key not in params:
                raise ValueError(f"{name}.load_state_dict: the state has parameter {key}, which the model lacks")
            p = params[key]
            for s, v in st.items():
                if s == "step":
                    steps = max(steps, int(v))
                    continue
                if tuple(v.shape) != tuple(p.shape) or v.dtype != p.dtype:
                    raise ValueError(f"{name}.load_state_dict: state {key}.{s} is {v.dtype}{tuple(v.shape)}, "
                                     f"the parameter is {p.dtype}{tuple(p.shape)}")
        self.flat_state = {}
        self.steps = steps
        if not steps:
            return
        flat = self.flat()
        xp = backend.xp(flat.param)
        self.flat_state = {s: xp.zeros_like(flat.param) for s in sorted({s for st in state.values() for s in st
                                                                         if s != "step"})}
        for key, st in state.items():
            for s, v in st.items():
                if s != "step":
                    view = flat.view(self.flat_state[s], key)
                    view[...] = backend.asarray(v) if backend.is_cupy(view) else backend.to_numpy(v)

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

    def _hyper(self):
        return K.sgd_hyper(self.lr, self.momentum, self.weight_decay, self.nesterov)

    def _update(self, p, g, st, hyper):
        K.sgd_update(p, g, st.get("velocity"), self.lr, self.momentum, self.weight_decay, self.nesterov,
                     hyper=hyper)


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

    def _hyper(self):
        return K.adam_hyper(self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay, max(self.steps, 1),
                            self.decoupled)

    def _update(self, p, g, st, hyper):
        K.adam_update(p, g, st["m"], st["v"], self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay,
                      self.steps, decoupled=self.decoupled, hyper=hyper)


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
    GPU; on the CPU the scale is read (free) and the multiplications are skipped when it is 1. For a
    model with flat gradients (a Sequential) it is one pass over the flat gradient (2 launches on the GPU).
    """
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    grads = [(layer, name, g) for layer in _layers(model) for name, g in layer.grads.items() if g is not None]
    if not grads:
        raise RuntimeError("clip_grad_norm: no gradients; run backward first")
    if hasattr(model, "flat"):
        flat = model.flat
        flat.gather_grads()
        return K.clip_by_norm(flat.grad, max_norm)
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
            g *= scale
    elif scale < 1:
        for layer, name, g in grads:
            g *= g.dtype.type(scale)
    return norm
