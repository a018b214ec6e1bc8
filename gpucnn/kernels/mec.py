"""The CPU twin of im2col + GEMM (conv.py's algorithm "gemm"): a lighter lowering, forward and backward.

On the CPU the convolution runs on a lighter lowering than im2col (MEC, Cho and Brand 2017): each padded
input row is copied KW times, once per horizontal kernel offset, into Y (Hp, C, KW, OW, N). The matrix of
output row oh's receptive fields, rows in (kh, c, kw) order, is then KH*C*KW consecutive rows of Y: one
contiguous block, found by pointer arithmetic. Consecutive output rows share KH - SH of those rows, so Y
holds about 1/KH of im2col's copies (2.3 MB instead of 10 MB on LeNet's first layer at batch 128) and
every GEMM reads from cache-sized blocks. The weights are read in the same (kh, c, kw) order. Groups: c sits
inside h here, so a grouped lowering stacks the groups' Y, (G*Hp, C/G, KW, OW, N), each group's rows one
contiguous block, and conv.py's Im2colGemm runs the functions below on each block with its slice of the weights
and of z (with one group, Y is what it always was).

The GEMMs are cut to the size OpenBLAS (NumPy's BLAS) multiplies fastest. For a product of M*N*K <= 100**3 its
AVX-512 builds run a small-matrix kernel that reads both operands in place; above that they first pack both into
cache-sized panels, which a thin product cannot repay: (6, 25) @ (25, 6656) runs at 65 GFLOP/s on one core,
(6, 25) @ (25, 6720) at 39. The small kernel runs on one core, so a GEMM is sliced (into columns of at most
SMALL_GEMM // (M*K)) only where the slices stay wide, i.e. its M*K is tiny: LeNet's first layer, whose forward
GEMMs then run 2.6x and grad-weight 2x faster. Its second layer (M*K = 2400, slices of 416) runs as fast whole
on two cores, and AlexNet's (M*K of 35 000 to 880 000) are left whole, where packing pays.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..backend import matmul

SMALL_GEMM = 100 ** 3       # OpenBLAS's bound on M*N*K for its small-matrix kernel (see above)
MIN_SLICE = 1024            # narrower slices than this: the GEMM stays whole, on as many cores as BLAS has
PARTS = 1 << 18             # elements of grad-weight's per-row products kept at once (cache-sized)


def lower(x, KH: int, KW: int, SH: int, SW: int, PH: int, PW: int, groups: int = 1):
    """Y (G*Hp, C/G, KW, OW, N) with Y[g*Hp + h, c, kw, ow, n] = xpad[n, g*C/G + c, h, ow*SW + kw] (zeros in the
    padding): per group g the block of rows g*Hp .. (g+1)*Hp, which the functions below take as their Y."""
    N, C, H, W = x.shape
    G, Cg = groups, C // groups
    Hp, Wp = H + 2 * PH, W + 2 * PW
    OW = (Wp - KW) // SW + 1            # the caller has checked that the kernel fits
    shape = (G, Hp, Cg, Wp, N)
    xt = np.zeros(shape, dtype=x.dtype) if (PH or PW) else np.empty(shape, dtype=x.dtype)
    xt[:, PH:PH + H, :, PW:PW + W] = x.reshape(N, G, Cg, H, W).transpose(1, 3, 2, 4, 0)
    sg, sh, sc, sw, sn = xt.strides
    Y = np.empty((G, Hp, Cg, KW, OW, N), dtype=x.dtype)
    np.copyto(Y, as_strided(xt, Y.shape, (sg, sh, sc, sw, sw * SW, sn), writeable=False))
    return Y.reshape(G * Hp, Cg, KW, OW, N)


def row_blocks(Y, KH: int, SH: int, OH: int):
    """The (OH, KH*C*KW, OW*N) view of Y whose block oh is output row oh's receptive fields (no copy)."""
    _, C, KW, OW, N = Y.shape
    L, it = OW * N, Y.itemsize
    return as_strided(Y, (OH, KH * C * KW, L), (SH * C * KW * L * it, L * it, it), writeable=False)


def weights_khckw(w):
    """The weights as the (Cout, KH*C*KW) matrix matching row_blocks' row order."""
    Cout, C, KH, KW = w.shape
    return np.ascontiguousarray(w.transpose(0, 2, 1, 3)).reshape(Cout, KH * C * KW)


