"""Losses: softmax cross-entropy fused with its gradient, the softmax alone, and mean squared error.

Cross-entropy of logits z (N, C) and integer labels y (N,), averaged over the batch:

    L = 1/N sum_n [ log sum_k exp(z[n, k]) - z[n, y[n]] ]       dL/dz = (softmax(z) - onehot(y)) / N

Both are computed from the row max m subtracted first (z - m <= 0), so exp never overflows and logits of
+-1e4 give finite, exact results. GPU: ONE launch for loss, gradient and mean (_softmax_kernel): a row (or a
chunk of a wide row's columns) per unit of threads, as many blocks as fill the GPU, the row losses summed by
gpucnn.kernels.reduce (each block a tree, the last block adding the blocks' sums: a fixed order, on the
device, no host copy, no sync). ``tally`` adds a step's loss and correct predictions to fit's running sums,
on the device. MSE: L = mean((p - t)^2), dL/dp = 2 (p - t) / size; GPU: ElementwiseKernels and one sum.

Labels: a label outside [0, C) raises the same ValueError on every device. The CPU path checks on every
call (free there). The GPU path checks with one device reduction and one host read of a boolean (a sync),
except where that is not wanted or not allowed: inside :func:`labels_checked` (fit and evaluate check the
whole data set on the host once, with ``check_labels``) and while a CUDA graph is captured. There a bad
label is never used as an index: it makes its row's loss NaN, and :func:`tally` counts it into fit's
device sums, which fit reads back every few steps and raises on.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import backend
from ..backend import cuda, gpu_device, gpu_kernel, on_gpu, to_numpy, xp
from ..elementwise import ElementwiseKernel
from .pool import max_wins
from .reduce import (LARGE, MAX_PER_THREAD, MIN_BLOCKS, block_reduce, filling_threads, grid_sums, grid_total,
                     last_to_arrive, launch_reduction, reduction_grid)

# ---------------------------------------------------------------------------- label checks


def check_label_format(labels, where: str, n: int | None = None):
    """The cheap label checks (no data read, no sync): a 1-d integer array, of length ``n`` when given."""
    if not hasattr(labels, "dtype") or not hasattr(labels, "shape"):
        raise TypeError(f"{where}: expected the labels as an integer array, got {type(labels).__name__}")
    if labels.dtype.kind not in "iu":
        hint = " (one-hot labels? pass y.argmax(axis=1))" if labels.ndim == 2 else ""
        raise TypeError(f"{where}: labels must be integer class indices, got dtype {labels.dtype}{hint}; "
                        "convert them with y.astype('int64')")
    if labels.ndim != 1:
        raise ValueError(f"{where}: expected labels of shape (N,), one class index per row, "
                         f"got shape {tuple(labels.shape)}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{where}: {n} rows of logits but {labels.shape[0]} labels (expected one per row)")


def check_labels(y, num_classes: int, where: str, n: int | None = None):
    """Raise unless ``y`` is a 1-d integer array with every value in [0, num_classes) (and ``n`` long).

    Reads every label, so on a GPU array it syncs once: call it once per data set (fit does), not per batch.
    """
    check_label_format(y, where, n)
    if y.shape[0] == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        host = to_numpy(y)
        bad = np.flatnonzero((host < 0) | (host >= num_classes))
        k = int(bad[0])
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(f"{where}: labels must be in [0, {num_classes}) for {num_classes} classes, "
                         f"got {int(host[k])} at index {k}{more}")


# ---------------------------------------------------------------------------- GPU: Numba kernels
# A row kernel gives each row (or each (row, column chunk)) a unit of ``group`` threads, its lanes: a narrow row
# (LeNet's 10 classes) is one thread's, a wide one (AlexNet's 1,000) is spread over lanes and over column chunks
# in other blocks, so that a large batch fills the GPU (_row_grid). Lane l of unit u is
# thread l * units + u of its block: a unit's lanes reduce with reduce.block_reduce(width=units).

_PER_LANE = 16          # columns a lane takes at least before a row gets more lanes
_MAX_GROUP = 32


@gpu_device
def _unit(group):
    """(t, threads, units, u, lane, unit) of this thread in a row kernel of ``group`` lanes a unit: its index in
    the block, the block's size and units, its unit u in the block (lane l of unit u is thread l * units + u), its
    lane, and its unit's index in the grid."""
    t = cuda.threadIdx.x
    units = cuda.blockDim.x // group
    u = t % units
    return t, cuda.blockDim.x, units, u, t // units, cuda.blockIdx.x * units + u


