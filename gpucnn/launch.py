"""Numba CUDA kernels: declared at import without touching numba.cuda (:func:`gpu_kernel`,
:func:`gpu_device`), compiled at their first launch, launched on CuPy's stream through one helper
(:func:`launch`: configured launches kept, views of persistent buffers passed as wrappers made once, :func:`bind`),
and counted, timed and recorded there for gpucnn.profile and the launch-resource checks."""
from __future__ import annotations

import collections
import functools
import os
import sys
import time
import warnings
import weakref

import numpy as np

from . import backend as _backend
from . import capture as _capture
from . import memory as _memory
from .backend import DeviceError, device, is_cupy, numba_cuda_sim_active, on_gpu


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
    if not _timers or _capture._capturing:
        return fn(*args, **(kwargs or {}))
    start = _mark()
    out = fn(*args, **(kwargs or {}))
    end = _mark()
    for t in _timers:
        t.add_time(family, name, start, end)
    return out


def _mark():
    if _backend._device == "cuda":
        e = _backend._cupy.cuda.Event()
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
        self._configured = {}       # (argument types, grid, block, shared bytes, stream) -> its configured launch

    def compiled(self):
        if self._jitted is None:
            numba_cuda = _backend._numba_cuda or _backend._import_numba_cuda(simulate=device() == "sim")
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
            numba_cuda = _backend._numba_cuda or _backend._import_numba_cuda(simulate=device() == "sim")
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
        s = _streams[ptr] = _backend._numba_cuda.external_stream(ptr)
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
    checked in CI on recorded launches instead; a user's own kernels keep their warnings). An array that is a
    view of a buffer declared persistent (:func:`bind`: a step's planned workspace, the flat parameters) is
    passed as a device-array wrapper made at its first launch, so Numba no longer converts it at every launch.
    On "sim" the same caches are kept and Numba's simulator runs the kernel.

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
    gpu = is_cupy(args[0]) if args else False
    stream = _capture.current_stream(args[0] if gpu else None)
    key = (tuple(_arg_key(a) for a in args), blocks, threads, shared_bytes, stream)
    keep = BIND or gpu                  # (before binding, "sim" configured at every launch)
    conf = kernel._configured.get(key) if keep else None
    if conf is None:
        conf = (_configure if gpu else _configure_sim)(kernel, jitted, args, blocks, threads, stream, shared_bytes)
        if keep:
            kernel._configured[key] = conf
        _count_host("configured")
    args = _arguments(kernel, args, gpu)
    if gpu:
        timed(kernel.family, kernel.name, conf, args)
    else:
        timed(kernel.family, kernel.name, _capture.enqueue, (lambda: conf(*args),))


# ----------------------------------------------------------------------------------------------
# arguments: a persistent buffer's views wrapped once (bind), everything else converted at each launch

BIND = True     # False: no wrapper is kept and "sim" configures at every launch: the launch path before binding,
                # what tests/test_launch.py and bench/host.py compare with

_wrapped = {}   # (address, shape, strides, dtype) of a view of a bound buffer -> its device-array wrapper
_bindings = {}  # id(owner) -> [_Bound, ...]: the buffers bind() declared persistent for that owner


class _Bound:
    """One persistent buffer (held, so its memory cannot go to another array while it is bound), the bytes it
    covers, and the keys of the wrappers made for its views."""

    __slots__ = ("array", "lo", "hi", "keys")

    def __init__(self, array):
        self.array = array
        self.lo, self.hi = _memory._span(array)
        self.keys = []

    def drop(self):
        for key in self.keys:
            _wrapped.pop(key, None)
        self.keys = []


def bind(owner, *arrays):
    """Declare ``arrays`` (device buffers: a planned workspace's block, the flat parameters, an optimizer's state)
    persistent while ``owner`` lives, until the next ``bind(owner, ...)``: a launch that passes a view of one of
    them passes a device-array wrapper made at its first launch and kept (on "cuda" ``cuda.as_cuda_array``, so
    Numba no longer types and exports that argument by DLPack at every launch; on "sim" the simulator's array over
    the same memory). Buffers bound again keep their wrappers; the others' wrappers are dropped. A wrapper holds
    its memory, so it never points at freed memory; binding only decides which arrays get one."""
    arrays = [a for a in arrays if a is not None and getattr(a, "size", 0) and on_gpu(a)]
    old = _bindings.get(id(owner))
    if old is None:
        if not arrays:
            return
        weakref.finalize(owner, _unbind, id(owner))
        old = []
    elif len(old) == len(arrays) and all(b.array is a for b, a in zip(old, arrays)):
        return
    kept = {id(b.array): b for b in old}
    new = [kept.pop(id(a), None) or _Bound(a) for a in arrays]
    for b in kept.values():
        b.drop()
    _bindings[id(owner)] = new


def _unbind(key):
    for b in _bindings.pop(key, ()):
        b.drop()


def _bound_at(address):
    """The bound buffer whose bytes include ``address``, or None."""
    for bounds in _bindings.values():
        for b in bounds:
            if b.lo <= address < b.hi:
                return b
    return None


def _arguments(kernel, args, gpu: bool) -> tuple:
    """What a launch passes for ``args``: a view of a bound buffer as its wrapper (made at its first launch, then
    found by address, shape, strides and dtype); any other array as the device converts it at every launch
    (Numba exports a CuPy array by DLPack; the simulator copies a NumPy array in and back out)."""
    address, wrap, plain = (_cupy_address, _wrap_cuda, _as_is) if gpu else (_memory._address, _wrap_sim, _plain_sim)
    out = []
    for a in args:
        if getattr(a, "ndim", 0) == 0:
            out.append(plain(kernel, a))
            continue
        w = None
        if BIND:
            key = (address(a), a.shape, a.strides, a.dtype)
            w = _wrapped.get(key)
            if w is None:
                b = _bound_at(key[0])
                if b is not None:
                    w = _wrapped[key] = wrap(kernel, a)
                    b.keys.append(key)
                    _count_host("wrapped")
        if w is None:
            w = plain(kernel, a)
            _count_host("converted")
        out.append(w)
    return tuple(out)


def _count_host(kind):
    for c in _counters:
        c.count_host(kind)


def _as_is(kernel, a):
    return a


def _cupy_address(a):
    return a.data.ptr


def _wrap_cuda(kernel, a):
    # sync=False: no wait on the stream the array names (our kernels run on CuPy's current stream). It allocates
    # nothing and calls no CUDA API that a graph capture refuses.
    return _backend._numba_cuda.as_cuda_array(a, sync=False)


def _plain_sim(kernel, a):
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:     # the simulator rejects them; say so plainly
        raise ValueError(f"{kernel!r}: arrays passed to GPU kernels must be C-contiguous")
    return _capture._plain(a)


_FakeCUDAArray = None


def _wrap_sim(kernel, a):
    """The simulator's device array over ``a``'s own memory (an unbound argument is copied in and out instead)."""
    global _FakeCUDAArray
    if _FakeCUDAArray is None:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray
    return _FakeCUDAArray(_plain_sim(kernel, a))


# ----------------------------------------------------------------------------------------------
# configured launches: made once per kernel, argument types, grid, block, stream and shared memory


def _simulate(jitted, config, *args):
    # The simulator runs each CUDA thread as a Python thread and polls them; with Python's default
    # 5 ms GIL switch interval every syncthreads costs milliseconds. A short interval, while it runs,
    # makes the sim suite several times faster and changes nothing else.
    old = sys.getswitchinterval()
    sys.setswitchinterval(_SIM_SWITCH_INTERVAL)
    try:
        jitted[config](*args)
    finally:
        sys.setswitchinterval(old)


def _configure_sim(kernel, jitted, args, blocks, threads, stream, shared_bytes):
    """"sim"'s configured launch. The simulator's kernel holds one configuration at a time, so each call sets it
    (attribute writes, no checks) and runs the kernel."""
    return functools.partial(_simulate, jitted, (blocks, threads, 0, shared_bytes))


def _configure(kernel, jitted, args, blocks, threads, stream, shared_bytes):
    """The configured launch of ``kernel`` for these argument types and this grid on CuPy's stream ``stream``
    ("cuda"), checked once."""
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
        return spec[blocks, threads, _numba_stream(stream), shared_bytes]
