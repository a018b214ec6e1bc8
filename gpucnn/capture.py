"""CUDA graphs: a training step captured once per batch shape and replayed (see gpucnn.model).

"sim" captures too, and refuses what CUDA and CuPy refuse while capturing, in their words, so that a step that
cannot be captured on a GPU cannot be captured on "sim" either: a read on the host, a sync, an allocation
outside the step's workspace, cuBLAS through CuPy (gpucnn.blas's "cupy" provider; its "nvmath" provider's cuBLAS
calls are checked against cuBLAS's own capture rules in gpucnn.simblas). Device work queued meanwhile is
recorded (:func:`enqueue`) and replayed by the graph."""
from __future__ import annotations

import numpy as np

from . import backend as _backend
from .backend import is_cupy, synchronize


_capturing = False      # True while a graph is being captured ("cuda" or "sim")
_sim_ops = None         # while "sim" captures: the device work the step queued (closures), in stream order

# CuPy 14.2's and CUDA's messages (cuBLAS: cupy_backends/cuda/libs/cublas.pyx, setStream; D2H: cupy/cuda/memory.pyx,
# MemoryPointer.copy_to_host_async, which ndarray.get and so float(), bool(), item() ... reach; sync: CUDA's
# cudaErrorStreamCaptureUnsupported as CuPy's CUDARuntimeError words it)
CUBLAS_IN_CAPTURE = "calling cuBLAS API during stream capture is currently unsupported"
D2H_IN_CAPTURE = "the current stream is capturing, so D2H transfers are disallowed"
SYNC_IN_CAPTURE = "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing"
_sim_stream = 0         # "sim": the stream a capture records (a new number per capture, as "cuda" makes a new stream)
_sim_streams = 0


class CaptureError(RuntimeError):
    """An operation a graph capture refuses (a host read, a sync, an allocation outside the step's workspace),
    raised on "sim" with the words CuPy or CUDA use on "cuda"."""


def capturing() -> bool:
    """True while a training step is being captured as a graph."""
    return _capturing


def refuse_allocation(shape, dtype, how):
    if _capturing:
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raise CaptureError(
            f"allocating {nbytes:,} bytes ({np.dtype(dtype).name}{shape}) {how} while a graph is captured: on a GPU "
            "that is a cudaMalloc the graph keeps a pointer to after the memory is reused. Everything a captured "
            "step writes must come from its workspace (backend.empty/zeros inside the step) or exist before it")


def _host_read(name):
    """ndarray's method ``name`` (a read on the host), refused while a graph is captured on "sim", as CuPy does."""
    def read(self, *args, **kwargs):
        if _sim_ops is not None:
            raise CaptureError(D2H_IN_CAPTURE)
        return getattr(np.ndarray, name)(self, *args, **kwargs)
    read.__name__ = name
    return read


class CapturedArray(np.ndarray):
    """A device array of a step being captured on "sim" (a workspace buffer, a batch input, or a view of one).

    As on a GPU while capturing: reading it on the host (bool, float, int, index, item, tolist, to_numpy)
    raises CuPy's error; a write to it (a ufunc with ``out=``, fill, item assignment, copyto) is recorded for
    the graph's launches, not run; a new array made from it (a ufunc without ``out=``, copy, astype, fancy
    indexing, ...) is an allocation outside the workspace and raises. Views of it stay CapturedArrays, and an
    integer index gives a 0-d view (a 0-d CuPy array), not a host number. Outside a capture it is an ndarray.
    """

    def __array_finalize__(self, obj):
        # legitimate: a view of a CapturedArray, or _captured's view of a plain buffer; anything else is new memory
        if _sim_ops is not None and obj is not None and not isinstance(self.base, CapturedArray) \
                and not (self.base is obj and not isinstance(obj, CapturedArray)):
            refuse_allocation(self.shape, self.dtype, "by a NumPy operation on a device array")

    __bool__, __float__, __int__, __index__, __complex__, item, tolist = map(
        _host_read, ("__bool__", "__float__", "__int__", "__index__", "__complex__", "item", "tolist"))

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        inputs = [_plain(a) for a in inputs]
        kwargs = {k: _plain(v) for k, v in kwargs.items()}
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        if _sim_ops is None:
            return getattr(ufunc, method)(*inputs, **kwargs)
        if method != "at" and (out is None or any(o is None for o in out)):
            what = ufunc.__name__ + ("" if method == "__call__" else f".{method}")
            raise CaptureError(f"numpy.{what} without out= on a device array while a graph is captured: a new "
                               "array outside the step's workspace (on a GPU an allocation the graph cannot keep)")
        _sim_ops.append(lambda: getattr(ufunc, method)(*inputs, **kwargs))
        return None if out is None else out[0] if len(out) == 1 else out

    def __array_function__(self, func, types, args, kwargs):
        if _sim_ops is not None and func not in _VIEW_FUNCTIONS:
            if func is not np.copyto:
                raise CaptureError(f"numpy.{func.__name__} on a device array while a graph is captured on 'sim': it "
                                   "cannot be recorded for the graph (on a GPU it would allocate or read on the "
                                   "host); write the step with gpucnn's kernels, or ufuncs with out=")
            args, kwargs = [_plain(a) for a in args], {k: _plain(v) for k, v in kwargs.items()}
            _sim_ops.append(lambda: np.copyto(*args, **kwargs))
            return None
        return super().__array_function__(func, types, args, kwargs)

    def fill(self, value):
        if _sim_ops is None:
            return np.ndarray.fill(self, value)
        plain = _plain(self)
        _sim_ops.append(lambda: plain.fill(value))

    def __setitem__(self, key, value):
        if _sim_ops is None:
            return np.ndarray.__setitem__(self, key, value)
        plain, key, value = _plain(self), _plain(key), _plain(value)
        _sim_ops.append(lambda: plain.__setitem__(key, value))

    def __getitem__(self, key):
        a = np.ndarray.__getitem__(self, key)
        if _sim_ops is not None and not isinstance(a, np.ndarray):     # a number: stay a 0-d device array
            a = np.ndarray.__getitem__(self, (key if isinstance(key, tuple) else (key,)) + (Ellipsis,))
        return a

    def __iter__(self):
        return (self[i] for i in range(len(self))) if _sim_ops is not None else np.ndarray.__iter__(self)