@gpu_kernel
def _softmax_kernel(logits, labels, out, value, partials, tickets, with_loss, group, chunks, inv_n):
    """Softmax of each row of logits (N, C) into out; with ``with_loss`` the cross-entropy too: out = (softmax(z) -
    onehot(labels)) / N, its gradient, and value[0] = the batch mean of the rows' losses logsumexp(z[n]) - z[n,
    y[n]]. A unit of ``group`` lanes takes one of ``chunks`` column chunks of a row: the row's max and its sum of
    exponentials (float64) over the whole row (trees in shared memory), then the chunk's columns. The row losses
    (lane 0 of chunk 0) are summed by reduce.grid_sums: loss, gradient and mean in one launch. A label outside
    [0, C) is never used as an index: its row's loss and gradient are NaN."""
    t, threads, units, u, lane, unit = _unit(group)
    n_rows, n_classes = logits.shape
    row = unit // chunks
    chunk = unit - row * chunks
    active = row < n_rows
    part = cuda.shared.array(0, dtype=partials.dtype)      # float64, a value per thread
    m = logits.dtype.type(-math.inf)
    if active:
        for k in range(lane, n_classes, group):
            m = max(m, logits[row, k])
    part[t] = m
    block_reduce(part, t, threads, units, True)
    m = logits.dtype.type(part[u])
    cuda.syncthreads()          # every lane has read its row's max before the next tree
    s = 0.0     # a double: the sum of C exponentials in full precision costs nothing next to the memory traffic
    if active:
        for k in range(lane, n_classes, group):
            s += math.exp(logits[row, k] - m)
    part[t] = s
    block_reduce(part, t, threads, units, False)
    s = part[u]
    total = 0.0
    if active:
        y = labels[row] if with_loss else 0
        bad = with_loss and (y < 0 or y >= n_classes)
        scale = inv_n / s if with_loss else 1.0 / s
        width = (n_classes + chunks - 1) // chunks
        for k in range(chunk * width + lane, min(chunk * width + width, n_classes), group):
            g = math.exp(logits[row, k] - m) * scale
            if with_loss and k == y:
                g -= inv_n
            out[row, k] = math.nan if bad else g
        if with_loss and chunk == 0 and lane == 0:
            total = math.nan if bad else math.log(s) - (logits[row, y] - m)
    if with_loss:
        cuda.syncthreads()      # every lane has read its row's sum
        part[t] = total
        if grid_sums(part, t, threads, 1, partials, tickets, 0, cuda.blockIdx.x, cuda.gridDim.x) and t == 0:
            value[0] = part[0] * inv_n


@gpu_device
def _argmax_wins(v, k, best, arg, n_classes):
    """Whether column k (value v) takes a row's argmax from column arg (value best), as NumPy's argmax: the larger
    value, a NaN first, the first column on a tie. Column n_classes stands for none: it never wins, and loses."""
    return k < n_classes and (arg == n_classes or max_wins(v, best) or
                              ((v == best or (v != v and best != best)) and k < arg))


