"""nvmath.bindings.cublas as "sim" runs it: the functions gpucnn's capture-safe GEMM calls, with the same names
and arguments, run on NumPy memory under cuBLAS's rules and a graph capture's.

A GEMM here reads its operands the way cuBLAS would, from raw pointers, leading dimensions and trans flags
(column-major), so a wrong ``lda`` or flag gives wrong numbers on "sim" as it would on a GPU. While a graph is
captured it is recorded (capture.enqueue), and refused where cuBLAS could not be captured: a handle whose
stream is not the capturing one, a workspace not set after the last set_stream (set_stream resets it, and
cuBLAS would then allocate in the capture), a scalar read from device memory under pointer mode host. Every
call is recorded in :data:`CALLS`, so the tests can pass the same arguments to the real nvmath functions."""
from __future__ import annotations

import numpy as np

from . import capture as _capture
from .memory import _address

OP_N, OP_T = 0, 1                       # nvmath.bindings.cublas.Operation
POINTER_MODE_HOST, POINTER_MODE_DEVICE = 0, 1   # .PointerMode
DEFAULT_MATH = 0                        # .Math.DEFAULT_MATH: no reduced precision unless the compute type asks
COMPUTE_32F, COMPUTE_32F_FAST_TF32, COMPUTE_64F = 68, 77, 70     # .ComputeType
CUDA_R_32F, CUDA_R_64F = 0, 1           # nvmath.CudaDataType
GEMM_DEFAULT = -1                       # .GemmAlgo.DEFAULT
DTYPES = {CUDA_R_32F: np.dtype(np.float32), CUDA_R_64F: np.dtype(np.float64)}
COMPUTE = {COMPUTE_32F: CUDA_R_32F, COMPUTE_32F_FAST_TF32: CUDA_R_32F, COMPUTE_64F: CUDA_R_64F}
COMPUTE_CAPABILITY = (9, 0)             # what "sim" stands for when cuBLAS's needs depend on the GPU (workspace)

# the pointer arguments: their values differ from call to call, so CALLS keeps one example per signature
POINTERS = frozenset({"handle", "stream_id", "workspace", "alpha", "a", "b", "beta", "c"})
CALLS = {}      # (function, ((argument, type, value or None for a pointer), ...)) -> the arguments of one such call


class SimCublasError(RuntimeError):
    """A call that cuBLAS answers with an error status (the status's name begins the message)."""


class _Handle:
    def __init__(self):
        self.stream = 0                         # the legacy default stream, as after cublasCreate
        self.workspace = None                   # None: cuBLAS's own pool (it allocates); else (pointer, bytes)
        self.pointer_mode = POINTER_MODE_HOST
        self.math_mode = DEFAULT_MATH


_handles = {}
_memory = {"device": (), "host": ()}            # what the next GEMM may read (see expose)


def _record(name, **args):
    key = (name, tuple((k, type(v).__name__, None if k in POINTERS else v) for k, v in args.items()))
    CALLS.setdefault(key, tuple(args.values()))


def _handle(handle) -> _Handle:
    h = _handles.get(handle)
    if h is None:
        raise SimCublasError(f"CUBLAS_STATUS_NOT_INITIALIZED: {handle:#x} is not a handle from create()")
    return h


def create():
    _record("create")
    h = _Handle()
    _handles[id(h)] = h
    return id(h)


def destroy(handle):
    _record("destroy", handle=handle)
    _handles.pop(handle, None)


def set_stream(handle, stream_id):
    _record("set_stream", handle=handle, stream_id=stream_id)
    h = _handle(handle)
    h.stream, h.workspace = stream_id, None         # cublasSetStream resets the workspace to the default pool


def set_workspace(handle, workspace, workspace_size_in_bytes):
    _record("set_workspace", handle=handle, workspace=workspace, workspace_size_in_bytes=workspace_size_in_bytes)
    _handle(handle).workspace = (workspace, workspace_size_in_bytes)


def set_pointer_mode(handle, mode):
    _record("set_pointer_mode", handle=handle, mode=mode)
    if mode not in (POINTER_MODE_HOST, POINTER_MODE_DEVICE):
        raise SimCublasError(f"CUBLAS_STATUS_INVALID_VALUE: pointer mode {mode}")
    _handle(handle).pointer_mode = mode


def set_math_mode(handle, mode):
    _record("set_math_mode", handle=handle, mode=mode)
    _handle(handle).math_mode = mode


def workspace_bytes(cc) -> int:
    """The workspace NVIDIA's cuBLAS guide asks a capturable handle for: 32 MiB on Hopper (9.0) and later,
    4 MiB before."""
    return (32 if tuple(cc) >= (9, 0) else 4) << 20


def expose(device, host):
    """Name the arrays the next GEMM's pointers point into: ``device`` (its operands) and ``host`` (its alpha and
    beta). "sim" only: a real GPU needs no such help to find its memory."""
    _memory["device"], _memory["host"] = tuple(device), tuple(host)


def gemm_ex(handle, transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype, ldc,
            compute_type, algo):
    _record("gemm_ex", handle=handle, transa=transa, transb=transb, m=m, n=n, k=k, alpha=alpha, a=a, atype=atype,
            lda=lda, b=b, btype=btype, ldb=ldb, beta=beta, c=c, ctype=ctype, ldc=ldc, compute_type=compute_type,
            algo=algo)
    _gemm(handle, transa, transb, m, n, k, alpha, (a, atype, lda, 0), (b, btype, ldb, 0), beta, (c, ctype, ldc, 0),
          1, compute_type)


def gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, a, atype, lda, stride_a, b, btype, ldb,
                            stride_b, beta, c, ctype, ldc, stride_c, batch_count, compute_type, algo):
    _record("gemm_strided_batched_ex", handle=handle, transa=transa, transb=transb, m=m, n=n, k=k, alpha=alpha,
            a=a, atype=atype, lda=lda, stride_a=stride_a, b=b, btype=btype, ldb=ldb, stride_b=stride_b, beta=beta,
            c=c, ctype=ctype, ldc=ldc, stride_c=stride_c, batch_count=batch_count, compute_type=compute_type,
            algo=algo)
    _gemm(handle, transa, transb, m, n, k, alpha, (a, atype, lda, stride_a), (b, btype, ldb, stride_b), beta,
          (c, ctype, ldc, stride_c), batch_count, compute_type)


def _gemm(handle, transa, transb, m, n, k, alpha, a, b, beta, c, batch, compute_type):
    """C (m x n, column-major) = alpha op(A) op(B) + beta C, for each of ``batch`` matrices: checked as cuBLAS
    checks it, then run (or, while a graph is captured, recorded)."""
    h = _handle(handle)
    if min(m, n, k, batch) < 0 or transa not in (OP_N, OP_T) or transb not in (OP_N, OP_T) \
            or compute_type not in COMPUTE or a[1] != b[1] or b[1] != c[1] or c[1] != COMPUTE[compute_type]:
        raise SimCublasError(f"CUBLAS_STATUS_INVALID_VALUE: m, n, k, batch {m}, {n}, {k}, {batch}, trans "
                             f"{transa}, {transb}, types {a[1]}, {b[1]}, {c[1]} with compute type {compute_type}")
    ra, rb = (m if transa == OP_N else k), (k if transb == OP_N else n)     # rows of A and B as stored
    for what, ld, rows in (("lda", a[2], ra), ("ldb", b[2], rb), ("ldc", c[2], m)):
        if ld < max(1, rows):
            raise SimCublasError(f"CUBLAS_STATUS_INVALID_VALUE: {what} {ld} < max(1, {rows})")
    if _capture._capturing:
        if h.stream != _capture.current_stream():
            raise _capture.CaptureError(
                f"a cuBLAS GEMM on stream {h.stream:#x} while stream {_capture.current_stream():#x} captures: it "
                "would run now, outside the graph (call set_stream with the capturing stream first)")
        if h.workspace is None:
            raise _capture.CaptureError(
                "a cuBLAS GEMM in a graph capture on a handle whose workspace was not set after its last "
                "set_stream (which resets it): cuBLAS would allocate its workspace inside the capture")
        if h.workspace[1] < workspace_bytes(COMPUTE_CAPABILITY):
            raise _capture.CaptureError(f"a cuBLAS workspace of {h.workspace[1]:,} bytes in a graph capture, under "
                                        f"the {workspace_bytes(COMPUTE_CAPABILITY):,} NVIDIA asks for")
    dtype = DTYPES[c[1]]
    scalars = [_scalar(p, dtype, h.pointer_mode, what) for p, what in ((alpha, "alpha"), (beta, "beta"))]
    A = _matrix(a, (ra, k if transa == OP_N else m), batch, dtype, "A")
    B = _matrix(b, (rb, n if transb == OP_N else k), batch, dtype, "B")
    C = _matrix(c, (m, n), batch, dtype, "C")
    tf32 = compute_type == COMPUTE_32F_FAST_TF32
    _capture.enqueue(lambda: _run(A if transa == OP_N else A.swapaxes(1, 2),
                                  B if transb == OP_N else B.swapaxes(1, 2), C, *scalars, tf32))


def _run(A, B, C, alpha, beta, tf32):
    alpha, beta = (v[0] if isinstance(v, np.ndarray) else v for v in (alpha, beta))
    if tf32:
        from .blas import to_tf32
        A, B = to_tf32(A), to_tf32(B)
    r = np.matmul(A, B)
    if alpha != 1:
        r *= alpha
    if beta != 0:                       # beta == 0: C is not read (NaNs in it do not propagate)
        r += beta * C
    C[...] = r


def _scalar(ptr, dtype, mode, what):
    """alpha or beta, read where the pointer mode says: the host under POINTER_MODE_HOST (captured by value)."""
    arrays = _memory["host" if mode == POINTER_MODE_HOST else "device"]
    other = _memory["device" if mode == POINTER_MODE_HOST else "host"]
    found = _view(ptr, (1,), (dtype.itemsize,), dtype, arrays)
    if found is None:
        where = "device" if _view(ptr, (1,), (dtype.itemsize,), dtype, other) is not None else "unknown"
        raise SimCublasError(f"{what} at {ptr:#x} is {where} memory, read under pointer mode "
                             f"{'host' if mode == POINTER_MODE_HOST else 'device'}")
    return dtype.type(found[0]) if mode == POINTER_MODE_HOST else found       # device: read when the GEMM runs


def _matrix(operand, shape, batch, dtype, what):
    """The column-major operand (pointer, type, ld, batch stride) as a (batch, rows, cols) view of its memory."""
    ptr, _, ld, stride = operand
    s = dtype.itemsize
    view = _view(ptr, (batch,) + shape, (stride * s, s, ld * s), dtype, _memory["device"])
    if view is None:
        raise SimCublasError(f"{what}: {batch} x {shape} from {ptr:#x} (ld {ld}, batch stride {stride}) is not "
                             "inside one device array of this call")
    return view


def _view(ptr, shape, strides, dtype, arrays):
    """An ndarray of ``shape`` at address ``ptr`` inside the memory of one of ``arrays``, or None."""
    for arr in arrays:
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        root = root.view(np.ndarray)
        start = _address(root)
        if start <= ptr < start + root.nbytes:
            try:
                return np.ndarray(shape, dtype, buffer=root, offset=ptr - start, strides=strides)
            except (ValueError, TypeError):
                return None
    return None
