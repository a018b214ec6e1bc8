"""2-D convolution (cross-correlation, as PyTorch), forward and backward, by im2col and GEMM.

    y[n, o, oh, ow] = b[o] + sum_{c, kh, kw} w[o, c, kh, kw] * xpad[n, c, oh*SH + kh, ow*SW + kw]

im2col copies every receptive field into a column of ``col``; the convolution is then one matrix product
with the weights seen as a (Cout, Cin*KH*KW) matrix. Backward is two more products with the same ``col``:
``gw = gy @ col.T`` (the weight-sharing sum over every position and image) and ``gcol = w.T @ gy``, whose
columns col2im adds back onto the input positions they were copied from (the input gradient).

The layout of ``col`` is (Cin*KH*KW, OH*OW*N): rows ordered (c, kh, kw) as in the weight, columns
(oh, ow, n) with the **batch innermost**. Every GEMM is then a plain 2-D product, and on the CPU im2col
and col2im move runs of OW*N contiguous numbers per (c, kh, kw, oh) instead of runs of OW (2-3x faster
on LeNet's layers). The GEMM's output z is therefore (Cout, OH, OW, N), not NCHW: the epilogue that
adds the bias and applies the activation (and, in a Sequential, the pooling that follows) writes NCHW
as it goes, and its backward twin writes dL/dz back in the GEMM's layout while it sums the bias
gradient (:mod:`gpucnn.kernels.activation`), so no pass of its own moves an activation between layouts.

GPU: Numba kernels for im2col and col2im (col2im gathers, for each input element, every (kh, kw, oh, ow) it
was copied to: deterministic, no atomics, no zero fill); cuBLAS for the GEMMs, each writing into an array
from ``backend.empty`` (a training step's workspace). ``col`` has the batch innermost and x the width, so
both kernels transpose; ``DATA_MOVEMENT`` (read at every call) picks how:

* ``"tiled"`` (the default): a block stages a tile of TILE images by up to TILE columns (a wider tile for
  a smaller batch) in shared memory, so that global memory is read and written along its innermost axis.
* ``"plain"``: a thread per element, kept for comparison (bench) and as the reference of the tiled ones;
  one side of each kernel's traffic is then strided (im2col's reads of x, col2im's reads of col).

Both give the same numbers to the bit (col2im adds in the CPU's order).

CPU: the same products on a lighter lowering (MEC: each input row copied KW times, not each window KH*KW
times; see "the CPU's lowering" below), one OpenBLAS GEMM per output row. im2col and col2im stay the
reference and the GPU's data movement (bench/NOTES.md: what the CPU gained when it stopped writing im2col's
matrix).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import backend
from ..backend import cuda, gpu_kernel, launch, matmul, on_gpu, xp
from .activation import activation_bias_backward, bias_activation_nchw

DATA_MOVEMENT = "tiled"     # "tiled" or "plain": the GPU's im2col/col2im kernels (see above)
TILE = 32                   # images per tile (a warp along n), and columns per tile for a full batch
SHARED_LIMIT = 48 * 1024    # bytes of shared memory a block may ask for without opting in


def _two(v) -> tuple:
    """``2 -> (2, 2)``; a pair stays a pair (kernel functions take either, as the layers do)."""
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    if size + 2 * pad < kernel:
        raise ValueError(f"conv: kernel {kernel} is larger than the padded input {size} + 2*{pad}")
    return (size + 2 * pad - kernel) // stride + 1


# ---------------------------------------------------------------------------------------- GPU kernels
# ``col`` reaches the kernels as its 6-d view (C, KH, KW, OH, OW, N), so that indices read as names.
#
# Two versions of each data-movement kernel (DATA_MOVEMENT picks one). The plain ones are a thread per
# element: im2col's writes run along n (coalesced) but its reads x[n, c, h, w] are C*H*W apart between
# neighbouring threads; col2im's writes run along w but its reads col[..., n] are N apart. Both are a
# transpose between "n innermost" (col) and "w innermost" (x, gx), so the tiled ones stage a tile of
# (images x columns) in shared memory: read global memory along w, write along n (im2col), or read along n,
# write along w (col2im). Every col and gx element is written by exactly one block: no atomics, no zero fill.


@gpu_kernel
def _im2col_kernel(x, col, SH, SW, PH, PW):
    # a thread per col element (a grid-stride loop: see backend.launch; on a GPU it runs once per thread)
    H, W = x.shape[2], x.shape[3]
    KH, KW, OH, OW, N = col.shape[1], col.shape[2], col.shape[3], col.shape[4], col.shape[5]
    for i in range(cuda.grid(1), col.size, cuda.gridsize(1)):
        n = i % N
        ow = (i // N) % OW
        oh = (i // (N * OW)) % OH
        kw = (i // (N * OW * OH)) % KW
        kh = (i // (N * OW * OH * KW)) % KH
        c = i // (N * OW * OH * KW * KH)
        h = oh * SH - PH + kh
        w = ow * SW - PW + kw
        if 0 <= h < H and 0 <= w < W:
            col[c, kh, kw, oh, ow, n] = x[n, c, h, w]
        else:
            col[c, kh, kw, oh, ow, n] = 0      # the zero padding exists only here, never as an array


@gpu_kernel
def _im2col_tiled_kernel(x, col, SH, SW, PH, PW, TN, TOW):
    """Block per (c, kh, oh, a tile of TOW output columns, a tile of TN images): the tile's input row
    x[n0:n0+TN, c, h, w0:w0+span] goes to shared memory read along w, then every col[c, kh, :, oh, ow, n] of
    the tile is written along n (for a tile holding the whole batch, one contiguous run per kw)."""
    N, H, W = x.shape[0], x.shape[2], x.shape[3]
    KH, KW, OH, OW = col.shape[1], col.shape[2], col.shape[3], col.shape[4]
    n_tiles = (N + TN - 1) // TN
    ow_tiles = (OW + TOW - 1) // TOW
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    S = ((TOW - 1) * SW + KW) | 1           # shared row stride per image: odd, so that the write phase's
    zero = x.dtype.type(0)                  # reads (a warp along n) hit 32 different banks
    tile = cuda.shared.array(0, dtype=x.dtype)
    # a tile per block on a GPU; on "sim" one block walks every tile (a Python thread costs more than a loop)
    for b in range(cuda.blockIdx.x, col.shape[0] * KH * OH * ow_tiles * n_tiles, cuda.gridDim.x):
        nt = b % n_tiles
        owt = (b // n_tiles) % ow_tiles
        oh = (b // (n_tiles * ow_tiles)) % OH
        kh = (b // (n_tiles * ow_tiles * OH)) % KH
        c = b // (n_tiles * ow_tiles * OH * KH)
        n0 = nt * TN
        ow0 = owt * TOW
        tn = min(TN, N - n0)                # the last tiles along n and ow may be narrower
        tow = min(TOW, OW - ow0)
        span = (tow - 1) * SW + KW          # the input columns the tile reads, from w0
        h = oh * SH - PH + kh
        w0 = ow0 * SW - PW
        inside = 0 <= h < H                 # else this whole row of col is zero padding
        if inside:
            for j in range(t, tn * span, threads):
                i = j // span
                dw = j - i * span
                w = w0 + dw
                tile[i * S + dw] = x[n0 + i, c, h, w] if 0 <= w < W else zero
        cuda.syncthreads()
        per_kw = tow * tn
        for j in range(t, KW * per_kw, threads):
            kw = j // per_kw
            r = j - kw * per_kw
            dow = r // tn
            i = r - dow * tn
            col[c, kh, kw, oh, ow0 + dow, n0 + i] = tile[i * S + dow * SW + kw] if inside else zero
        cuda.syncthreads()                  # the tile is read before the next one is loaded


@gpu_kernel
def _col2im_kernel(col, gx, SH, SW, PH, PW):
    # a thread per input element (a grid-stride loop, as im2col's)
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    KH, KW, OH, OW = col.shape[1], col.shape[2], col.shape[3], col.shape[4]
    for i in range(cuda.grid(1), gx.size, cuda.gridsize(1)):
        w = i % W
        h = (i // W) % H
        c = (i // (W * H)) % C
        n = i // (W * H * C)
        hp = h + PH                 # position in the padded input
        wp = w + PW
        # the outputs whose window covers (hp, wp): oh*SH <= hp <= oh*SH + KH - 1, at offset kh = hp - oh*SH
        oh_start, oh_end = max((hp - KH + SH) // SH, 0), min(hp // SH + 1, OH)
        ow_start, ow_end = max((wp - KW + SW) // SW, 0), min(wp // SW + 1, OW)
        acc = gx.dtype.type(0)
        # oh and ow downwards: kh and kw upwards, the CPU's order of addition (the same sum to the bit)
        for oh in range(oh_end - 1, oh_start - 1, -1):
            for ow in range(ow_end - 1, ow_start - 1, -1):
                acc += col[c, hp - oh * SH, wp - ow * SW, oh, ow, n]
        gx[n, c, h, w] = acc


@gpu_kernel
def _col2im_tiled_kernel(col, gx, SH, SW, PH, PW, TN, TW):
    """Block per (c, h, a tile of TW input columns, a tile of TN images): each thread sums the col entries
    of its (n, w), neighbouring threads taking neighbouring n (reads along col's n), into shared memory;
    then gx[n0:n0+TN, c, h, w0:w0+TW] is written along w."""
    N, H, W = gx.shape[0], gx.shape[2], gx.shape[3]
    KH, KW, OH, OW = col.shape[1], col.shape[2], col.shape[3], col.shape[4]
    n_tiles = (N + TN - 1) // TN
    w_tiles = (W + TW - 1) // TW
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    # shared stride per column: odd, so that the write phase (a warp along w) has no bank conflicts
    S = TN | 1
    tile = cuda.shared.array(0, dtype=gx.dtype)
    for b in range(cuda.blockIdx.x, gx.shape[1] * H * w_tiles * n_tiles, cuda.gridDim.x):   # as im2col's
        nt = b % n_tiles
        wt = (b // n_tiles) % w_tiles
        h = (b // (n_tiles * w_tiles)) % H
        c = b // (n_tiles * w_tiles * H)
        n0 = nt * TN
        w0 = wt * TW
        tn = min(TN, N - n0)
        tw = min(TW, W - w0)
        hp = h + PH
        oh_start, oh_end = max((hp - KH + SH) // SH, 0), min(hp // SH + 1, OH)
        for j in range(t, tw * tn, threads):
            dw = j // tn
            i = j - dw * tn
            wp = w0 + dw + PW
            ow_start, ow_end = max((wp - KW + SW) // SW, 0), min(wp // SW + 1, OW)
            acc = gx.dtype.type(0)
            for oh in range(oh_end - 1, oh_start - 1, -1):      # the plain kernel's order (the CPU's)
                for ow in range(ow_end - 1, ow_start - 1, -1):
                    acc += col[c, hp - oh * SH, wp - ow * SW, oh, ow, n0 + i]
            tile[dw * S + i] = acc
        cuda.syncthreads()
        for j in range(t, tn * tw, threads):
            i = j // tw
            dw = j - i * tw
            gx[n0 + i, c, h, w0 + dw] = tile[dw * S + i]
        cuda.syncthreads()


# ---------------------------------------------------------------------------------------- launching them

def _tile(N: int, cols: int):
    """(TN, TC): a tile of TN images by TC columns. TILE images when the batch has that many, and about
    TILE*TILE elements: a small batch gets a wider tile, so that a warp still moves one contiguous run."""
    TN = min(N, TILE)
    return TN, min(cols, max(TILE, TILE * TILE // TN))


def _block_threads(elements: int) -> int:
    """Threads of a tiled block: a multiple of the warp covering ``elements``, at most 256. On "sim" at most
    8: each is a Python thread, and each syncthreads waits for all of them (32 made these kernels 3x slower)."""
    if backend.sim_sized():
        return min(8, elements)
    return min(256, (elements + 31) // 32 * 32)


def _blocks(tiles: int) -> int:
    """A block per tile; one block walking them all on "sim"."""
    return min(tiles, 1) if backend.sim_sized() else tiles


def _im2col_tiles(N, OW, KW, SW, itemsize):
    """(TN, TOW, shared bytes) of the tiled im2col, the tile shrunk until its input rows fit in
    SHARED_LIMIT; None when not even one image's one output column fits (a kernel thousands wide)."""
    TN, TOW = _tile(N, OW)

    def nbytes(TN, TOW):
        return TN * (((TOW - 1) * SW + KW) | 1) * itemsize

    while TOW > 1 and nbytes(TN, TOW) > SHARED_LIMIT:
        TOW = (TOW + 1) // 2
    while TN > 1 and nbytes(TN, TOW) > SHARED_LIMIT:
        TN = (TN + 1) // 2
    return (TN, TOW, nbytes(TN, TOW)) if nbytes(TN, TOW) <= SHARED_LIMIT else None


def _im2col_gpu(x, col, SH, SW, PH, PW):
    C, KH, KW, OH, OW, N = col.shape
    tiles = _im2col_tiles(N, OW, KW, SW, x.itemsize) if _data_movement() == "tiled" and col.size else None
    if tiles is None:
        launch(_im2col_kernel, col.size, x, col, SH, SW, PH, PW, grid_stride=True)
        return
    TN, TOW, nbytes = tiles
    blocks = _blocks(C * KH * OH * -(-OW // TOW) * -(-N // TN))
    threads = _block_threads(max(TN * ((TOW - 1) * SW + KW), KW * TOW * TN))
    launch(_im2col_tiled_kernel, blocks * threads, x, col, SH, SW, PH, PW, TN, TOW,
           threads=threads, blocks=blocks, shared_bytes=nbytes)


def _col2im_gpu(col, gx, SH, SW, PH, PW):
    N, C, H, W = gx.shape
    if _data_movement() == "plain" or gx.size == 0:
        launch(_col2im_kernel, gx.size, col, gx, SH, SW, PH, PW, grid_stride=True)
        return
    TN, TW = _tile(N, W)
    blocks = _blocks(C * H * -(-W // TW) * -(-N // TN))
    threads = _block_threads(TN * TW)
    launch(_col2im_tiled_kernel, blocks * threads, col, gx, SH, SW, PH, PW, TN, TW,
           threads=threads, blocks=blocks, shared_bytes=TW * (TN | 1) * gx.itemsize)


def _data_movement() -> str:
    if DATA_MOVEMENT not in ("tiled", "plain"):
        raise ValueError(f"conv.DATA_MOVEMENT must be 'tiled' or 'plain', got {DATA_MOVEMENT!r}")
    return DATA_MOVEMENT


# ---------------------------------------------------------------------------------------- im2col, col2im

def im2col(x, KH: int, KW: int, stride, padding):
    """The (C*KH*KW, OH*OW*N) matrix whose column (oh, ow, n) is the receptive field of output (oh, ow)
    of image n, zero padding included; rows in the weight's (c, kh, kw) order."""
    N, C, H, W = x.shape
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    OH, OW = _output_size(H, KH, SH, PH), _output_size(W, KW, SW, PW)
    if on_gpu(x):
        col = backend.empty((C, KH, KW, OH, OW, N), x.dtype, x)
        _im2col_gpu(xp(x).ascontiguousarray(x), col, SH, SW, PH, PW)
        return col.reshape(C * KH * KW, OH * OW * N)
    # batch innermost from the start, so that the copy below moves contiguous runs of OW*N numbers
    xt = np.zeros((C, H + 2 * PH, W + 2 * PW, N), dtype=x.dtype)
    xt[:, PH:PH + H, PW:PW + W, :] = x.transpose(1, 2, 3, 0)
    col = np.empty((C, KH, KW, OH, OW, N), dtype=x.dtype)
    np.copyto(col, _windows(xt, KH, KW, SH, SW, OH, OW))
    return col.reshape(C * KH * KW, OH * OW * N)


def _windows(xt, KH, KW, SH, SW, OH, OW):
    """The (C, KH, KW, OH, OW, N) view of every receptive field of xt (C, H, W, N): element (c, kh, kw, oh,
    ow, n) is xt[c, oh*SH + kh, ow*SW + kw, n]. No copy (as sliding_window_view, with less overhead per call)."""
    sc, sh, sw, sn = xt.strides
    return as_strided(xt, shape=(xt.shape[0], KH, KW, OH, OW, xt.shape[3]),
                      strides=(sc, sh, sw, sh * SH, sw * SW, sn), writeable=False)


def col2im(col, x_shape, KH: int, KW: int, stride, padding):
    """The inverse scatter of :func:`im2col`: an x-shaped array where each input element is the sum of
    every entry of ``col`` that im2col copied from it (entries copied from the padding are dropped)."""
    N, C, H, W = x_shape
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    OH, OW = _output_size(H, KH, SH, PH), _output_size(W, KW, SW, PW)
    col6 = col.reshape(C, KH, KW, OH, OW, N)
    if on_gpu(col):
        gx = backend.empty((N, C, H, W), col.dtype, col)
        _col2im_gpu(xp(col).ascontiguousarray(col6), gx, SH, SW, PH, PW)
        return gx
    gxt = np.zeros((C, H + 2 * PH, W + 2 * PW, N), dtype=col.dtype)
    for kh in range(KH):
        for kw in range(KW):
            # output (oh, ow) read the padded input at (oh*SH + kh, ow*SW + kw)
            gxt[:, kh:kh + SH * OH:SH, kw:kw + SW * OW:SW] += col6[:, kh, kw]
    return np.ascontiguousarray(gxt[:, PH:PH + H, PW:PW + W].transpose(3, 0, 1, 2))


# ---------------------------------------------------------------------------------------- the CPU's lowering
# On the CPU the convolution runs on a lighter lowering than im2col (MEC, Cho and Brand 2017): each padded
# input row is copied KW times, once per horizontal kernel offset, into Y (Hp, C, KW, OW, N). The matrix of
# output row oh's receptive fields, rows in (kh, c, kw) order, is then KH*C*KW consecutive rows of Y: one
# contiguous block, found by pointer arithmetic. Consecutive output rows share KH - SH of those rows, so Y
# holds about 1/KH of im2col's copies (2.3 MB instead of 10 MB on LeNet's first layer at batch 128) and
# every GEMM reads from cache-sized blocks. The weights are read in the same (kh, c, kw) order.
#
# The GEMMs are cut to the size OpenBLAS (NumPy's BLAS) multiplies fastest. For a product of M*N*K <= 100**3 its
# AVX-512 builds run a small-matrix kernel that reads both operands in place; above that they first pack both into
# cache-sized panels, which a thin product cannot repay: (6, 25) @ (25, 6656) runs at 65 GFLOP/s on one core,
# (6, 25) @ (25, 6720) at 39. The small kernel runs on one core, so a GEMM is sliced (into columns of at most
# SMALL_GEMM // (M*K)) only where the slices stay wide, i.e. its M*K is tiny: LeNet's first layer, whose forward
# GEMMs then run 2.6x and grad-weight 2x faster. Its second layer (M*K = 2400, slices of 416) runs as fast whole
# on two cores, and AlexNet's (M*K of 35 000 to 880 000) are left whole, where packing pays.

SMALL_GEMM = 100 ** 3       # OpenBLAS's bound on M*N*K for its small-matrix kernel (see above)
MIN_SLICE = 1024            # narrower slices than this: the GEMM stays whole, on as many cores as BLAS has
PARTS = 1 << 18             # elements of grad-weight's per-row products kept at once (cache-sized)


def _lower_rows(x, KH: int, KW: int, SH: int, SW: int, PH: int, PW: int):
    """Y (Hp, C, KW, OW, N) with Y[h, c, kw, ow, n] = xpad[n, c, h, ow*SW + kw] (zeros in the padding)."""
    N, C, H, W = x.shape
    Hp, Wp = H + 2 * PH, W + 2 * PW
    OW = _output_size(W, KW, SW, PW)
    xt = np.zeros((Hp, C, Wp, N), dtype=x.dtype) if (PH or PW) else np.empty((Hp, C, Wp, N), dtype=x.dtype)
    xt[PH:PH + H, :, PW:PW + W] = x.transpose(2, 1, 3, 0)
    sh, sc, sw, sn = xt.strides
    Y = np.empty((Hp, C, KW, OW, N), dtype=x.dtype)
    np.copyto(Y, as_strided(xt, (Hp, C, KW, OW, N), (sh, sc, sw, sw * SW, sn), writeable=False))
    return Y


def _row_blocks(Y, KH: int, SH: int, OH: int):
    """The (OH, KH*C*KW, OW*N) view of Y whose block oh is output row oh's receptive fields (no copy)."""
    _, C, KW, OW, N = Y.shape
    L, it = OW * N, Y.itemsize
    return as_strided(Y, (OH, KH * C * KW, L), (SH * C * KW * L * it, L * it, it), writeable=False)


def _weights_khckw(w):
    """The weights as the (Cout, KH*C*KW) matrix matching _row_blocks' row order."""
    Cout, C, KH, KW = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3)).reshape(Cout, KH * C * KW)


def _slice_width(mk: int, L: int) -> int:
    """Columns per GEMM for a product whose other two sizes multiply to ``mk``: equal slices of L small enough
    for OpenBLAS's small-matrix kernel, or L (the GEMM whole) where those would be narrower than MIN_SLICE."""
    width = SMALL_GEMM // mk
    if width < MIN_SLICE or width >= L:
        return L
    slices = -(-L // width)
    return -(-L // slices)


# ---------------------------------------------------------------------------------------- the passes

def conv2d_gemm(x, w, stride, padding):
    """``(z, col)``: z = w @ im2col(x), the convolution before bias and activation, left in col's column
    order as (Cout, OH, OW, N); the epilogues of :mod:`gpucnn.kernels.activation` finish it. ``col`` is
    what backward needs: im2col's matrix on the GPU, the lighter row lowering Y on the CPU."""
    N = x.shape[0]
    Cout, _, KH, KW = w.shape
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    OH, OW = _output_size(x.shape[2], KH, SH, PH), _output_size(x.shape[3], KW, SW, PW)
    if on_gpu(x):
        col = im2col(x, KH, KW, stride, padding)
        z = matmul(w.reshape(Cout, -1), col, out=backend.empty((Cout, OH * OW * N), x.dtype, x))
        return z.reshape(Cout, OH, OW, N), col
    Y = _lower_rows(x, KH, KW, SH, SW, PH, PW)
    z = np.empty((Cout, OH, OW, N), dtype=x.dtype)
    wk, blocks, L = _weights_khckw(w), _row_blocks(Y, KH, SH, OH), OW * N
    zt = z.reshape(Cout, OH, L).transpose(1, 0, 2)
    # one GEMM per output row (a batched matmul over contiguous blocks of Y), each into its slice of z; a thin
    # one (small Cout) in slices of columns that OpenBLAS multiplies without packing (see "the CPU's lowering")
    width = _slice_width(wk.size, L)
    for l0 in range(0, L, width):
        matmul(wk, blocks[:, :, l0:l0 + width], out=zt[:, :, l0:l0 + width])
    return z, Y


def conv2d_forward(x, w, b, stride, padding, activation: str = "identity", slope: float = 0.01):
    """``y = act(conv(x, w) + b)`` for x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout,) or None.

    Returns ``(y, col)``: y is (N, Cout, OH, OW); ``col`` is what backward needs (see conv2d_gemm).
    Three launches on the GPU: im2col, the GEMM, and bias + activation + the move to NCHW in one.
    """
    z, col = conv2d_gemm(x, w, stride, padding)
    return bias_activation_nchw(z, b, activation, slope), col


def conv2d_gemm_backward(x_shape, col, w, gz, stride, padding, need_gx: bool = True, need_gw: bool = True,
                         gw_out=None):
    """``(gx, gw)`` from gz = dL/dz in the GEMM's layout (Cout, OH, OW, N) (see :func:`conv2d_gemm`).

    gw = gz @ col.T sums over every output position and image (the weights are shared), written into
    ``gw_out`` when given (a flat gradient buffer's view); gx = col2im(w.T @ gz). None where not needed.
    Within a training step ``col`` is released (backend.release) once gw has read it: gx's GEMM output, as large,
    may take its memory.
    """
    Cout, C, KH, KW = w.shape
    OH = gz.shape[1]
    (SH, SW), (PH, PW) = _two(stride), _two(padding)
    if on_gpu(gz):
        gz2 = gz.reshape(Cout, -1)
        gw = gx = None
        if need_gw:
            K = col.shape[0]
            gw = matmul(gz2, col.T, out=gw_out.reshape(Cout, K) if gw_out is not None
                        else backend.empty((Cout, K), col.dtype, col)).reshape(w.shape)
            backend.release(col)        # read no more: gcol below, as large, may take its memory
        if need_gx:
            gcol = matmul(w.reshape(Cout, -1).T, gz2, out=backend.empty((col.shape[0], gz2.shape[1]), gz.dtype, gz))
            gx = col2im(gcol, x_shape, KH, KW, stride, padding)
            backend.release(gcol)       # as large as col: its memory goes to the next request of the step
        return gx, gw
    gw = _weight_grad_rows(col, gz, KH, SH, gw_out) if need_gw else None
    gx = _input_grad_rows(w, gz, x_shape, SH, SW, PH, PW) if need_gx else None
    return gx, gw


def _weight_grad_rows(Y, gz, KH: int, SH: int, out=None):
    """gw (Cout, C, KH, KW): per output row, its receptive fields (a block of Y) times its gradient, summed over
    rows (the weight sharing), into ``out`` when given.

    The per-row products are summed as they come, a few rows at a time (PARTS elements), not stacked whole and
    summed after: on AlexNet's 3x3 layers the stack, OH products of (KH*C*KW, Cout), is 5x the size of Y itself
    (46 MB at batch 16), written once and read again. A thin product (LeNet's c1) also runs in slices of columns,
    for OpenBLAS's small-matrix kernel (see "the CPU's lowering"); those slices add up the same way."""
    Cout, OH, OW, N = gz.shape
    C, KW = Y.shape[1], Y.shape[2]
    K, L = KH * C * KW, OW * N
    blocks = _row_blocks(Y, KH, SH, OH)                                   # (OH, K, L)
    gzt = gz.reshape(Cout, OH, L).transpose(1, 2, 0)                      # (OH, L, Cout), a view
    rows, width = max(1, min(OH, PARTS // (K * Cout))), _slice_width(K * Cout, L)
    parts = np.empty((rows, K, Cout), dtype=gz.dtype)
    acc = np.zeros((K, Cout), dtype=gz.dtype)
    for o in range(0, OH, rows):
        for l0 in range(0, L, width):
            p = matmul(blocks[o:o + rows, :, l0:l0 + width], gzt[o:o + rows, l0:l0 + width], out=parts[:OH - o])
            acc += p[0] if len(p) == 1 else p.sum(axis=0)
    if out is None:
        out = np.empty((Cout, C, KH, KW), dtype=gz.dtype)
    np.copyto(out.transpose(2, 1, 3, 0), acc.reshape(KH, C, KW, Cout))
    return out


def _input_grad_rows(w, gz, x_shape, SH: int, SW: int, PH: int, PW: int):
    """gx, the adjoint of _lower_rows after the GEMM: per kernel row kh, w[:, :, kh].T @ gz gives every
    output row's share of the input rows oh*SH + kh (added into gY, Y's shape); then each of the KW copies
    of a row is added back at its horizontal offset."""
    Cout, C, KH, KW = w.shape
    N, _, H, W = x_shape
    _, OH, OW, _ = gz.shape
    Hp, Wp, L = H + 2 * PH, W + 2 * PW, OW * N
    gz3 = gz.reshape(Cout, OH, L).transpose(1, 0, 2)                       # (OH, Cout, L), a view
    wk = w.transpose(2, 1, 3, 0).reshape(KH, C * KW, Cout)                 # per kh: (C*KW, Cout)
    gY = np.zeros((Hp, C * KW, L), dtype=gz.dtype)
    part = np.empty((OH, C * KW, L), dtype=gz.dtype)
    width = _slice_width(C * KW * Cout, L)         # a thin product in slices (see "the CPU's lowering")
    for kh in range(KH):
        for l0 in range(0, L, width):
            matmul(wk[kh], gz3[:, :, l0:l0 + width], out=part[:, :, l0:l0 + width])
        gY[kh:kh + SH * (OH - 1) + 1:SH] += part
    gY = gY.reshape(Hp, C, KW, OW, N)
    gxt = np.zeros((C, Hp, Wp, N), dtype=gz.dtype)
    for kw in range(KW):
        gxt[:, :, kw:kw + SW * (OW - 1) + 1:SW] += gY[:, :, kw].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(gxt[:, PH:PH + H, PW:PW + W].transpose(3, 0, 1, 2))


def conv2d_backward(x_shape, col, w, gy, stride, padding, need_gx: bool = True, need_gb: bool = True,
                    need_gw: bool = True):
    """``(gx, gw, gb)`` from ``gy`` = dL/d(conv output before the activation), shape (N, Cout, OH, OW).

    gw sums over every output position and image (the weights are shared); gb sums gy over N, OH, OW.
    gx is None unless ``need_gx`` (the first layer needs none), gb None unless ``need_gb``, gw None unless
    ``need_gw`` (a saliency map wants gx alone). On the GPU gy moves to the GEMM's layout and is summed
    into gb by one kernel.
    """
    gz, gb = activation_bias_backward(gy, None, "identity", layout="gemm", need_gb=need_gb)
    gx, gw = conv2d_gemm_backward(x_shape, col, w, gz, stride, padding, need_gx, need_gw)
    return gx, gw, gb


def _bias_grad(gy2):
    """The sum of each row of gy2 (Cout, L): dL/db (one block per row on the GPU)."""
    Cout, L = gy2.shape
    return activation_bias_backward(gy2.reshape(1, Cout, L), None, "identity")[1]
