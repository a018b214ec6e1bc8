"""Which device runs an op, and the two ways a GPU kernel is launched.

gpucnn has three devices with one behaviour:

* ``"cpu"``  - NumPy arrays, vectorised NumPy code (the reference).
* ``"cuda"`` - CuPy arrays, Numba ``@cuda.jit`` kernels on CuPy's stream, CuPy ElementwiseKernels, cuBLAS.
* ``"sim"``  - NumPy arrays run through the *GPU* code: Numba's CUDA simulator for the Numba kernels and
  each ElementwiseKernel's own C source compiled for the host (see :mod:`gpucnn.elementwise`).

The one decision every op makes is :func:`on_gpu`: a CuPy array takes the GPU path; a NumPy array takes
it only while "sim" is selected. Nothing here imports CuPy or ``numba.cuda`` until a GPU device is used,
so ``import gpucnn`` works on a laptop with no CUDA at all.
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import sys
import time
import warnings

import numpy as np

DEVICES = ("cpu", "cuda", "sim")

_device = None          # resolved lazily: "cpu" | "cuda" | "sim"
_numba_cuda = None      # the numba.cuda module once a GPU device is in use
_cupy = None
_rng = np.random.default_rng(0)


class DeviceError(RuntimeError):
    """A device was asked for that cannot be used here; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# choosing the device


def _cuda_problem():
    """Why "cuda" cannot be used here (a sentence), or None when CuPy sees a usable GPU."""
    if importlib.util.find_spec("cupy") is None:
        return ("CuPy is not installed. Install gpucnn with the extra matching your driver's CUDA "
                "version (`nvidia-smi` shows it): pip install 'gpucnn[cuda12]' or 'gpucnn[cuda13]'")
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, wrong CUDA major version, ...
        return f"CuPy is installed but cannot reach a CUDA device ({type(e).__name__}: {e})"
    if n < 1:
        return "CuPy found no CUDA device"
    return None


def _import_numba_cuda(simulate: bool):
    """Import numba.cuda once, as the simulator or the real thing; the choice is per process."""
    global _numba_cuda
    import numba
    already = "numba.cuda" in sys.modules
    if already:
        simulated = bool(numba.config.ENABLE_CUDASIM)
        if simulated != simulate:
            have, want = ("sim", "cuda") if simulated else ("cuda", "sim")
            raise DeviceError(
                f"numba.cuda was already imported as {'the simulator' if simulated else 'the real CUDA target'} "
                f"in this process, so gpucnn cannot use {want!r}: Numba picks simulator or GPU once per "
                f"process. Run {want!r} in a separate process (e.g. GPUCNN_DEVICE={want} python ...).")
    elif simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
        numba.config.ENABLE_CUDASIM = 1
    else:
        os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")   # see below
    from numba import cuda
    if not simulate:
        # Numba would otherwise synchronise the stream a CuPy array names (CUDA array interface v3) at every
        # launch: a wait per kernel, and forbidden while a CUDA graph is captured. Our kernels run on CuPy's
        # current stream, so stream order already makes them safe.
        for mod in ("numba.cuda.core.config", "numba.core.config"):
            cfg = sys.modules.get(mod)
            if cfg is not None and hasattr(cfg, "CUDA_ARRAY_INTERFACE_SYNC"):
                cfg.CUDA_ARRAY_INTERFACE_SYNC = False
    _numba_cuda = cuda
    return cuda


def use_device(name: str) -> str:
    """Select the device ("cpu", "cuda" or "sim") for arrays made from now on; returns it."""
    global _device, _cupy
    if name not in DEVICES:
        raise ValueError(f"use_device: expected one of {DEVICES}, got {name!r}")
    if {_device, name} == {"sim", "cuda"}:
        raise DeviceError(f"use_device({name!r}): this process already uses {_device!r}; "
                          "'sim' and 'cuda' cannot share a process (Numba picks one at import)")
    if name == "cuda":
        why = _cuda_problem()
        if why:
            raise DeviceError(f"use_device('cuda'): {why}")
        if numba_cuda_sim_active():
            raise DeviceError("use_device('cuda'): this process already runs Numba's CUDA simulator ('sim'); "
                              "use 'cuda' in a separate process")
        import cupy
        _cupy = cupy
    elif name == "sim":
        _import_numba_cuda(simulate=True)
    _device = name
    return name


def numba_cuda_sim_active() -> bool:
    return "numba.cuda" in sys.modules and bool(sys.modules["numba"].config.ENABLE_CUDASIM)


