"""Reductions that several op families' kernels share (Numba CUDA device functions), and how to size them.

A sum is the one reduction every family needs: a bias gradient per channel, BatchNorm's statistics, the loss's
batch mean, the gradient norm for clipping. On an H200 (132 SMs) "one block per channel" ran a bias gradient on
6 blocks for 1.5 ms, so a sum over many values is split over many blocks (``chunks`` of each segment): each
block sums its threads' values in shared memory (:func:`block_reduce`, a tree in a fixed order), writes its
partial sum into a small buffer and takes a ticket, an atomic counter per segment (:func:`last_to_arrive`);
the block that takes the last ticket adds the segment's partials in a fixed order (:func:`sum_partials`) and
writes the result. One launch, no atomics in any addition (the ticket only says which block finishes), so the
same inputs give the same bits every run and a CUDA graph's replay equals the eager step.

The fill rule, checked on every recorded launch (tests/test_launch_resources.py): a launch whose largest array
has LARGE elements or more uses at least MIN_BLOCKS blocks, and no launch leaves more than MAX_PER_THREAD
elements of its largest array to a thread. :func:`split` sizes the reductions by it.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import cuda, gpu_device, launch

SMS = 132                   # streaming multiprocessors of an H200 (an H100 SXM has 132 too)
MIN_BLOCKS = 2 * SMS        # what a large launch fills: two blocks per SM at least
LARGE = 2 ** 16             # elements of a launch's largest array from which it must fill the GPU
MAX_PER_THREAD = 64         # elements of a launch's largest array a thread may be left with, at most
PER_THREAD = 16             # what the reductions aim for: enough loads in flight, few partials to add


# ---------------------------------------------------------------------------- device functions

@gpu_device
def block_reduce(partial, t, threads, width, take_max):
    """partial[i] for i < width becomes the sum (or, with ``take_max``, the largest) of partial[i], partial[i +
    width], ..., partial[threads - width + i]: halving in shared memory, a fixed order (deterministic). ``threads``
    / ``width`` is a power of two; t is this thread's index. Every thread of the block calls it; it synchronises
    before and after, so each may read the results when it returns."""
    cuda.syncthreads()
    half = threads // 2
    while half >= width:
        if t < half:
            if take_max:
                partial[t] = max(partial[t], partial[t + half])
            else:
                partial[t] += partial[t + half]
        cuda.syncthreads()
        half //= 2


@gpu_device
def block_sum(partial, t, threads):
    """partial[0] becomes the sum of partial[:threads] (``threads`` a power of two): :func:`block_reduce`."""
    block_reduce(partial, t, threads, 1, False)


@gpu_device
def chunk_of(values, segments):
    """(segment, chunk, chunks, start, end) of this block in a grid of ``segments`` x chunks blocks, segment-major
    (block b is chunk b % chunks of segment b // chunks): its chunk of the segment's values is [start, end)."""
    chunks = cuda.gridDim.x // segments
    segment = cuda.blockIdx.x // chunks
    chunk = cuda.blockIdx.x - segment * chunks
    span = (values + chunks - 1) // chunks
    start = chunk * span
    return segment, chunk, chunks, start, min(start + span, values)


@gpu_device
def last_to_arrive(partial, t, tickets, segment, chunks):
    """Every thread of a block calls it once its block has written its partials of ``segment`` (and read what it
    needs of the shared ``partial``, whose first element carries the answer): True (in every thread) in the block
    that finishes the segment last of its ``chunks`` blocks, which then resets the ticket to zero for the next
    launch. The fences make the partials of every block visible to the last one (the pattern of CUDA's
    threadFenceReduction sample and of a cooperative grid sync). No static shared array: Numba's simulator makes
    those without a lock, and threads leaving a barrier together could each get their own."""
    one = partial.dtype.type(1)     # typed as the array: a float32 kernel does no float64 arithmetic
    cuda.threadfence()              # this thread's partials reach the GPU's memory before the ticket is taken
    cuda.syncthreads()
    if t == 0:
        partial[0] = one if cuda.atomic.add(tickets, segment, 1) == chunks - 1 else one - one
    cuda.syncthreads()
    last = partial[0] == one
    if last:
        cuda.threadfence()          # and the last block reads them after its ticket
        if t == 0:
            tickets[segment] = 0
    return last


@gpu_device
def sum_partials(partial, t, threads, width, partials, row0, chunks):
    """In the last block: partial[i] (i < width) = the sum over k < chunks of partials[row0 + i, k], each thread
    adding a strided run then the tree (a fixed order)."""
    acc = partial.dtype.type(0)
    for k in range(t // width, chunks, threads // width):
        acc += partials[row0 + t % width, k]
    cuda.syncthreads()              # every thread has read what the previous tree left in partial
    partial[t] = acc
    block_reduce(partial, t, threads, width, False)


@gpu_device
def grid_sums(partial, t, threads, width, partials, tickets, tile, chunk, chunks):
    """One launch's sums of ``width`` segments per tile over many blocks. Every thread of block ``chunk`` (of
    ``chunks``) of ``tile`` calls it with partial[:threads] holding its values, those of segment tile*width + i
    at positions i, i + width, ...; returns True in the block that finishes the tile, where partial[:width] then
    holds the tile's sums over every block (see the module docstring). partials: (tiles*width, chunks)."""
    block_reduce(partial, t, threads, width, False)
    if t < width:
        partials[tile * width + t, chunk] = partial[t]
    if not last_to_arrive(partial, t, tickets, tile, chunks):
        return False
    sum_partials(partial, t, threads, width, partials, tile * width, chunks)
    return True


@gpu_device
def grid_total(values, square, part, t, threads, partials, tickets):
    """The sum of the 1-D ``values`` (or, with ``square``, of their squares) over the whole grid, each block a chunk,
    the threads' sums in double: True in the block that finishes last, where part[0] then holds the total (part:
    a double per thread; partials (1, blocks), tickets[0])."""
    _, chunk, chunks, start, end = chunk_of(values.size, 1)
    acc = 0.0
    for k in range(start + t, end, threads):
        v = values[k]
        acc += v * v if square else v
    part[t] = acc
    return grid_sums(part, t, threads, 1, partials, tickets, 0, chunk, chunks)


# ---------------------------------------------------------------------------- host side: sizes and tickets

def fills(size: int, blocks: int, threads: int) -> bool:
    """Whether a launch of ``blocks`` x ``threads`` whose largest array has ``size`` elements keeps the fill rule."""
    return (size < LARGE or blocks >= MIN_BLOCKS) and size <= MAX_PER_THREAD * blocks * threads


def split(per_segment: int, segments: int, threads: int, size: int | None = None) -> int:
    """How many blocks (chunks) share each of ``segments`` sums of ``per_segment`` values, for blocks of
    ``threads``: at most PER_THREAD values a thread, and at least MIN_BLOCKS blocks in all when the launch's
    largest array (``size``, default segments * per_segment elements) is LARGE; never so many that a thread has
    no value. On "sim" 2 where there are values for them: the multi-block path runs, at little cost."""
    most = max(1, -(-per_segment // threads))
    if backend.sim_sized():
        return min(2, most)
    want = -(-per_segment // (threads * PER_THREAD))
    if (size if size is not None else per_segment * segments) >= LARGE:
        want = max(want, -(-MIN_BLOCKS // segments))
    return max(1, min(want, most))


def filling_threads(n: int, size: int, threads: int = 128) -> int:
    """The block for ``n`` threads of work whose largest array has ``size`` elements: ``threads``, halved (to 32 at
    least) while a LARGE launch would have fewer than MIN_BLOCKS blocks (LeNet's fused forward at a last batch
    of 44 images: 138 blocks of 128, 275 of 64)."""
    while threads > 32 and size >= LARGE and -(-n // threads) < MIN_BLOCKS:
        threads //= 2
    return threads


def reduction_grid(per_segment: int, segments: int, cap: int = 256, size: int | None = None):
    """(threads, chunks) of a reduction of ``segments`` sums of ``per_segment`` values: a power-of-two block (at
    most ``cap``, backend.reduction_threads; smaller where a large launch has too few values for MIN_BLOCKS full
    blocks) and :func:`split`'s chunks."""
    size = size if size is not None else per_segment * segments
    threads = filling_threads(segments * per_segment, size, backend.reduction_threads(per_segment, cap))
    return threads, split(per_segment, segments, threads, size)


class _Tickets(dict):
    """device -> int32 counters, every one zero between launches (a dict that can own a launch binding)."""


_tickets = _Tickets()
_retired = []       # outgrown ticket arrays: a captured graph may still use them, so they are never freed


def tickets(n: int, like):
    """``n`` ticket counters (int32, zero) on ``like``'s device: a view of one persistent array that every reduction
    shares (launches run one after another on the stream and each leaves its counters at zero), made at a first
    (eager) step, never inside a graph capture."""
    key = ("cuda", like.device.id) if backend.is_cupy(like) else "host"
    a = _tickets.get(key)
    if a is None or a.size < n:
        if a is not None:
            _retired.append(a)
        a = backend.persistent_empty((max(4096, 2 * n),), np.int32, like)
        a.fill(0)                   # CuPy: a memset
        _tickets[key] = a
        backend.bind(_tickets, *_tickets.values())    # launches wrap the views they use once (gpucnn.launch.bind)
    return a[:n]                    # a launch's arrays are only what it uses (the fill rule measures its largest)



def launch_reduction(kernel, arrays, scalars, partials, tickets_needed, like, threads, blocks, shared_bytes):
    """``kernel(*arrays, partials, tickets, *scalars)`` over ``blocks`` blocks of ``threads``: the partial sums'
    buffer (``partials`` = (rows, chunks, dtype)) from the step's workspace, released once the kernel is queued
    (a later kernel that reuses its memory runs after it), and ``tickets_needed`` ticket counters."""
    buf = backend.empty(partials[:2], partials[2], like)
    launch(kernel, blocks * threads, *arrays, buf, tickets(tickets_needed, like), *scalars, threads=threads,
           blocks=blocks, shared_bytes=shared_bytes)
    backend.release(buf)
