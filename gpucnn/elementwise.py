"""CuPy ElementwiseKernels that also run without a GPU.

Every elementwise kernel of gpucnn is declared once with :class:`ElementwiseKernel`, using CuPy's own
three strings (in_params, out_params, operation). On "cuda" it *is* a ``cupy.ElementwiseKernel``. On
"sim" the very same strings are pasted into a C++ loop, compiled for the host with the system compiler
and called through ctypes, so the code a GPU will run is the code the tests run.

The host build supports this documented subset of CuPy's kernel language:

* parameters ``T x`` (elementwise, all the same shape - no broadcasting), scalars (a Python number passed
  to a non-raw parameter), and ``raw T w`` (C-contiguous, indexed ``w[j]`` with a flat index);
* type placeholders (``T``, ``U``, ...) resolved from the array arguments, or explicit dtype names
  (``float32``, ``float64``, ``int32``, ``int64``, ``uint32``, ``uint64``, ``bool``);
* ``i`` (the flat index), ``_ind.size()`` (the number of elements), C math functions (``exp``,
  ``tanh``, ``sqrt``, ``pow``, ``fmax``, ``fabs``, ... with C++ overloads for float and double),
  ``min``/``max`` of two values of the same type, casts such as ``T(0.5)``;
* a ``preamble`` of ``__device__`` helper functions (``__device__`` expands to nothing on the host).

Outputs not passed are allocated with the elementwise shape (or ``size=``) through ``backend.empty`` (so
profile() counts them and a training step's workspace supplies them). Every kernel is recorded in
:data:`KERNELS`; :data:`HOST_RUNS` records which ran through the host build (a test checks all did).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

from . import backend, launch

KERNELS: dict[str, "ElementwiseKernel"] = {}
HOST_RUNS: set[str] = set()
CUPY_CALLS: set = set()     # (name, argument specs, keywords) of each distinct call "sim" made (see cupy_call)


def _spec(a):
    """An argument as a test can remake it: ("array", shape, dtype) or ("scalar", value)."""
    if hasattr(a, "dtype") and getattr(a, "ndim", 0) > 0:
        return ("array", tuple(a.shape), np.dtype(a.dtype).name)
    return ("scalar", a.item() if hasattr(a, "item") else a)

_C_TYPES = {
    "float32": "float", "float64": "double", "int8": "signed char", "uint8": "unsigned char",
    "int32": "int", "int64": "long long", "uint32": "unsigned int", "uint64": "unsigned long long",
    "bool": "bool",
}
_CTYPES_SCALAR = {
    "float32": ctypes.c_float, "float64": ctypes.c_double, "int8": ctypes.c_int8, "uint8": ctypes.c_uint8,
    "int32": ctypes.c_int32, "int64": ctypes.c_int64, "uint32": ctypes.c_uint32, "uint64": ctypes.c_uint64,
    "bool": ctypes.c_bool,
}


class _Param:
    def __init__(self, text: str, is_out: bool):
        words = text.split()
        if not 2 <= len(words) <= 3 or (len(words) == 3 and words[0] != "raw"):
            raise ValueError(f"ElementwiseKernel: cannot read parameter {text!r} (expected '[raw] TYPE name')")
        self.raw = words[0] == "raw"
        self.ctype, self.name = words[-2], words[-1]
        self.is_out = is_out
        self.placeholder = self.ctype not in _C_TYPES

    def __repr__(self):
        return ("raw " if self.raw else "") + f"{self.ctype} {self.name}"


def _parse(params: str, is_out: bool):
    return [_Param(p.strip(), is_out) for p in params.split(",") if p.strip()]


class ElementwiseKernel:
    """An elementwise kernel in CuPy's language: a ``cupy.ElementwiseKernel`` on "cuda", host C++ on "sim"."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str, preamble: str = ""):
        self.in_params, self.out_params = in_params, out_params
        self.operation, self.name, self.preamble = operation, name, preamble
        self.params = _parse(in_params, False) + _parse(out_params, True)
        self.family = name.split("_", 1)[0]
        self._cupy_kernel = None
        self._host = {}
        if name in KERNELS:
            raise ValueError(f"ElementwiseKernel: the name {name!r} is already registered")
        KERNELS[name] = self

    def __repr__(self):
        return f"<ElementwiseKernel {self.name}({self.in_params}) -> ({self.out_params})>"

    def __call__(self, *args, size=None):
        n_in = sum(not p.is_out for p in self.params)
        if not n_in <= len(args) <= len(self.params):
            raise TypeError(f"{self.name}: expected {n_in} to {len(self.params)} arguments, got {len(args)}")
        for c in backend._counters:
            c.count_launch(self.family, "cupy")
        types, shape = self._resolve(args, size)
        args = list(args)
        made = False
        for p in self.params[len(args):]:
            # outputs through backend.empty: counted by gpucnn.profile, and taken from a training step's
            # workspace when one is active (so a step allocates nothing in steady state)
            dtype = np.dtype(types[p.ctype]) if p.placeholder else np.dtype(p.ctype)
            args.append(backend.empty(shape, dtype, self._like(args)))
            made = True
        if any(backend.is_cupy(a) for a in args):
            if self._cupy_kernel is None:
                import cupy
                self._cupy_kernel = cupy.ElementwiseKernel(self.in_params, self.out_params, self.operation,
                                                           self.name, preamble=self.preamble)
            args, kwargs = self.cupy_call(args, size, made)
            return backend.timed(self.family, self.name, self._cupy_kernel, args, kwargs)
        _, kwargs = self.cupy_call(args, size, made)
        CUPY_CALLS.add((self.name, tuple(_spec(a) for a in args), tuple(sorted(kwargs.items()))))
        if launch._skip_work:      # gpucnn.profile.shapes_only: outputs allocated, nothing computed
            outs = [a for p, a in zip(self.params, args) if p.is_out]
            return outs[0] if len(outs) == 1 else tuple(outs)
        return backend.timed(self.family, self.name, self._host_call, (args, types, shape))

    def cupy_call(self, args, size, made):
        """The positional arguments and keywords ``cupy.ElementwiseKernel.__call__`` gets on "cuda": ``size``
        only where no output was made here and the caller gave one (CuPy 14 refuses ``size=None``: a TypeError).
        A test sends every call the sim suite makes through real CuPy with exactly these."""
        return list(args), ({} if made or size is None else {"size": int(size)})

    def _like(self, args):
        """An argument array that says on which device the outputs belong."""
        for a in args:
            if hasattr(a, "dtype") and getattr(a, "ndim", 0) > 0:
                return a
        return np.empty(0)

    def _resolve(self, args, size):
        """(placeholder -> dtype, the elementwise shape) from the arguments given, as CuPy resolves them."""
        params = self.params
        types = {}
        for p, a in zip(params, args):
            if hasattr(a, "dtype") and getattr(a, "ndim", 0) > 0 and p.placeholder:
                if types.setdefault(p.ctype, a.dtype) != a.dtype:
                    raise TypeError(f"{self.name}: type {p.ctype} is both {types[p.ctype]} and {a.dtype}")
        arrays = [(p, a) for p, a in zip(params, args) if not p.raw and hasattr(a, "dtype") and a.ndim > 0]
        shape = tuple(arrays[0][1].shape) if arrays else None
        for p, a in arrays:
            if tuple(a.shape) != shape:
                raise ValueError(f"{self.name}: elementwise argument {p.name!r} has shape {tuple(a.shape)}, expected "
                                 f"{shape} (the host build does not broadcast)")
        if shape is None:
            if size is None:
                raise ValueError(f"{self.name}: no elementwise array argument, so size= is required")
            shape = (int(size),)
        for p in params:  # placeholders only used by scalars or outputs default to the first array's type
            if p.placeholder and p.ctype not in types:
                types[p.ctype] = arrays[0][1].dtype if arrays else np.dtype("float64")
        return types, shape

    # -------------------------------------------------------------------------------------- host build

    def _host_call(self, args, types, shape):
        params = self.params
        for p, a in zip(params, args):
            if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
                raise ValueError(f"{self.name}: argument {p.name!r} must be C-contiguous")
        n = int(np.prod(shape))
        outs = []
        call = []
        for p, a in zip(params, args):
            dtype = np.dtype(types[p.ctype]) if p.placeholder else np.dtype(p.ctype)
            if p.is_out:
                outs.append(a)
            if isinstance(a, np.ndarray) and (a.ndim > 0 or p.raw or p.is_out):
                if a.dtype != dtype:
                    raise TypeError(f"{self.name}: argument {p.name!r} is {a.dtype}, expected {dtype}")
                call.append(a.ctypes.data_as(ctypes.c_void_p))
            else:
                call.append(_CTYPES_SCALAR[dtype.name](np.asarray(a).astype(dtype).item()))
        scalar_mask = tuple(not isinstance(c, ctypes.c_void_p) for c in call)
        key = (tuple(sorted((k, str(v)) for k, v in types.items())), scalar_mask)
        fn = self._host.get(key)
        if fn is None:
            fn = self._host[key] = self._build(types, scalar_mask)
        # run now, or recorded while a graph is captured on "sim" (the closure keeps the arrays alive)
        backend.enqueue(lambda: (fn(ctypes.c_longlong(n), *call), args))
        HOST_RUNS.add(self.name)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def host_source(self, types, scalar_mask) -> str:
        """The C++ translation unit the host build compiles: CuPy's strings inside a plain loop."""
        lines = ["#include <cmath>", "#include <cstdint>", "#include <algorithm>", "using namespace std;",
                 "#define __device__", "#define __forceinline__ inline",
                 "struct _Ind { long long n; long long size() const { return n; } };"]
        lines += [f"typedef {_C_TYPES[np.dtype(t).name]} {name};" for name, t in types]
        lines.append(self.preamble)
        sig, pre, body = [], [], []
        for p, scalar in zip(self.params, scalar_mask):
            ct = p.ctype if p.placeholder else _C_TYPES[p.ctype]
            if scalar:
                sig.append(f"{ct} {p.name}")
            elif p.raw:
                sig.append(f"{ct}* {p.name}")
            else:
                sig.append(f"{ct}* _p_{p.name}")
                body.append(f"{ct}& {p.name} = _p_{p.name}[i];" if p.is_out else f"const {ct} {p.name} = _p_{p.name}[i];")
        lines.append(f'extern "C" void {self.name}(long long _n, {", ".join(sig)}) {{')
        lines.append("  _Ind _ind = {_n};")
        lines += ["  " + x for x in pre]
        lines.append("  for (long long i = 0; i < _n; ++i) {")
        lines += ["    " + x for x in body]
        lines.append("    " + self.operation.strip().replace("\n", "\n    ") + ";")
        lines += ["  }", "}"]
        return "\n".join(lines) + "\n"

    def _build(self, types: dict, scalar_mask):
        src = self.host_source(sorted(types.items()), scalar_mask)
        lib = ctypes.CDLL(_compile(src, self.name))
        fn = getattr(lib, self.name)
        fn.restype = None
        return fn


