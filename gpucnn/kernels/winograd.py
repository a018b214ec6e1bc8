"""3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray 2015), forward and
backward: the same result as :mod:`gpucnn.kernels.conv`'s im2col + GEMM with fewer multiplications.

    z[o, oh, ow, n] = sum_{c, kh, kw} w[o, c, kh, kw] * xpad[n, c, oh + kh, ow + kw]

Each 2x2 block of outputs reads a 4x4 tile d of the padded input (tiles 2 apart, so they overlap by two
rows and columns). With

    B^T = [[1, 0, -1, 0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0, 1,  1, 0],          [1/2,  1/2, 1/2],          [0, 1, -1, -1]]
           [0, -1, 1, 0],          [1/2, -1/2, 1/2],
           [0, 1,  0, -1]]         [0,    0,   1]]

the 2x2 outputs are Y = A^T [(G g G^T) * (B^T d B)] A for a 3x3 filter g: 16 products per 2x2 outputs
instead of 36. Summed over input channels the 16 elementwise products become 16 GEMMs, one per tile
position xi: U = G w G^T (16, Cout, C), V = B^T d B (16, C, T) over every tile, M[xi] = U[xi] @ V[xi]
(one batched GEMM), Y = A^T M A. Per output that is 4C multiply-adds instead of im2col's 9C (a little
more where an odd output size crops half of the last tiles: 13x13 outputs cost 7x7 tiles), and V holds
4 numbers per output and channel instead of im2col's 9. The price: the transforms' adds (they dominate
when C is small: LeNet's 6 channels run faster by im2col), and float32 sums that round a little more
than the direct ones (up to ~3x the error on gw; the 1/2 in G is exact in binary).

Tiles are ordered (th, tw, n), batch innermost, so that M's columns are z's (oh, ow, n) order two at a
time and z leaves in conv's GEMM layout (Cout, OH, OW, N): the same epilogues finish it. The last tile
row and column reach one past the padded input when OH or OW is odd; those inputs are zeros and those
outputs are dropped.

Backward is the exact adjoint of that linear map, stage by stage: gM = A gY A^T (gY is gz, zero past
the crop), gU[xi] = gM[xi] @ V[xi]^T then gw = G^T gU G (the GEMM sums over tiles and images),
gV[xi] = U[xi]^T @ gM[xi] then gx = B gV B^T added back onto the overlapping tiles.

All of it is WINOGRAD (class Winograd, at the end), an algorithm of conv.py's registry with the same methods
as im2col + GEMM: Conv2D(algorithm="winograd") calls it; winograd_gemm and winograd_gemm_backward wrap it.

GPU: four Numba kernels, each a grid-stride loop: the input transform and the output transform (a thread
per tile of one channel), the adjoint output transform (a thread per tile) and the adjoint input transform
(a thread per input element that gathers the up to 4 tiles covering it: deterministic, no atomics, no zero
fill); cuBLAS for the batched GEMMs and for the filter transform and its adjoint (tiny: one GEMM with the
(16, 9) matrix kron(G, G)). Launches: forward 4 (filter transform, input transform, batched GEMM, output
transform); backward 5 (adjoint output transform; for gw the batched GEMM and the adjoint filter
transform; for gx the batched GEMM and the adjoint input transform). CPU: the same GEMMs through NumPy's
matmul; the input's tiles copied out once by a strided view (4 numbers per input, as conv's im2col copies
9), then each transform as the 1-D transform down the tiles' columns, then along their rows, each a few
adds and subtracts of whole contiguous arrays (:func:`_combine`; with the transposed matrix it is its own
adjoint); the adjoint input transform adds each tile's 16 numbers back as col2im does. Copying first pays:
a NumPy add of two strided views runs about 5x slower than the copy (runs of N numbers at batch 16), and
the contiguous transforms are 1.2-1.7x faster at batch 16 than adds on the strided views were.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import backend
from ..backend import cuda, gpu_kernel, launch, matmul, on_gpu, xp
from .conv import ALGORITHMS, Saved, group_slices, unravel4

# The transforms' matrices. B^T and A^T hold only 0 and +-1: the CPU applies them as adds and subtracts
# (_combine), the GPU kernels have them written out; G (with its halves) enters only through kron(G, G).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.int8)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.int8)
_B = np.ascontiguousarray(_BT.T)    # the adjoint input transform's kernel reads its rows: a global constant
_KGG = np.kron(_G, _G)              # (16, 9): U[(a, b)] = sum_{k, l} G[a, k] G[b, l] w[k, l]


def _two(v) -> tuple:
    """``3 -> (3, 3)``; a pair stays a pair."""
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def winograd_supported(kernel_size, stride) -> bool:
    """True when Winograd F(2x2, 3x3) computes this convolution: a 3x3 kernel with stride 1 (any padding)."""
    return _two(kernel_size) == (3, 3) and _two(stride) == (1, 1)


def _check(where: str, w, stride):
    if w.ndim != 4:
        raise ValueError(f"{where}: expected weights (Cout, C, 3, 3), got shape {tuple(w.shape)}")
    if not winograd_supported(w.shape[2:], stride):
        raise ValueError(f"{where}: Winograd F(2x2, 3x3) computes 3x3 convolutions with stride 1 only, "
                         f"got a {w.shape[2]}x{w.shape[3]} kernel with stride {_two(stride)}")


def _sizes(x_shape, padding):
    """(PH, PW, OH, OW, TH, TW): padding, output size and the number of 2x2 output tiles along each axis."""
    (PH, PW) = _two(padding)
    H, W = x_shape[2], x_shape[3]
    for size, pad in ((H, PH), (W, PW)):
        if size + 2 * pad < 3:
            raise ValueError(f"winograd: kernel 3 is larger than the padded input {size} + 2*{pad}")
    OH, OW = H + 2 * PH - 2, W + 2 * PW - 2
    return PH, PW, OH, OW, (OH + 1) // 2, (OW + 1) // 2


_constants = {}


def _kgg(dtype, like):
    """kron(G, G) (16, 9) in ``dtype`` on ``like``'s device, made once per device and dtype (on "cuda" a
    host-to-device copy the first time: run a step before capturing a CUDA graph, as the workspaces need)."""
    dev = like.device.id if backend.is_cupy(like) else -1
    key = (np.dtype(dtype).str, dev)
    if key not in _constants:
        _constants[key] = backend.asarray(_KGG, dtype=dtype, device_="cuda" if dev >= 0 else "cpu")
    return _constants[key]


# ---------------------------------------------------------------------------------------- GPU kernels
# V and M reach the kernels as their 5-d views (G*16, C/G or Cout/G, TH, TW, N): xi = 4*row + column, and a
# group's 16 rows together (channel c = g*C/G + c' is row 16*g + xi, column c'); one group: (16, C, TH, TW, N).

@gpu_kernel
def _input_transform_kernel(x, V, PH, PW):
    # a thread per 4x4 input tile of one channel (a grid-stride loop: see backend.launch): V = B^T d B
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    Cg, TH, TW, N = V.shape[1], V.shape[2], V.shape[3], V.shape[4]
    d = cuda.local.array(16, x.dtype)
    for i in range(cuda.grid(1), C * TH * TW * N, cuda.gridsize(1)):
        n, tw, th, c = unravel4(i, N, TW, TH)
        g = c // Cg                       # the group: V's rows 16*g .. 16*g + 15, its column c - g*Cg
        xi, cg = 16 * g, c - g * Cg
        for r in range(4):
            for s in range(4):
                h = 2 * th - PH + r
                w = 2 * tw - PW + s
                if 0 <= h < H and 0 <= w < W:
                    d[4 * r + s] = x[n, c, h, w]
                else:
                    d[4 * r + s] = 0      # the padding, and the row/column past it when OH/OW is odd
        for s in range(4):                # B^T d: rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), in place
            d0, d1, d2, d3 = d[s], d[4 + s], d[8 + s], d[12 + s]
            d[s], d[4 + s], d[8 + s], d[12 + s] = d0 - d2, d1 + d2, d2 - d1, d1 - d3
        for r in range(4):                # (B^T d) B: the same along each row, straight into V
            e0, e1, e2, e3 = d[4 * r], d[4 * r + 1], d[4 * r + 2], d[4 * r + 3]
            V[xi + 4 * r, cg, th, tw, n] = e0 - e2
            V[xi + 4 * r + 1, cg, th, tw, n] = e1 + e2
            V[xi + 4 * r + 2, cg, th, tw, n] = e2 - e1
            V[xi + 4 * r + 3, cg, th, tw, n] = e1 - e3


@gpu_kernel
def _output_transform_kernel(M, z):
    # a thread per tile of one output channel: the 2x2 outputs A^T m A, those inside z only
    Cog, TH, TW, N = M.shape[1], M.shape[2], M.shape[3], M.shape[4]
    Cout, OH, OW = z.shape[0], z.shape[1], z.shape[2]
    m = cuda.local.array(16, M.dtype)
    for i in range(cuda.grid(1), Cout * TH * TW * N, cuda.gridsize(1)):
        n, tw, th, o = unravel4(i, N, TW, TH)
        g = o // Cog                      # the group: M's rows 16*g .., its column o - g*Cog
        for k in range(16):
            m[k] = M[16 * g + k, o - g * Cog, th, tw, n]
        for s in range(4):                # A^T m: rows (m0 + m1 + m2, m1 - m2 - m3), into rows 0 and 1
            m0, m1, m2, m3 = m[s], m[4 + s], m[8 + s], m[12 + s]
            m[s], m[4 + s] = m0 + m1 + m2, m1 - m2 - m3
        for a in range(2):                # (A^T m) A: the same along each of the two rows
            oh = 2 * th + a
            ow = 2 * tw                   # < OW always; ow + 1 is past it in the last tile when OW is odd
            if oh < OH:
                e0, e1, e2, e3 = m[4 * a], m[4 * a + 1], m[4 * a + 2], m[4 * a + 3]
                z[o, oh, ow, n] = e0 + e1 + e2
                if ow + 1 < OW:
                    z[o, oh, ow + 1, n] = e1 - e2 - e3


@gpu_kernel
def _output_transform_adjoint_kernel(gz, gM):
    # a thread per tile of one output channel: gM = A gY A^T, gY the tile's 2x2 of gz (zero past the crop)
    Cout, OH, OW, N = gz.shape[0], gz.shape[1], gz.shape[2], gz.shape[3]
    Cog, TH, TW = gM.shape[1], gM.shape[2], gM.shape[3]
    zero = gz.dtype.type(0)
    for i in range(cuda.grid(1), Cout * TH * TW * N, cuda.gridsize(1)):
        n, tw, th, o = unravel4(i, N, TW, TH)
        g = o // Cog                      # the group: gM's rows 16*g .., its column og
        xi, og = 16 * g, o - g * Cog
        oh, ow = 2 * th, 2 * tw
        g00 = gz[o, oh, ow, n]
        g01 = gz[o, oh, ow + 1, n] if ow + 1 < OW else zero
        g10 = gz[o, oh + 1, ow, n] if oh + 1 < OH else zero
        g11 = gz[o, oh + 1, ow + 1, n] if oh + 1 < OH and ow + 1 < OW else zero
        for s in range(4):                # gY A^T: each row (g0, g1) -> (g0, g0 + g1, g0 - g1, -g1)
            if s == 0:
                p0, p1 = g00, g10
            elif s == 1:
                p0, p1 = g00 + g01, g10 + g11
            elif s == 2:
                p0, p1 = g00 - g01, g10 - g11
            else:
                p0, p1 = -g01, -g11
            gM[xi + s, og, th, tw, n] = p0      # A (gY A^T): the same down each column
            gM[xi + 4 + s, og, th, tw, n] = p0 + p1
            gM[xi + 8 + s, og, th, tw, n] = p0 - p1
            gM[xi + 12 + s, og, th, tw, n] = -p1


@gpu_kernel
def _input_transform_adjoint_kernel(gV, gx, PH, PW):
    # a thread per input element: the sum, over the (up to 2x2) tiles that cover it, of its entry of B gV B^T
    C, H, W = gx.shape[1], gx.shape[2], gx.shape[3]
    Cg, TH, TW = gV.shape[1], gV.shape[2], gV.shape[3]
    for i in range(cuda.grid(1), gx.size, cuda.gridsize(1)):
        w, h, c, n = unravel4(i, W, H, C)
        g = c // Cg                       # the group: gV's rows 16*g .., its column cg
        xi, cg = 16 * g, c - g * Cg
        hp = h + PH                       # position in the padded input
        wp = w + PW
        acc = gx.dtype.type(0)
        # the tiles whose rows 2*th .. 2*th + 3 hold hp, at row r = hp - 2*th of the tile (columns alike)
        for th in range(max((hp - 2) // 2, 0), min(hp // 2 + 1, TH)):
            r = hp - 2 * th
            for tw in range(max((wp - 2) // 2, 0), min(wp // 2 + 1, TW)):
                s = wp - 2 * tw
                for a in range(4):        # (B gV B^T)[r, s] = sum_a B[r, a] sum_b gV[a, b] B[s, b]
                    ba = _B[r, a]
                    if ba != 0:
                        row = gx.dtype.type(0)
                        for b in range(4):
                            bb = _B[s, b]
                            if bb > 0:
                                row += gV[xi + 4 * a + b, cg, th, tw, n]
                            elif bb < 0:
                                row -= gV[xi + 4 * a + b, cg, th, tw, n]
                        if ba > 0:
                            acc += row
                        else:
                            acc -= row
        gx[n, c, h, w] = acc


# ---------------------------------------------------------------------------------------- the CPU's transforms

def _combine(mat, src, dst):
    """dst[k] = sum_i mat[k, i] * src[i] for a matrix of 0 and +-1: adds and subtracts of whole arrays."""
    for k, row in enumerate(mat):
        terms = sorted(((int(c), src[i]) for i, c in enumerate(row) if c), key=lambda t: -t[0])
        (c0, a0), rest = terms[0], terms[1:]
        if not rest:
            if c0 > 0:
                np.copyto(dst[k], a0)
            else:
                np.negative(a0, out=dst[k])
            continue
        c1, a1 = rest[0]
        (np.add if c1 > 0 else np.subtract)(a0, a1, out=dst[k])
        for c, a in rest[1:]:
            (np.add if c > 0 else np.subtract)(dst[k], a, out=dst[k])
        if c0 < 0:                        # every coefficient negative: the sum of them all, negated
            np.negative(dst[k], out=dst[k])
    return dst


# ---------------------------------------------------------------------------------------- the four transforms

def _tiles(xt, TH: int, TW: int):
    """The (4, 4, C, TH, TW, N) view of every 4x4 tile of xt (C, Hp, Wp, N): element (r, s, c, th, tw, n) is
    xt[c, 2*th + r, 2*tw + s, n]. No copy (as conv's _windows)."""
    sc, sh, sw, sn = xt.strides
    return as_strided(xt, (4, 4, xt.shape[0], TH, TW, xt.shape[3]), (sh, sw, sc, 2 * sh, 2 * sw, sn),
                      writeable=False)


def _input_transform(x, PH: int, PW: int, TH: int, TW: int, groups: int):
    """V (G*16, C/G, TH, TW, N): B^T d B of every 4x4 tile d of the zero-padded input, tiles in (th, tw, n) order,
    a group's 16 rows together (see the GPU kernels)."""
    N, C, H, W = x.shape
    Cg = C // groups
    if on_gpu(x):
        V = backend.empty((16 * groups, Cg, TH, TW, N), x.dtype, x)
        launch(_input_transform_kernel, C * TH * TW * N, xp(x).ascontiguousarray(x), V, PH, PW, grid_stride=True)
        return V
    # batch innermost, padded to the tiles' reach (one past the padding when OH or OW is odd); every tile
    # copied out once (4 numbers per input), so that the arithmetic runs on contiguous arrays: a NumPy add
    # of two strided views is ~5x slower than the copy
    V = np.empty((16 * groups, Cg, TH, TW, N), dtype=x.dtype)
    for xi, c in group_slices(groups, 16 * groups, C):
        xt = np.zeros((Cg, 2 * TH + 2, 2 * TW + 2, N), dtype=x.dtype)
        xt[:, PH:PH + H, PW:PW + W] = x[:, c].transpose(1, 2, 3, 0)
        D = V[xi].reshape(4, 4, Cg, TH, TW, N)
        np.copyto(D, _tiles(xt, TH, TW))
        R = _combine(_BT, D, np.empty_like(D))          # B^T d: down the tile's columns
        for i in range(4):
            _combine(_BT, R[i], D[i])                   # (B^T d) B: along its rows, into D's memory
    return V


def _input_transform_adjoint(gV, x_shape, PH: int, PW: int):
    """gx (N, C, H, W): B gV B^T of every tile added back onto the input it was read from (padding dropped)."""
    N, C, H, W = x_shape
    Cg, TH, TW = gV.shape[1], gV.shape[2], gV.shape[3]
    if on_gpu(gV):
        gx = backend.empty((N, C, H, W), gV.dtype, gV)
        launch(_input_transform_adjoint_kernel, gx.size, gV, gx, PH, PW, grid_stride=True)
        return gx
    gx = np.empty((N, C, H, W), dtype=gV.dtype)
    for xi, c in group_slices(C // Cg, gV.shape[0], C):
        gV6 = gV[xi].reshape(4, 4, Cg, TH, TW, N)
        gR = np.empty_like(gV6)
        for i in range(4):
            _combine(_BT.T, gV6[i], gR[i])              # gV B^T
        gD = _combine(_BT.T, gR, np.empty_like(gR))     # B (gV B^T)
        gxt = np.zeros((Cg, 2 * TH + 2, 2 * TW + 2, N), dtype=gV.dtype)
        for r in range(4):                              # each tile's numbers added back where they were read
            for s in range(4):
                gxt[:, r:r + 2 * TH:2, s:s + 2 * TW:2] += gD[r, s]
        gx[:, c] = gxt[:, PH:PH + H, PW:PW + W].transpose(3, 0, 1, 2)
    return gx


def _output_transform(M, OH: int, OW: int):
    """z (Cout, OH, OW, N): A^T m A of every tile, its 2x2 outputs in place, those past OH or OW dropped; M is
    (G*16, Cout/G, TH, TW, N)."""
    _, Cog, TH, TW, N = M.shape
    Cout = M.shape[0] // 16 * Cog
    if on_gpu(M):
        z = backend.empty((Cout, OH, OW, N), M.dtype, M)
        launch(_output_transform_kernel, Cout * TH * TW * N, M, z, grid_stride=True)
        return z
    z = np.empty((Cout, OH, OW, N), dtype=M.dtype)
    for xi, o in group_slices(Cout // Cog, M.shape[0], Cout):
        rows = _combine(_AT, M[xi].reshape(4, 4, Cog, TH, TW, N),                  # A^T m: down the columns
                        np.empty((2, 4, Cog, TH, TW, N), dtype=M.dtype))
        Y = np.empty((2, 2, Cog, TH, TW, N), dtype=M.dtype)
        for a in range(2):                                                      # (A^T m) A: along the rows
            _combine(_AT, rows[a], Y[a])
        for a in range(2):                                                      # one copy into place, cropped
            for b in range(2):
                out = z[o, a::2, b::2]
                out[...] = Y[a, b][:, :out.shape[1], :out.shape[2]]
    return z


def _output_transform_adjoint(gz, TH: int, TW: int, groups: int):
    """gM (G*16, Cout/G, TH, TW, N): A gY A^T of every tile's 2x2 of gz (zeros past the crop)."""
    Cout, OH, OW, N = gz.shape
    Cog = Cout // groups
    if on_gpu(gz):
        gM = backend.empty((16 * groups, Cog, TH, TW, N), gz.dtype, gz)
        launch(_output_transform_adjoint_kernel, Cout * TH * TW * N, xp(gz).ascontiguousarray(gz), gM,
               grid_stride=True)
        return gM
    ragged = (OH, OW) != (2 * TH, 2 * TW)
    gM = np.empty((16 * groups, Cog, TH, TW, N), dtype=gz.dtype)
    for xi, o in group_slices(groups, 16 * groups, Cout):
        gY = (np.zeros if ragged else np.empty)((2, 2, Cog, TH, TW, N), dtype=gz.dtype)
        for a in range(2):                                                      # each tile's 2x2, one copy
            for b in range(2):
                g = gz[o, a::2, b::2]
                gY[a, b][:, :g.shape[1], :g.shape[2]] = g
        Q = np.empty((2, 4, Cog, TH, TW, N), dtype=gz.dtype)
        for a in range(2):                                                      # gY A^T: along the rows
            _combine(_AT.T, gY[a], Q[a])
        _combine(_AT.T, Q, gM[xi].reshape(4, 4, Cog, TH, TW, N))                # A (gY A^T): down the columns
    return gM


def _filter_transform(w, groups: int):
    """U (G*16, Cout/G, C/G) = G w G^T of every 3x3 filter w (Cout, C/G, 3, 3), a group's 16 rows together: one
    small GEMM per group with kron(G, G)."""
    Cout, Cg = w.shape[0], w.shape[1]
    U = backend.empty((16 * groups, Cout // groups, Cg), w.dtype, w)
    U2, w9 = U.reshape(16 * groups, -1), w.reshape(Cout * Cg, 9)
    for xi, o in group_slices(groups, 16 * groups, Cout * Cg):
        matmul(_kgg(w.dtype, w), w9[o].T, out=U2[xi])
    return U


# ---------------------------------------------------------------------------------------- the algorithm

class Winograd:
    """F(2x2, 3x3) (Conv2D's algorithm "winograd"), an algorithm as conv.py's Im2colGemm: 3x3 kernels with
    stride 1, any padding, any groups. Its lowered input is V; ``saved.extra`` holds U, the transformed filters.

    Groups: a group is a slice of V's channels and a (Cout/G, C/G) block of U at every tile position xi; with the
    group outermost, V (G*16, C/G, T), U (G*16, Cout/G, C/G) and M (G*16, Cout/G, T), every group's 16 GEMMs are
    one batched GEMM of G*16 (the same call as one group's, G times as many): nothing else changes."""
    name, title, limits = "winograd", "F(2x2, 3x3)", "3x3 convolutions with stride 1"

    def supports(self, kernel, stride) -> bool:
        return winograd_supported(kernel, stride)

    def lower(self, x, kernel, stride, padding, groups: int = 1):
        """V = B^T d B for every 4x4 tile d of x: (G*16, C/G, TH, TW, N), what forward multiplies and grad_weight
        reads (a layer short of memory drops it and lowers its input again)."""
        PH, PW, _, _, TH, TW = _sizes(x.shape, padding)
        return _input_transform(x, PH, PW, TH, TW, groups)

    def forward(self, x, w, stride, padding, groups: int = 1):
        """``(z, saved)``: the convolution before bias and activation, in conv's GEMM layout (Cout, OH, OW, N)."""
        N, C = x.shape[0], x.shape[1]
        Cout, G = w.shape[0], groups
        PH, PW, OH, OW, TH, TW = _sizes(x.shape, padding)
        T = TH * TW * N
        U = _filter_transform(w, G)                                                         # G w G^T
        V = self.lower(x, 3, stride, padding, G)
        M = backend.empty((16 * G, Cout // G, TH, TW, N), x.dtype, x)
        matmul(U, V.reshape(16 * G, C // G, T), out=M.reshape(16 * G, Cout // G, T))      # 16*G GEMMs in one call
        return _output_transform(M, OH, OW), Saved(self, x.shape, 3, stride, padding, V, (U,), G)

    def grad_weight(self, saved, gz, out=None):
        """gw alone (see backward)."""
        return self.backward(saved, None, gz, need_gx=False, gw_out=out)[1]

    def grad_input(self, saved, w, gz):
        """gx alone (see backward)."""
        return self.backward(saved, w, gz, need_gw=False)[0]

    def backward(self, saved, w, gz, need_gx: bool = True, need_gw: bool = True, gw_out=None, overwrite=False):
        """``(gx, gw)`` from gz = dL/dz in the GEMM layout, the adjoint of forward, None where not needed:
        gw = G^T (gM @ V^T) G summed over every tile and image (into ``gw_out`` when given), gx = the input
        transform's adjoint of U^T @ gM; gM = A gz A^T is made once for both. It releases only the temporaries it
        allocates (gU, gV, gM, and U when forward made none: a transposed convolution's forward is this grad_input),
        each once read. ``overwrite``: the caller reads V no more, so gV (V's shape) is written over it once gw has
        read it."""
        V, x_shape, G = saved.lowered, saved.x_shape, saved.groups
        Cout, Cg = gz.shape[0], x_shape[1] // G
        PH, PW, OH, OW, TH, TW = _sizes(x_shape, saved.padding)
        T = TH * TW * x_shape[0]
        gM = _output_transform_adjoint(gz, TH, TW, G).reshape(16 * G, Cout // G, T)
        gx = gw = None
        if need_gw:
            gU = matmul(gM, V.reshape(16 * G, Cg, T).transpose(0, 2, 1),
                        out=backend.empty((16 * G, Cout // G, Cg), gz.dtype, gz))
            gw = gw_out if gw_out is not None else backend.empty((Cout, Cg, 3, 3), gz.dtype, gz)
            gU2, gw9 = gU.reshape(16 * G, -1), gw.reshape(Cout * Cg, 9)
            for xi, o in group_slices(G, 16 * G, Cout * Cg):
                matmul(gU2[xi].T, _kgg(gz.dtype, gz), out=gw9[o])                                   # G^T gU G
            backend.release(gU)         # read by no one else: gV below may take its memory
        if need_gx:
            made_here = not saved.extra
            U = _filter_transform(w, G) if made_here else saved.extra[0]
            overwrite = overwrite and V is not None
            gV = V if overwrite else backend.empty((16 * G, Cg, TH, TW, x_shape[0]), gz.dtype, gz)
            matmul(U.transpose(0, 2, 1), gM, out=gV.reshape(16 * G, Cg, T))
            gx = _input_transform_adjoint(gV, x_shape, PH, PW)
            if not overwrite:
                backend.release(gV)
            if made_here:
                backend.release(U)
        backend.release(gM)             # read by no one else: a later request of the step may have the memory
        return gx, gw


WINOGRAD = ALGORITHMS["winograd"] = Winograd()


# ---------------------------------------------------------------------------------------- the passes
# (the functions tests and bench/ call, on WINOGRAD)

def winograd_lower(x, padding):
    """WINOGRAD.lower: V (16, C, TH, TW, N), the transformed input."""
    return WINOGRAD.lower(x, 3, 1, padding)


def winograd_gemm(x, w, padding, *, stride=1):
    """``(z, (V, U))``: WINOGRAD.forward, z in conv's GEMM layout (Cout, OH, OW, N), with the transformed input
    and filters that backward needs."""
    _check("winograd_gemm", w, stride)
    z, saved = WINOGRAD.forward(x, w, stride, padding)
    return z, (saved.lowered, *saved.extra)


def winograd_gemm_backward(x_shape, saved, w, gz, padding, need_gx: bool = True, need_gw: bool = True,
                           gw_out=None, *, stride=1):
    """``(gx, gw)`` from gz = dL/dz in the GEMM layout (Cout, OH, OW, N): WINOGRAD.backward on winograd_gemm's
    ``saved`` = (V, U)."""
    _check("winograd_gemm_backward", w, stride)
    Cout, (_, _, OH, OW, _, _) = w.shape[0], _sizes(x_shape, padding)
    if gz.shape != (Cout, OH, OW, x_shape[0]):
        raise ValueError(f"winograd_gemm_backward: gz has shape {tuple(gz.shape)}, expected "
                         f"(Cout, OH, OW, N) = {(Cout, OH, OW, x_shape[0])}")
    V, U = saved
    return WINOGRAD.backward(Saved(WINOGRAD, x_shape, 3, stride, padding, V, (U,)), w, gz, need_gx, need_gw, gw_out)
