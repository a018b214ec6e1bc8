"""Losses: softmax cross-entropy fused with its gradient, the softmax alone, and mean squared error.

Cross-entropy of logits z (N, C) and integer labels y (N,), averaged over the batch:

    L = 1/N sum_n [ log sum_k exp(z[n, k]) - z[n, y[n]] ]       dL/dz = (softmax(z) - onehot(y)) / N

Both are computed from the row max m subtracted first (z - m <= 0), so exp never overflows and logits of
+-1e4 give finite, exact results. GPU: ONE launch of one block: each thread computes the max, log-sum-exp,
loss and gradient of its rows in a single pass, then the block sums the row losses in shared memory into
the mean (on the device: no host copy, no sync). Beyond 8192 rows a thread per row and a second launch
for the mean. ``tally`` adds a step's loss and correct predictions to fit's running sums, on the device.
MSE: L = mean((p - t)^2), dL/dp = 2 (p - t) / size; GPU: ElementwiseKernels and the same block sum.

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
from ..backend import cuda, gpu_kernel, launch, on_gpu, to_numpy, xp
from ..elementwise import ElementwiseKernel
from .reduce import block_sum

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

_BLOCK = 128   # threads of the one block that sums row losses / squared errors (at most)
_ONE_BLOCK_ROWS = 8192   # up to this batch the whole cross-entropy is one launch (64 rows per thread)


@gpu_kernel
def _softmax_xent_kernel(logits, labels, grad, out, n_rows, n_classes, inv_n):
    """ONE block: each thread takes rows n = t, t + threads, ...: the row's loss logsumexp(z[n]) - z[n, y[n]]
    and its gradient row (softmax(z[n]) - onehot) / N; then the block sums the row losses in shared memory
    (float64, a fixed order: deterministic) and thread 0 writes the mean to out[0]. Loss, gradient and
    mean in a single launch; a batch of thousands of rows is a few rows per thread."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    partial = cuda.shared.array(_BLOCK, np.float64)
    total = 0.0
    for n in range(t, n_rows, threads):
        y = labels[n]
        if y < 0 or y >= n_classes:
            # never index with a bad label (that would read and write out of bounds): poison the row instead
            total += math.nan
            for k in range(n_classes):
                grad[n, k] = math.nan
            continue
        m = logits[n, 0]
        for k in range(1, n_classes):
            m = max(m, logits[n, k])
        s = 0.0   # a double: the sum of C exponentials in full precision costs nothing next to the memory traffic
        for k in range(n_classes):
            e = math.exp(logits[n, k] - m)
            grad[n, k] = e
            s += e
        total += math.log(s) - (logits[n, y] - m)
        scale = inv_n / s
        for k in range(n_classes):
            grad[n, k] *= scale
        grad[n, y] -= inv_n
    partial[t] = total
    block_sum(partial, t, threads)
    if t == 0:
        out[0] = partial[0] * inv_n


@gpu_kernel
def _softmax_xent_rows(logits, labels, row_loss, grad, n_rows, n_classes, inv_n):
    """Thread per row n, for batches too large for one block: row_loss[n] and the gradient row; a
    _block_sum launch then takes the mean."""
    n = cuda.grid(1)
    if n >= n_rows:
        return
    y = labels[n]
    if y < 0 or y >= n_classes:
        row_loss[n] = math.nan
        for k in range(n_classes):
            grad[n, k] = math.nan
        return
    m = logits[n, 0]
    for k in range(1, n_classes):
        m = max(m, logits[n, k])
    s = 0.0
    for k in range(n_classes):
        e = math.exp(logits[n, k] - m)
        grad[n, k] = e
        s += e
    row_loss[n] = math.log(s) - (logits[n, y] - m)
    scale = inv_n / s
    for k in range(n_classes):
        grad[n, k] *= scale
    grad[n, y] -= inv_n


