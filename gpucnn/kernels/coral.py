"""CORAL (Cao, Mirjalili, Raschka 2020): rank-consistent ordinal regression, the lecture's age-prediction head.

K ordered classes become K-1 binary tasks "is the rank above k?", k = 0..K-2, sharing ONE weight vector w and
keeping a bias each:

    z[n, k] = x[n] . w + b[k]                      (logits, N x (K-1))
    L = 1/N sum_n sum_k [ softplus(-z) if y[n] > k else softplus(z) ]        (the binary cross-entropies)
    dL/dz[n, k] = (sigmoid(z[n, k]) - [y[n] > k]) / N
    rank[n] = #{k : z[n, k] > 0}                   (sigmoid(z) > 0.5)

Backward of the head: with s[n] = sum_k dL/dz[n, k] (the shared weight sees every task), gw = s^T x,
gb[k] = sum_n dL/dz[n, k] and gx = s w. GPU: a GEMV-shaped GEMM and one ElementwiseKernel forward; the loss is
the binary cross-entropy kernel on the levels (one elementwise launch, one block sum); backward one Numba
kernel for both sums (a thread per row for s, then per task for gb), and two GEMMs.

Reading the ranks for fit and evaluate: :func:`scores` gives each row [rank == y], [y outside [0, K)] and
|rank - y| (one ElementwiseKernel on the GPU), and :func:`tally` adds a step's loss, hits and bad labels to fit's
device sums as ``gpucnn.kernels.loss.tally`` does for the argmax, so fit reads nothing back per step.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import cuda, gpu_kernel, launch, matmul, on_gpu, xp
from ..elementwise import ElementwiseKernel
from .loss import _bce_logits_k, _block_sum, _BLOCK, check_labels

_logits_k = ElementwiseKernel("raw T s, raw T b, int64 tasks", "T z", "z = s[i / tasks] + b[i % tasks]",
                              "coral_logits")
# one thread per (row, column) of the (N, 3) scores: the row's rank is counted again by columns 0 and 2 (K-1 compares
# each: cheaper than a second launch)
_scores_k = ElementwiseKernel(
    "raw T z, raw L y, int64 tasks", "float64 s",
    "long long r = i / 3, c = i % 3; long long lab = (long long)y[r]; bool bad = lab < 0 || lab > tasks; "
    "long long rank = 0; for (long long k = 0; k < tasks; ++k) { rank += z[r * tasks + k] > T(0) ? 1 : 0; } "
    "long long d = rank > lab ? rank - lab : lab - rank; "
    "s = c == 1 ? (bad ? 1.0 : 0.0) : bad ? 0.0 : c == 0 ? (rank == lab ? 1.0 : 0.0) : (double)d",
    "coral_scores")
_levels_k = ElementwiseKernel("raw L y, int64 tasks", "T lev", "lev = y[i / tasks] > (i % tasks) ? T(1) : T(0)",
                              "coral_levels")


@gpu_kernel
def _sums_kernel(gz, s, gb):
    """Thread i < N: s[i] = sum_k gz[i, k] (a row: what the shared weight sees); thread i < K-1 also
    gb[i] = sum_n gz[n, i] (a task's bias). Fixed order, no atomics."""
    i = cuda.grid(1)
    N, T = gz.shape
    if i < N:
        acc = gz.dtype.type(0)
        for k in range(T):
            acc += gz[i, k]
        s[i] = acc
    if i < T:
        acc = gz.dtype.type(0)
        for n in range(N):
            acc += gz[n, i]
        gb[i] = acc


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
        launch(_sums_kernel, max(N, T), gz, s.reshape(-1), gb)
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
        out = backend.empty((1,), logits.dtype, logits)
        launch(_block_sum, _BLOCK, rows.reshape(-1), out, rows.size, 1.0 / N, threads=_BLOCK)
        return out.reshape(()), grad
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


def scores(logits, labels):
    """Each row's reading, float64 (N, 3): [rank == y], [y outside [0, K)], |rank - y| (the first and the last 0
    for a label outside). On the GPU one elementwise launch and no host copy (fit calls it every step)."""
    N, T = logits.shape
    if on_gpu(logits):
        x = xp(logits)
        logits, labels = x.ascontiguousarray(logits), x.ascontiguousarray(labels)
        return _scores_k(logits, labels, T, backend.empty((N, 3), np.float64, logits))
    rank = coral_predict(logits)
    bad = (labels < 0) | (labels > T)
    err = np.where(bad, 0, np.abs(rank - labels))
    return np.stack([(rank == labels) & ~bad, bad, err], axis=1).astype(np.float64)


def tally(value, logits, labels, acc):
    """Add a CORAL step to fit's running sums ``acc`` (float64 (3,), on the logits' device), as
    ``gpucnn.kernels.loss.tally`` does for softmax: ``acc[0] += value * N``, ``acc[1] +=`` the rows whose rank is
    the label, ``acc[2] +=`` the labels outside [0, K) (fit raises on it). No host copy on the GPU."""
    s = scores(logits, labels)
    acc[0] += value.astype(np.float64) * s.shape[0]
    acc[1:] += s[:, :2].sum(axis=0)
    return acc
