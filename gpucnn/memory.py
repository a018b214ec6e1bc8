"""A training step's device memory: the workspace that hands a step the same buffers every run, laid out
once by their lifetimes (Arena); :func:`release`, by which a buffer's life ends; the poison mode that fills
every buffer with NaN at its end of life; and the out-of-memory errors that name the step and what to do.

Who ends a life: the step runner (gpucnn.step), from what layers declare (``Layer.save_for_backward``) and what
each stage's forward and backward made (:func:`mark`, :func:`release_since`); a kernel function only for the
temporaries it allocated itself; :func:`keep_for_backward`, the runner's recompute policy, for a lowered input
not worth keeping. Layers release nothing."""
from __future__ import annotations

import contextlib
import os

import numpy as np

from . import capture as _capture
from .backend import _allocating, is_cupy, on_gpu, xp
from .launch import bind, skipping_work

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
    one buffer only while no two share memory. The planned block is bound (gpucnn.launch.bind: a kernel launched
    on one of its views gets a wrapper made once) until the plan is dropped or the arena freed.
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
        self.recompute_above = None     # bytes: the running step's recompute policy (see keep_for_backward)

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
            _capture.refuse_allocation(shape, dtype, f"by the workspace: request {k} is not in its plan")
            _allocating(shape, dtype, like, depth=4)
            a = xp(like).empty(shape, dtype=dtype)
            if k < len(self.buffers):
                self.buffers[k] = a
            else:
                self.buffers.append(a)
            if not self.recording:              # another code path than the one planned: record it anew
                self.recording = True
                self._dropped = self.slab is not None
                bind(self)                      # launches keep no wrapper of the plan's views any more
        if self.recording:
            del self.spans[k:]
            self.spans.append([self.clock, None])
        self.clock += 1
        if a.size:
            self._live[_address(a)] = k
        return _capture._captured(a) if _capture._sim_ops is not None else a

    def release(self, a, address=None) -> bool:
        """``a`` (a buffer this run handed out, or a view starting where it starts; or its ``address``) is read no
        more this run. Returns whether it was one (in poison mode its whole buffer is then filled: :func:`poison`)."""
        if address is None and getattr(a, "size", 0):
            address = _address(a)
        k = self._live.pop(address, None) if address is not None else None
        if k is None:
            return False
        if self.recording and k < len(self.spans):
            self.spans[k][1] = self.clock
        self.clock += 1
        if _poison:
            _fill_poison(self.buffers[k])
        return True

    def release_since(self, mark: int, spans=(), stop=None):
        """Release every buffer handed out since request ``mark`` (and before ``stop``) and not released yet,
        except those that share a byte with one of ``spans`` (see :func:`_span`), in the order they were asked for."""
        stop = self.cursor if stop is None else stop
        found = sorted((k, address) for address, k in self._live.items() if mark <= k < stop)
        for k, address in found:                # (a buffer is contiguous: it covers nbytes from its address)
            if not overlap([(address, address + self.buffers[k].nbytes)], spans):
                self.release(None, address)

    def end(self):
        """After a run: lay the recorded buffers out by lifetime (once per recording)."""
        if self._dropped:                       # recorded among the plan's views: start again on separate buffers
            self.buffers, self.spans, self.slab, self._dropped = [], [], None, False
            bind(self)
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
        bind(self, slab)        # its views are the same every run: launches wrap each once (gpucnn.launch.bind)

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


def _span(a) -> tuple:
    """The bytes [low, high) that array ``a`` (device or host, any strides) covers."""
    lo = hi = _address(a)
    if a.flags.c_contiguous:
        return lo, lo + a.nbytes
    for n, s in zip(a.shape, a.strides):
        lo, hi = (lo + s * (n - 1), hi) if s < 0 else (lo, hi + s * (n - 1))
    return lo, hi + a.itemsize


def overlap(spans_a, spans_b) -> bool:
    """Whether any span of ``spans_a`` shares a byte with any of ``spans_b`` (spans from :func:`_span`)."""
    return any(a0 < b1 and b0 < a1 for a0, a1 in spans_a for b0, b1 in spans_b)


