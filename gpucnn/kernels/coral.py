"""CORAL (Cao, Mirjalili, Raschka 2020): rank-consistent ordinal regression, the lecture's age-prediction head.

K ordered classes become K-1 binary tasks "is the rank above k?", k = 0..K-2, sharing ONE weight vector w and
keeping a bias each:

    z[n, k] = x[n] . w + b[k]                      (logits, N x (K-1))
    L = 1/N sum_n sum_k [ softplus(-z) if y[n] > k else softplus(z) ]        (the binary cross-entropies)
    dL/dz[n, k] = (sigmoid(z[n, k]) - [y[n] > k]) / N
    rank[n] = #{k : z[n, k] > 0}                   (sigmoid(z) > 0.5)

Backward of the head: with s[n] = sum_k dL/dz[n, k] (the shared weight sees every task), gw = s^T x,
gb[k] = sum_n dL/dz[n, k] and gx = s w. GPU: a GEMV-shaped GEMM and one ElementwiseKernel forward; the loss is
the binary cross-entropy kernel on the levels (one elementwise launch, one sum over many blocks); backward one
Numba kernel for both sums, then two GEMMs.

The GPU's row reductions (s, and each row's rank for the counts below) tile z (N, K-1) as dense's bias gradient
does: a block takes 32 tasks (a warp's lanes: coalesced reads) by a chunk of rows, so that AlexNet's 1,000
ranks at batch 128 still fill the GPU; a block's row sums over its 32 tasks go to a (N, tiles) buffer, and the
block that finishes a chunk of rows last (a ticket per chunk, gpucnn.kernels.reduce) adds them in a fixed
order. Column sums (gb) and the sums over rows (the counts) are reduce.grid_sums: deterministic, no float atomics.

Reading the ranks for fit and evaluate: :func:`scores` adds up the batch's [rank == y], [y outside [0, K)] and
|rank - y|, and :func:`tally` adds a step's loss, hits and bad labels to fit's device sums as
``gpucnn.kernels.loss.tally`` does for the argmax, so fit reads nothing back per step: one Numba launch each.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import cuda, gpu_device, gpu_kernel, matmul, on_gpu, xp
from ..elementwise import ElementwiseKernel
from .dense import _LANES
from .loss import _bce_logits_k, _mean_on_device, check_labels
from .reduce import block_reduce, chunk_of, grid_sums, last_to_arrive, launch_reduction, split

_logits_k = ElementwiseKernel("raw T s, raw T b, int64 tasks", "T z", "z = s[i / tasks] + b[i % tasks]",
                              "coral_logits")
_levels_k = ElementwiseKernel("raw L y, int64 tasks", "T lev", "lev = y[i / tasks] > (i % tasks) ? T(1) : T(0)",
                              "coral_levels")


@gpu_device
def _tile_row_sums(a, count, partial, rowpart, t, tile, start, end):
    """Thread (r, lane) of a block of 32 tasks (``tile``) by the rows [start, end): rowpart[n, tile] = the sum over
    the tile's tasks k of a[n, k] (``count``: of [a[n, k] > 0], NaN not counted), a tree per row group in the
    shared ``partial`` (the block's size); returns the thread's column sum over its rows r, r + R, ..."""
    threads = cuda.blockDim.x
    R = threads // _LANES
    lane = t % _LANES
    T = a.shape[1]
    k = tile * _LANES + lane
    zero = partial.dtype.type(0)
    one = partial.dtype.type(1)
    col = zero
    for j in range(start, end, R):         # the same trips in every thread: the trees below synchronise
        v = zero
        if j + t // _LANES < end and k < T:
            x = a[j + t // _LANES, k]
            v = (one if x > 0 else zero) if count else x
        col += v
        partial[lane * R + t // _LANES] = v        # a row's 32 lanes R apart: block_reduce(width=R) sums them
        block_reduce(partial, t, threads, R, False)
        if t < R and j + t < end:
            rowpart[j + t, tile] = partial[t]
        cuda.syncthreads()                  # read before the next group's values
    return col


@gpu_kernel
def _sums_kernel(gz, s, gb, rowpart, partials, tickets):
    """s[n] = sum_k gz[n, k] (what the shared weight sees) and gb[k] = sum_n gz[n, k] (a task's bias) in one
    launch over (tile of 32 tasks, chunk of rows) blocks: gb by reduce.grid_sums over the chunks, s by the block
    that finishes a chunk's rows last (ticket tiles + chunk), from the tiles' sums in rowpart (N, tiles)."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, T = gz.shape
    tiles = (T + _LANES - 1) // _LANES
    tile, chunk, chunks, start, end = chunk_of(N, tiles)
    partial = cuda.shared.array(0, dtype=gz.dtype)
    partial[t] = _tile_row_sums(gz, False, partial, rowpart, t, tile, start, end)
    k = tile * _LANES + t % _LANES
    if grid_sums(partial, t, threads, _LANES, partials, tickets, tile, chunk, chunks) and t < _LANES and k < T:
        gb[k] = partial[t]
    if last_to_arrive(partial, t, tickets, tiles + chunk, tiles):
        for n in range(start + t, end, threads):
            acc = gz.dtype.type(0)
            for j in range(tiles):
                acc += rowpart[n, j]
            s[n] = acc


@gpu_kernel
def _counts_kernel(value, z, labels, out, rowpart, partials, tickets, weight, tally):
    """The batch's hits [rank == y], bad labels [y outside [0, K)] and sum of |rank - y| (a bad label counts 0 to
    both others), rank[n] = #{k : z[n, k] > 0}, over (tile of 32 tasks, chunk of rows) blocks: the ranks from the
    tiles' counts in rowpart by the block that finishes a chunk last (ticket 3 + chunk), the three sums over the
    chunks by reduce.grid_sums (tickets 0-2). ``tally``: out[0] += weight * value[0], out[1] += hits, out[2] += bad
    labels (fit's device sums); else out[:] = hits, bad labels, |rank - y|."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    N, T = z.shape
    tiles = (T + _LANES - 1) // _LANES
    tile, chunk, chunks, start, end = chunk_of(N, tiles)
    part = cuda.shared.array(0, dtype=partials.dtype)      # float64: 3 * threads
    _tile_row_sums(z, True, part, rowpart, t, tile, start, end)
    if not last_to_arrive(part, t, tickets, 3 + chunk, tiles):
        return
    hits = 0.0
    bad = 0.0
    err = 0.0
    for n in range(start + t, end, threads):
        rank = 0.0
        for j in range(tiles):
            rank += rowpart[n, j]
        y = labels[n]
        if y < 0 or y > T:
            bad += 1.0
        else:
            d = abs(rank - y)
            err += d
            hits += 1.0 if d == 0 else 0.0
    cuda.syncthreads()                      # every thread has read last_to_arrive's flag in part[0]
    part[t] = hits
    part[threads + t] = bad
    part[2 * threads + t] = err
    for i in range(3):
        if grid_sums(part[i * threads:], t, threads, 1, partials, tickets, i, chunk, chunks) and t == 0:
            v = part[i * threads]
            if not tally:
                out[i] = v
            elif i == 0:
                out[0] += weight * float(value[0])     # in double (the simulator too)
                out[1] += v
            elif i == 1:
                out[2] += v


def _tiled(kernel, arrays, scalars, z, dtype, partial_rows, tickets_first, shared_values):
    """Launch one of the tiled kernels over z (N, K-1) (see the module docstring): blocks of 32 tasks by 8 rows (2
    on "sim": Python threads), the rows in chunks (reduce.split) so that the launch fills the GPU. Its sums are
    ``dtype``: the (N, tiles) row sums and the (``partial_rows``, chunks) partial sums, both from the step's
    workspace; the chunks' tickets follow ``tickets_first`` others; ``shared_values`` a thread."""
    N, T = z.shape
    tiles = -(-T // _LANES)
    rows = 2 if backend.sim_sized() else 8
    threads = rows * _LANES
    chunks = split(N, tiles, rows, z.size)
    rowpart = backend.empty((N, tiles), dtype, z)
    launch_reduction(kernel, (*arrays, rowpart), scalars, (partial_rows, chunks, dtype), tickets_first + chunks, z,
                     threads, tiles * chunks, threads * shared_values * np.dtype(dtype).itemsize)
    backend.release(rowpart)


def coral_forward(x, w, b):
    """z (N, K-1) = x w^T + b: one shared weight row w (1, F), a bias per task b (K-1,)."""
    s = matmul(x, w.T, out=backend.empty((x.shape[0], 1), x.dtype, x) if on_gpu(x) else None)
    if on_gpu(x):
        z = backend.empty((x.shape[0], b.shape[0]), x.dtype, x)
        return _logits_k(s.reshape(-1), b, b.shape[0], z)
    return s + b


def coral_backward(x, w, gz, need_gx=True, gw_out=None, gb_out=None):
    """``(gx, gw, gb)`` from gz = dL/dz (N, K-1); gx None unless ``need_gx``."""
    N, T = gz.shape
    if on_gpu(gz):
        gz = xp(gz).ascontiguousarray(gz)
        s = backend.empty((N, 1), gz.dtype, gz)
        gb = gb_out if gb_out is not None else backend.empty((T,), gz.dtype, gz)
        tiles = -(-T // _LANES)
        _tiled(_sums_kernel, (gz, s.reshape(-1), gb), (), gz, gz.dtype, tiles * _LANES, tiles, 1)
        gw = matmul(s.T, x, out=gw_out if gw_out is not None else backend.empty(w.shape, gz.dtype, gz))
        gx = matmul(s, w, out=backend.empty(x.shape, gz.dtype, gz)) if need_gx else None
        return gx, gw, gb
    s = gz.sum(axis=1, keepdims=True)
    gb = gz.sum(axis=0, out=gb_out)
    gw = np.matmul(s.T, x, out=gw_out)
    return (s * w if need_gx else None), gw, gb


def coral_loss(logits, labels, where="CoralLoss", check=True):
    """(loss as a 0-d array, dL/dlogits) for logits (N, K-1) and integer ranks in [0, K): the mean over the batch
    of the summed binary cross-entropies of the levels [y > k]. Labels are range-checked as
    SoftmaxCrossEntropy's (one reduction and one sync on the GPU, unless ``check`` is False)."""
    N, T = logits.shape
    if on_gpu(logits):
        x = xp(logits)
        logits, labels = x.ascontiguousarray(logits), x.ascontiguousarray(labels)
        if check and bool(((labels < 0) | (labels > T)).any()):
            check_labels(labels, T + 1, where, N)
        levels = _levels_k(labels, T, backend.empty(logits.shape, logits.dtype, logits))
        rows, grad = _bce_logits_k(logits, levels, logits.dtype.type(1.0 / N))
        return _mean_on_device(rows.reshape(-1), N), grad
    check_labels(labels, T + 1, where, N)
    levels = (labels[:, None] > np.arange(T)[None, :]).astype(logits.dtype)
    e = np.exp(-np.abs(logits))
    rows = np.maximum(logits, 0) - logits * levels + np.log1p(e)
    sig = np.where(logits >= 0, 1 / (1 + e), e / (1 + e))
    grad = ((sig - levels) * logits.dtype.type(1.0 / N)).astype(logits.dtype, copy=False)
    return np.asarray((rows.sum(dtype=np.float64) / N)).astype(logits.dtype), grad


def coral_predict(logits):
    """The predicted rank of each row of CORAL logits (N, K-1): how many tasks say "above" (z > 0), int64."""
    return (logits > 0).sum(axis=1).astype(np.int64)


def coral_probabilities(logits):
    """sigmoid(z): P(rank > k) for each task k (rows need not be non-increasing: the biases are not forced
    to stay ordered)."""
    return 1 / (1 + xp(logits).exp(-logits))


def _counts_cpu(logits, labels):
    """[rows whose rank is the label, labels outside [0, K), sum of |rank - label| over the good ones], float64."""
    rank = coral_predict(logits)
    bad = (labels < 0) | (labels > logits.shape[1])
    err = np.where(bad, 0, np.abs(rank - labels))
    return np.array([((rank == labels) & ~bad).sum(), bad.sum(), err.sum()], np.float64)


def scores(logits, labels):
    """The batch's counts, float64 (3,) on the logits' device: rows whose rank is the label, labels outside
    [0, K), and the sum of |rank - label| over the others (evaluate's accuracy and mean absolute error). On the GPU
    one launch (_counts_kernel) and no host copy."""
    if on_gpu(logits):
        x = xp(logits)
        logits, labels = x.ascontiguousarray(logits), x.ascontiguousarray(labels)
        out = backend.empty((3,), np.float64, logits)
        _tiled(_counts_kernel, (out, logits, labels, out), (0.0, False), logits, np.float64, 3, 3, 3)
        return out
    return _counts_cpu(logits, labels)


def tally(value, logits, labels, acc):
    """Add a CORAL step to fit's running sums ``acc`` (float64 (3,), on the logits' device), as
    ``gpucnn.kernels.loss.tally`` does for softmax: ``acc[0] += value * N``, ``acc[1] +=`` the rows whose rank is
    the label, ``acc[2] +=`` the labels outside [0, K) (fit raises on it). One launch and no host copy on the GPU."""
    N = logits.shape[0]
    if on_gpu(logits):
        x = xp(logits)
        logits, labels = x.ascontiguousarray(logits), x.ascontiguousarray(labels)
        _tiled(_counts_kernel, (value.reshape(1), logits, labels, acc), (float(N), True), logits, np.float64, 3, 3, 3)
        return acc
    counts = _counts_cpu(logits, labels)
    acc[0] += float(value) * N
    acc[1:] += counts[:2]
    return acc