def device() -> str:
    """The device in use. First call: $GPUCNN_DEVICE, else "cuda" where CuPy finds a GPU, else "cpu"."""
    if _device is None:
        want = os.environ.get("GPUCNN_DEVICE", "").strip().lower()
        if want:
            use_device(want)
        elif _cuda_problem() is None:
            try:
                use_device("cuda")
            except DeviceError as e:
                warnings.warn(f"gpucnn: falling back to the CPU: {e}", stacklevel=2)
                use_device("cpu")
        else:
            if importlib.util.find_spec("cupy") is not None:
                warnings.warn(f"gpucnn: falling back to the CPU: {_cuda_problem()}", stacklevel=2)
            use_device("cpu")
    return _device


# ----------------------------------------------------------------------------------------------
# arrays


def is_cupy(a) -> bool:
    if type(a) is np.ndarray:       # the common case on "cpu" and "sim", checked first (it is asked often)
        return False
    return type(a).__module__.startswith("cupy")


def on_gpu(a) -> bool:
    """True when an op on ``a`` takes the GPU code path: a CuPy array, or a NumPy array under "sim"."""
    if is_cupy(a):
        return True
    return device() == "sim" and not _cpu_forced


_cpu_forced = False


@contextlib.contextmanager
def cpu_path():
    """Within this block NumPy arrays take the CPU path even under "sim" (the reference in sim tests)."""
    global _cpu_forced
    old, _cpu_forced = _cpu_forced, True
    try:
        yield
    finally:
        _cpu_forced = old


def xp(a):
    """The array module of ``a``: cupy for CuPy arrays, numpy otherwise (the Chainer idiom); for an array of a
    step being captured on "sim", numpy whose asarray/ascontiguousarray keep it a CapturedArray."""
    if is_cupy(a):
        return _cupy
    return _captured_numpy if _sim_ops is not None and isinstance(a, CapturedArray) else np


def asarray(a, dtype=None, device_=None):
    """Put ``a`` on the current device, or on ``device_`` when given (CuPy on "cuda", NumPy on
    "cpu"/"sim"), C-contiguous."""
    if (device_ or device()) == "cuda":
        if _cupy is None:
            use_device("cuda")  # says exactly what is missing where there is no usable GPU
        return _cupy.ascontiguousarray(_cupy.asarray(a, dtype=dtype))
    if is_cupy(a):
        a = a.get()
    return np.ascontiguousarray(a, dtype=dtype)


def to_numpy(a):
    """Bring an array back to the host as a NumPy array (a no-op for NumPy arrays). While a graph is captured
    on "sim" this is the device-to-host copy CuPy refuses then."""
    if is_cupy(a):
        return a.get()
    if _sim_ops is not None:
        raise CaptureError(D2H_IN_CAPTURE)
    return np.asarray(a)


def synchronize():
    """Wait for the work queued on the device ("cuda"; nothing to wait for on "cpu" and "sim"). While a graph
    is captured CUDA refuses it: "sim" raises CUDA's error, as CuPy does on "cuda"."""
    if _sim_ops is not None:
        raise CaptureError(SYNC_IN_CAPTURE)
    if _device == "cuda":
        _cupy.cuda.get_current_stream().synchronize()


def empty(shape, dtype, like):
    """An uninitialised array on the same device as ``like`` (counted by :func:`gpucnn.profile`); inside
    :func:`workspace`, the arena's buffer for this request when it fits."""
    if _arena is not None:
        return _arena.take(shape, dtype, like)
    _refuse_allocation_in_capture(shape, dtype, "by backend.empty outside a workspace")
    _allocating(shape, dtype, like)
    return xp(like).empty(shape, dtype=dtype)


def zeros(shape, dtype, like):
    """A zero-filled array on the same device as ``like`` (counted by :func:`gpucnn.profile`)."""
    if _arena is not None:
        a = _arena.take(shape, dtype, like)
        a.fill(0)
        return a
    _refuse_allocation_in_capture(shape, dtype, "by backend.zeros outside a workspace")
    _allocating(shape, dtype, like)
    return xp(like).zeros(shape, dtype=dtype)


def persistent_empty(shape, dtype, like):
    """An array that outlives a training step (a layer's own small buffer), never taken from a workspace."""
    _refuse_allocation_in_capture(shape, dtype, "by backend.persistent_empty (make it before the capture)")
    _allocating(shape, dtype, like)
    return xp(like).empty(shape, dtype=dtype)


def _allocating(shape, dtype, like, depth=3):
    """Every device array the backend allocates is announced here first: gpucnn.profile counts it on "sim" (on
    "cuda" its CuPy memory hook sees every allocation already), and on "sim" the emulated memory limit may refuse it."""
    if (SIM_DEVICE_MEMORY is None and not _counters) or is_cupy(like) or not on_gpu(like):
        return
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if SIM_DEVICE_MEMORY is not None and nbytes > SIM_DEVICE_MEMORY:
        raise OutOfMemoryError(nbytes)
    if _counters:
        from .profile import _family_of_caller
        for c in _counters:
            c.count_alloc(_family_of_caller(depth), nbytes)


