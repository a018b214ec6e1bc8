"""The GEMM of every conv and dense layer (cuBLAS on "cuda", NumPy's BLAS elsewhere) and its precision:
float32 or TF32 tensor cores, emulated on "sim".

On "cuda" the GEMM has two providers (:func:`provider`, :func:`use_provider`, ``GPUCNN_BLAS``):
- "nvmath": cuBLAS through NVIDIA's nvmath-python bindings (``nvmath.bindings.cublas``, pinned to 1.0.1: NVIDIA
  marks them experimental) on a handle of gpucnn's own: pointer mode host, a workspace of its own set after every
  set_stream (32 MiB from sm_90, 4 MiB before), as NVIDIA's guide to CUDA graphs asks; a training step's GEMMs
  can then be captured, and the whole step is one graph. The default where nvmath-python is installed.
- "cupy": ``cupy.matmul``. CuPy refuses any cuBLAS call while a stream captures, so steps run eagerly.
Why this and not the alternatives: cuBLASLt (``nvmath.bindings.cublasLt``, the same package) captures too, but
asks for a matmul descriptor, four layouts and a heuristic query per shape, plans to cache and free, for GEMMs
cuBLAS already picks kernels for; piecewise graphs (the kernels between GEMMs captured, the GEMMs eager) keep a
host launch per GEMM plus one per segment (10+ per LeNet-5 step), and every segment boundary is a place for a
bug. A handle and a workspace are the least code that makes the step one graph.
On "sim" the "nvmath" provider makes the same calls, with the same arguments, to gpucnn.simblas, which runs them
on NumPy memory under cuBLAS's and the capture's rules; "cupy" is NumPy's matmul, refused in a capture as CuPy
refuses it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import numpy as np

from . import backend as _backend
from . import capture as _capture
from . import launch as _launch
from . import simblas as _sim
from .backend import is_cupy, on_gpu, xp
from .launch import timed
from .memory import _address

PROVIDERS = ("nvmath", "cupy")
NVMATH = "nvmath-python==1.0.1"
ENABLE_GRAPHS = (f"install {NVMATH} with the cuBLAS wheel for your CUDA (nvidia-cublas for 13.x, nvidia-cublas-cu12 "
                 "for 12.x; or pip install \".[cuda13]\"): gpucnn's GEMMs then go through a capture-safe cuBLAS handle")
_provider = None        # chosen by use_provider (or after cuBLAS through nvmath failed to start); None: the default


def provider() -> str:
    """The GEMM provider of the GPU paths: "nvmath" (capture-safe cuBLAS) or "cupy" (cupy.matmul; see the module
    docstring). Default: ``GPUCNN_BLAS`` when set; else on "cuda" "nvmath" where nvmath-python is installed and
    "cupy" where not; on "sim" "nvmath" (gpucnn.simblas needs no package: "sim" stands for a GPU set up as the
    cuda12/cuda13 extras set it up, so the sim suite is the same wherever it runs)."""
    if _provider is not None:
        return _provider
    env = os.environ.get("GPUCNN_BLAS", "").strip().lower()
    if env:
        if env not in PROVIDERS:
            raise ValueError(f"GPUCNN_BLAS: expected one of {PROVIDERS}, got {env!r}")
        return env
    return "nvmath" if _backend.device() == "sim" or _nvmath_installed() else "cupy"


def use_provider(name) -> str:
    """Choose the GEMM provider ("nvmath" or "cupy"; None: back to the default); returns the previous one.
    "nvmath" on "cuda" needs nvmath-python (an ImportError saying what to install)."""
    global _provider
    if name is not None and name not in PROVIDERS:
        raise ValueError(f"use_provider: expected one of {PROVIDERS}, got {name!r}")
    if name == "nvmath" and _backend.device() == "cuda":
        _nvmath()
    old, _provider = provider(), name
    return old


def _nvmath():
    try:
        from nvmath.bindings import cublas
    except ImportError as e:
        raise ImportError(f"gpucnn's 'nvmath' GEMM provider needs nvmath.bindings.cublas: {ENABLE_GRAPHS} ({e})") from e
    return cublas


_installed = []


def _nvmath_installed() -> bool:
    if not _installed:          # found once, without importing it (that takes a second or two)
        _installed.append(importlib.util.find_spec("nvmath") is not None)
    return _installed[0]


def describe() -> str:
    """The GEMM provider in a line, for ``gpucnn info``."""
    if provider() == "nvmath":
        return ("nvmath (cuBLAS through nvmath.bindings.cublas on gpucnn's own handle and workspace: training steps "
                "can be captured as CUDA graphs)")
    return f"cupy (cupy.matmul: CuPy refuses cuBLAS in a graph capture, so training steps run eagerly; {ENABLE_GRAPHS})"


def matmul(a, b, out=None):
    """The GEMM of every conv and dense layer: cuBLAS on "cuda" (see :func:`provider`), BLAS otherwise.

    "nvmath": a[..., m, k] @ b[..., k, n] into ``out`` (row-major; transposed views are read in place through
    the trans flags), by the same cuBLAS calls on "cuda" and "sim" (gpucnn.simblas). "cupy": ``cupy.matmul``; on
    "sim" NumPy's (its float32 inputs first cut to TF32 under ``set_precision("tf32")``, as the tensor cores read
    them), and while a graph is captured CuPy's NotImplementedError, as on "cuda". Each call counts as one launch
    in :func:`gpucnn.profile`.
    """
    fam = count_gemm(a)
    if on_gpu(a) and provider() == "nvmath":
        if _launch._skip_work:
            return _skipped_matmul(a, b, out)
        return timed(fam, "gemm", _cublas_matmul, (a, b, out), {})
    if _capture._sim_ops is not None:
        raise NotImplementedError(_CUBLAS_REFUSED)
    if _launch._skip_work:
        return _skipped_matmul(a, b, out)
    return timed(fam, "gemm", _cupy_matmul, (a, b, out), {}) if on_gpu(a) else np.matmul(a, b, out=out)


_CUBLAS_REFUSED = f"{_capture.CUBLAS_IN_CAPTURE} (CuPy's words: gpucnn's GEMMs go through cupy.matmul; {ENABLE_GRAPHS})"


def _cupy_matmul(a, b, out):
    """The "cupy" provider's GEMM: cupy.matmul, or NumPy's on "sim" (float32 inputs cut to TF32 under "tf32")."""
    if not is_cupy(a):
        if _precision == "tf32" and a.dtype == np.float32:
            a, b = to_tf32(a), to_tf32(b)
        return np.matmul(a, b, out=out)
    if _applied != _precision:
        _apply_precision()
    try:
        return _backend._cupy.matmul(a, b, out=out)
    except NotImplementedError as e:
        if _capture._capturing:
            raise NotImplementedError(_CUBLAS_REFUSED) from e
        raise


# ------------------------------------------------------------------------------------------------ "nvmath"

def _cublas_matmul(a, b, out):
    """a @ b into ``out`` (made here when None, outside a capture) by one cuBLAS call on gpucnn's handle."""
    if out is None:
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        _capture.refuse_allocation(shape, a.dtype, "by matmul without out=")
        out = xp(a).empty(shape, dtype=np.result_type(a.dtype, b.dtype))
    call = gemm_call(a, b, out, _precision == "tf32")
    if isinstance(call, str):
        if _capture._capturing:
            raise _capture.CaptureError(f"matmul: {call}: cuBLAS cannot read it in place, and cupy.matmul cannot "
                                        "be captured; make the operands row-major or transposed views")
        if call not in _fallbacks:
            _fallbacks.add(call)
            warnings.warn(f"gpucnn.blas: a GEMM with {call} runs through cupy.matmul, not gpucnn's capture-safe "
                          "cuBLAS handle; a training step that makes it cannot be captured as a CUDA graph", stacklevel=4)
        return _cupy_matmul(a, b, out)
    lib, handle = _handle(a)
    if lib is None:                             # cuBLAS through nvmath failed to start: told once, CuPy's from now
        return _cupy_matmul(a, b, out)
    lib.set_stream(handle.ptr, _capture.current_stream(a))
    lib.set_workspace(handle.ptr, _address(handle.workspace), handle.workspace.nbytes)     # set_stream reset it
    if lib is _sim:
        _sim.expose((a, b, out), (_SCALARS[out.dtype],))
    getattr(lib, call[0])(handle.ptr, *call[1])
    return out


