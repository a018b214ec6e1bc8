"""The activations, one record each, registered by name in one table.

A record holds everything any kernel needs of its activation, and nothing else writes it again: the C
expressions the CuPy ElementwiseKernels are made of, the Numba device functions the fused kernels call, the
NumPy functions of the CPU paths, and whether its derivative reads the input x or the output y. Every kernel
of :mod:`gpucnn.kernels.activation` and :mod:`gpucnn.kernels.dense`, on every device, takes it from here.

A new activation is one :func:`register` call (tests/test_activation.py adds softplus that way) and
``gpucnn.layers.ActivationLayer(name)`` makes it a layer.

Numba cannot call a device function passed as a value, so the fused kernels call ``act(kind, ...)`` and
``act_grad(kind, ...)``, an if-chain over the records' integer codes that :func:`_generate_dispatch` writes as
source text from the table and compiles, and writes again (recompiling the kernels that call it) when an
activation is registered.

The fused backward keeps only the output y, so it reads y for every kind. An activation whose derivative reads
x can still be fused where its rule gives the same answer at y (``same_rule_at_y``): ReLU and LeakyReLU with
slope >= 0 are positive exactly where their input is (y = x > 0 there; y = slope * x <= 0 where x <= 0), so
"v > 0" is the same test whether v is x or y. A negative slope breaks that: such a LeakyReLU is not fused.
"""
from __future__ import annotations

import hashlib
import marshal
import math
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..backend import GPUDevice, gpu_device
from ..elementwise import ElementwiseKernel


@dataclass(eq=False)
class Activation:
    """One activation. ``v`` is what the function reads; ``g`` the gradient of the activation's output.

    * ``c_forward``: act(v) in CuPy's C, of ``v`` and ``slope``, type ``T``;
    * ``c_grad``: g * act' in C, of ``g``, ``v`` and ``slope``, where v is what ``reads`` says;
    * ``reads``: "x" (the input) or "y" (the output): what the derivative reads;
    * ``forward``/``grad``: Numba device functions ``(v, slope, zero, one)`` and ``(g, v, slope, zero, one)``
      (``zero`` and ``one`` come typed like v, so a float32 kernel stays in float32 arithmetic);
    * ``numpy_forward(x, slope, out)``: out = act(x), out may be x; ``numpy_grad(g, v, slope, out)``: out =
      g * act'(v), out may be g, and g may broadcast to v's shape; both return out;
    * ``same_rule_at_y(slope)``: for a kind that reads x, whether its rule gives the same at y (see the module).
    """
    name: str
    c_forward: str
    c_grad: str
    reads: str
    forward: GPUDevice
    grad: GPUDevice
    numpy_forward: Callable
    numpy_grad: Callable
    same_rule_at_y: Optional[Callable[[float], bool]] = None
    code: int = field(default=-1, init=False)           # its branch in act/act_grad, set by register
    kernels: dict = field(default_factory=dict, init=False)   # its ElementwiseKernels, made by register

    def fuses(self, slope: float) -> bool:
        """Whether the fused kernels, which keep only the output y, compute this activation's backward."""
        return self.reads == "y" or (self.same_rule_at_y is not None and bool(self.same_rule_at_y(slope)))


TABLE: dict[str, Activation] = {}
_DISPATCHING: list = []             # the GPUKernels that call act/act_grad (see dispatching)


def get(kind: str) -> Activation:
    """The registered activation ``kind`` (a ValueError naming the registered ones otherwise)."""
    activation = TABLE.get(kind) if isinstance(kind, str) else None
    if activation is None:
        raise ValueError(f"activation: expected one of {tuple(TABLE)}, got {kind!r}")
    return activation


