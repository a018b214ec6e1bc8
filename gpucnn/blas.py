"""The GEMM of every conv and dense layer (cuBLAS on "cuda", NumPy's BLAS elsewhere) and its precision:
float32 or TF32 tensor cores, emulated on "sim"."""
from __future__ import annotations

import sys

import numpy as np

from . import backend as _backend
from . import capture as _capture
from . import launch as _launch
from .backend import is_cupy, on_gpu, xp
from .launch import timed

def matmul(a, b, out=None):
    """The GEMM of every conv and dense layer: cuBLAS through ``cupy.matmul`` on "cuda", BLAS otherwise.

    On "sim" the GEMM is NumPy's: cuBLAS is not our code, so the simulator has nothing of ours to run
    (under ``set_precision("tf32")`` its float32 inputs are first cut to TF32, as the tensor cores read them).
    While a graph is captured on "sim" it raises CuPy's NotImplementedError, as ``cupy.matmul`` does on "cuda"
    (unless CUBLAS_CAPTURABLE), and is recorded into ``out``. Each call counts as one launch in :func:`gpucnn.profile`.
    """
    fam = count_gemm(a)
    if _capture._sim_ops is not None and not _capture.CUBLAS_CAPTURABLE:
        raise NotImplementedError(_capture.CUBLAS_IN_CAPTURE)
    if _launch._skip_work:
        return _skipped_matmul(a, b, out)
    if is_cupy(a):
        if _applied != _precision:
            _apply_precision()
        return timed(fam, "gemm", _backend._cupy.matmul, (a, b), {"out": out})
    tf32 = _precision == "tf32" and a.dtype == np.float32 and on_gpu(a)
    if _capture._sim_ops is not None:
        if out is None:
            _capture.refuse_allocation(a.shape[:-1] + b.shape[-1:], a.dtype, "by matmul without out=")
        a_, b_, out_ = _capture._plain(a), _capture._plain(b), _capture._plain(out)
        _capture.enqueue(lambda: np.matmul(*((to_tf32(a_), to_tf32(b_)) if tf32 else (a_, b_)), out=out_))
        return out
    if tf32:
        a, b = to_tf32(a), to_tf32(b)
    return timed(fam, "gemm", np.matmul, (a, b), {"out": out}) if on_gpu(a) else np.matmul(a, b, out=out)


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


def _compute_capability() -> tuple:
    """(major, minor) of CuPy's current GPU."""
    cc = str(_backend._cupy.cuda.Device().compute_capability)       # "90" for 9.0
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