@gpu_kernel
def _tally_kernel(value, logits, labels, acc, n_rows, n_classes, weight):
    """ONE block: acc[0] += weight * value[0], acc[1] += the number of rows whose largest logit (the first, as
    argmax) is at the label, acc[2] += the labels outside [0, classes): the running sums fit keeps on the device
    (float64 acc). The last is the device flag a replayed step raises on when fit reads the sums back."""
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    partial = cuda.shared.array(_BLOCK, np.float64)
    bad_partial = cuda.shared.array(_BLOCK, np.float64)
    hits = 0.0
    bad = 0.0
    for n in range(t, n_rows, threads):
        y = labels[n]
        if y < 0 or y >= n_classes:
            bad += 1.0
            continue
        best = logits[n, 0]
        arg = 0
        for k in range(1, n_classes):
            v = logits[n, k]
            if v > best or (v != v and best == best):    # NumPy's argmax: the first NaN counts as the max
                best = v
                arg = k
        if arg == y:
            hits += 1.0
    partial[t] = hits
    bad_partial[t] = bad
    block_sum(partial, t, threads)
    block_sum(bad_partial, t, threads)
    if t == 0:
        acc[0] += weight * value[0]
        acc[1] += partial[0]
        acc[2] += bad_partial[0]


@gpu_kernel
def _softmax_rows(logits, probs, n_rows, n_classes):
    """Thread per row n: probs[n] = exp(z[n] - max) / sum(exp(z[n] - max))."""
    n = cuda.grid(1)
    if n >= n_rows:
        return
    m = logits[n, 0]
    for k in range(1, n_classes):
        m = max(m, logits[n, k])
    s = 0.0
    for k in range(n_classes):
        e = math.exp(logits[n, k] - m)
        probs[n, k] = e
        s += e
    inv_s = 1.0 / s
    for k in range(n_classes):
        probs[n, k] *= inv_s


@gpu_kernel
def _block_sum(values, out, n, scale):
    """out[0] = scale * sum(values[:n]) by ONE block of _BLOCK threads (launch exactly _BLOCK threads).

    Each thread adds a strided slice in double, then the block halves the partial sums in shared memory.
    The order is fixed, so the result is deterministic (no atomics). One block suffices for the sizes a
    loss sees (a batch of rows or outputs).
    """
    t = cuda.threadIdx.x
    partial = cuda.shared.array(_BLOCK, np.float64)
    acc = 0.0
    for k in range(t, n, _BLOCK):
        acc += values[k]
    partial[t] = acc
    block_sum(partial, t, _BLOCK)
    if t == 0:
        out[0] = partial[0] * scale


def _mean_on_device(values, n: int):
    """sum(values) / n as a 0-d array on values' device: one block-sum launch, no host copy."""
    out = backend.empty((1,), values.dtype, values)
    launch(_block_sum, _BLOCK, values, out, n, 1.0 / n, threads=_BLOCK)
    return out.reshape(())


# ---------------------------------------------------------------------------- GPU: elementwise kernels
_sq_diff_k = ElementwiseKernel("T p, T t", "T d2", "T d = p - t; d2 = d * d", "loss_sq_diff")
_mse_grad_k = ElementwiseKernel("T p, T t, T scale", "T g", "g = scale * (p - t)", "loss_mse_grad")


# Binary cross-entropy, elementwise, loss and gradient in one pass (the batch mean is a _block_sum after it).
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
        if n <= _ONE_BLOCK_ROWS:
            out = backend.empty((1,), logits.dtype, logits)
            threads = backend.reduction_threads(n, _BLOCK)
            launch(_softmax_xent_kernel, threads, logits, labels, grad, out, n, c, 1.0 / n, threads=threads)
            return out.reshape(()), grad
        row_loss = backend.empty((n,), logits.dtype, logits)
        launch(_softmax_xent_rows, n, logits, labels, row_loss, grad, n, c, 1.0 / n)
        return _mean_on_device(row_loss, n), grad
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
        threads = backend.reduction_threads(n, _BLOCK)
        launch(_tally_kernel, threads, value.reshape(1), logits, labels, acc, n, c, float(n), threads=threads)
        return acc
    bad = (labels < 0) | (labels >= c)
    acc[0] += float(value) * n
    acc[1] += int((logits.argmax(axis=1) == labels)[~bad].sum())
    acc[2] += int(bad.sum())
    return acc


def binary_cross_entropy(pred, target, from_logits: bool = True):
    """(mean binary cross-entropy as a 0-d array, dL/dpred) for predictions and targets of one shape, every
    element a binary task: ``pred`` logits (``from_logits``) or probabilities in [0, 1]. On the GPU one
    elementwise launch makes each element's loss and gradient, one block sum the mean (no host copy)."""
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
        n, c = logits.shape
        launch(_softmax_rows, n, logits, probs, n, c)
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