_fallbacks = set()      # layouts that went to cupy.matmul (each warned once)
_SCALARS = {np.dtype(t): np.array([1, 0], t) for t in (np.float32, np.float64)}    # alpha, beta (pointer mode host)
_TYPES = {np.dtype(np.float32): _sim.CUDA_R_32F, np.dtype(np.float64): _sim.CUDA_R_64F}
_INT32 = 2 ** 31


def gemm_call(a, b, out, tf32=False):
    """The cuBLAS call that computes ``out = a @ b`` on row-major arrays (2-d, or 3-d for a batch) reading each
    operand in place: ``(function name, its arguments after the handle)``, or why there is none (a str).

    cuBLAS is column-major, and a row-major matrix is its transpose there: C = A B is computed as C^T = B^T A^T.
    An operand whose rows are contiguous is read as it is (CUBLAS_OP_N); a transposed view (``col.T``, columns
    contiguous) is read with CUBLAS_OP_T; anything else (a step on both axes) is not read in place. An ``out``
    that is itself a transposed view is computed as out^T = b^T a^T."""
    if not (a.dtype == b.dtype == out.dtype and a.dtype in _TYPES):
        return f"dtypes {a.dtype} @ {b.dtype} -> {out.dtype} (cuBLAS here: float32 or float64 throughout)"
    if not (2 <= min(a.ndim, b.ndim) and max(a.ndim, b.ndim) == out.ndim <= 3):
        return f"{a.ndim}-d @ {b.ndim}-d -> {out.ndim}-d operands (2-d, or 3-d for a batch)"
    (m, k), (k_, n) = a.shape[-2:], b.shape[-2:]
    if k != k_ or tuple(out.shape[-2:]) != (m, n) or min(m, n, k) == 0:
        return f"shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)} (empty or not chaining)"
    c = _layout(out)
    if c is None or c[0] != _sim.OP_N:
        t = _layout(out.swapaxes(-1, -2))
        if t is not None and t[0] == _sim.OP_N:
            return gemm_call(b.swapaxes(-1, -2), a.swapaxes(-1, -2), out.swapaxes(-1, -2), tf32)
        return f"an output of strides {out.strides}"
    ops = [_layout(x) for x in (b, a)]
    if None in ops:
        return f"an operand of strides {(b if ops[0] is None else a).strides} (neither rows nor columns contiguous)"
    batch = out.shape[0] if out.ndim == 3 else 1
    strides = [_batch_stride(x, batch) for x in (b, a, out)]
    if None in strides or (batch > 1 and strides[2] < c[1] * (m - 1) + n):
        return f"a batch of {batch} with strides {[x.strides for x in (a, b, out)]}"
    ptrs = [_address(x) for x in (b, a, out)]
    if any(p % out.itemsize for p in ptrs) or max(m, n, k, *(ld for _, ld in ops), c[1]) >= _INT32:
        return "an unaligned pointer or a size over cuBLAS's 32 bits"
    dtype = _TYPES[out.dtype]
    compute = _sim.COMPUTE_64F if out.dtype == np.float64 else _sim.COMPUTE_32F_FAST_TF32 if tf32 \
        else _sim.COMPUTE_32F
    alpha = _address(_SCALARS[out.dtype])
    beta = alpha + out.itemsize
    (opb, ldb), (opa, lda) = ops
    if out.ndim == 2:
        return "gemm_ex", (opb, opa, n, m, k, alpha, ptrs[0], dtype, ldb, ptrs[1], dtype, lda, beta, ptrs[2], dtype,
                           c[1], compute, _sim.GEMM_DEFAULT)
    return "gemm_strided_batched_ex", (opb, opa, n, m, k, alpha, ptrs[0], dtype, ldb, strides[0], ptrs[1], dtype, lda,
                                       strides[1], beta, ptrs[2], dtype, c[1], strides[2], batch, compute,
                                       _sim.GEMM_DEFAULT)