# ----------------------------------------------------------------------------------------------
# running out of device memory

SIM_DEVICE_MEMORY = None    # bytes: on "sim" a larger allocation fails as on a GPU with that much free (tests)


class OutOfMemoryError(MemoryError):
    """"sim"'s stand-in for CuPy's cupy.cuda.memory.OutOfMemoryError (the same message), past SIM_DEVICE_MEMORY."""

    def __init__(self, size: int):
        self._size = size
        super().__init__(f"Out of memory allocating {size:,} bytes")


class DeviceMemoryError(MemoryError):
    """The device ran out of memory in a step; the message names the step, the bytes asked for, what to do."""


@contextlib.contextmanager
def device_memory_errors(where, advice: str):
    """Within this block the allocator's out-of-memory error (CuPy's, or "sim"'s emulated one) becomes a
    DeviceMemoryError saying ``where()`` (the step: a callable, formatted only then), the bytes asked for
    and ``advice``."""
    try:
        yield
    except MemoryError as e:
        if isinstance(e, DeviceMemoryError) or not (isinstance(e, OutOfMemoryError)
                                                    or type(e).__module__.startswith("cupy")):
            raise
        size = getattr(e, "_size", None)
        asked = f" allocating {size:,} bytes" if size else ""
        raise DeviceMemoryError(f"{where()}: the GPU ran out of memory{asked} ({type(e).__name__}: {e}). "
                                f"{advice}") from e


# ----------------------------------------------------------------------------------------------
# workspaces: what a training step allocates, allocated once per batch shape and handed out again


class Arena:
    """The buffers one kind of step allocates, in the order it asks for them, planned to the step's peak.

    Inside ``with workspace(arena):`` the k-th :func:`empty` or :func:`zeros` call gets the arena's k-th
    buffer when its shape, dtype and device match, and allocates (and keeps) a new one otherwise. A step
    that runs the same code on the same shapes therefore allocates nothing from its second run on. What a
    step gets from its arena is overwritten by the next run of that step: callers keep nothing across runs.

    The first run also records each buffer's lifetime: from its request to the :func:`release` that says
    nobody reads it again (an input-gradient GEMM's output once col2im has read it, a layer's im2col matrix
    once its backward is done), or to the step's end. At the end of that run the buffers are laid out in
    one block of memory, greedily, largest first, each at the lowest offset free throughout its lifetime
    (buffers that never live at the same time share memory), so the arena holds the step's peak rather
    than the sum of everything it asked for. Planned only for the GPU path (CuPy arrays, or NumPy under
    "sim"), where the step's code path is fixed. A run that asks for something else drops the plan, and the
    next run records anew on separate buffers: :meth:`release` finds a buffer by its address, which names
    one buffer only while no two share memory.
    """

    ALIGN = 256                 # bytes: every planned buffer starts on a 256-byte boundary (cudaMalloc's)
    PLAN = True                 # False: one separate buffer per request (what tests compare the plan with)

    def __init__(self):
        self.buffers = []
        self.cursor = 0
        self.clock = 0
        self.spans = []         # per request of the recording run: [birth, death or None (the step's end)]
        self.recording = True
        self.slab = None
        self._live = {}         # address of a buffer handed out this run -> its request index
        self.sum_bytes = 0      # what separate buffers would hold (the arena before planning)
        self._dropped = False   # this run left the plan: its buffers share memory, so record in the next one

    def begin(self):
        self.cursor = 0
        self.clock = 0
        self._live = {}

    def take(self, shape, dtype, like):
        shape = tuple(int(s) for s in shape) if not isinstance(shape, (int, np.integer)) else (int(shape),)
        dtype = np.dtype(dtype)
        k = self.cursor
        self.cursor += 1
        a = self.buffers[k] if k < len(self.buffers) else None
        if a is None or a.shape != shape or a.dtype != dtype or is_cupy(a) != is_cupy(like):
            _refuse_allocation_in_capture(shape, dtype, f"by the workspace: request {k} is not in its plan")
            _allocating(shape, dtype, like, depth=4)
            a = xp(like).empty(shape, dtype=dtype)
            if k < len(self.buffers):
                self.buffers[k] = a
            else:
                self.buffers.append(a)
            if not self.recording:              # another code path than the one planned: record it anew
                self.recording = True
                self._dropped = self.slab is not None
        if self.recording:
            del self.spans[k:]
            self.spans.append([self.clock, None])
        self.clock += 1
        if a.size:
            self._live[_address(a)] = k
        return _captured(a) if _sim_ops is not None else a

    def release(self, a):
        """``a`` (a buffer this run handed out, or a view starting where it starts) is read no more this run."""
        k = self._live.pop(_address(a), None) if getattr(a, "size", 0) else None
        if k is None:
            return
        if self.recording and k < len(self.spans):
            self.spans[k][1] = self.clock
        self.clock += 1

    def end(self):
        """After a run: lay the recorded buffers out by lifetime (once per recording)."""
        if self._dropped:                       # recorded among the plan's views: start again on separate buffers
            self.buffers, self.spans, self.slab, self._dropped = [], [], None, False
            return
        if not self.PLAN or not self.recording or self.cursor != len(self.buffers) or not self.buffers:
            return
        if not all(on_gpu(a) for a in self.buffers) or len({is_cupy(a) for a in self.buffers}) != 1:
            return
        sizes = [int(a.nbytes) for a in self.buffers]
        self.sum_bytes = sum(sizes)
        end = self.clock + 1
        spans = [(b, end if d is None else d) for b, d in self.spans]
        offsets, total = _plan(sizes, spans, self.ALIGN)
        _allocating((max(total, 1),), np.uint8, self.buffers[0], depth=2)
        slab = xp(self.buffers[0]).empty(max(total, 1), dtype=np.uint8)
        self.buffers = [slab[o:o + n].view(a.dtype).reshape(a.shape)
                        for a, o, n in zip(self.buffers, offsets, sizes)]
        self.slab = slab
        self.recording = False

    @property
    def nbytes(self) -> int:
        """Device bytes the arena holds: the planned block, or the separate buffers while recording."""
        if self.slab is not None and not self.recording:
            return int(self.slab.nbytes)
        return sum(int(a.nbytes) for a in self.buffers)