_VIEW_FUNCTIONS = {np.reshape, np.transpose, np.ravel, np.squeeze, np.expand_dims, np.moveaxis, np.swapaxes,
                   np.shape, np.ndim, np.size, np.broadcast_to, np.may_share_memory, np.shares_memory}


def _captured(a):
    """``a`` (a plain buffer) seen as a CapturedArray: the same memory."""
    return a.view(CapturedArray) if isinstance(a, np.ndarray) and not isinstance(a, CapturedArray) else a


def _plain(a):
    """A CapturedArray seen as a plain ndarray (the same memory); anything else (tuples of them too) as it is."""
    if isinstance(a, CapturedArray):
        return a.view(np.ndarray)
    if isinstance(a, tuple):
        return tuple(_plain(v) for v in a)
    return a


class _CapturedNumPy:
    """numpy as ``xp(a)`` gives it for a CapturedArray: asarray and ascontiguousarray return the array itself when
    it fits (CuPy's would copy otherwise: an allocation, refused); everything else is numpy's."""

    def __getattr__(self, name):
        return getattr(np, name)

    def asarray(self, a, dtype=None):
        if dtype is not None and np.dtype(dtype) != a.dtype:
            refuse_allocation(a.shape, dtype, "by asarray (a conversion)")
        return a

    def ascontiguousarray(self, a, dtype=None):
        if not a.flags.c_contiguous:
            refuse_allocation(a.shape, a.dtype, "by ascontiguousarray (a copy)")
        return self.asarray(a, dtype)


_captured_numpy = _CapturedNumPy()


def current_stream(a=None) -> int:
    """The stream device work on ``a`` is queued on now: CuPy's current stream for a CuPy array; on "sim" the
    capturing stream's number during a capture, else 0 (the legacy default stream)."""
    return int(_backend._cupy.cuda.get_current_stream().ptr) if is_cupy(a) else _sim_stream


def enqueue(fn):
    """Run ``fn`` (device work: a kernel, a GEMM) now, or, while a graph is captured on "sim", record it for the
    graph's launches (on a GPU nothing runs while capturing either)."""
    if _sim_ops is None:
        fn()
    else:
        _sim_ops.append(fn)


class _CudaGraph:
    def __init__(self, graph):
        self.graph = graph

    def launch(self):
        self.graph.launch(stream=_backend._cupy.cuda.get_current_stream())


class _SimGraph:
    """A step captured on "sim": the device work it queued, in order, with the arguments it was captured with (as
    a CUDA graph holds its kernels' arguments): replaying it runs that work again and nothing else."""

    def __init__(self, ops):
        self.ops = ops

    def launch(self):
        for op in self.ops:
            op()


def capture_graph(fn, *inputs):
    """Capture ``fn(*inputs)`` (a training step) as a graph of the device work it queues; nothing runs while
    capturing. "cuda": a CUDA graph (CuPy stream capture); "sim": the same work recorded, the inputs and workspace
    buffers handed out as CapturedArrays, and every rule of the capture enforced (see CapturedArray, matmul,
    synchronize, the workspace). Returns ``(graph, fn's results, None)``, whose ``graph.launch()`` replays the
    step, or ``(None, None, error)`` when the capture failed (the caller then runs the step eagerly).
    gpucnn.profile and record_launches see what runs, so nothing of the capture."""
    from .launch import _counters, _launch_logs
    paused = list(_counters), list(_launch_logs)
    _counters.clear()
    _launch_logs.clear()
    try:
        return _capture_graph(fn, inputs)
    finally:
        _counters.extend(paused[0])
        _launch_logs.extend(paused[1])


def _capture_graph(fn, inputs):
    global _capturing, _sim_ops, _sim_stream, _sim_streams
    graph = result = error = None
    if is_cupy(inputs[0]):
        stream = _backend._cupy.cuda.Stream(non_blocking=True)
        synchronize()                                     # once per batch shape: nothing pending crosses over
        with stream:
            _capturing = True
            stream.begin_capture()
            try:
                result = fn(*inputs)
            except Exception as e:          # noqa: BLE001 - returned: the caller falls back to eager
                error = e
            finally:
                try:
                    graph = stream.end_capture()
                except Exception as e:      # noqa: BLE001
                    error = error or e
                _capturing = False
        if error is None and graph is None:
            error = RuntimeError("the stream capture ended without a graph")
        return (None, None, error) if error is not None else (_CudaGraph(graph), result, None)
    ops = []
    _sim_streams += 1
    _capturing, _sim_ops, _sim_stream = True, ops, 0x5000 + _sim_streams
    try:
        result = fn(*(_captured(a) for a in inputs))
    except Exception as e:                  # noqa: BLE001 - as on "cuda"
        error = e
    finally:
        _capturing, _sim_ops, _sim_stream = False, None, 0
    return (None, None, error) if error is not None else (_SimGraph(ops), _plain(result), None)
