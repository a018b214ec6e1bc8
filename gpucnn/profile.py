"""``gpucnn.profile()``: count what a piece of training costs on the GPU path, per op family.

    with gpucnn.profile() as p:
        model.train_step(x, y, loss, optimizer)
    print(p)                 # a table: family, Numba launches, CuPy launches, cuBLAS calls, bytes allocated
    p.launches               # total kernel launches (each cuBLAS call counts as one)
    p.bytes_allocated        # 0 from a step's second run on: its workspace supplies every buffer
    p.host                   # the host's work per Numba launch: configured launches and argument wrappers
                             # made, arguments converted (0 wrappers and configurations from a step's third run)

    with gpucnn.profile(timing=True) as p:   # and the time of every launch: GPU time on "cuda"
        model.train_step(x, y, loss, optimizer)
    p.milliseconds, p.family_milliseconds(), p.times   # the table adds a column and a per-kernel list

Counts are the same on "cuda" and "sim": every ``backend.launch`` (Numba), every ElementwiseKernel call
(CuPy) and every ``backend.matmul`` (cuBLAS) on the GPU path. Bytes are the device memory gpucnn itself
allocates through ``backend.empty``/``backend.zeros`` and for ElementwiseKernel outputs; on "sim" the
simulator's own copies of kernel arguments do not count. On "cuda" every CuPy allocation made inside the
block is counted too (a CuPy memory hook), so nothing hides there.
"""
from __future__ import annotations

import contextlib
import sys
from collections import defaultdict

from . import backend, launch