def _layout(x):
    """How cuBLAS reads row-major ``x``'s last two axes (r x c) in place as the column-major x^T: (OP_N, ld) when
    its rows are contiguous (memory holds x^T, c x r), (OP_T, ld) when its columns are (memory holds x, r x c), or
    None. A unit axis may have any stride."""
    (r, c), (sr, sc) = x.shape[-2:], x.strides[-2:]
    if sr % x.itemsize or sc % x.itemsize or sr < 0 or sc < 0:
        return None
    sr, sc = sr // x.itemsize, sc // x.itemsize
    if c == 1 or sc == 1:
        ld = sr if r > 1 else c
        if ld >= max(1, c):
            return _sim.OP_N, int(ld)
    if r == 1 or sr == 1:
        ld = sc if c > 1 else r
        if ld >= max(1, r):
            return _sim.OP_T, int(ld)
    return None


def _batch_stride(x, batch):
    """Elements between the matrices of ``x``'s batch: 0 for one matrix shared by all (2-d, or a batch of 1)."""
    if x.ndim == 2 or x.shape[0] == 1:
        return 0
    if x.shape[0] != batch or x.strides[0] % x.itemsize or x.strides[0] < 0:
        return None
    return x.strides[0] // x.itemsize


class _Handle:
    """gpucnn's cuBLAS handle on one device: pointer mode host (alpha and beta captured by value), default math
    (TF32 only where the compute type asks for it, whatever CUPY_TF32 says), and a workspace of its own."""

    def __init__(self, lib, workspace):
        self.ptr = lib.create()
        lib.set_pointer_mode(self.ptr, _sim.POINTER_MODE_HOST)
        lib.set_math_mode(self.ptr, _sim.DEFAULT_MATH)
        self.workspace = workspace


_handles = {}           # (library, device) -> _Handle, or None where cuBLAS through nvmath failed to start


