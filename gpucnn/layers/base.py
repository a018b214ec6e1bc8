"""The layer contract every layer follows, built-in or a user's own.

A layer owns its parameters, its caches and its shape checks, and calls kernel functions
(``gpucnn.kernels.<family>``) for the array work; it never asks which device it is on.

    layer.params                  # name -> array on the device
    layer.grads                   # same keys, overwritten by backward (no accumulation)
    layer.grad_views              # name -> where backward may write the gradient (a Sequential's flat buffer)
    layer.buffers                 # name -> array saved with the model but not trained (BatchNorm's running stats)
    layer.output_shape((C, H, W)) # shape without the batch axis, computed without running
    y  = layer.forward(x, training=True)
    gx = layer.backward(gy)       # dL/dx; fills layer.grads

Fusion: a layer that can run inside the layer before it says what it would add there as a value, its
``epilogue()`` (:class:`Act`, :class:`Pool`); a layer whose kernels can compute such values after its own op says
so in ``absorbs(*epilogues)`` (Conv2D: an activation, then a pooling; Dense: an activation). gpucnn.step's planner
asks these two and nothing else, and passes the values to the head's forward (``activation=``, ``pool=``).

Lifetimes: forward declares what backward reads with ``self.save_for_backward(...)`` (as PyTorch's
``ctx.save_for_backward``, Chainer's ``retain_inputs``); in a training step the runner (gpucnn.step) keeps those
arrays, and frees them once this layer's backward has run. Everything else a forward or backward makes and does
not return ends with it. A layer never releases anything itself.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import backend

LAYER_TYPES: dict[str, type] = {}   # class name -> class, so that a saved model can be rebuilt


class Act(NamedTuple):
    """An activation as an epilogue: its registered kind (gpucnn.kernels.activations) and LeakyReLU's slope."""
    kind: str
    slope: float = 0.0


class Pool(NamedTuple):
    """A pooling as an epilogue ("max" or "avg", each an (H, W) pair): the spec the fused kernels take."""
    kind: str
    kernel: tuple
    stride: tuple
    padding: tuple


class Layer:
    """Base class of every layer. Subclass it, set ``params``/``grads`` in ``__init__``, and write
    ``forward``, ``backward`` and ``output_shape``; ``config()`` returns the constructor's arguments.
    Subclasses are registered by class name, so that ``Sequential.load`` can rebuild them."""

    # False while a training step runs this layer's backward (gpucnn.step): what forward declared ends when backward
    # returns, so backward may write over it (Conv2D writes its input gradient's lowering over its lowered input)
    retain_saved = True

    def __init__(self):
        self.params: dict = {}
        self.grads: dict = {}
        self.grad_views: dict = {}    # set by gpucnn.optim.FlatParameters: views of one flat gradient array
        self.buffers: dict = {}
        self.training = True
        self.saved = None             # what the last forward declared backward reads (save_for_backward)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        LAYER_TYPES[cls.__name__] = cls

    @property
    def name(self) -> str:
        return type(self).__name__

    def forward(self, x, training: bool = True):
        raise NotImplementedError(f"{self.name}.forward is not written")

    def backward(self, gy):
        raise NotImplementedError(f"{self.name}.backward is not written")

    def output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape)

    def config(self) -> dict:
        """The keyword arguments that rebuild this layer (plain JSON values)."""
        return {}

    def num_params(self) -> int:
        return int(sum(int(np.prod(p.shape)) for p in self.params.values()))

    def to(self, dev: str) -> "Layer":
        """Move parameters and buffers to device ``dev`` ("cpu", "cuda", "sim")."""
        if dev not in backend.DEVICES:
            raise ValueError(f"{self.name}.to: expected one of {backend.DEVICES}, got {dev!r}")
        move = lambda a: backend.asarray(a, device_=dev)  # noqa: E731
        for d in (self.params, self.buffers):
            for k, v in d.items():
                d[k] = move(v)
        self.grads = {k: None for k in self.params}
        self.grad_views = {}
        return self

    def epilogue(self):
        """What this layer computes as a value the layer before it may compute in its own kernels (an
        :class:`Act` or :class:`Pool`), or None: it runs alone."""
        return None

    def absorbs(self, *epilogues) -> bool:
        """Whether this layer's forward computes ``epilogues`` (in order) after its own op, given as keywords
        ``activation=`` and ``pool=``, and its backward differentiates them too."""
        return False

    def save_for_backward(self, *arrays):
        """Declare the arrays backward reads (None entries are skipped); returns them, to keep as attributes:
        ``self._x, self._y = self.save_for_backward(x, y)``. In a training step the runner keeps them until this
        layer's backward has run, then ends their lives; what forward made and neither returned nor declared ends
        when forward returns. A layer that never declares keeps all its forward made, its input and its output,
        until its backward has run (safe for layers written before this existed, and lazier with memory)."""
        self.saved = tuple(a for a in arrays if a is not None)
        return arrays if len(arrays) != 1 else arrays[0]

    def replay_step(self):
        """What a training forward does on the host, for a step replayed from a CUDA graph (whose kernels
        ran without this layer's Python): e.g. Dropout writes this step's keys and counts the step.
        Most layers keep no such state."""

    def _grad_out(self, name: str, like):
        """Where backward writes the gradient of ``name``: its view of the flat gradient buffer when that
        fits (the parameter's shape, ``like``'s dtype and device), else None (the kernel makes an array)."""
        v = self.grad_views.get(name)
        p = self.params.get(name)
        if v is None or p is None or v.shape != p.shape or v.dtype != like.dtype \
                or backend.is_cupy(v) != backend.is_cupy(like):
            return None
        return v

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"

    def _need(self, attr: str):
        """The cache ``attr`` saved by forward, or a clear error when backward comes first."""
        v = getattr(self, attr, None)
        if v is None:
            raise RuntimeError(f"{self.name}: backward called before forward (nothing cached to differentiate)")
        return v