class Profile:
    """Launch and allocation counts, per op family."""

    KINDS = ("numba", "cupy", "cublas")
    # what the host makes or converts for a Numba launch (gpucnn.launch): a configured launch (per kernel, argument
    # types, grid, stream, shared memory), a wrapper for a view of a bound buffer, an argument converted at launch
    HOST = ("configured", "wrapped", "converted")

    def __init__(self, timing: bool = False):
        self.counts = defaultdict(lambda: dict.fromkeys(self.KINDS + ("bytes", "allocs"), 0))
        self.host = dict.fromkeys(self.HOST, 0)
        self.timing = timing
        self._marks = []            # (family, kernel, start, end): CUDA events or host clock readings
        self.times = {}             # (family, kernel) -> [milliseconds per launch], once the block ends

    def add_time(self, family: str, kernel: str, start, end):
        self._marks.append((family, kernel, start, end))

    def _resolve(self):
        """Turn the recorded marks into milliseconds (on "cuda": waits for the last event once)."""
        if self._marks and not isinstance(self._marks[-1][3], float):
            self._marks[-1][3].synchronize()
        for family, kernel, start, end in self._marks:
            if isinstance(start, float):
                ms = (end - start) * 1e3
            else:
                import cupy
                ms = cupy.cuda.get_elapsed_time(start, end)
            self.times.setdefault((family, kernel), []).append(ms)
        self._marks = []

    @property
    def milliseconds(self) -> float:
        """Time inside the timed launches (profile(timing=True)): GPU time on "cuda", host time on "sim"."""
        return sum(sum(v) for v in self.times.values())

    def family_milliseconds(self) -> dict:
        out = defaultdict(float)
        for (family, _), v in self.times.items():
            out[family] += sum(v)
        return dict(out)

    def count_launch(self, family: str, kind: str):
        self.counts[family][kind] += 1

    def count_host(self, kind: str):
        self.host[kind] += 1

    def count_alloc(self, family: str, nbytes: int):
        self.counts[family]["bytes"] += int(nbytes)
        self.counts[family]["allocs"] += 1

    @property
    def launches(self) -> int:
        return sum(c[k] for c in self.counts.values() for k in self.KINDS)

    @property
    def bytes_allocated(self) -> int:
        return sum(c["bytes"] for c in self.counts.values())

    def by_family(self) -> dict:
        return {f: dict(c) for f, c in sorted(self.counts.items())}

    def __str__(self):
        timed = self.timing
        fam_ms = self.family_milliseconds()
        rows = ["| family | Numba | CuPy | cuBLAS | launches | allocations | bytes |" + (" ms |" if timed else ""),
                "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if timed else "")]
        for f, c in sorted(self.counts.items()):
            n = sum(c[k] for k in self.KINDS)
            rows.append(f"| {f} | {c['numba']} | {c['cupy']} | {c['cublas']} | {n} | {c['allocs']} | {c['bytes']:,} |"
                        + (f" {fam_ms.get(f, 0.0):.3f} |" if timed else ""))
        rows.append(f"| **total** | | | | **{self.launches}** | | **{self.bytes_allocated:,}** |"
                    + (f" **{self.milliseconds:.3f}** |" if timed else ""))
        h = self.host
        rows.append(f"\nNumba launches' host work: {h['configured']} configured launches made, {h['wrapped']} "
                    f"argument wrappers made, {h['converted']} array arguments converted at launch")
        if timed and self.times:
            rows += ["", "| kernel | launches | ms | share |", "|---|---:|---:|---:|"]
            total = max(self.milliseconds, 1e-12)
            for (f, k), v in sorted(self.times.items(), key=lambda kv: -sum(kv[1])):
                rows.append(f"| {f}.{k} | {len(v)} | {sum(v):.3f} | {sum(v) / total:.0%} |")
        return "\n".join(rows)


def _family_of_caller(depth: int = 2) -> str:
    """The op family of the first gpucnn.kernels module on the stack (where an allocation comes from)."""
    f = sys._getframe(depth)
    while f is not None:
        name = f.f_globals.get("__name__", "")
        if name.startswith("gpucnn.kernels."):
            return name.rsplit(".", 1)[-1]
        f = f.f_back
    return "other"


def _cupy_alloc_hook(prof):
    """A CuPy memory hook that counts every memory-pool request inside a profile() block ("cuda")."""
    from cupy.cuda import memory_hook

    class Hook(memory_hook.MemoryHook):
        name = "gpucnn-profile"

        def malloc_preprocess(self, **kw):
            prof.count_alloc(_family_of_caller(3), kw["mem_size"])

    return Hook()


@contextlib.contextmanager
def profile(print_table: bool = False, timing: bool = False):
    """Count kernel launches and allocations per op family inside the block (on "cuda" and "sim").

    ``timing``: also time every launch (CUDA events around each on "cuda": the GPU time per op family and per
    kernel, without ncu; the host clock on "sim", the simulator's own time), read when the block ends. Events
    around every launch cost a little: time a step apart from the steps whose wall clock you measure."""
    p = Profile(timing)
    backend._counters.append(p)
    if timing:
        backend._timers.append(p)
    hook = None
    if backend.device() == "cuda":
        hook = _cupy_alloc_hook(p)
        hook.__enter__()
    try:
        yield p
    finally:
        if hook is not None:
            hook.__exit__(None, None, None)
        backend._counters.remove(p)
        if timing:
            backend._timers.remove(p)
            p._resolve()
        if print_table:
            print(p)


@contextlib.contextmanager
def shapes_only(cuda_shapes: bool = False):
    """Inside this block the GPU code path ("sim") requests and releases every buffer as usual but computes
    nothing: Numba launches, host-built ElementwiseKernels and GEMMs are skipped (their outputs allocated
    and left unwritten). Launches are still counted by :func:`profile` and recorded by
    :func:`record_launches`. A step's workspace plan depends only on shapes and lifetimes, so this predicts a
    GPU's memory in seconds (bench/memory.py). ``cuda_shapes``: size grids and blocks as "cuda" would,
    not as small as the simulator prefers (what the launch-resource checks read)."""
    if backend.device() == "cuda":
        raise backend.DeviceError("shapes_only: runs the GPU code path on 'sim' only (on 'cuda' the work is real)")
    old = launch._skip_work, launch._cuda_shapes
    launch._skip_work, launch._cuda_shapes = True, bool(cuda_shapes)
    try:
        yield
    finally:
        launch._skip_work, launch._cuda_shapes = old


@contextlib.contextmanager
def record_launches():
    """Collect every Numba launch made inside the block as a :class:`gpucnn.backend.LaunchRecord` (kernel,
    grid, block, shared memory, argument types, largest array); yields the list it fills."""
    log = []
    backend._launch_logs.append(log)
    try:
        yield log
    finally:
        backend._launch_logs.remove(log)
