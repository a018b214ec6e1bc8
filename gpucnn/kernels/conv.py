"""2-D convolution (cross-correlation, as PyTorch) by im2col and GEMM, forward and backward; what every
convolution algorithm is.

    z[o, oh, ow, n] = sum_{c, kh, kw} w[o, c, kh, kw] * xpad[n, c, oh*SH + kh, ow*SW + kw]

(grouped, G groups: output o reads only its group's C/G channels, w being (Cout, C/G, KH, KW)).

An algorithm is one object (ALGORITHMS, at the end: "gemm" here, "winograd" in winograd.py, "direct" in
direct.py): ``supports``, ``lower`` (the input as its products read it), ``forward`` (z and a Saved, what backward
reads), ``grad_weight``, ``grad_input`` and ``backward``, each with its GPU code and its CPU twin, each for any
number of groups; ``grad_input`` alone is a transposed convolution's forward (gpucnn.layers.ConvTranspose2D). z is
left in the GEMM layout (Cout, OH, OW, N), the batch innermost: the epilogues of :mod:`gpucnn.kernels.activation`
add the bias and apply the activation (and the pooling that follows) writing NCHW as they go, and their backward
twins write dL/dz back in this layout while they sum the bias gradient.

im2col copies every receptive field into a column of ``col`` (C*KH*KW, OH*OW*N): rows in the weight's
(c, kh, kw) order, columns (oh, ow, n). The convolution is then one product with the weights as a
(Cout, C*KH*KW) matrix, and backward two more: ``gw = gz @ col.T`` (the weight-sharing sum over every position
and image) and ``gcol = w.T @ gz``, whose columns col2im adds back where they were copied from. With the
batch innermost every GEMM is a plain 2-D product, and im2col and col2im move runs of OW*N numbers instead of
OW (2-3x faster on the CPU on LeNet's layers).

GPU: Numba kernels for im2col and col2im (see "GPU kernels"), cuBLAS for the GEMMs, each into an array from
``backend.empty`` (a training step's workspace). CPU: the same products on a lighter lowering (MEC: each input
row copied KW times, not each window KH*KW times; :mod:`gpucnn.kernels.mec`), one OpenBLAS GEMM per output row;
im2col and col2im stay the reference and the GPU's data movement (bench/NOTES.md: what the CPU gained when it
stopped writing im2col's matrix).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import backend
from ..backend import cuda, gpu_device, gpu_kernel, launch, matmul, on_gpu, xp
from . import mec
from .activation import activation_bias_backward, bias_activation_nchw
from .reduce import fills

DATA_MOVEMENT = "tiled"     # "tiled" or "plain": the GPU's im2col/col2im kernels (see "GPU kernels")
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
# "tiled" is the default; "plain" stays for comparison (bench) and as the tiled ones' reference. Both give the
# same numbers to the bit (col2im gathers each input's entries and adds them in the CPU's order).


@gpu_device
def unravel4(i, inner, middle, outer):
    """The indices (fastest first) of flat index i over (rest, outer, middle, inner), row-major: a thread's (or
    a block's) position, named, in one place for every kernel here and in winograd.py."""
    return i % inner, (i // inner) % middle, (i // (inner * middle)) % outer, i // (inner * middle * outer)


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
    n_tiles, ow_tiles = (N + TN - 1) // TN, (OW + TOW - 1) // TOW
    t, threads = cuda.threadIdx.x, cuda.blockDim.x
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
        w, h, c, n = unravel4(i, W, H, C)
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
    n_tiles, w_tiles = (N + TN - 1) // TN, (W + TW - 1) // TW
    t, threads = cuda.threadIdx.x, cuda.blockDim.x
    # shared stride per column: odd, so that the write phase (a warp along w) has no bank conflicts
    S = TN | 1
    tile = cuda.shared.array(0, dtype=gx.dtype)
    for b in range(cuda.blockIdx.x, gx.shape[1] * H * w_tiles * n_tiles, cuda.gridDim.x):   # as im2col's
        nt, wt, h, c = unravel4(b, n_tiles, w_tiles, H)
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


def _narrowed(width: int, size: int, tiles_of, threads_of) -> int:
    """A tile ``width`` halved (to 1 at least) until a block per tile, tiles_of(width) x threads_of(width), keeps the
    fill rule (reduce.fills) for the launch's largest array of ``size`` elements: narrower tiles, more blocks."""
    while width > 1 and not fills(size, tiles_of(width), threads_of(width)):
        width = (width + 1) // 2
    return width


def _im2col_bytes(TN, TOW, SW, KW, itemsize) -> int:
    """Shared memory of a tiled im2col block: TN images' input rows, each (TOW - 1) * SW + KW wide (odd)."""
    return TN * (((TOW - 1) * SW + KW) | 1) * itemsize


def _im2col_tiles(N, OW, KW, SW, itemsize):
    """(TN, TOW, shared bytes) of the tiled im2col, the tile shrunk until its input rows fit in
    SHARED_LIMIT; None when not even one image's one output column fits (a kernel thousands wide)."""
    TN, TOW = _tile(N, OW)
    nbytes = lambda TN, TOW: _im2col_bytes(TN, TOW, SW, KW, itemsize)
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
    TN, TOW, _ = tiles
    tiles_of = lambda TOW: C * KH * OH * -(-OW // TOW) * -(-N // TN)
    threads_of = lambda TOW: _block_threads(max(TN * ((TOW - 1) * SW + KW), KW * TOW * TN))
    TOW = _narrowed(TOW, col.size, tiles_of, threads_of)   # the autoencoder's first conv: 84 blocks, then 336
    blocks, threads = _blocks(tiles_of(TOW)), threads_of(TOW)
    launch(_im2col_tiled_kernel, blocks * threads, x, col, SH, SW, PH, PW, TN, TOW,
           threads=threads, blocks=blocks, shared_bytes=_im2col_bytes(TN, TOW, SW, KW, x.itemsize))


def _col2im_gpu(col, gx, SH, SW, PH, PW):
    N, C, H, W = gx.shape
    if _data_movement() == "plain" or gx.size == 0:
        launch(_col2im_kernel, gx.size, col, gx, SH, SW, PH, PW, grid_stride=True)
        return
    TN, TW = _tile(N, W)
    tiles_of = lambda TW: C * H * -(-W // TW) * -(-N // TN)
    TW = _narrowed(TW, col.size, tiles_of, lambda TW: _block_threads(TN * TW))    # AlexNet's conv2: 84 col
    blocks, threads = _blocks(tiles_of(TW)), _block_threads(TN * TW)              # entries a thread, then 42
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


# ---------------------------------------------------------------------------------------- the algorithm

def group_slices(groups: int, *sizes):
    """Per group g, the slice of each of ``sizes`` (rows of the weights, of z, of a lowering) that holds it: g's
    equal share, in order. A grouped convolution is a loop over these of one group's GEMMs."""
    if groups == 1:                 # the plain convolution: whole arrays, at the cost of a view each
        return [(slice(None),) * len(sizes)]
    return [tuple(slice(g * n // groups, (g + 1) * n // groups) for n in sizes) for g in range(groups)]


class Saved:
    """What a convolution's backward reads, made by its algorithm's forward: the algorithm, the geometry (with the
    groups), the lowered input (``lowered``: im2col's matrix, MEC's rows, Winograd's V) and what else backward
    reads (``extra``: Winograd's U). ``drop(x)`` keeps x in the lowered input's place (the step runner's recompute
    policy ended the lowered input's life: gpucnn.memory.keep_for_backward); ``relower()`` makes it again. A
    transposed convolution's forward (an algorithm's grad_input) makes one with ``lowered=None``."""

    def __init__(self, algorithm, x_shape, kernel, stride, padding, lowered, extra=(), groups: int = 1):
        self.algorithm, self.x_shape, self.x = algorithm, tuple(x_shape), None
        self.kernel, self.stride, self.padding = _two(kernel), _two(stride), _two(padding)
        self.lowered, self.extra, self.groups = lowered, tuple(extra), int(groups)

    def drop(self, x):
        self.lowered, self.x = None, x

    def relower(self):
        if self.lowered is None:
            x, self.x = self.x, None
            self.lowered = self.algorithm.lower(x, self.kernel, self.stride, self.padding, self.groups)
        return self.lowered


class Im2colGemm:
    """The convolution as a lowering and GEMMs, for any kernel, stride, padding and groups (algorithm "gemm").

    GPU: col = im2col(x), z = w @ col; gw = gz @ col.T, gx = col2im(w.T @ gz). CPU: the same products on MEC's
    rows (:mod:`gpucnn.kernels.mec`). Groups: with c = g*C/G + c' and o = g*Cout/G + o', the group is outermost
    in col's rows (c, kh, kw), in the weight's rows and in z's (and MEC stacks the groups' rows, see mec.lower),
    so a grouped convolution is a loop over g of these GEMMs on contiguous slices of rows (group_slices); one
    group is the plain convolution, the same calls as ever.
    """
    name, title, limits = "gemm", "im2col + GEMM", "every convolution"

    def supports(self, kernel, stride) -> bool:
        return True

    def lower(self, x, kernel, stride, padding, groups: int = 1):
        """im2col's matrix (C*KH*KW, OH*OW*N) on the GPU; MEC's lighter rows (G*Hp, C/G, KW, OW, N) on the CPU."""
        (KH, KW), (SH, SW), (PH, PW) = _two(kernel), _two(stride), _two(padding)
        if on_gpu(x):
            return im2col(x, KH, KW, (SH, SW), (PH, PW))
        return mec.lower(x, KH, KW, SH, SW, PH, PW, groups)

    def forward(self, x, w, stride, padding, groups: int = 1):
        """``(z, saved)``: z = w @ lower(x) per group, the convolution before bias and activation, in the GEMM
        layout; w is (Cout, C/G, KH, KW)."""
        N = x.shape[0]
        Cout, _, KH, KW = w.shape
        (SH, SW), (PH, PW) = _two(stride), _two(padding)
        OH, OW = _output_size(x.shape[2], KH, SH, PH), _output_size(x.shape[3], KW, SW, PW)
        col = self.lower(x, (KH, KW), stride, padding, groups)
        if on_gpu(x):
            z, w2 = backend.empty((Cout, OH * OW * N), x.dtype, x), w.reshape(Cout, -1)
            for o, k in group_slices(groups, Cout, col.shape[0]):
                matmul(w2[o], col[k], out=z[o])
            z = z.reshape(Cout, OH, OW, N)
        else:
            z = np.empty((Cout, OH, OW, N), dtype=x.dtype)
            for o, h in group_slices(groups, Cout, col.shape[0]):
                mec.forward(col[h], w[o], SH, OH, out=z[o])
        return z, Saved(self, x.shape, (KH, KW), stride, padding, col, groups=groups)

    def grad_weight(self, saved, gz, out=None):
        """gw (Cout, C/G, KH, KW) = gz @ col.T per group, summed over every output position and image (the weights
        are shared), into ``out`` when given (a flat gradient buffer's view)."""
        col, (KH, KW), SH, G = saved.lowered, saved.kernel, saved.stride[0], saved.groups
        Cout, Cg = gz.shape[0], saved.x_shape[1] // G
        if on_gpu(gz):
            gw = out if out is not None else backend.empty((Cout, Cg, KH, KW), col.dtype, col)
            gz2, gw2 = gz.reshape(Cout, -1), gw.reshape(Cout, -1)
            for o, k in group_slices(G, Cout, col.shape[0]):
                matmul(gz2[o], col[k].T, out=gw2[o])
        else:
            gw = out if out is not None else np.empty((Cout, Cg, KH, KW), dtype=gz.dtype)
            for o, h in group_slices(G, Cout, col.shape[0]):
                mec.grad_weight(col[h], gz[o], KH, SH, gw[o])
        return gw

    def grad_input(self, saved, w, gz, out=None):
        """gx (N, C, H, W) = col2im(w.T @ gz) per group: each input's share of every output that read it. It reads
        no lowered input: it is a transposed convolution's forward too (gpucnn.layers.ConvTranspose2D). GPU: w.T @ gz
        goes into ``out`` when given (col's shape: the lowered input itself, when its owner reads it no more)."""
        Cout, _, KH, KW = w.shape
        (SH, SW), (PH, PW), G, C = saved.stride, saved.padding, saved.groups, saved.x_shape[1]
        if on_gpu(gz):
            gz2, w2 = gz.reshape(Cout, -1), w.reshape(Cout, -1)
            gcol = out if out is not None else backend.empty((C * KH * KW, gz2.shape[1]), gz.dtype, gz)
            for o, k in group_slices(G, Cout, C * KH * KW):
                matmul(w2[o].T, gz2[o], out=gcol[k])
            gx = col2im(gcol, saved.x_shape, KH, KW, saved.stride, saved.padding)
            if out is None:
                backend.release(gcol)   # (made here) as large as col: its memory goes to the next request of the step
            return gx
        gx = np.empty(saved.x_shape, dtype=gz.dtype)
        for o, c in group_slices(G, Cout, C):
            mec.grad_input(w[o], gz[o], saved.x_shape, SH, SW, PH, PW, out=gx[:, c])
        return gx

    def backward(self, saved, w, gz, need_gx: bool = True, need_gw: bool = True, gw_out=None, overwrite=False):
        """``(gx, gw)`` from gz = dL/dz in the GEMM layout, None where not needed. ``overwrite``: the caller reads
        the lowered input no more, so gx's lowering is written over it once gw has read it (one such buffer alive)."""
        gw = self.grad_weight(saved, gz, gw_out) if need_gw else None
        gx = self.grad_input(saved, w, gz, saved.lowered if overwrite else None) if need_gx else None
        return gx, gw


# ---------------------------------------------------------------------------------------- the passes
# (the functions tests and bench/ call, on the registry's "gemm")

def conv2d_gemm(x, w, stride, padding):
    """``(z, col)``: GEMM.forward, with its lowered input (im2col's matrix on the GPU, MEC's rows on the CPU)."""
    z, saved = GEMM.forward(x, w, stride, padding)
    return z, saved.lowered


def conv2d_forward(x, w, b, stride, padding, activation: str = "identity", slope: float = 0.01):
    """``y = act(conv(x, w) + b)`` for x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout,) or None.

    Returns ``(y, col)``: y is (N, Cout, OH, OW); ``col`` is what backward needs (see conv2d_gemm).
    Three launches on the GPU: im2col, the GEMM, and bias + activation + the move to NCHW in one.
    """
    z, col = conv2d_gemm(x, w, stride, padding)
    return bias_activation_nchw(z, b, activation, slope), col


def conv2d_gemm_backward(x_shape, col, w, gz, stride, padding, need_gx: bool = True, need_gw: bool = True,
                         gw_out=None):
    """``(gx, gw)`` from gz = dL/dz in the GEMM layout (Cout, OH, OW, N): GEMM.backward on conv2d_gemm's col."""
    return GEMM.backward(Saved(GEMM, x_shape, w.shape[2:], stride, padding, col), w, gz, need_gx, need_gw, gw_out)


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
    """The sum of each row of gy2 (Cout, L): dL/db (many blocks per row on the GPU, see kernels.reduce)."""
    Cout, L = gy2.shape
    return activation_bias_backward(gy2.reshape(1, Cout, L), None, "identity")[1]


# ---------------------------------------------------------------------------------------- the registry
# name -> algorithm (Conv2D's ``algorithm=``). winograd.py and direct.py build on Saved and add "winograd" and
# "direct" as they are imported, which the imports below make sure of whichever module is imported first.
GEMM = Im2colGemm()
ALGORITHMS = {"gemm": GEMM}
from . import winograd  # noqa: E402,F401
from . import direct  # noqa: E402,F401
