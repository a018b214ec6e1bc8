"""Each op of a training step, gpucnn beside PyTorch in the same run: convolutions (forward, grad-input,
grad-weight, the whole backward), pooling, dense layers and softmax cross-entropy.

Convolutions run by each algorithm gpucnn has for their shape (the "algo" column and field): "gemm"
(im2col + GEMM, every shape), "winograd" (F(2x2, 3x3)) for 3x3 stride-1 shapes, and "direct" (forward without
im2col's matrix; backward by GEMM's passes) for kernels and strides up to 16. The variants of one pass are
timed in the same rounds as one PyTorch call, whose time is the denominator of each one's ratio.
On the GPU path im2col and col2im are timed alone too (passes "im2col", "col2im"), by the "tiled" and the
"plain" kernels of conv.DATA_MOVEMENT (the "data_movement" field, shown in the "algo" column), checked
against the CPU path's; PyTorch has no such op. The CPU conv no longer uses im2col: no such rows on "cpu".

    python bench/layers.py                # the device gpucnn picks: "cuda" where CuPy finds a GPU, else "cpu"
    python bench/layers.py --device cpu --quick
    python bench/layers.py --dry          # every code path on "sim", tiny shapes, checked, no timings

Every row is checked against PyTorch (relative to the reference's largest magnitude) before it is timed;
a row that disagrees is reported and not timed, and the script exits 1. On "cuda": CUDA events, cuDNN
with ``torch.backends.cudnn.benchmark = True``, precision "fp32" (TF32 off in cuBLAS and cuDNN, on both
sides) then "tf32". On "cpu": the wall clock, PyTorch with as many threads as NumPy's BLAS. The median
of the timed runs is reported. Prints a markdown table; writes bench/results/<device>-<date>.json.
"""
import _common as C


def _extra_args(p):
    p.add_argument("--only", default="", help="run only the shapes whose label contains this text (e.g. alexnet.c2)")
    p.add_argument("--precision", choices=("fp32", "tf32", "both"), default="both",
                   help="on cuda: which precisions to run (default both)")


ARGS = C.parse_args("gpucnn's ops beside PyTorch's, per pass.", _extra_args)   # before gpucnn is imported

import contextlib  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

import gpucnn  # noqa: E402
from gpucnn import backend  # noqa: E402
from gpucnn.kernels import conv as KC, dense as KD, loss as KL, pool as KP  # noqa: E402
from gpucnn.kernels.activation import activation_bias_backward, bias_activation_nchw  # noqa: E402

# (N, C, H, W, K, kernel, stride, pad), the shapes of issue 6 (AlexNet's are gpucnn's, one tower)
CONV = {
    "lenet.c1": (256, 1, 28, 28, 6, 5, 1, 2),
    "lenet.c3": (256, 6, 14, 14, 16, 5, 1, 0),
    "alexnet.c1": (128, 3, 224, 224, 96, 11, 4, 2),
    "alexnet.c2": (128, 96, 27, 27, 256, 5, 1, 2),
    "alexnet.c3": (128, 256, 13, 13, 384, 3, 1, 1),
    "alexnet.c4": (128, 384, 13, 13, 384, 3, 1, 1),
    "alexnet.c5": (128, 384, 13, 13, 256, 3, 1, 1),
}
# (N, C, H, W, kernel, stride): AlexNet's 3x3/2 max pools after c1, c2, c5; LeNet-5's 2x2 average pools
MAXPOOL = {"alexnet.p1": (128, 96, 55, 55, 3, 2), "alexnet.p2": (128, 256, 27, 27, 3, 2),
           "alexnet.p5": (128, 256, 13, 13, 3, 2)}
AVGPOOL = {"lenet.s2": (256, 6, 28, 28, 2, 2), "lenet.s4": (256, 16, 10, 10, 2, 2)}
DENSE = {"lenet.f5": (256, 400, 120), "lenet.f6": (256, 120, 84), "lenet.f7": (256, 84, 10),
         "alexnet.f6": (128, 9216, 4096), "alexnet.f7": (128, 4096, 4096), "alexnet.f8": (128, 4096, 1000)}