@gpu_kernel
def _tally_kernel(value, logits, labels, acc, rowpart, partials, tickets, group, chunks, weight):
    """acc[0] += weight * value[0], acc[1] += the number of rows whose largest logit (the first, as argmax) is at the
    label, acc[2] += the labels outside [0, classes): the running sums fit keeps on the device (float64 acc). The
    last is the device flag a replayed step raises on when fit reads the sums back. Block (b, c) takes the rows of
    row block b (a unit of ``group`` lanes each) in their column chunk c of ``chunks``: a tree gives each row's
    argmax in the chunk, kept in rowpart (2, N, chunks); the block that finishes row block b last
    (reduce.last_to_arrive, ticket 2 + b; every block with one chunk) picks each row's argmax over its chunks and
    reads its label, so a wide row is spread over blocks. The hits and the bad labels are two reduce.grid_sums
    (tickets 0 and 1)."""
    t, threads, units, u, lane, _ = _unit(group)
    n_rows, n_classes = logits.shape
    rows = cuda.blockIdx.x // chunks
    chunk = cuda.blockIdx.x - rows * chunks
    row = rows * units + u
    part = cuda.shared.array(0, dtype=partials.dtype)      # float64: 2 * threads
    best = part[:threads]
    arg = part[threads:]
    b = 0.0
    a = n_classes                                           # no column yet: loses to any
    if row < n_rows:
        width = (n_classes + chunks - 1) // chunks
        for k in range(chunk * width + lane, min(chunk * width + width, n_classes), group):
            v = logits[row, k]
            if _argmax_wins(v, k, b, a, n_classes):
                b = v
                a = k
    best[t] = b
    arg[t] = a
    half = threads // 2
    while half >= units:
        cuda.syncthreads()
        if t < half and _argmax_wins(best[t + half], arg[t + half], best[t], arg[t], n_classes):
            best[t] = best[t + half]
            arg[t] = arg[t + half]
        half //= 2
    cuda.syncthreads()
    if t < units and row < n_rows:
        rowpart[0, row, chunk] = best[t]
        rowpart[1, row, chunk] = arg[t]
    hit = 0.0
    bad = 0.0
    last = chunks == 1 or last_to_arrive(part, t, tickets, 2 + rows, chunks)       # (chunks is the grid's)
    if last and t < units and row < n_rows:
        rb = 0.0
        ra = float(n_classes)
        for j in range(chunks):             # the chunks in column order: the first maximum stays
            if _argmax_wins(rowpart[0, row, j], rowpart[1, row, j], rb, ra, n_classes):
                rb = rowpart[0, row, j]
                ra = rowpart[1, row, j]
        y = labels[row]
        if y < 0 or y >= n_classes:
            bad = 1.0
        elif ra == y:
            hit = 1.0
    cuda.syncthreads()          # every thread has read last_to_arrive's flag in part[0] before it holds the sums
    best[t] = hit
    arg[t] = bad
    if grid_sums(best, t, threads, 1, partials, tickets, 0, cuda.blockIdx.x, cuda.gridDim.x) and t == 0:
        acc[0] += weight * float(value[0])      # in double (the simulator too: NumPy would multiply in float32)
        acc[1] += best[0]
    if grid_sums(arg, t, threads, 1, partials, tickets, 1, cuda.blockIdx.x, cuda.gridDim.x) and t == 0:
        acc[2] += arg[0]


@gpu_kernel
def _sum_kernel(values, out, partials, tickets, scale):
    """out[0] = scale * the sum of values over many blocks (reduce.grid_total): the mean of a loss's elements (MSE,
    binary cross-entropy, CORAL's)."""
    t = cuda.threadIdx.x
    part = cuda.shared.array(0, dtype=partials.dtype)      # float64
    if grid_total(values, False, part, t, cuda.blockDim.x, partials, tickets) and t == 0:
        out[0] = part[0] * scale