def _handle(a):
    """(library, handle) for ``a``'s device: nvmath.bindings.cublas on "cuda", gpucnn.simblas on "sim"; made at
    the first GEMM (not inside a capture: cublasCreate and the workspace allocate)."""
    cupy = is_cupy(a)
    key = ("cuda", a.device.id) if cupy else ("sim", 0)
    if key in _handles:
        h = _handles[key]
        return (None, None) if h is None else (_nvmath() if cupy else _sim, h)
    if _capture._capturing:
        raise _capture.CaptureError("matmul: gpucnn's cuBLAS handle and its workspace are made at the first GEMM "
                                    "on a device, which is not allowed while a graph is captured: run the step once "
                                    "eagerly first (Sequential.train_step does)")
    try:
        lib = _nvmath() if cupy else _sim
        size = _sim.workspace_bytes(_compute_capability(a.device) if cupy else _sim.COMPUTE_CAPABILITY)
        h = _handles[key] = _Handle(lib, xp(a).empty(size, dtype=np.uint8))
    except Exception as e:      # no cuBLAS library, no nvmath: said once, then CuPy's GEMMs
        if not cupy:
            raise
        global _provider
        _handles[key], _provider = None, "cupy"
        warnings.warn(f"gpucnn.blas: cuBLAS through nvmath-python did not start ({type(e).__name__}: {e}); GEMMs "
                      f"go through cupy.matmul, and training steps are not captured as CUDA graphs. {ENABLE_GRAPHS}",
                      stacklevel=5)
        return None, None
    return lib, h


def _skipped_matmul(a, b, out):
    """What matmul returns while the work is skipped: its output, allocated as usual and left unwritten."""
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not chain")
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    if out is not None:
        if tuple(out.shape) != shape:
            raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {shape}")
        return out
    return xp(a).empty(shape, dtype=np.result_type(a.dtype, b.dtype))


def count_gemm(a):
    """Count one cuBLAS call (a GEMM on ``a``'s GPU path) in gpucnn.profile, under the op family of the module
    that called the GEMM function calling this; returns that family (None when nothing profiles)."""
    if (_launch._counters or _launch._timers) and on_gpu(a):
        fam = sys._getframe(2).f_globals.get("__name__", "?").rsplit(".", 1)[-1]
        for c in _launch._counters:
            c.count_launch(fam, "cublas")
        return fam
    return None


PRECISIONS = ("fp32", "tf32")
_precision = "fp32"


def set_precision(precision: str) -> str:
    """How float32 GEMMs (cuBLAS, through ``cupy.matmul``) multiply: "fp32" (full float32, the default) or
    "tf32" (TensorFloat-32 tensor cores on compute capability >= 8.0: inputs read to 10 mantissa bits,
    products summed in float32; several times the fp32 throughput; a GPU below 8.0 is a ValueError). Our own
    Numba and elementwise kernels always compute in float32, and float64 GEMMs are never affected. On "sim" the
    cut is emulated (to_tf32) so tests can see it; on "cpu" BLAS has no TF32 and nothing changes. Returns the previous setting."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"set_precision: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "tf32" and _backend._device == "cuda":
        cc = _compute_capability()
        if cc < (8, 0):
            raise ValueError(f"set_precision('tf32'): this GPU (compute capability {cc[0]}.{cc[1]}) has no TF32 "
                             "tensor cores (they start at 8.0, Ampere); keep 'fp32'")
    old, _precision = _precision, precision
    return old


def _compute_capability(device=None) -> tuple:
    """(major, minor) of ``device`` (a CuPy Device; default: CuPy's current GPU)."""
    cc = str((device or _backend._cupy.cuda.Device()).compute_capability)       # "90" for 9.0
    return int(cc[:-1]), int(cc[-1])


def precision() -> str:
    """The GEMM precision set by :func:`set_precision` ("fp32" unless changed)."""
    return _precision


_applied = None         # what CuPy was last told; matmul tells it again when set_precision changed it


def _apply_precision():
    # CuPy keeps one compute type per dtype for its GEMMs; DEFAULT is plain float32 (CUBLAS_COMPUTE_32F),
    # set explicitly so that a CUPY_TF32=1 in the environment cannot turn "fp32" into TF32 unseen
    global _applied
    from cupy._core import _routines_linalg as linalg
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if _precision == "tf32"
                            else linalg.COMPUTE_TYPE_DEFAULT)
    _applied = _precision


def to_tf32(a):
    """float32 ``a`` as a TF32 tensor core reads it, as float32: the 13 low mantissa bits dropped (truncated
    toward zero, keeping 10 stored bits). NVIDIA documents that TF32 tensor cores read "only the first 10
    bits of the input mantissa"; the first H200 run found cuBLAS's TF32 GEMM 3.25e-5 (relative) away from a
    round-to-nearest model, as truncation predicts. Infinities and NaNs pass through."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    return np.where(finite, bits & np.uint32(0xFFFFE000), bits).view(np.float32).reshape(np.shape(a))