XENT = {"lenet.loss": (256, 10), "alexnet.loss": (128, 1000)}           # (N, classes)

# --dry: one small shape of each kind, a few hundred simulated threads per launch at most
DRY_CONV = {"dry.pad": (1, 1, 6, 6, 2, 3, 1, 1),          # stride 1, zero padding
            "dry.stride": (1, 2, 7, 7, 2, 3, 2, 0),       # stride 2, no padding
            "dry.big": (1, 3, 9, 9, 2, 5, 4, 2),          # kernel > stride, padded: AlexNet c1's kind
            "dry.odd": (2, 2, 5, 5, 3, 3, 1, 1)}          # 3x3/1, odd output (Winograd crops its last tiles):
                                                          # AlexNet c3-c5's kind
DRY_MAXPOOL = {"dry.max3s2": (1, 2, 7, 7, 3, 2)}
DRY_AVGPOOL = {"dry.avg2": (1, 2, 6, 6, 2, 2)}
DRY_DENSE = {"dry.dense": (2, 8, 4)}
DRY_XENT = {"dry.loss": (3, 5)}


class Env:
    """Where the two sides run and how they are timed."""

    def __init__(self, args, torch):
        self.args, self.torch, self.device = args, torch, args.device
        self.tdev = "cuda" if self.device == "cuda" else "cpu"
        self.rng = np.random.default_rng(0)
        quick_cpu = args.quick and self.device == "cpu"
        self.batch_div = 8 if quick_cpu else 1        # --quick on the CPU: 1/8 of each batch
        if self.device == "cuda":
            self.repeats, self.warmup, self.rounds = args.repeats or (20 if args.quick else 50), 5, 1
            if args.quick:
                self.warmup = 2
        else:   # a shared CPU: the timed calls in 3 rounds of blocks (see _common.time_each)
            self.repeats, self.warmup, self.rounds = args.repeats or (6 if args.quick else 12), 1, 3

    def ours(self, a):
        return backend.asarray(a)

    def theirs(self, a):
        return None if self.torch is None else self.torch.tensor(a, device=self.tdev)

    def randn(self, *shape):
        return self.rng.standard_normal(shape, dtype=np.float32)

    def uniform(self, shape, fan_in):
        """PyTorch's default initialisation, U(+-1/sqrt(fan_in)), so activations are O(1)."""
        bound = np.float32(1 / np.sqrt(fan_in))
        return (self.rng.random(shape, dtype=np.float32) * 2 - 1) * bound

    def batch(self, n):
        return max(1, n // self.batch_div)

    def time(self, ours, theirs=None):
        """Per-call seconds of each of gpucnn's fns (a list: the variants of one pass, timed in the same rounds)
        and of PyTorch's (None without it)."""
        if self.device == "cuda":
            runs = [(fn, C.cupy_time) for fn in ours] + ([(theirs, C.torch_cuda_time(self.torch))] if theirs else [])
        else:
            runs = [(fn, C.wall_time) for fn in ours] + ([(theirs, C.wall_time)] if theirs else [])
        times = C.time_each(runs, self.repeats, self.warmup, self.rounds)
        return times[:len(ours)], (times[-1] if theirs else None)


class Case:
    """One row: a pass of one op at one shape, as gpucnn and as PyTorch compute it.

    ``ours()`` returns gpucnn's outputs (device arrays), ``theirs()`` PyTorch's (tensors) in the same order,
    named by ``outputs``; ``theirs`` is None without PyTorch (or where PyTorch has no such op). ``fields``
    go into the row as they are (``{"algo": "winograd"}``). ``cpu_ref()``, where given, returns the CPU
    path's outputs as host arrays, checked on every device (on --dry without it: ``ours()`` under
    ``backend.cpu_path()``). ``ref64()``, where given, returns the outputs in float64 on the host (PyTorch's
    CPU build): the arbiter when gpucnn and PyTorch disagree (see _common.arbitrate)."""

    def __init__(self, shape, dims, pass_, outputs, ours, theirs, fields=None, cpu_ref=None, ref64=None):
        self.shape, self.dims, self.pass_, self.outputs = shape, dims, pass_, outputs
        self.ours, self.theirs = ours, theirs
        self.fields, self.cpu_ref, self.ref64 = fields or {}, cpu_ref, ref64


# ------------------------------------------------------------------------------------------ the cases

def algorithm_forward(name, x, w, b, stride, padding):
    """conv2d_forward by the algorithm ``name`` of conv.ALGORITHMS (identity activation): ``(y, saved)``, what
    Conv2D(algorithm=name) runs, y (N, Cout, OH, OW) as conv2d_forward's."""
    z, saved = KC.ALGORITHMS[name].forward(x, w, stride, padding)
    return bias_activation_nchw(z, b), saved


def algorithm_backward(saved, w, gy, need_gx=True, need_gb=True, need_gw=True):
    """conv2d_backward by the algorithm that made ``saved``: ``(gx, gw, gb)``, gy to the GEMM layout (and summed
    into gb) by one kernel, then the algorithm's backward."""
    gz, gb = activation_bias_backward(gy, None, "identity", layout="gemm", need_gb=need_gb)
    gx, gw = saved.algorithm.backward(saved, w, gz, need_gx, need_gw)
    return gx, gw, gb


@contextlib.contextmanager
def data_movement(mode):
    """conv.DATA_MOVEMENT = ``mode`` within the block; the module's value comes back after it, also on error."""
    old, KC.DATA_MOVEMENT = KC.DATA_MOVEMENT, mode
    try:
        yield
    finally:
        KC.DATA_MOVEMENT = old


def moving(mode, fn):
    """fn, called with conv.DATA_MOVEMENT = ``mode`` (every call: the check, the count and each timed run)."""
    def run():
        with data_movement(mode):
            return fn()
    return run


def conv_cases(env, label, dims, movement=False):
    """The passes of one conv shape by each algorithm that computes it, and with ``movement`` (the GPU path
    only) im2col and col2im alone by each data-movement kernel."""
    N, Cin, H, W, K, k, s, p = dims
    N = env.batch(N)
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    fan_in = Cin * k * k
    h = {"x": env.randn(N, Cin, H, W), "w": env.uniform((K, Cin, k, k), fan_in), "b": env.uniform((K,), fan_in),
         "gy": env.randn(N, K, OH, OW)}
    x, w, b, gy = (env.ours(h[n]) for n in ("x", "w", "b", "gy"))
    saved = {}

    def col(algo="gemm"):
        # forward's by-product, which backward reads: im2col's matrix on the GPU path, a lighter lowering on the
        # CPU's (another algorithm's Saved: Winograd's V and U, "direct"'s x), so one per path (--dry runs both)
        key = (algo, backend.on_gpu(x))
        if key not in saved:
            saved[key] = (KC.conv2d_forward(x, w, b, s, p) if algo == "gemm" else
                          algorithm_forward(algo, x, w, b, s, p))[1]
        return saved[key]

    shape = f"{label} ({N},{Cin},{H},{W},{K},{k},{s},{p})"
    dims = [N, Cin, H, W, K, k, s, p]
    cases = [
        ("forward", ("y",), lambda: (KC.conv2d_forward(x, w, b, s, p)[0],)),
        ("grad-input", ("gx",), lambda: KC.conv2d_backward(x.shape, col(), w, gy, s, p, need_gw=False,
                                                           need_gb=False)[:1]),
        ("grad-weight", ("gw", "gb"), lambda: KC.conv2d_backward(x.shape, col(), w, gy, s, p, need_gx=False)[1:]),
        ("backward", ("gx", "gw", "gb"), lambda: KC.conv2d_backward(x.shape, col(), w, gy, s, p)),
    ]

    def passes(algo):           # the four passes by another algorithm, in cases' order
        return [lambda: (algorithm_forward(algo, x, w, b, s, p)[0],),
                lambda: algorithm_backward(col(algo), w, gy, need_gw=False, need_gb=False)[:1],
                lambda: algorithm_backward(col(algo), w, gy, need_gx=False)[1:],
                lambda: algorithm_backward(col(algo), w, gy)]
    others = {name: passes(name) for name, algo in KC.ALGORITHMS.items() if name != "gemm" and algo.supports(k, s)}
    theirs = dict.fromkeys(n for n, _, _ in cases)
    t = env.torch
    if t is not None:
        tx, tw, tb, tgy = (env.theirs(h[n]) for n in ("x", "w", "b", "gy"))
        F = t.nn.functional

        def bwd(mask):
            # what autograd runs for a convolution's backward (cuDNN on cuda), one output per True in mask
            out = t.ops.aten.convolution_backward(tgy, tx, tw, [K], [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)
            return tuple(o for o, m in zip(out, mask) if m)
        theirs = {"forward": lambda: (F.conv2d(tx, tw, tb, s, p),),
                  "grad-input": lambda: bwd([True, False, False]),
                  "grad-weight": lambda: bwd([False, True, True]),
                  "backward": lambda: bwd([True, True, True])}
    ref64 = dict.fromkeys(theirs)
    if t is not None:
        def ref(mask):
            # the arbiter: PyTorch's CPU build in float64 on the same inputs (computed only on a disagreement)
            tx, tw, tb, tgy = (t.tensor(h[n], dtype=t.float64) for n in ("x", "w", "b", "gy"))
            if mask is None:
                return (t.nn.functional.conv2d(tx, tw, tb, s, p).numpy(),)
            out = t.ops.aten.convolution_backward(tgy, tx, tw, [K], [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)
            return tuple(o.numpy() for o, m in zip(out, mask) if m)
        ref64 = {"forward": lambda: ref(None), "grad-input": lambda: ref([True, False, False]),
                 "grad-weight": lambda: ref([False, True, True]), "backward": lambda: ref([True, True, True])}
    out = []
    for i, (n, outs, fn) in enumerate(cases):       # each pass by im2col + GEMM, then beside it by the others
        out.append(Case(shape, dims, n, outs, fn, theirs[n], {"algo": "gemm"}, ref64=ref64[n]))
        for name, fns in others.items():
            out.append(Case(shape, dims, n, outs, fns[i], theirs[n], {"algo": name}, ref64=ref64[n]))
    if movement:
        out += movement_cases(env, shape, dims, x, h["x"])
    return out


def movement_cases(env, shape, dims, x, x_host):
    """im2col and col2im alone at one conv shape, by the tiled and the plain kernels, each checked against
    the CPU path's on host copies; no PyTorch side (it has no such op)."""
    N, Cin, H, W, K, k, s, p = dims
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    col_host = env.randn(Cin * k * k, OH * OW * N)      # a gradient's columns, for col2im to add back
    col = env.ours(col_host)
    refs = {}

    def on_cpu(pass_, fn):
        def ref():          # once per pass: both kernels are checked against it
            if pass_ not in refs:
                with backend.cpu_path():
                    refs[pass_] = host([fn()])
            return refs[pass_]
        return ref
    passes = [("im2col", ("col",), lambda: (KC.im2col(x, k, k, s, p),),
               on_cpu("im2col", lambda: KC.im2col(x_host, k, k, s, p))),
              ("col2im", ("gx",), lambda: (KC.col2im(col, x.shape, k, k, s, p),),
               on_cpu("col2im", lambda: KC.col2im(col_host, x_host.shape, k, k, s, p)))]
    return [Case(shape, dims, pass_, outs, moving(mode, fn), None, {"data_movement": mode}, ref)
            for pass_, outs, fn, ref in passes for mode in ("tiled", "plain")]


def pool_cases(env, label, dims, kind):
    N, Cn, H, W, k, s = dims
    N = env.batch(N)
    OH, OW = (H - k) // s + 1, (W - k) // s + 1
    h = {"x": env.randn(N, Cn, H, W), "gy": env.randn(N, Cn, OH, OW)}
    x, gy = env.ours(h["x"]), env.ours(h["gy"])
    kk, ss, pp = (k, k), (s, s), (0, 0)
    shape = f"{label} ({N},{Cn},{H},{W}) {kind} {k}x{k}/{s}"
    t = env.torch
    if kind == "max":
        switches = KP.maxpool2d_forward(x, kk, ss, pp)[1]
        cases = [("forward", ("y", "switches"), lambda: KP.maxpool2d_forward(x, kk, ss, pp)),
                 ("backward", ("gx",), lambda: (KP.maxpool2d_backward(gy, switches, x.shape, kk, ss, pp),))]
        theirs = {"forward": None, "backward": None}
        if t is not None:
            tx, tgy = env.theirs(h["x"]), env.theirs(h["gy"])
            idx = t.ops.aten.max_pool2d_with_indices(tx, [k, k], [s, s], [0, 0], [1, 1], False)[1]
            theirs = {"forward": lambda: t.ops.aten.max_pool2d_with_indices(tx, [k, k], [s, s], [0, 0], [1, 1], False),
                      "backward": lambda: (t.ops.aten.max_pool2d_with_indices_backward(
                          tgy, tx, [k, k], [s, s], [0, 0], [1, 1], False, idx),)}
    else:
        cases = [("forward", ("y",), lambda: (KP.avgpool2d_forward(x, kk, ss, pp),)),
                 ("backward", ("gx",), lambda: (KP.avgpool2d_backward(gy, x.shape, kk, ss, pp),))]
        theirs = {"forward": None, "backward": None}
        if t is not None:
            tx, tgy = env.theirs(h["x"]), env.theirs(h["gy"])
            theirs = {"forward": lambda: (t.nn.functional.avg_pool2d(tx, k, s),),
                      "backward": lambda: (t.ops.aten.avg_pool2d_backward(tgy, tx, [k, k], [s, s], [0, 0], False,
                                                                          True, None),)}
    return [Case(shape, [N, Cn, H, W, k, s], n, outs, fn, theirs[n]) for n, outs, fn in cases]


def dense_cases(env, label, dims):
    N, fin, fout = dims
    N = env.batch(N)
    h = {"x": env.randn(N, fin), "w": env.uniform((fout, fin), fin), "b": env.uniform((fout,), fin),
         "gy": env.randn(N, fout)}
    x, w, b, gy = (env.ours(h[n]) for n in ("x", "w", "b", "gy"))
    shape = f"{label} ({N},{fin})->{fout}"
    cases = [("forward", ("y",), lambda: (KD.dense_forward(x, w, b),)),
             ("backward", ("gx", "gw", "gb"), lambda: KD.dense_backward(x, w, gy))]
    theirs = {"forward": None, "backward": None}
    t = env.torch
    if t is not None:
        tx, tw, tb, tgy = (env.theirs(h[n]) for n in ("x", "w", "b", "gy"))
        # the forward of nn.Linear, and the three products its autograd backward runs
        theirs = {"forward": lambda: (t.nn.functional.linear(tx, tw, tb),),
                  "backward": lambda: (tgy @ tw, tgy.t() @ tx, tgy.sum(0))}
    return [Case(shape, [N, fin, fout], n, outs, fn, theirs[n]) for n, outs, fn in cases]


def xent_cases(env, label, dims):
    N, classes = dims
    N = env.batch(N)
    logits_h = env.randn(N, classes) * np.float32(3)
    labels_h = env.rng.integers(0, classes, N).astype(np.int64)
    logits, labels = env.ours(logits_h), env.ours(labels_h)
    theirs = None
    t = env.torch
    if t is not None:
        tz, ty = env.theirs(logits_h), env.theirs(labels_h)

        def theirs():
            # PyTorch's loss with its gradient, as a training step gets both (gpucnn's kernel is fused)
            z = tz.detach().requires_grad_()
            loss = t.nn.functional.cross_entropy(z, ty)
            return loss.detach(), t.autograd.grad(loss, z)[0]
    return [Case(f"{label} ({N},{classes})", [N, classes], "loss+grad", ("loss", "grad"),
                 lambda: KL.softmax_cross_entropy_forward(logits, labels), theirs)]


def groups(env, args, movement=False):
    """(label, builder) of every shape in this run; builders make their arrays only when called. ``movement``:
    with the conv shapes' im2col/col2im rows."""
    dry = args.dry
    table = [(DRY_CONV if dry else CONV, lambda e, l, d: conv_cases(e, l, d, movement)),
             (DRY_MAXPOOL if dry else MAXPOOL, lambda e, l, d: pool_cases(e, l, d, "max")),
             (DRY_AVGPOOL if dry else AVGPOOL, lambda e, l, d: pool_cases(e, l, d, "avg")),
             (DRY_DENSE if dry else DENSE, dense_cases),
             (DRY_XENT if dry else XENT, xent_cases)]
    for shapes, build in table:
        for label, dims in shapes.items():
            if args.only in label:
                yield label, (lambda b=build, l=label, d=dims: b(env, l, d))


# ------------------------------------------------------------------------------------------ running

def host(arrays):
    out = []
    for a in arrays:
        if hasattr(a, "detach"):        # a torch tensor
            out.append(a.detach().cpu().numpy())
        else:
            out.append(backend.to_numpy(a))
    return out


def check_case(env, case, precision):
    """Check and count one case; returns its row, untimed (with "error" set when the check failed)."""
    args = env.args
    row = {"shape": case.shape, "dims": case.dims, "pass": case.pass_, **case.fields, "precision": precision}
    what = " ".join([case.shape, case.pass_, *case.fields.values()])
    try:
        ours = host(case.ours())
        if case.cpu_ref is not None or args.dry:
            # the GPU path against the CPU path, as the sim tests do (on --dry: the simulator's)
            if case.cpu_ref is not None:
                ref = case.cpu_ref()
            else:
                with backend.cpu_path():
                    ref = host(case.ours())
            row["err_cpu_path"] = C.check(zip(case.outputs, ours, ref), C.TOLERANCE["sim"],
                                          f"{what} ({args.device} vs the CPU path)")
        if case.theirs is not None:
            theirs = host(case.theirs())
            tol = C.TOLERANCE["tf32" if precision == "tf32" else "fp32"]
            try:
                row["err_torch"] = C.check(zip(case.outputs, ours, theirs), tol, f"{what} (vs PyTorch)")
            except AssertionError as e:
                if case.ref64 is None:
                    raise
                row["err_torch"] = max(C.rel_error(a, b) for a, b in zip(ours, theirs))
                row["err_fp64"], row["err_torch_fp64"] = C.arbitrate(case.outputs, ours, theirs, case.ref64(), tol,
                                                                     what)
                row["note"] = f"{e}; against float64 gpucnn is off by {row['err_fp64']:.2e}, PyTorch by " \
                              f"{row['err_torch_fp64']:.2e}: PyTorch's result is the inaccurate one"
    except AssertionError as e:
        row["error"] = str(e)
        return row
    if args.device in ("cuda", "sim"):          # gpucnn.profile counts on the GPU path only
        with gpucnn.profile() as p:
            case.ours()
        row["launches"], row["bytes_allocated"] = p.launches, p.bytes_allocated
    return row


def run_cases(env, cases, precision):
    """Check, count and time the variants of one pass (its algorithms, or its data-movement kernels), which
    share one PyTorch side: their rows, each timed in the same rounds as the others and PyTorch's one call."""
    rows = [check_case(env, c, precision) for c in cases]
    timed = [(c, r) for c, r in zip(cases, rows) if "error" not in r]
    if env.args.dry or not timed:
        return rows             # the simulator's times mean nothing; a row that disagrees is not timed
    ts, tt = env.time([c.ours for c, _ in timed], cases[0].theirs)
    for (_, row), t in zip(timed, ts):
        row["gpucnn_ms"], row["gpucnn_min_ms"] = C.median_ms(t), 1e3 * min(t)
        if tt is not None:
            row["torch_ms"], row["torch_min_ms"] = C.median_ms(tt), 1e3 * min(tt)
            row["ratio"] = row["gpucnn_ms"] / row["torch_ms"]
            row["ratio_min"] = row["gpucnn_min_ms"] / row["torch_min_ms"]
        row["repeats"] = env.repeats
    return rows


def variants(cases):
    """The cases in runs of one pass at one shape with one PyTorch side (gemm beside winograd and direct, tiled
    beside plain): each run is timed together."""
    run = []
    for case in cases:
        if run and (case.shape, case.pass_, case.theirs) != (run[0].shape, run[0].pass_, run[0].theirs):
            yield run
            run = []
        run.append(case)
    if run:
        yield run


def variant(row):
    """The "algo" cell: a conv row's algorithm, a data-movement row's kernels ("tiled" or "plain"), else None."""
    return row.get("algo", row.get("data_movement"))


def main():
    args = ARGS
    torch = C.load_torch(args)
    C.match_torch_threads(torch)
    env = Env(args, torch)
    precisions = C.precisions(args)
    m = C.machine(args, torch)
    C.print_machine(m)
    if args.dry:
        print("--dry: the GPU code path on Numba's simulator, tiny shapes, checked against the CPU path"
              + (" and PyTorch" if torch else "") + "; launch counts, no timings.\n")
    if env.batch_div > 1:
        print(f"--quick on the CPU: batches are 1/{env.batch_div} of the listed sizes.\n")

    rows, notes = [], []
    if args.device == "cpu":
        notes.append("no im2col/col2im rows: the CPU conv path no longer uses im2col (GPU path only)")
        print(f"note: {notes[-1]}.\n")
    for precision in precisions:
        C.select_precision(precision, args, torch, gpucnn, notes)
        # the data movement once (the first precision): precision does not touch a copy
        movement = args.device != "cpu" and precision == precisions[0]
        for label, build in groups(env, args, movement):
            for run in variants(build()):
                for row in run_cases(env, run, precision):
                    C.keep_row(rows, row, f"  {row['shape']:<44} {row['pass']:<12} {variant(row) or '-':<9} "
                                          f"{precision}  gpucnn {C.fmt(row.get('gpucnn_ms'))} ms  torch "
                                          f"{C.fmt(row.get('torch_ms'))} ms  launches {C.fmt(row.get('launches'))}")
    for r in rows:
        r["check"] = C.check_status(r)

    columns = [("shape", "shape"), ("pass", "pass"), ("algo", "variant")]
    if len(precisions) > 1:
        columns.append(("precision", "precision"))
    if not args.dry:            # the simulator's times mean nothing
        columns += [("gpucnn ms", "gpucnn_ms"), ("torch ms", "torch_ms"), ("ratio", "ratio")]
    if args.device == "cpu":    # on a shared CPU the fastest run is the one least disturbed by others
        columns += [("gpucnn min ms", "gpucnn_min_ms"), ("torch min ms", "torch_min_ms"),
                    ("ratio of mins", "ratio_min")]
    if args.device != "cpu":
        columns.append(("launches", "launches"))
    if any("err_cpu_path" in r for r in rows):     # --dry, and the data-movement rows on cuda
        columns.append(("err vs CPU path", "err_cpu_path"))
    columns += [("err vs torch", "err_torch")]
    if any("err_fp64" in r for r in rows):         # a disagreement with PyTorch, settled against float64
        columns += [("err vs float64", "err_fp64"), ("torch err vs float64", "err_torch_fp64")]
    columns.append(("check", "check"))
    print()
    print(f"## gpucnn vs PyTorch per op on {args.device}"
          + (f" ({m['gpu']})" if "gpu" in m else f" ({m['cpu']}, {m['blas_threads']} threads)"))
    print(f"median (and on the CPU the minimum) of {env.repeats} runs in {env.rounds} round(s) of blocks, each block "
          f"after {env.warmup} warm-up call(s); ratio = gpucnn ms / "
          "torch ms (below 1: gpucnn faster); err = max |ours - reference| / max |reference|\n" if not args.dry else
          "no timings on the simulator; launches = gpucnn kernel launches per call (cuBLAS calls count one)\n")
    print(C.markdown_table(columns, [dict(r, variant=variant(r)) for r in rows]))
    failed = [r for r in rows if "error" in r]
    path = C.save_results(args, "layers", {"machine": m, "quick": args.quick, "dry": args.dry,
                                           "repeats": env.repeats, "warmup": env.warmup, "notes": notes,
                                           "tolerance": C.TOLERANCE, "rows": rows})
    return C.report_and_exit_code(path, failed, "row(s)")


if __name__ == "__main__":
    sys.exit(main())
