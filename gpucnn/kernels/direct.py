"""Direct convolution (algorithm "direct"): z computed straight from x, no lowered matrix in global memory; for
the small-channel layers (LeNet's 1- and 6-channel inputs) where im2col's copies, not the GEMM, cost the time.

    z[o, oh, ow, n] = sum_{c, kh, kw} w[o, c, kh, kw] * xpad[n, c, oh*SH + kh, ow*SW + kw]

(grouped as conv.py's: output o reads its group's C/G channels). z leaves in conv's GEMM layout (Cout, OH, OW, N),
the batch innermost, so the same epilogues add the bias, the activation and the pooling.

Why: on LeNet-5 at batch 256 im2col writes 25 copies of each input (c1: 5.1 M floats, 20 MB; c3: 3.8 M, 15 MB) for a
GEMM that reads them back, where the convolution itself reads x (0.8 / 1.2 MB) and writes z (4.8 / 1.6 MB). Here
each block stages the part of x it needs in shared memory and writes z once: the bytes moved fall by about 8x (c1:
46 MB to 5.6) and 12x (c3: 34 MB to 2.8); the multiply-adds stay im2col's (bench/NOTES.md, 2026-12-05: a
prediction, not yet measured).

GPU forward: one Numba kernel. A block computes a tile of outputs: OPT output channels of one group, TOH output
rows, TOW = CG*PPT output columns and TN images. For each input channel of the group in turn it loads into shared
memory that channel's weights for its OPT output channels (OPT*KH*KW numbers) and the input patch its outputs read
(TN images x R = (TOH-1)*SH + KH rows x SPAN = (TOW-1)*SW + KW columns, zeros for the padding), read along w;
then each thread adds the channel's share of OPT output channels x PPT consecutive output columns of one image and
one row (16 accumulators in registers). Neighbouring threads take neighbouring images: the patch is read from
shared memory without bank conflicts (an odd stride per image) and z is written along n, coalesced. The channels
are a loop, so any C fits; what bounds a layer is one channel's kernel and its input window in shared memory
(``limits``). Tiles are sized by :func:`grid` to fit shared memory and to fill the GPU (the fill rule of
gpucnn.kernels.reduce). ptxas (sm_80, sm_90): 102 registers in float32, 126 in float64, no spills; LeNet's blocks
of up to 224 threads then run 2 to an SM (22% occupancy: Numba's 64-bit index arithmetic, not the accumulators,
holds most registers).

Backward reuses im2col + GEMM (conv.GEMM), where a direct kernel is not expected to pay: the weight gradient is
a sum over N*OH*OW per weight, what a GEMM does well (a direct one would need reduce.py's multi-block sums), so
backward lowers x by im2col into a temporary, runs GEMM's products and col2im (the input gradient's lowering
written over that temporary), and releases it; the input gradient alone needs no lowering (GEMM's grad_input). A
direct transposed convolution for grad-input would save col2im's traffic as forward saves im2col's: not written
until forward's speed is measured.

What is saved: nothing lowered. Forward's Saved holds x itself (``saved.x``, ``lowered`` None, as after
Saved.drop), and ``lower`` returns x, so ``relower()`` gives x back without a copy. Not ``lowered = x``: the step
runner's recompute policy ends a large lowered input's life at once (gpucnn.memory.keep_for_backward), and x is
the layer's input, not this algorithm's to end. The layer declares x for backward (gpucnn.step).

CPU: every pass is GEMM's CPU code (MEC rows, gpucnn.kernels.mec): the reference, not a speed claim.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from ..backend import cuda, gpu_kernel, launch, on_gpu, xp
from .conv import ALGORITHMS, GEMM, SHARED_LIMIT, Saved, _output_size, _two, unravel4
from .reduce import fills

OPT = 4                 # output channels per thread
PPT = 4                 # consecutive output columns per thread
ACC = OPT * PPT         # a thread's accumulators (registers: every index into them is a constant)
TN_MAX = 32             # images per block: a warp along n (4 on "sim", where a thread is a Python thread)
POSITIONS_MAX = 8       # position groups (TOH rows x CG column groups) per block: 8 x 32 = 256 threads at most
MAX_KERNEL = 16         # the limits (below): one channel's weights and input window fit shared memory easily
MAX_STRIDE = 16


# ---------------------------------------------------------------------------------------- the GPU kernel

@gpu_kernel
def _direct_forward_kernel(x, w, z, SH, SW, PH, PW, TN, TOH, CG):
    """A block per tile (group, OPT output channels, TOH output rows, TOW output columns, TN images); a thread per
    (image, output row, group of PPT columns) of the tile, for OPT output channels. Shared memory: the weights of
    one input channel for the tile's output channels (OPT*KK), then the tile's input patch of that channel."""
    N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    Cout, Cg, KH, KW = w.shape[0], w.shape[1], w.shape[2], w.shape[3]
    OH, OW = z.shape[1], z.shape[2]
    G = C // Cg
    Cog = Cout // G
    KK = KH * KW
    TOW = CG * PPT
    R = (TOH - 1) * SH + KH                 # the patch's input rows and columns
    SPAN = (TOW - 1) * SW + KW
    S = (R * SPAN) | 1                      # shared stride per image: odd, so that a warp along n hits 32 banks
    o_tiles, n_tiles = (Cog + OPT - 1) // OPT, (N + TN - 1) // TN
    ow_tiles, oh_tiles = (OW + TOW - 1) // TOW, (OH + TOH - 1) // TOH
    t, threads = cuda.threadIdx.x, cuda.blockDim.x
    i = t % TN                              # this thread's image in the tile, output row, column group
    pg = t // TN
    r = pg // CG
    cgi = pg - r * CG
    mine = pg < TOH * CG
    smem = cuda.shared.array(0, dtype=x.dtype)
    acc = cuda.local.array(ACC, x.dtype)
    xv = cuda.local.array(PPT, x.dtype)
    zero = x.dtype.type(0)
    # a tile per block, also on "sim" (a loop over tiles, as conv's tiled im2col walks them there, costs a GPU
    # 34 more registers per thread: 138 on sm_90)
    b = cuda.blockIdx.x
    if b < G * o_tiles * oh_tiles * ow_tiles * n_tiles:
        ot, nt, owt, rest = unravel4(b, o_tiles, n_tiles, ow_tiles)    # output-channel tiles fastest: the blocks
        oht = rest % oh_tiles                                           # that read one patch run together
        g = rest // oh_tiles
        o0 = g * Cog + ot * OPT
        nq = min(OPT, Cog - ot * OPT)       # the tile's output channels, images
        n0 = nt * TN
        tn = min(TN, N - n0)
        oh0 = oht * TOH
        ow0 = owt * TOW
        h0 = oh0 * SH - PH                  # the patch's first input row and column (maybe in the padding)
        w0 = ow0 * SW - PW
        active = mine and i < tn
        for q in range(ACC):
            acc[q] = zero
        for cl in range(Cg):
            c = g * Cg + cl
            for j in range(t, OPT * KK, threads):
                q = j // KK
                k = j - q * KK
                smem[j] = w[o0 + q, cl, k // KW, k % KW] if q < nq else zero
            for j in range(t, tn * R * SPAN, threads):      # along w: coalesced reads of x
                ii = j // (R * SPAN)
                rem = j - ii * R * SPAN
                rr = rem // SPAN
                h = h0 + rr
                wc = w0 + rem - rr * SPAN
                inside = 0 <= h < H and 0 <= wc < W
                smem[OPT * KK + ii * S + rem] = x[n0 + ii, c, h, wc] if inside else zero
            cuda.syncthreads()
            if active:
                for kh in range(KH):
                    base = OPT * KK + i * S + (r * SH + kh) * SPAN + cgi * PPT * SW
                    for kw in range(KW):
                        for p in range(PPT):
                            xv[p] = smem[base + p * SW + kw]
                        for q in range(OPT):
                            wq = smem[q * KK + kh * KW + kw]
                            for p in range(PPT):
                                acc[q * PPT + p] += wq * xv[p]
            cuda.syncthreads()              # the channel is read before the next one is loaded
        oh = oh0 + r
        if active and oh < OH:
            for q in range(OPT):
                if q < nq:
                    for p in range(PPT):
                        ow = ow0 + cgi * PPT + p
                        if ow < OW:
                            z[o0 + q, oh, ow, n0 + i] = acc[q * PPT + p]


# ---------------------------------------------------------------------------------------- sizing the launch

class Grid(NamedTuple):
    """A forward launch: TN images, TOH output rows and CG groups of PPT columns per tile; blocks x threads, and the
    dynamic shared memory in bytes."""
    TN: int
    TOH: int
    CG: int
    blocks: int
    threads: int
    shared_bytes: int


def grid(x_shape, w_shape, OH: int, OW: int, SH: int, SW: int, itemsize: int) -> Grid:
    """The tiles of a forward launch: a warp of images (or equal shares of fewer), up to POSITIONS_MAX position groups (rows before columns
    where the output is narrow), shrunk (rows, then columns, then images) until the block's shared memory fits
    SHARED_LIMIT and, on a GPU, the launch keeps the fill rule (reduce.fills). On "sim" a thread per slot (no
    rounding up to a warp)."""
    N, C, H, W = x_shape
    Cout, Cg, KH, KW = w_shape
    G = C // Cg
    sim = backend.sim_sized()
    largest = max(N * C * H * W, Cout * OH * OW * N)

    def size(TN, TOH, CG):
        R, SPAN = (TOH - 1) * SH + KH, (CG * PPT - 1) * SW + KW
        tiles = G * -(-(Cout // G) // OPT) * -(-OH // TOH) * -(-OW // (CG * PPT)) * -(-N // TN)
        slots = TN * TOH * CG
        threads = slots if sim else -(-slots // 32) * 32
        return Grid(TN, TOH, CG, tiles, threads, (OPT * KH * KW + TN * ((R * SPAN) | 1)) * itemsize)

    TN = -(-N // -(-N // (4 if sim else TN_MAX)))      # equal tiles: 100 images as 4 x 25, not 3 x 32 + 4
    CG = min(-(-OW // PPT), POSITIONS_MAX)
    TOH = min(OH, max(1, POSITIONS_MAX // CG))
    g = size(TN, TOH, CG)
    while g.shared_bytes > SHARED_LIMIT or not (sim or fills(largest, g.blocks, g.threads)):
        if TOH > 1:
            TOH //= 2
        elif CG > 1:
            CG = (CG + 1) // 2
        elif TN > 1:
            TN = (TN + 1) // 2
        else:
            break
        g = size(TN, TOH, CG)
    return g


def _forward_gpu(x, w, SH, SW, PH, PW, OH, OW):
    z = backend.empty((w.shape[0], OH, OW, x.shape[0]), x.dtype, x)
    if z.size:
        g = grid(x.shape, w.shape, OH, OW, SH, SW, x.itemsize)
        launch(_direct_forward_kernel, g.blocks * g.threads, xp(x).ascontiguousarray(x), xp(w).ascontiguousarray(w),
               z, SH, SW, PH, PW, g.TN, g.TOH, g.CG, threads=g.threads, blocks=g.blocks, shared_bytes=g.shared_bytes)
    return z


# ---------------------------------------------------------------------------------------- the algorithm

def _input(saved):
    """x, what this algorithm's backward reads: the lowered input after relower(), else the kept input."""
    return saved.lowered if saved.lowered is not None else saved.x