def register(activation: Activation) -> Activation:
    """Add ``activation`` to the table: its ElementwiseKernels are made from its C strings, and act/act_grad
    (and every kernel that calls them) gain its branch."""
    if not activation.name.isidentifier() or activation.name in TABLE:
        raise ValueError(f"register: {activation.name!r} is not a new identifier (registered: {tuple(TABLE)})")
    if activation.reads not in ("x", "y"):
        raise ValueError(f"register: reads must be 'x' or 'y', got {activation.reads!r}")
    name, fwd = activation.name, activation.c_forward
    k = activation.kernels
    # y <- act(y + b[c]) in place, c the channel of element i in an (N, C, inner) layout: the bias add of conv
    # (inner = H*W) and dense (inner = 1) fused with the activation that follows, one launch
    k["bias"] = ElementwiseKernel("raw T b, int64 C, int64 inner, T slope", "T y",
                                  f"T v = y + b[(i / inner) % C]; y = {fwd}", f"activation_bias_{name}")
    if name != "identity":          # identity's forward and backward are copies: no kernel
        k["forward"] = ElementwiseKernel("T x, T slope", "T y", f"T v = x; y = {fwd}", f"activation_{name}_fwd")
        k["backward"] = ElementwiseKernel("T v, T g, T slope", "T gx", f"gx = {activation.c_grad}",
                                          f"activation_{name}_bwd")
    activation.code = len(TABLE)
    TABLE[name] = activation
    _generate_dispatch()
    return activation


def dispatching(kernel):
    """Decorator (above @gpu_kernel): ``kernel`` calls act/act_grad, so it compiles again when they change."""
    _DISPATCHING.append(kernel)
    _recompile(kernel)
    return kernel


def _generate_dispatch():
    """act(kind, v, slope, zero, one) and act_grad(kind, g, v, slope, zero, one): one branch per record, calling its
    device function; written as source text and compiled lazily (gpucnn.backend.GPUDevice) like any device function."""
    global act, act_grad
    namespace = {"__name__": __name__}
    src = ["def act(kind, v, slope, zero, one):"]
    src_grad = ["def act_grad(kind, g, v, slope, zero, one):"]
    for a in TABLE.values():
        namespace[f"forward_{a.code}"], namespace[f"grad_{a.code}"] = a.forward, a.grad
        src += [f"    if kind == {a.code}:", f"        return forward_{a.code}(v, slope, zero, one)"]
        src_grad += [f"    if kind == {a.code}:", f"        return grad_{a.code}(g, v, slope, zero, one)"]
    src.append("    return v")
    src_grad.append("    return g")
    exec(compile("\n".join(src + src_grad), "<gpucnn.kernels.activations dispatch>", "exec"), namespace)
    act, act_grad = GPUDevice(namespace["act"]), GPUDevice(namespace["act_grad"])
    for kernel in _DISPATCHING:
        _recompile(kernel)


def _table_key() -> str:
    """A digest of the table's device functions: part of the dispatching kernels' names in Numba's disk cache, whose
    key is only a kernel's own bytecode (blind to what act calls: a kernel cached with another table would be
    loaded and silently take an unknown kind for the identity)."""
    h = hashlib.sha1()
    for a in TABLE.values():
        h.update(a.name.encode() + marshal.dumps(a.forward.fn.__code__) + marshal.dumps(a.grad.fn.__code__))
    return h.hexdigest()[:12]


def _recompile(kernel):
    """Bind the current act/act_grad into ``kernel``'s module and drop what was compiled with the old ones."""
    names = kernel.fn.__globals__
    for name, dispatch in (("act", act), ("act_grad", act_grad)):
        if name in names:
            names[name] = dispatch
    original = getattr(kernel, "_undispatched_fn", kernel.fn)
    kernel._undispatched_fn = original
    fn = types.FunctionType(original.__code__, original.__globals__, original.__name__, original.__defaults__)
    fn.__qualname__ = f"{original.__qualname__}__{_table_key()}"
    kernel.fn = fn
    kernel._jitted = None
    kernel._specialised.clear()
    kernel._configured.clear()


# ---------------------------------------------------------------------------- the built-in activations
@gpu_device
def _identity(v, slope, zero, one):
    return v


