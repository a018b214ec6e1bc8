"""Which device runs an op, the arrays it runs on, and every name a kernel module imports from the backend.

gpucnn has three devices with one behaviour:

* ``"cpu"``  - NumPy arrays, vectorised NumPy code (the reference).
* ``"cuda"`` - CuPy arrays, Numba ``@cuda.jit`` kernels on CuPy's stream, CuPy ElementwiseKernels, cuBLAS.
* ``"sim"``  - NumPy arrays run through the *GPU* code: Numba's CUDA simulator for the Numba kernels and
  each ElementwiseKernel's own C source compiled for the host (see :mod:`gpucnn.elementwise`).

The one decision every op makes is :func:`on_gpu`: a CuPy array takes the GPU path; a NumPy array takes
it only while "sim" is selected. Nothing here imports CuPy or ``numba.cuda`` until a GPU device is used,
so ``import gpucnn`` works on a laptop with no CUDA at all.

The rest of the backend lives beside this file, and its public names are re-exported here (kernels import
them from ``gpucnn.backend``): :mod:`gpucnn.memory` (a step's workspace, release, out-of-memory errors),
:mod:`gpucnn.capture` (CUDA graphs, and their rules enforced on "sim"), :mod:`gpucnn.launch` (Numba kernels:
declared, compiled lazily, launched, recorded) and :mod:`gpucnn.blas` (the GEMM and its precision).
"""
from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import sys
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
    from numba import cuda as numba_cuda
    if not simulate:
        # Numba would otherwise synchronise the stream a CuPy array names (CUDA array interface v3) at every
        # launch: a wait per kernel, and forbidden while a CUDA graph is captured. Our kernels run on CuPy's
        # current stream, so stream order already makes them safe.
        for mod in ("numba.cuda.core.config", "numba.core.config"):
            cfg = sys.modules.get(mod)
            if cfg is not None and hasattr(cfg, "CUDA_ARRAY_INTERFACE_SYNC"):
                cfg.CUDA_ARRAY_INTERFACE_SYNC = False
    _numba_cuda = numba_cuda
    return numba_cuda


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
    return _capture._captured_numpy if _capture._sim_ops is not None and isinstance(a, _capture.CapturedArray) else np


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
    if _capture._sim_ops is not None:
        raise _capture.CaptureError(_capture.D2H_IN_CAPTURE)
    return np.asarray(a)


def synchronize():
    """Wait for the work queued on the device ("cuda"; nothing to wait for on "cpu" and "sim"). While a graph
    is captured CUDA refuses it: "sim" raises CUDA's error, as CuPy does on "cuda"."""
    if _capture._sim_ops is not None:
        raise _capture.CaptureError(_capture.SYNC_IN_CAPTURE)
    if _device == "cuda":
        _cupy.cuda.get_current_stream().synchronize()


def empty(shape, dtype, like):
    """An uninitialised array on the same device as ``like`` (counted by :func:`gpucnn.profile`); inside
    :func:`workspace`, the arena's buffer for this request when it fits."""
    if _memory._arena is not None:
        return _memory._arena.take(shape, dtype, like)
    _capture.refuse_allocation(shape, dtype, "by backend.empty outside a workspace")
    _allocating(shape, dtype, like)
    return xp(like).empty(shape, dtype=dtype)


def zeros(shape, dtype, like):
    """A zero-filled array on the same device as ``like`` (counted by :func:`gpucnn.profile`)."""
    if _memory._arena is not None:
        a = _memory._arena.take(shape, dtype, like)
        a.fill(0)
        return a
    _capture.refuse_allocation(shape, dtype, "by backend.zeros outside a workspace")
    _allocating(shape, dtype, like)
    return xp(like).zeros(shape, dtype=dtype)


def persistent_empty(shape, dtype, like):
    """An array that outlives a training step (a layer's own small buffer), never taken from a workspace."""
    _capture.refuse_allocation(shape, dtype, "by backend.persistent_empty (make it before the capture)")
    _allocating(shape, dtype, like)
    return xp(like).empty(shape, dtype=dtype)


def _allocating(shape, dtype, like, depth=3):
    """Every device array the backend allocates is announced here first: gpucnn.profile counts it on "sim" (on
    "cuda" its CuPy memory hook sees every allocation already), and on "sim" the emulated memory limit may refuse it."""
    if (_memory.SIM_DEVICE_MEMORY is None and not _counters) or is_cupy(like) or not on_gpu(like):
        return
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if _memory.SIM_DEVICE_MEMORY is not None and nbytes > _memory.SIM_DEVICE_MEMORY:
        raise _memory.OutOfMemoryError(nbytes)
    if _counters:
        from .profile import _family_of_caller
        for c in _counters:
            c.count_alloc(_family_of_caller(depth), nbytes)



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
        if not _capture._capturing:
            dst.set(host, stream=_cupy.cuda.get_current_stream())
            # CUDA stages a copy from pageable memory before returning; keeping the last few host arrays
            # alive anyway costs nothing and leaves no doubt about what an in-flight copy reads
            _in_flight.append(host)
    elif not _capture._capturing:
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
# the rest of the backend, under the names kernel modules import (see the module docstring)

from . import capture as _capture, memory as _memory  # noqa: E402  (first: the others import them)
from .blas import PRECISIONS, count_gemm, matmul, precision, set_precision, to_tf32  # noqa: E402,F401
from .capture import (CaptureError, CapturedArray, D2H_IN_CAPTURE, SYNC_IN_CAPTURE,  # noqa: E402,F401
                      capture_graph, capturing, enqueue)
from .launch import (GPUDevice, GPUKernel, LaunchError, LaunchRecord, bind, bind_globals, cuda,  # noqa: E402,F401
                     gpu_device, gpu_kernel, launch, sim_sized, skipping_work, timed)
from .launch import _counters, _launch_logs, _timers  # noqa: E402,F401  (lists gpucnn.profile fills)
from .memory import (Arena, DeviceMemoryError, OutOfMemoryError, device_memory_errors,  # noqa: E402,F401
                     in_workspace, no_workspace, release, workspace)
from .memory import _address, _plan  # noqa: E402,F401