def _plan(sizes, spans, align):
    """Offsets for buffers of ``sizes`` bytes alive over ``spans`` [birth, death): largest first, each at the
    lowest aligned offset that no placed buffer alive at the same time covers. Returns (offsets, total)."""
    offsets = [0] * len(sizes)
    placed = []                                         # (offset, end, birth, death)
    for k in sorted(range(len(sizes)), key=lambda k: (-sizes[k], k)):
        b, d = spans[k]
        busy = sorted((o, e) for o, e, pb, pd in placed if pb < d and b < pd)
        off = 0
        for o, e in busy:
            if off + sizes[k] <= o:
                break
            off = max(off, -(-e // align) * align)
        offsets[k] = off
        placed.append((off, off + sizes[k], b, d))
    return offsets, max((o + n for o, n in zip(offsets, sizes)), default=0)


def _address(a) -> int:
    """Where ``a``'s first element lives (device or host)."""
    return int(a.data.ptr) if is_cupy(a) else int(a.__array_interface__["data"][0])


_arena = None


@contextlib.contextmanager
def workspace(arena: Arena):
    """Within this block :func:`empty`/:func:`zeros` hand out ``arena``'s buffers in order (see Arena)."""
    global _arena
    old, _arena = _arena, arena
    arena.begin()
    try:
        yield arena
    finally:
        _arena = old
    arena.end()


def in_workspace() -> bool:
    """True inside :func:`workspace` (a training step): arrays made now are the step's own."""
    return _arena is not None


def release(*arrays):
    """Say that nothing reads these arrays again in this training step, so the workspace may hand their memory
    to a later request (see Arena). Outside a workspace, or for arrays it did not hand out, nothing happens."""
    if _arena is not None:
        for a in arrays:
            if a is not None and hasattr(a, "shape"):
                _arena.release(a)


@contextlib.contextmanager
def no_workspace():
    """Within this block allocations are plain again (for arrays that must outlive the step)."""
    global _arena
    old, _arena = _arena, None
    try:
        yield
    finally:
        _arena = old


# ----------------------------------------------------------------------------------------------
# CUDA graphs: a training step captured once per batch shape and replayed (see gpucnn.model).
# "sim" captures too, and refuses what CUDA and CuPy refuse while capturing, in their words, so that a step
# that cannot be captured on a GPU cannot be captured on "sim" either.

_capturing = False      # True while a graph is being captured ("cuda" or "sim")
_sim_ops = None         # while "sim" captures: the device work the step queued (closures), in stream order

# CuPy 14.2's and CUDA's messages (cuBLAS: cupy_backends/cuda/libs/cublas.pyx, setStream; D2H: cupy/cuda/memory.pyx,
# MemoryPointer.copy_to_host_async, which ndarray.get and so float(), bool(), item() ... reach; sync: CUDA's
# cudaErrorStreamCaptureUnsupported as CuPy's CUDARuntimeError words it)
CUBLAS_IN_CAPTURE = "calling cuBLAS API during stream capture is currently unsupported"
D2H_IN_CAPTURE = "the current stream is capturing, so D2H transfers are disallowed"
SYNC_IN_CAPTURE = "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing"
CUBLAS_CAPTURABLE = False   # CuPy refuses any cuBLAS call in a capture; tests lift it on "sim" to check the rest


class CaptureError(RuntimeError):
    """An operation a graph capture refuses (a host read, a sync, an allocation outside the step's workspace),
    raised on "sim" with the words CuPy or CUDA use on "cuda"."""


def capturing() -> bool:
    """True while a training step is being captured as a graph."""
    return _capturing


def _refuse_allocation_in_capture(shape, dtype, how):
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
            _refuse_allocation_in_capture(self.shape, self.dtype, "by a NumPy operation on a device array")

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
            _refuse_allocation_in_capture(a.shape, dtype, "by asarray (a conversion)")
        return a

    def ascontiguousarray(self, a, dtype=None):
        if not a.flags.c_contiguous:
            _refuse_allocation_in_capture(a.shape, a.dtype, "by ascontiguousarray (a copy)")
        return self.asarray(a, dtype)


_captured_numpy = _CapturedNumPy()


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
        self.graph.launch(stream=_cupy.cuda.get_current_stream())


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
    paused = list(_counters), list(_launch_logs)
    _counters.clear()
    _launch_logs.clear()
    try:
        return _capture_graph(fn, inputs)
    finally:
        _counters.extend(paused[0])
        _launch_logs.extend(paused[1])


def _capture_graph(fn, inputs):
    global _capturing, _sim_ops
    graph = result = error = None
    if is_cupy(inputs[0]):
        stream = _cupy.cuda.Stream(non_blocking=True)
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
    _capturing, _sim_ops = True, ops
    try:
        result = fn(*(_captured(a) for a in inputs))
    except Exception as e:                  # noqa: BLE001 - as on "cuda"
        error = e
    finally:
        _capturing, _sim_ops = False, None
    return (None, None, error) if error is not None else (_SimGraph(ops), _plain(result), None)


def write_scalars(dst, values):
    """Copy host numbers into the small device array ``dst``: the scalars a kernel reads from memory
    rather than as arguments (a learning rate, Adam's step, dropout keys), so that a captured CUDA graph
    reads their current values at every replay.

    On "cuda" an asynchronous copy on the current stream (the host does not wait). While a graph is
    being captured ("cuda" or "sim") the copy is left out (it would be recorded with this step's values):
    whoever replays the graph writes the values before every replay.
    """
    host = np.asarray(values, dtype=dst.dtype).reshape(dst.shape)
    if is_cupy(dst):
        if not _capturing:
            dst.set(host, stream=_cupy.cuda.get_current_stream())
            # CUDA stages a copy from pageable memory before returning; keeping the last few host arrays
            # alive anyway costs nothing and leaves no doubt about what an in-flight copy reads
            _in_flight.append(host)
    elif not _capturing:
        dst[...] = host


_in_flight = collections.deque(maxlen=64)


def scalars(values, dtype, like):
    """A new small device array holding ``values`` (on ``like``'s device), written with write_scalars."""
    values = list(values)
    a = empty((len(values),), dtype, like)
    write_scalars(a, values)
    return a


def reduction_threads(n: int, cap: int = 256) -> int:
    """Threads of a block that reduces ``n`` values: a power of two, at most ``cap``.

    On "sim" every thread of a block that calls syncthreads costs milliseconds, so blocks there stay at
    16 threads at most (the sum is then taken in another order: equal within rounding).
    """
    t = 32                      # a warp at least: a smaller block wastes the rest of its warp
    if sim_sized():
        cap, t = min(cap, 16), 1
    while t < min(n, cap):
        t *= 2
    return t


def seed(n: int) -> None:
    """Seed gpucnn's default random generator (initialisation, shuffling)."""
    global _rng
    _rng = np.random.default_rng(n)


def default_rng() -> np.random.Generator:
    return _rng


# ----------------------------------------------------------------------------------------------
# Numba kernels: declared at import without touching numba.cuda, compiled on first launch


class _CudaPlaceholder:
    """Stands for ``numba.cuda`` in kernel modules until the first GPU kernel is compiled."""

    def __getattr__(self, name):
        raise DeviceError("numba.cuda is used only on the 'cuda' and 'sim' devices; "
                          "call gpucnn.use_device('cuda' or 'sim') first")


cuda = _CudaPlaceholder()

_counters = []          # active gpucnn.profile() counters (see gpucnn.profile)
_timers = []            # active gpucnn.profile(timing=True) profiles


def timed(family, name, fn, args=(), kwargs=None):
    """``fn(*args, **kwargs)``, timed for gpucnn.profile(timing=True) when one is active: CUDA events recorded
    on the current stream around it on "cuda" (read once the profile ends), the host clock on "sim" (the
    simulator's time: a kernel's share of the step, not a GPU's). Nothing is timed while a graph is captured."""
    if not _timers or _capturing:
        return fn(*args, **(kwargs or {}))
    start = _mark()
    out = fn(*args, **(kwargs or {}))
    end = _mark()
    for t in _timers:
        t.add_time(family, name, start, end)
    return out


def _mark():
    if _device == "cuda":
        e = _cupy.cuda.Event()
        e.record()
        return e
    return time.perf_counter()


class GPUKernel:
    """A Numba CUDA kernel written as a plain function, compiled with ``cuda.jit`` at its first launch.

    Compiling late keeps ``import gpucnn`` free of numba.cuda. Before compiling, the function's module
    global ``cuda`` is bound to the real numba.cuda module: the simulator finds kernels' ``cuda`` that way.
    """

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self.family = fn.__module__.rsplit(".", 1)[-1]
        self._jitted = None
        self._specialised = {}      # argument types -> the specialised dispatcher ("cuda")
        self._configured = {}       # (argument types, grid, stream, shared bytes) -> its configured launch

    def compiled(self):
        if self._jitted is None:
            numba_cuda = _numba_cuda or _import_numba_cuda(simulate=device() == "sim")
            bind_globals(self.fn.__globals__, numba_cuda)
            # cache=True: the compiled kernel is kept on disk (beside the module, or in NUMBA_CACHE_DIR), so a
            # second process's first step does not JIT-compile every kernel again (the simulator ignores it)
            self._jitted = numba_cuda.jit(self.fn, cache=not numba_cuda_sim_active())
            _key_cache_on_sources(self._jitted)
        return self._jitted

    def __repr__(self):
        return f"<gpucnn kernel {self.family}.{self.name}>"


def _key_cache_on_sources(dispatcher):
    """Make the disk cache of a compiled kernel know every kernel source file. Numba keys a cached kernel on its own
    bytecode and its own file's timestamp only: a kernel calling a device function of another module (block_sum in
    reduce.py, an activation, a pooling window) would load the old machine code after that module was edited."""
    cache = getattr(dispatcher, "_cache", None)
    index_key = getattr(cache, "_index_key", None)
    if index_key is None:
        return
    digest = _kernel_sources_digest()
    cache._index_key = lambda sig, codegen: (index_key(sig, codegen), digest)


_digest = None


def _kernel_sources_digest() -> str:
    """sha256 of gpucnn/kernels/*.py and this file (read once per process)."""
    global _digest
    if _digest is None:
        import glob
        import hashlib
        here = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256()
        for path in sorted(glob.glob(os.path.join(here, "kernels", "*.py"))) + [os.path.abspath(__file__)]:
            with open(path, "rb") as f:
                h.update(f.read())
        _digest = h.hexdigest()[:16]
    return _digest


def gpu_kernel(fn) -> GPUKernel:
    """Decorator: declare a Numba CUDA kernel (compiled lazily, launched with :func:`launch`)."""
    return GPUKernel(fn)


class GPUDevice:
    """A Numba CUDA device function: code that kernels call (a block's tree sum, an activation's derivative),
    written once. Compiled with ``cuda.jit(device=True)`` when the first kernel naming it is compiled."""

    def __init__(self, fn):
        self.fn = fn
        self.name = fn.__name__
        self._jitted = None

    def compiled(self):
        if self._jitted is None:
            numba_cuda = _numba_cuda or _import_numba_cuda(simulate=device() == "sim")
            # Numba reads the function's globals when it first types a call, not here: set _jitted first,
            # so that device functions of one module naming each other bind without recursion
            self._jitted = numba_cuda.jit(device=True)(self.fn)
            bind_globals(self.fn.__globals__, numba_cuda)
        return self._jitted

    def __repr__(self):
        return f"<gpucnn device function {self.name}>"


def gpu_device(fn) -> GPUDevice:
    """Decorator: declare a Numba CUDA device function (compiled lazily with the kernels that call it)."""
    return GPUDevice(fn)


def bind_globals(namespace: dict, numba_cuda):
    """Make a kernel module's globals compilable: its ``cuda`` becomes numba.cuda (the simulator finds kernels'
    ``cuda`` that way) and every device function it names is compiled and put in its place."""
    namespace["cuda"] = numba_cuda
    for name, value in list(namespace.items()):
        if isinstance(value, GPUDevice):
            namespace[name] = value.compiled()


_streams = {}


def _numba_stream(ptr):
    """Numba's view of CuPy's stream ``ptr`` (the current one), so our kernels queue behind (and graph with)
    CuPy's."""
    s = _streams.get(ptr)
    if s is None:
        s = _streams[ptr] = _numba_cuda.external_stream(ptr)
    return s


def _arg_key(a):
    dt = getattr(a, "dtype", None)
    if dt is not None and getattr(a, "ndim", 0) > 0:
        return (dt.str, a.ndim)
    return type(a)


_SIM_SWITCH_INTERVAL = 1e-4     # seconds; Python's default is 5e-3


class LaunchError(RuntimeError):
    """A kernel launch the GPU would refuse (too many threads for the kernel's registers, ...), said plainly."""


class LaunchRecord(collections.namedtuple("LaunchRecord", "kernel blocks threads shared_bytes signature largest")):
    """One Numba launch as "cuda" makes it: ``kernel`` ("family.name"), the grid (``blocks`` x ``threads``), the
    dynamic shared memory, the argument types (("array", dtype, ndim) or ("scalar", type)) and the element
    count of its largest array argument. :func:`gpucnn.profile.record_launches` collects them."""


def _signature(args):
    sig = []
    for a in args:
        if getattr(a, "ndim", 0) > 0 and hasattr(a, "dtype"):
            sig.append(("array", np.dtype(a.dtype).name, int(a.ndim)))
        elif isinstance(a, (bool, np.bool_)):
            sig.append(("scalar", "bool"))
        elif isinstance(a, int):                    # a Python int (bool is taken above): Numba types it int64
            sig.append(("scalar", "int64"))
        elif isinstance(a, float):
            sig.append(("scalar", "float64"))
        else:
            sig.append(("scalar", np.dtype(getattr(a, "dtype", type(a))).name))
    return tuple(sig)


_launch_logs = []       # lists that record_launches() fills with a LaunchRecord per Numba launch
_skip_work = False      # shapes only: every launch, GEMM and host-built elementwise kernel is skipped
_cuda_shapes = False    # "sim" sizes its launches as "cuda" would (only while the work is skipped)


def sim_sized() -> bool:
    """Whether launches are sized for the simulator (few threads: each is a Python thread): on "sim", unless
    gpucnn.profile.shapes_only(cuda_shapes=True) asks for the grids "cuda" would launch (what the
    launch-resource checks record)."""
    return device() == "sim" and not _cuda_shapes


def skipping_work() -> bool:
    """True inside gpucnn.profile.shapes_only(): buffers are allocated, nothing is computed (values are garbage)."""
    return _skip_work


def launch(kernel: GPUKernel, n: int, *args, threads: int = 128, blocks=None, shared_bytes: int = 0,
           grid_stride: bool = False):
    """Launch ``kernel`` over ``n`` threads (a 1-D grid of ``threads``-wide blocks) on the current stream.

    On "cuda" the configured launch (specialised for these argument types, bound to the stream and the grid)
    is made once and kept, so a launch skips Numba's type dispatch and its checks; making it checks the
    block against the kernel's register budget (a clear LaunchError rather than CUDA's
    LAUNCH_OUT_OF_RESOURCES) and keeps Numba's small-grid occupancy warning to itself (the grid-fill rule is
    checked in CI on recorded launches instead; a user's own kernels keep their warnings). On "sim" Numba's
    simulator runs it.

    ``grid_stride``: the kernel loops ``for i in range(cuda.grid(1), n, cuda.gridsize(1))``, so any grid
    covers the n elements. On "cuda" the grid still has a thread per element (the loop runs once); on
    "sim", where every simulated thread is a Python thread that costs far more than a loop iteration,
    one block of 32 threads does them all.
    """
    if n <= 0:
        return
    sim_grid = blocks is None and grid_stride and sim_sized()
    if blocks is None:
        blocks = (n + threads - 1) // threads           # what "cuda" launches
    if _launch_logs:
        largest = max((int(a.size) for a in args if getattr(a, "ndim", 0) > 0), default=0)
        rec = LaunchRecord(f"{kernel.family}.{kernel.name}", int(blocks), int(threads), int(shared_bytes),
                           _signature(args), largest)
        for log in _launch_logs:
            log.append(rec)
    for c in _counters:
        c.count_launch(kernel.family, "numba")
    if _skip_work:
        return
    if sim_grid:
        threads, blocks = min(threads, 32), 1
    jitted = kernel.compiled()
    if is_cupy(args[0]) if args else False:
        ptr = _cupy.cuda.get_current_stream().ptr
        key = (tuple(_arg_key(a) for a in args), blocks, threads, shared_bytes, ptr)
        conf = kernel._configured.get(key)
        if conf is None:
            conf = kernel._configured[key] = _configure(kernel, jitted, args, blocks, threads, _numba_stream(ptr),
                                                        shared_bytes)
        timed(kernel.family, kernel.name, conf, args)
    else:
        for a in args:  # the simulator rejects non-contiguous arrays; say so plainly
            if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
                raise ValueError(f"{kernel!r}: arrays passed to GPU kernels must be C-contiguous")
        args = tuple(_plain(a) for a in args)
        timed(kernel.family, kernel.name, enqueue, (lambda: _simulate(jitted[blocks, threads, 0, shared_bytes], args),))


def _simulate(configured, args):
    # The simulator runs each CUDA thread as a Python thread and polls them; with Python's default
    # 5 ms GIL switch interval every syncthreads costs milliseconds. A short interval, while it runs,
    # makes the sim suite several times faster and changes nothing else.
    old = sys.getswitchinterval()
    sys.setswitchinterval(_SIM_SWITCH_INTERVAL)
    try:
        configured(*args)
    finally:
        sys.setswitchinterval(old)


def _configure(kernel, jitted, args, blocks, threads, stream, shared_bytes):
    """The configured launch of ``kernel`` for these argument types and this grid ("cuda"), checked once."""
    tkey = tuple(_arg_key(a) for a in args)
    spec = kernel._specialised.get(tkey)
    if spec is None:
        spec = kernel._specialised[tkey] = jitted.specialize(*args)
    most = spec.get_max_threads_per_block()
    if threads > most:
        raise LaunchError(f"{kernel!r}: a block of {threads} threads cannot launch: the kernel uses "
                          f"{spec.get_regs_per_thread()} registers per thread, which allows at most {most} "
                          f"threads per block on this GPU (`gpucnn kernels` lists every kernel's limits)")
    from numba.core.errors import NumbaPerformanceWarning
    with warnings.catch_warnings():
        # Numba warns of grids under 128 blocks at every configuration; gpucnn's launches are checked by the
        # grid-fill rule in CI instead. Only this configuration is silenced: users' kernels keep the warning.
        warnings.simplefilter("ignore", NumbaPerformanceWarning)
        return spec[blocks, threads, stream, shared_bytes]


def matmul(a, b, out=None):
    """The GEMM of every conv and dense layer: cuBLAS through ``cupy.matmul`` on "cuda", BLAS otherwise.

    On "sim" the GEMM is NumPy's: cuBLAS is not our code, so the simulator has nothing of ours to run
    (under ``set_precision("tf32")`` its float32 inputs are first cut to TF32, as the tensor cores read them).
    While a graph is captured on "sim" it raises CuPy's NotImplementedError, as ``cupy.matmul`` does on "cuda"
    (unless CUBLAS_CAPTURABLE), and is recorded into ``out``. Each call counts as one launch in :func:`gpucnn.profile`.
    """
    fam = count_gemm(a)
    if _sim_ops is not None and not CUBLAS_CAPTURABLE:
        raise NotImplementedError(CUBLAS_IN_CAPTURE)
    if _skip_work:
        return _skipped_matmul(a, b, out)
    if is_cupy(a):
        if _applied != _precision:
            _apply_precision()
        return timed(fam, "gemm", _cupy.matmul, (a, b), {"out": out})
    tf32 = _precision == "tf32" and a.dtype == np.float32 and on_gpu(a)
    if _sim_ops is not None:
        if out is None:
            _refuse_allocation_in_capture(a.shape[:-1] + b.shape[-1:], a.dtype, "by matmul without out=")
        a_, b_, out_ = _plain(a), _plain(b), _plain(out)
        enqueue(lambda: np.matmul(*((to_tf32(a_), to_tf32(b_)) if tf32 else (a_, b_)), out=out_))
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
    if (_counters or _timers) and on_gpu(a):
        fam = sys._getframe(2).f_globals.get("__name__", "?").rsplit(".", 1)[-1]
        for c in _counters:
            c.count_launch(fam, "cublas")
        return fam
    return None


# ----------------------------------------------------------------------------------------------
# precision of the GEMMs

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
    if precision == "tf32" and _device == "cuda":
        cc = _compute_capability()
        if cc < (8, 0):
            raise ValueError(f"set_precision('tf32'): this GPU (compute capability {cc[0]}.{cc[1]}) has no TF32 "
                             "tensor cores (they start at 8.0, Ampere); keep 'fp32'")
    old, _precision = _precision, precision
    return old


def _compute_capability() -> tuple:
    """(major, minor) of CuPy's current GPU."""
    cc = str(_cupy.cuda.Device().compute_capability)       # "90" for 9.0
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