def slice_width(mk: int, L: int) -> int:
    """Columns per GEMM for a product whose other two sizes multiply to ``mk``: equal slices of L small enough
    for OpenBLAS's small-matrix kernel, or L (the GEMM whole) where those would be narrower than MIN_SLICE."""
    width = SMALL_GEMM // mk
    if width < MIN_SLICE or width >= L:
        return L
    slices = -(-L // width)
    return -(-L // slices)


def forward(Y, w, SH: int, OH: int, out=None):
    """z (Cout, OH, OW, N) = w @ each output row's block of Y (conv's GEMM layout), into ``out`` when given."""
    Cout = w.shape[0]
    KH, OW, N = w.shape[2], Y.shape[3], Y.shape[4]
    z = out if out is not None else np.empty((Cout, OH, OW, N), dtype=Y.dtype)
    wk, blocks, L = weights_khckw(w), row_blocks(Y, KH, SH, OH), OW * N
    zt = z.reshape(Cout, OH, L).transpose(1, 0, 2)
    # one GEMM per output row (a batched matmul over contiguous blocks of Y), each into its slice of z; a thin
    # one (small Cout) in slices of columns that OpenBLAS multiplies without packing (see above)
    width = slice_width(wk.size, L)
    for l0 in range(0, L, width):
        matmul(wk, blocks[:, :, l0:l0 + width], out=zt[:, :, l0:l0 + width])
    return z


def grad_weight(Y, gz, KH: int, SH: int, out=None):
    """gw (Cout, C, KH, KW): per output row, its receptive fields (a block of Y) times its gradient, summed over
    rows (the weight sharing), into ``out`` when given.

    The per-row products are summed as they come, a few rows at a time (PARTS elements), not stacked whole and
    summed after: on AlexNet's 3x3 layers the stack, OH products of (KH*C*KW, Cout), is 5x the size of Y itself
    (46 MB at batch 16), written once and read again. A thin product (LeNet's c1) also runs in slices of columns,
    for OpenBLAS's small-matrix kernel (see above); those slices add up the same way."""
    Cout, OH, OW, N = gz.shape
    C, KW = Y.shape[1], Y.shape[2]
    K, L = KH * C * KW, OW * N
    blocks = row_blocks(Y, KH, SH, OH)                                    # (OH, K, L)
    gzt = gz.reshape(Cout, OH, L).transpose(1, 2, 0)                      # (OH, L, Cout), a view
    rows, width = max(1, min(OH, PARTS // (K * Cout))), slice_width(K * Cout, L)
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


def grad_input(w, gz, x_shape, SH: int, SW: int, PH: int, PW: int, out=None):
    """gx (N, C, H, W) for w's C channels, the adjoint of lower after the GEMM: per kernel row kh, w[:, :, kh].T @ gz
    gives every output row's share of the input rows oh*SH + kh (added into gY, Y's shape); then each of the KW
    copies of a row is added back at its horizontal offset. Into ``out`` when given (x_shape: only N, H, W read)."""
    Cout, C, KH, KW = w.shape
    N, _, H, W = x_shape
    _, OH, OW, _ = gz.shape
    Hp, Wp, L = H + 2 * PH, W + 2 * PW, OW * N
    gz3 = gz.reshape(Cout, OH, L).transpose(1, 0, 2)                       # (OH, Cout, L), a view
    wk = w.transpose(2, 1, 3, 0).reshape(KH, C * KW, Cout)                 # per kh: (C*KW, Cout)
    gY = np.zeros((Hp, C * KW, L), dtype=gz.dtype)
    part = np.empty((OH, C * KW, L), dtype=gz.dtype)
    width = slice_width(C * KW * Cout, L)          # a thin product in slices (see above)
    for kh in range(KH):
        for l0 in range(0, L, width):
            matmul(wk[kh], gz3[:, :, l0:l0 + width], out=part[:, :, l0:l0 + width])
        gY[kh:kh + SH * (OH - 1) + 1:SH] += part
    gY = gY.reshape(Hp, C, KW, OW, N)
    gxt = np.zeros((C, Hp, Wp, N), dtype=gz.dtype)
    for kw in range(KW):
        gxt[:, :, kw:kw + SW * (OW - 1) + 1:SW] += gY[:, :, kw].transpose(1, 0, 2, 3)
    gx = gxt[:, PH:PH + H, PW:PW + W].transpose(3, 0, 1, 2)
    if out is None:
        return np.ascontiguousarray(gx)
    np.copyto(out, gx)
    return out