_arena = None


@contextlib.contextmanager
def workspace(arena: Arena, recompute_above=None):
    """Within this block :func:`empty`/:func:`zeros` hand out ``arena``'s buffers in order (see Arena).
    ``recompute_above``: the step runner's recompute policy for this block (see :func:`keep_for_backward`)."""
    global _arena
    old, _arena = _arena, arena
    arena.recompute_above = recompute_above
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
    """End these arrays' lives: nothing reads them again in this training step, so the workspace may hand their
    memory to a later request (see Arena); in poison mode they are filled with NaN. Outside a workspace nothing
    happens. The step runner calls it; a kernel function only for a temporary it allocated itself."""
    if _arena is not None:
        for a in arrays:
            if a is not None and hasattr(a, "shape") and not _arena.release(a) and _poison:
                _fill_poison(a)


def mark():
    """How many buffers the workspace has handed out so far this run (None outside one): :func:`release_since`
    ends the lives of those asked for after it."""
    return _arena.cursor if _arena is not None else None


def release_since(mark_: int, keep=(), stop=None, spans=()):
    """End the life of every workspace buffer handed out since ``mark_`` (see :func:`mark`; and before the mark
    ``stop``) and still alive, except those sharing memory with an array of ``keep`` (or a byte with one of
    ``spans``, :func:`_span`'s): what a stage's forward or backward made and does not keep."""
    if _arena is not None and mark_ is not None:
        _arena.release_since(mark_, [*spans, *(_span(a) for a in keep if getattr(a, "size", 0))], stop)


def keep_for_backward(a) -> bool:
    """The step runner's recompute policy (gpucnn.step.RECOMPUTE_ABOVE), asked by a layer about a lowered input it
    could make again from its input: True to keep ``a`` for backward; False when, in a training step on the GPU
    path, ``a`` is larger than the policy's bytes: its life ends here, and backward must make it again. None (an
    algorithm that lowers nothing: "direct") is kept: there is nothing to end."""
    above = _arena.recompute_above if _arena is not None else None
    if a is None or above is None or not on_gpu(a) or a.nbytes <= above:
        return True
    release(a)
    return False


# ----------------------------------------------------------------------------------------------
# poison: every buffer at its end of life filled with NaN, so that a read after it shows in the results

_poison = os.environ.get("GPUCNN_POISON", "").strip() not in ("", "0")


def poison(on: bool = True) -> bool:
    """Turn poison mode on (or off); returns whether it was on. In poison mode each array a training step
    releases (see :func:`release`) is filled with NaN (integers: their most negative value, or largest when
    unsigned; booleans: True) at once, so a read after its declared end of life shows up as NaN in the
    results (on the GPU path the workspace also hands the memory to a later buffer). ``GPUCNN_POISON=1`` turns
    it on for a process. For debugging and tests: it costs a fill per released array."""
    global _poison
    old, _poison = _poison, bool(on)
    return old


def poisoning() -> bool:
    """Whether poison mode is on (see :func:`poison`)."""
    return _poison


def _fill_poison(a):
    """Fill ``a`` with its dtype's poison, as device work (recorded while a graph is captured on "sim")."""
    if skipping_work() or not getattr(a, "size", 0) or not (is_cupy(a) or a.flags.writeable):
        return
    kind = a.dtype.kind
    value = (np.nan if kind in "fc" else True if kind == "b"
             else np.iinfo(a.dtype).min if kind == "i" else np.iinfo(a.dtype).max)
    if is_cupy(a):
        a.fill(value)
    else:
        plain = _capture._plain(a)
        _capture.enqueue(lambda: plain.fill(value))


@contextlib.contextmanager
def no_workspace():
    """Within this block allocations are plain again (for arrays that must outlive the step)."""
    global _arena
    old, _arena = _arena, None
    try:
        yield
    finally:
        _arena = old