@gpu_device
def _identity_grad(g, v, slope, zero, one):
    return g


def _copy_into(x, out):
    if out is not x:
        np.copyto(out, x)
    return out


@gpu_device
def _relu(v, slope, zero, one):
    return v if v > zero else zero


@gpu_device
def _relu_grad(g, v, slope, zero, one):
    return g if v > zero else zero


def _relu_grad_np(g, v, slope, out):
    # a select, as the C and Numba rules: g * 0 would keep an infinite or NaN gradient where the unit is off
    np.copyto(_copy_into(g, out), 0, where=~(v > 0))
    return out


@gpu_device
def _leaky_relu(v, slope, zero, one):
    return v if v > zero else slope * v


@gpu_device
def _leaky_relu_grad(g, v, slope, zero, one):
    return g if v > zero else slope * g


def _leaky_relu_np(x, slope, out):
    _copy_into(x, out)
    return np.multiply(out, out.dtype.type(slope), out=out, where=out < 0)


def _leaky_relu_grad_np(g, v, slope, out):
    _copy_into(g, out)
    return np.multiply(out, out.dtype.type(slope), out=out, where=~(v > 0))


@gpu_device
def _tanh(v, slope, zero, one):
    return math.tanh(v)


@gpu_device
def _tanh_grad(g, y, slope, zero, one):
    return g * (one - y * y)


def _tanh_grad_np(g, y, slope, out):
    d = np.multiply(y, y, out=None if np.may_share_memory(out, g) else out)   # out is scratch unless it is g
    np.subtract(1, d, out=d)
    return np.multiply(g, d, out=out)


@gpu_device
def _sigmoid(v, slope, zero, one):
    # the branch whose exp cannot overflow: exp(-|v|) <= 1
    if v >= zero:
        return one / (one + math.exp(-v))
    e = math.exp(v)
    return e / (one + e)


@gpu_device
def _sigmoid_grad(g, y, slope, zero, one):
    return g * y * (one - y)


def _sigmoid_np(x, slope, out):
    negative = x < 0                                    # before out (which may be x) is written
    e = np.abs(x, out=out)
    np.negative(e, out=e)
    np.exp(e, out=e)                                    # exp(-|x|) <= 1: never overflows
    d = e + 1
    np.divide(e, d, out=e, where=negative)              # e / (1 + e) where x < 0, else 1 / (1 + e)
    return np.divide(1, d, out=e, where=~negative)


def _sigmoid_grad_np(g, y, slope, out):
    d = np.subtract(1, y)
    np.multiply(g, y, out=out)
    return np.multiply(out, d, out=out)


_SIGMOID_C = "v >= T(0) ? T(1) / (T(1) + exp(-v)) : exp(v) / (T(1) + exp(v))"   # as _sigmoid: exp never overflows
for _a in (
    Activation("identity", "v", "g", "y", _identity, _identity_grad, lambda x, s, out: _copy_into(x, out),
               lambda g, v, s, out: _copy_into(g, out)),
    Activation("relu", "v > T(0) ? v : T(0)", "v > T(0) ? g : T(0)", "x", _relu, _relu_grad,
               lambda x, s, out: np.maximum(x, 0, out=out), _relu_grad_np, same_rule_at_y=lambda slope: True),
    Activation("leaky_relu", "v > T(0) ? v : slope * v", "v > T(0) ? g : slope * g", "x", _leaky_relu,
               _leaky_relu_grad, _leaky_relu_np, _leaky_relu_grad_np, same_rule_at_y=lambda slope: slope >= 0),
    Activation("tanh", "tanh(v)", "g * (T(1) - v * v)", "y", _tanh, _tanh_grad,
               lambda x, s, out: np.tanh(x, out=out), _tanh_grad_np),
    Activation("sigmoid", _SIGMOID_C, "g * v * (T(1) - v)", "y", _sigmoid, _sigmoid_grad, _sigmoid_np,
               _sigmoid_grad_np),
):
    register(_a)
del _a