# ------------------------------------------------------------------------------------------------
# shared checks: one place, so the CPU and GPU paths give the same errors


def check_input(layer: str, x, ndim: int, what: str, dtype=None, channels=None, channel_name="channels"):
    """Raise a clear error when ``x`` is not a float array of ``ndim`` dims (None: any; ``what`` names them),
    of the layer's dtype, with ``channels`` along axis 1, on the device in use."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{layer}: expected an array {what}, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{layer}: expected a {ndim}-d input {what}, got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{layer}: expected a float input ({np.dtype(dtype or 'float32').name}), got {x.dtype}; "
                        "convert images first, e.g. x.astype('float32') / 255")
    if dtype is not None and x.dtype != np.dtype(dtype):
        raise TypeError(f"{layer}: input is {x.dtype} but the layer's parameters are {np.dtype(dtype).name}; "
                        "gpucnn does not cast silently (make both float32 or both float64)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{layer}: expected {channels} input {channel_name}, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if backend.device() == "cuda" and not backend.is_cupy(x):
        raise TypeError(f"{layer}: the device is 'cuda' but the input is a NumPy array; move it first with "
                        "gpucnn.asarray(x) (gpucnn never copies silently)")


def check_same_device(layer: str, x, param):
    if backend.is_cupy(x) != backend.is_cupy(param):
        where = lambda a: "a CuPy (GPU) array" if backend.is_cupy(a) else "a NumPy (host) array"
        raise TypeError(f"{layer}: the input is {where(x)} but the parameters are {where(param)}; "
                        "move one of them (layer.to(...) or gpucnn.asarray(x))")


def pair(v, what: str, layer: str) -> tuple:
    """``3 -> (3, 3)``; a pair stays a pair; anything else is an error naming ``what``."""
    if isinstance(v, (int, np.integer)):
        return (int(v), int(v))
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(e, (int, np.integer)) for e in v):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{layer}: {what} must be an int or a pair of ints, got {v!r}")


def conv_output_size(layer: str, size: int, kernel: int, stride: int, pad: int, axis: str) -> int:
    """O = floor((W - K + 2P) / S) + 1; O < 1 is an error that shows the formula with the numbers."""
    out = (size - kernel + 2 * pad) // stride + 1
    if size - kernel + 2 * pad < 0 or out < 1:
        raise ValueError(
            f"{layer}: kernel {kernel} is larger than the padded input along {axis} "
            f"(input {size} + 2*padding {pad} = {size + 2 * pad}): the output size "
            f"O = (W - K + 2P)/S + 1 = ({size} - {kernel} + 2*{pad})/{stride} + 1 = "
            f"{(size - kernel + 2 * pad) / stride + 1:g} < 1")
    return out


def init_uniform(shape, fan_in: int, dtype, rng=None, init="default"):
    """Initial weights: PyTorch's default U(+-1/sqrt(fan_in)), "he" (normal, std sqrt(2/fan_in)),
    "glorot" (uniform, limit sqrt(6/(fan_in+fan_out))) or a callable ``init(shape, rng) -> array``."""
    rng = rng if rng is not None else backend.default_rng()
    if callable(init):
        w = np.asarray(init(shape, rng))
    elif init == "default":
        # drawn in the layer's dtype: AlexNet's 62M float64 draws would cost seconds
        bound = 1.0 / math.sqrt(fan_in)
        u = rng.random(size=shape, dtype=np.float32 if np.dtype(dtype) == np.float32 else np.float64)
        w = (u * 2 - 1) * u.dtype.type(bound)
    elif init == "he":
        w = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    elif init == "glorot":
        fan_out = shape[0] * (int(np.prod(shape[2:])) if len(shape) > 2 else 1)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-limit, limit, size=shape)
    else:
        raise ValueError(f"init must be 'default', 'he', 'glorot' or a callable, got {init!r}")
    if w.shape != tuple(shape):
        raise ValueError(f"init returned shape {w.shape}, expected {tuple(shape)}")
    return backend.asarray(w, dtype=dtype)