def _compiler():
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise RuntimeError(
        "the 'sim' device compiles gpucnn's CuPy ElementwiseKernels for the host, and no C++ compiler was "
        "found (looked for $CXX, g++, c++, clang++). Install one: `apt-get install g++` on Debian/Ubuntu, "
        "`xcode-select --install` on macOS, or set CXX to its path.")


def _cache_dir() -> str:
    d = os.environ.get("GPUCNN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gpucnn", "host_kernels")
    os.makedirs(d, exist_ok=True)
    return d


def _compile(src: str, name: str) -> str:
    """Compile ``src`` to a shared library (cached by the source's hash) and return its path."""
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    path = os.path.join(_cache_dir(), f"{name}-{digest}.so")
    if os.path.exists(path):
        return path
    with tempfile.TemporaryDirectory() as tmp:
        cpp = os.path.join(tmp, f"{name}.cpp")
        with open(cpp, "w") as f:
            f.write(src)
        so = os.path.join(tmp, f"{name}.so")
        r = subprocess.run([_compiler(), "-O2", "-std=c++17", "-shared", "-fPIC", "-o", so, cpp],
                           capture_output=True, text=True)
        if r.returncode != 0:
            numbered = "\n".join(f"{k + 1:4d}  {line}" for k, line in enumerate(src.splitlines()))
            raise RuntimeError(f"ElementwiseKernel {name!r}: the host build failed. The kernel must stay "
                               f"within the subset documented in gpucnn.elementwise.\n{r.stderr}\n{numbered}")
        tmp_final = path + f".{os.getpid()}.tmp"
        shutil.copyfile(so, tmp_final)
        os.replace(tmp_final, path)   # atomic: parallel test processes never load a half-written library
    return path