def _row_grid(n_rows: int, n_classes: int):
    """(group, threads, chunks, blocks) of a row kernel over (n_rows, n_classes): lanes a row (a power of two, each
    with _PER_LANE columns at least), blocks of 64 threads, and column chunks that keep a lane's columns under
    reduce.MAX_PER_THREAD; a large launch gets smaller blocks and more chunks until it has reduce.MIN_BLOCKS
    blocks (``blocks`` as _softmax_kernel lays them out). On "sim" blocks of 4 threads and 2 chunks where a row has
    the columns."""
    group = 1
    while group < _MAX_GROUP and 2 * group * _PER_LANE <= n_classes:
        group *= 2
    most = -(-n_classes // group)           # chunks that leave every lane a column
    if backend.sim_sized():
        threads, chunks = max(group, 4), min(2, most)
    else:
        threads, chunks = max(group, 64), min(most, -(-n_classes // (group * MAX_PER_THREAD)))
        if n_rows * n_classes >= LARGE:
            threads = max(group, 32, filling_threads(n_rows * group, n_rows * n_classes, threads))
            chunks = max(chunks, min(most, -(-MIN_BLOCKS * threads // (n_rows * group))))
    return group, threads, chunks, -(-n_rows * chunks * group // threads)


def _softmax_launch(logits, labels, out, value, with_loss):
    """Launch _softmax_kernel over logits (N, C) (see it); labels and value unused without the loss."""
    n, c = logits.shape
    group, threads, chunks, blocks = _row_grid(n, c)
    launch_reduction(_softmax_kernel, (logits, labels, out, value), (with_loss, group, chunks, 1.0 / n),
                     (1, blocks, np.float64), 1, logits, threads, blocks, threads * 8)


def _tally_launch(value, logits, labels, acc, group, threads, chunks):
    """Launch _tally_kernel over logits (N, C) (see it): rows in units of ``group`` lanes, ``threads`` a block, each
    row's columns in ``chunks`` chunks; the chunks' argmaxes in a (2, N, chunks) buffer from the step's workspace."""
    n = logits.shape[0]
    row_blocks = -(-n // (threads // group))
    rowpart = backend.empty((2, n, chunks), np.float64, logits)
    launch_reduction(_tally_kernel, (value.reshape(1), logits, labels, acc, rowpart), (group, chunks, float(n)),
                     (2, row_blocks * chunks, np.float64), 2 + (row_blocks if chunks > 1 else 0), logits, threads,
                     row_blocks * chunks, 2 * threads * 8)
    backend.release(rowpart)


def _mean_on_device(values, n: int):
    """sum(values) / n as a 0-d array on values' device: one launch (_sum_kernel), no host copy."""
    out = backend.empty((1,), values.dtype, values)
    threads, chunks = reduction_grid(values.size, 1)
    launch_reduction(_sum_kernel, (values, out), (1.0 / n,), (1, chunks, np.float64), 1, values, threads, chunks,
                     threads * 8)
    return out.reshape(())


# ---------------------------------------------------------------------------- GPU: elementwise kernels
_sq_diff_k = ElementwiseKernel("T p, T t", "T d2", "T d = p - t; d2 = d * d", "loss_sq_diff")
_mse_grad_k = ElementwiseKernel("T p, T t, T scale", "T g", "g = scale * (p - t)", "loss_mse_grad")


# Binary cross-entropy, elementwise, loss and gradient in one pass (the mean is a _sum_kernel after it).
# From logits z: max(z, 0) - z t + log1p(exp(-|z|)) never overflows; its gradient is (sigmoid(z) - t) / size.
# From probabilities p: -(t max(log p, -100) + (1 - t) max(log(1 - p), -100)), PyTorch's clamp of the logs, and
# gradient (p - t) / max(p (1 - p), 1e-12) / size, PyTorch's.
_bce_logits_k = ElementwiseKernel(
    "T z, T t, T inv_n", "T l, T g",
    "T e = exp(-fabs(z)); l = fmax(z, T(0)) - z * t + log1p(e); "
    "T s = z >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e); g = (s - t) * inv_n",
    "loss_bce_logits")
_bce_probs_k = ElementwiseKernel(
    "T p, T t, T inv_n", "T l, T g",
    "l = -(t * fmax(log(p), T(-100)) + (T(1) - t) * fmax(log(T(1) - p), T(-100))); "
    "g = (p - t) / fmax(p * (T(1) - p), T(1e-12)) * inv_n",
    "loss_bce_probs")


# ---------------------------------------------------------------------------- CPU twins
def _softmax_xent_cpu(logits, labels):
    n = logits.shape[0]
    rows = np.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    row_loss = np.log(s[:, 0]) - z[rows, labels]
    grad = e
    grad /= s
    grad[rows, labels] -= 1
    grad *= logits.dtype.type(1.0 / n)
    return np.asarray(row_loss.mean()), grad


def _softmax_cpu(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    e /= e.sum(axis=1, keepdims=True)
    return e


# ---------------------------------------------------------------------------- the functions losses call
def softmax_cross_entropy_forward(logits, labels, where: str = "softmax_cross_entropy"):
    """(mean cross-entropy as a 0-d array, dL/dlogits) for logits (N, C) and integer labels (N,).

    The gradient comes out of the same pass, so a loss keeps it for its backward. ``where`` names the
    caller in errors. A label outside [0, C) raises the same ValueError on every device (see the module
    docstring for what it costs on the GPU, and for when the check is left to a device flag).
    """
    n, c = logits.shape
    if on_gpu(logits):
        x = xp(logits)
        logits, labels = x.ascontiguousarray(logits), x.ascontiguousarray(labels)
        if _check_on_device():
            if bool(((labels < 0) | (labels >= c)).any()):     # one reduction, one host read of a boolean
                check_labels(labels, c, where, n)
        grad = backend.empty(logits.shape, logits.dtype, logits)
        out = backend.empty((1,), logits.dtype, logits)
        _softmax_launch(logits, labels, grad, out, True)
        return out.reshape(()), grad
    check_labels(labels, c, where, n)
    return _softmax_xent_cpu(logits, labels)


_prechecked = 0         # > 0 inside labels_checked(): the caller checked every label on the host already


@contextlib.contextmanager
def labels_checked():
    """Inside this block the GPU path does not check label ranges (no sync per batch): for callers that
    checked the whole data set on the host once (fit, evaluate). A bad label that still reaches the
    kernels poisons its row (NaN, never an out-of-bounds index) and is counted by :func:`tally`."""
    global _prechecked
    _prechecked += 1
    try:
        yield
    finally:
        _prechecked -= 1


def _check_on_device() -> bool:
    """Whether the GPU path checks label ranges now: not inside labels_checked(), and not while a CUDA graph
    is captured (a host read is not allowed then; tally's device flag stands in)."""
    return not _prechecked and not backend.capturing()


def tally(value, logits, labels, acc):
    """Add a training step's loss, hits and bad labels to the running sums ``acc`` (float64, shape (3,), on the
    logits' device): ``acc[0] += value * N``, ``acc[1] +=`` the rows whose argmax is the label, ``acc[2] +=``
    the labels outside [0, C) (fit raises on it when it reads the sums: a replayed step cannot stop itself).

    One launch and no host copy on the GPU, so fit reads ``acc`` back only when it prints.
    """
    n, c = logits.shape
    if on_gpu(logits):
        group, threads, chunks, _ = _row_grid(n, c)
        _tally_launch(value, logits, labels, acc, group, threads, chunks)
        return acc
    bad = (labels < 0) | (labels >= c)
    acc[0] += float(value) * n
    acc[1] += int((logits.argmax(axis=1) == labels)[~bad].sum())
    acc[2] += int(bad.sum())
    return acc


def binary_cross_entropy(pred, target, from_logits: bool = True):
    """(mean binary cross-entropy as a 0-d array, dL/dpred) for predictions and targets of one shape, every
    element a binary task: ``pred`` logits (``from_logits``) or probabilities in [0, 1]. On the GPU one
    elementwise launch makes each element's loss and gradient, one sum launch the mean (no host copy)."""
    n = pred.size
    if on_gpu(pred):
        x = xp(pred)
        pred, target = x.ascontiguousarray(pred), x.ascontiguousarray(target)
        k = _bce_logits_k if from_logits else _bce_probs_k
        row, grad = k(pred, target, pred.dtype.type(1.0 / n))
        return _mean_on_device(row.reshape(-1), n), grad
    inv_n = pred.dtype.type(1.0 / n)
    if from_logits:
        e = np.exp(-np.abs(pred))
        row = np.maximum(pred, 0) - pred * target + np.log1p(e)
        grad = (np.where(pred >= 0, 1 / (1 + e), e / (1 + e)) - target) * inv_n
    else:
        one = pred.dtype.type(1)
        with np.errstate(divide="ignore"):
            row = -(target * np.maximum(np.log(pred), -100) + (one - target) * np.maximum(np.log(one - pred), -100))
        grad = (pred - target) / np.maximum(pred * (one - pred), pred.dtype.type(1e-12)) * inv_n
    return np.asarray(row.mean(dtype=np.float64).astype(pred.dtype)), grad.astype(pred.dtype, copy=False)


def outside_unit_interval(a) -> bool:
    """Whether any element of ``a`` is outside [0, 1] (or NaN): one reduction, one host read of a boolean on
    the GPU. Not while a graph is captured (a host read is refused then): False."""
    if on_gpu(a) and backend.capturing():
        return False
    return bool(((a < 0) | (a > 1) | (a != a)).any())


def softmax(logits):
    """Row-wise softmax of logits (N, C), or of one row (C,): the class probabilities (predict_proba)."""
    if logits.ndim == 1:
        return softmax(logits.reshape(1, -1)).reshape(-1)
    if on_gpu(logits):
        x = xp(logits)
        logits = x.ascontiguousarray(logits)
        probs = backend.empty(logits.shape, logits.dtype, logits)
        _softmax_launch(logits, backend.empty((1,), np.int64, logits), probs, backend.empty((1,), probs.dtype, probs),
                        False)
        return probs
    return _softmax_cpu(logits)


def mse_forward(pred, target):
    """mean((pred - target)^2) over all elements, as a 0-d array on pred's device."""
    if on_gpu(pred):
        x = xp(pred)
        d2 = _sq_diff_k(x.ascontiguousarray(pred), x.ascontiguousarray(target))
        return _mean_on_device(d2.reshape(-1), d2.size)
    d = pred - target
    return np.asarray(np.mean(np.square(d, out=d)))


def mse_backward(pred, target):
    """dL/dpred = 2 (pred - target) / size."""
    scale = pred.dtype.type(2.0 / pred.size)
    if on_gpu(pred):
        x = xp(pred)
        return _mse_grad_k(x.ascontiguousarray(pred), x.ascontiguousarray(target), scale)
    g = pred - target
    g *= scale
    return g