def _as_gemm(saved, lowered):
    """The same convolution as GEMM's Saved, with GEMM's ``lowered`` input (or None)."""
    return Saved(GEMM, saved.x_shape, saved.kernel, saved.stride, saved.padding, lowered, groups=saved.groups)


class Direct:
    """The direct convolution (Conv2D's algorithm "direct"), an algorithm as conv.py's Im2colGemm: kernels up to
    MAX_KERNEL and strides up to MAX_STRIDE on each axis, any padding, channels and groups. Forward is its own
    kernel on the GPU; backward and every CPU pass are GEMM's (the module docstring says why)."""
    name, title = "direct", "direct convolution"
    limits = f"kernels of at most {MAX_KERNEL}x{MAX_KERNEL} with strides of at most {MAX_STRIDE}"

    def supports(self, kernel, stride) -> bool:
        (KH, KW), (SH, SW) = _two(kernel), _two(stride)
        return max(KH, KW) <= MAX_KERNEL and max(SH, SW) <= MAX_STRIDE

    def lower(self, x, kernel, stride, padding, groups: int = 1):
        """x itself: the direct convolution reads its input as it is (Saved.relower gives x back, no copy)."""
        return x

    def forward(self, x, w, stride, padding, groups: int = 1):
        """``(z, saved)``: the convolution before bias and activation in conv's GEMM layout (Cout, OH, OW, N); w is
        (Cout, C/G, KH, KW). ``saved`` keeps x (nothing lowered)."""
        N, C, H, W = x.shape
        Cout, Cg, KH, KW = w.shape
        (SH, SW), (PH, PW) = _two(stride), _two(padding)
        if not self.supports((KH, KW), (SH, SW)):
            raise ValueError(f"direct: computes {self.limits}, got a {KH}x{KW} kernel with stride {(SH, SW)}")
        if C != groups * Cg or Cout % groups:
            raise ValueError(f"direct: with {groups} group(s) expected weights (Cout, C/G, KH, KW) = "
                             f"(a multiple of {groups}, {C // groups}, KH, KW) for {C} input channels, "
                             f"got {tuple(w.shape)}")
        OH, OW = _output_size(H, KH, SH, PH), _output_size(W, KW, SW, PW)
        if on_gpu(x):
            z = _forward_gpu(x, w, SH, SW, PH, PW, OH, OW)
        else:
            z, _ = GEMM.forward(x, w, (SH, SW), (PH, PW), groups)     # MEC's rows, made and let go
        saved = Saved(self, x.shape, (KH, KW), (SH, SW), (PH, PW), None, groups=groups)
        saved.drop(x)
        return z, saved

    def grad_weight(self, saved, gz, out=None):
        """gw alone (see backward)."""
        return self.backward(saved, None, gz, need_gx=False, gw_out=out)[1]

    def grad_input(self, saved, w, gz, out=None):
        """gx (N, C, H, W): GEMM's grad_input, which reads no lowered input (nor does a transposed convolution's
        forward, gpucnn.layers.ConvTranspose2D). ``out`` is accepted for the interface and not used."""
        return GEMM.grad_input(_as_gemm(saved, None), w, gz)

    def backward(self, saved, w, gz, need_gx: bool = True, need_gw: bool = True, gw_out=None, overwrite=False):
        """``(gx, gw)`` from gz = dL/dz in the GEMM layout, None where not needed, by GEMM's passes: for gw, x is
        lowered (im2col on the GPU, MEC on the CPU) into a temporary that gx's lowering then overwrites, released
        here once read. ``overwrite`` does not apply: what was saved is x, the layer's input, never written over."""
        if not need_gw:
            return (self.grad_input(saved, w, gz) if need_gx else None), None
        low = GEMM.lower(_input(saved), saved.kernel, saved.stride, saved.padding, saved.groups)
        gx, gw = GEMM.backward(_as_gemm(saved, low), w, gz, need_gx, True, gw_out, overwrite=True)
        backend.release(low)            # made here, read by no one else
        return gx, gw


DIRECT = ALGORITHMS["direct"] = Direct()
