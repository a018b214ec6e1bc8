"""Dropout: a mask that keeps each element with probability 1 - p, scaled by 1/(1-p), forward and backward.

The mask is not drawn from a random state but computed from a counter-based hash of (seed, step, index):

    h = H(H(index ^ k_seed) ^ k_step)        H: a 32-bit integer finaliser (bijective, good avalanche)
    u = (h >> 8) * 2^-24                     uniform in [0, 1) on a grid of 2^-24, exact in float32
    keep  <=>  u >= p  <=>  (h >> 8) >= ceil(p * 2^24)

so a step needs no random state on the host, the GPU makes the mask inside the kernel that applies it,
and the CPU (NumPy uint32 arithmetic) and the GPU (C unsigned int arithmetic) give bit-identical masks.
The comparison is done on integers, so the mask does not depend on the float type either.
k_seed = H(seed), k_step = H(step ^ k_seed): distinct (seed, step) pairs (mod 2^32) give distinct key
pairs, so two steps never share a mask by a key collision. Indices are taken mod 2^32.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import on_gpu, xp
from ..elementwise import ElementwiseKernel

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x7FEB352D, 0x846CA68B    # the multipliers of the "lowbias32" finaliser (C. Wellons' hash prospector)


def _hash32(x: int) -> int:
    """H on one Python int: the host computes the keys with it (and the tests check the array versions)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def _keys(seed: int, step: int):
    k_seed = _hash32(seed)
    return k_seed, _hash32((step & _MASK32) ^ k_seed)


def _threshold(p: float) -> int:
    """ceil(p * 2^24): p * 2^24 is exact in double, so keep <=> (h >> 8) >= threshold <=> u >= p exactly."""
    return math.ceil(p * (1 << 24))


def _scale(p: float, dtype):
    return np.dtype(dtype).type(1.0 / (1.0 - p))


# ---------------------------------------------------------------------------- GPU: elementwise kernels
# unsigned int arithmetic wraps mod 2^32 in C as uint32 does in NumPy (no promotion: unsigned int is at
# least int's rank), which is what makes the two masks identical.
_HASH = r"""
__device__ __forceinline__ unsigned int dropout_hash(unsigned int x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}
"""
# The keys come from a small device array (keys = [k_seed, k_step, threshold]) rather than the launch's
# arguments, so that a CUDA graph replaying a training step reads each step's keys.
_KEEP = ("unsigned int h = dropout_hash(dropout_hash((unsigned int)i ^ keys[0]) ^ keys[1]); "
         "bool keep = (h >> 8) >= keys[2];")

_mask_k = ElementwiseKernel("raw uint32 keys, T scale", "T mask",
                            _KEEP + " mask = keep ? scale : T(0)", "dropout_mask", preamble=_HASH)
# forward makes the mask and applies it in one pass; the mask is kept for backward
_forward_k = ElementwiseKernel("T x, raw uint32 keys, T scale", "T y, T mask",
                               _KEEP + " mask = keep ? scale : T(0); y = x * mask", "dropout_forward",
                               preamble=_HASH)
_backward_k = ElementwiseKernel("T gy, T mask", "T gx", "gx = gy * mask", "dropout_backward")


# ---------------------------------------------------------------------------- CPU twins
def _hash32_array(x):
    """H in place on a uint32 array (NumPy's uint32 arithmetic wraps like C's unsigned int)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(_M1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_M2)
    x ^= x >> np.uint32(16)
    return x


def _mask_cpu(shape, p, seed, step, dtype):
    k_seed, k_step = _keys(seed, step)
    h = np.arange(math.prod(shape), dtype=np.uint32)
    h ^= np.uint32(k_seed)
    _hash32_array(h)
    h ^= np.uint32(k_step)
    _hash32_array(h)
    h >>= np.uint32(8)
    mask = (h >= np.uint32(_threshold(p))).astype(dtype)
    mask *= _scale(p, dtype)
    return mask.reshape(shape)


# ---------------------------------------------------------------------------- the functions layers call
def dropout_keys(p: float, seed: int, step: int) -> list:
    """[k_seed, k_step, threshold]: what the GPU kernels read to make the mask of (seed, step)."""
    return [*_keys(seed, step), _threshold(p)]


def keys_buffer(like):
    """A layer's own small device array for the keys (None on the CPU path, which needs none)."""
    return backend.persistent_empty((3,), np.uint32, like) if on_gpu(like) else None


def write_keys(keys, p: float, seed: int, step: int):
    """Write the keys of (seed, step) into ``keys`` (from :func:`keys_buffer`)."""
    backend.write_scalars(keys, dropout_keys(p, seed, step))


def _device_keys(p, seed, step, like, keys):
    if keys is None:
        return backend.scalars(dropout_keys(p, seed, step), np.uint32, like)
    write_keys(keys, p, seed, step)
    return keys


def dropout_mask(shape, p: float, seed: int, step: int, like, keys=None):
    """The scaled mask (0 or 1/(1-p)) for ``shape``, in ``like``'s dtype, on ``like``'s device."""
    shape = tuple(int(s) for s in shape)
    dtype = like.dtype
    if on_gpu(like):
        mask = backend.empty(shape, dtype, like)
        _mask_k(_device_keys(p, seed, step, like, keys), _scale(p, dtype), mask)
        return mask
    return _mask_cpu(shape, p, seed, step, dtype)


def dropout_forward(x, p: float, seed: int, step: int, keys=None):
    """(y, mask): y = x * mask, the mask of (seed, step) for x's shape; keep the mask for backward.
    ``keys``: on the GPU path, a device array (keys_buffer) to write this step's keys into and read them
    from; a captured CUDA graph reads them there at each replay."""
    if on_gpu(x):
        x = xp(x).ascontiguousarray(x)
        return _forward_k(x, _device_keys(p, seed, step, x, keys), _scale(p, x.dtype))
    mask = _mask_cpu(x.shape, p, seed, step, x.dtype)
    return x * mask, mask


def dropout_backward(gy, mask):
    """dL/dx = gy * mask (dropped elements get no gradient; kept ones are scaled as in forward)."""
    if on_gpu(gy):
        return _backward_k(xp(gy).ascontiguousarray(gy), mask)
    return gy * mask
