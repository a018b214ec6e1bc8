"""Device functions that several op families' kernels share (Numba CUDA, compiled with the kernels that call them).

A block-wide sum is the one reduction every family needs: a bias gradient per channel, BatchNorm's statistics,
the loss's batch mean, the gradient norm for clipping. It is written here once; each kernel fills a shared
array with its threads' partial sums and calls :func:`block_sum`.
"""
from __future__ import annotations

from ..backend import cuda, gpu_device


@gpu_device
def block_sum(partial, t, threads):
    """partial[0] becomes the sum of partial[:threads] (``threads`` a power of two, t this thread's index):
    halving in shared memory, a fixed order, so the result is deterministic (no atomics). Every thread of the
    block calls it; it synchronises before and after, so each may read partial[0] when it returns."""
    cuda.syncthreads()
    half = threads // 2
    while half > 0:
        if t < half:
            partial[t] += partial[t + half]
        cuda.syncthreads()
        half //= 2
