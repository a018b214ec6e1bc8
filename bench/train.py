"""Whole training steps, gpucnn beside the same network built in PyTorch; on the CPU, one LeNet-5 epoch each.

    python bench/train.py                 # the device gpucnn picks: "cuda" where CuPy finds a GPU, else "cpu"
    python bench/train.py --device cpu    # the step table on the CPU, then the epoch comparison (issue 6, point 6)
    python bench/train.py --dry           # every code path on "sim": LeNet-5 at batch 1, checked, no timings

Step table: LeNet-5 (tanh, average pooling) at batch 256 and 1024, alexnet_small (1x28x28) at 256 and
AlexNet (3x224x224, gpucnn's single tower with LRN and dropout) at 128, on synthetic data already on the
device, SGD with momentum 0.9 and weight decay 5e-4 on both sides; gpucnn's step is Sequential.train_step
(a CUDA graph on "cuda" where the library captures one; eager too). Before timing, the timed float32 net's
forward is checked against PyTorch's, and one whole step (loss, every gradient, velocity and update, dropout
off) of a float64 copy of the net (see "checking" below for why float64); --dry checks the simulated float32
step against the CPU path too. A net that disagrees is not timed and the script exits 1. Reported: ms per
step (median), images/s, gpucnn's kernel launches and bytes allocated per step (gpucnn.profile, on the GPU
path), peak memory. On "cuda" PyTorch runs eager and captured in a CUDA graph.

Epoch comparison ("cpu"): one epoch of LeNet-5 (tanh, avg pool) over 60,000 Fashion-MNIST images (synthetic
when the data set is not installed) at batch 128: gpucnn's ``Sequential.fit`` against a plain PyTorch
loop, same threads, same initial weights, same optimizer; seconds each and the ratio gpucnn / torch.
"""
import _common as C


def _extra_args(p):
    p.add_argument("--only", default="", help="run only the nets whose label contains this text (e.g. lenet5)")
    p.add_argument("--precision", choices=("fp32", "tf32", "both"), default="both",
                   help="on cuda: which precisions to run (default both)")
    p.add_argument("--epoch-images", type=int,
                   help="images in the CPU epoch comparison (default 60,000; 10,000 with --quick)")
    p.add_argument("--epoch-repeats", type=int, default=1,
                   help="run the epoch comparison this many times, alternating which side goes first")
    p.add_argument("--no-steps", action="store_true", help="skip the step table")
    p.add_argument("--no-epoch", action="store_true", help="skip the CPU epoch comparison")


ARGS = C.parse_args("gpucnn's training steps beside PyTorch's.", _extra_args)   # before gpucnn is imported

import contextlib  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import gpucnn  # noqa: E402
from gpucnn import backend, layers as L  # noqa: E402
from gpucnn.losses import SoftmaxCrossEntropy  # noqa: E402
from _torch import cupy_peak_bytes, numpy_step_peak_bytes, to_torch, torch_graphed_step, \
    torch_epoch, torch_kernels_per_step, torch_step  # noqa: E402

NETS = [("lenet5", 256), ("lenet5", 1024), ("alexnet_small", 256), ("alexnet", 128)]
QUICK_CPU_NETS = [("lenet5", 256)]
DRY_NETS = [("lenet5", 1)]      # the simulator runs every CUDA thread in Python: one image
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
MiB = 2 ** 20


def build(name):
    """The gpucnn net, with the same seed every time (so PyTorch's copy starts from the same weights)."""
    return gpucnn.models.get(name, seed=0)


def gpucnn_step(model, loss, opt, x, y, **kw):
    """One gpucnn training step: ``Sequential.train_step`` (what fit runs per batch) where the library has
    it, else the same sequence written out: forward, loss, backward, update."""
    if hasattr(model, "train_step"):
        return model.train_step(x, y, loss, opt, **kw)
    logits = model.forward(x, training=True)
    value = loss.forward(logits, y)
    model.backward(loss.backward())
    opt.step()
    return value


# ------------------------------------------------------------------------------------------ PyTorch's twin

# ------------------------------------------------------------------------------------------ checking
# Two checks before any timing. (1) The timed float32 net's forward (logits and loss, dropout off)
# against PyTorch's in float32: a forward is continuous in rounding. (2) A whole step - loss, every
# gradient, the optimizer's velocity, every new parameter and update - of fresh float64 copies of the net
# (same seed) on both sides: in float32 a pre-activation within rounding of 0 can sit on the other side of
# a ReLU's kink in the two libraries, and that one element moves a whole weight gradient by percents
# (measured: 2% in alexnet_small's third convolution between two correct float32 implementations).
# --dry also runs a whole float32 step of a fresh net on the simulator and on the CPU path and compares them.

def fresh(name, dtype):
    """The net built anew from seed 0 with dropout off (p = 0: the identity), for a checked step."""
    model = gpucnn.models.get(name, seed=0, dtype=dtype)
    for layer in model.layers:
        if isinstance(layer, L.Dropout):
            layer.p = 0.0
    return model


def forward_ours(model, x, y):
    """Logits and loss of the model in evaluation mode (dropout off), as host arrays."""
    logits = model.forward(x, training=False)
    value = SoftmaxCrossEntropy().forward(logits, y)
    return {"logits": backend.to_numpy(logits).copy(), "loss": backend.to_numpy(value).copy()}


def forward_torch(torch, tmodel, x, y):
    tmodel.eval()
    try:
        with torch.no_grad():
            logits = tmodel(x)
            value = torch.nn.functional.cross_entropy(logits, y)
        return {"logits": logits.cpu().numpy(), "loss": value.cpu().numpy()}
    finally:
        tmodel.train()


def sgd(model):
    return gpucnn.optim.SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def step_ours(model, opt, loss, x, y):
    """One gpucnn step; host copies of the loss, every gradient, velocity, new parameter and update
    (new - old parameter)."""
    params = [(f"{i}.{k}", layer, k) for i, layer in enumerate(model.layers) for k in layer.params]
    before = {key: backend.to_numpy(layer.params[k]).copy() for key, layer, k in params}
    value = gpucnn_step(model, loss, opt, x, y)
    state = opt.state_dict()["state"]
    out = {"loss": backend.to_numpy(value).copy()}
    for key, layer, k in params:
        out[f"grad {key}"] = backend.to_numpy(layer.grads[k]).copy()
        if "velocity" in state.get(key, {}):
            out[f"velocity {key}"] = np.array(state[key]["velocity"])
        out[f"param {key}"] = backend.to_numpy(layer.params[k]).copy()
        out[f"update {key}"] = out[f"param {key}"] - before[key]
    return out


def step_torch(torch, tmodel, x, y):
    """The same for PyTorch: loss, gradients, momentum buffers, new parameters and updates of one step."""
    topt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    before = [p.detach().clone() for p in tmodel.parameters()]
    loss = torch_step(torch, tmodel, topt, x, y)
    out = {"loss": loss.detach().cpu().numpy()}
    for i, m in enumerate(tmodel):
        for k, p in m.named_parameters(recurse=False):
            out[f"grad {i}.{k}"] = p.grad.detach().cpu().numpy()
            out[f"velocity {i}.{k}"] = topt.state[p]["momentum_buffer"].detach().cpu().numpy()
            out[f"param {i}.{k}"] = p.detach().cpu().numpy().copy()
            out[f"update {i}.{k}"] = (p.detach() - before.pop(0)).cpu().numpy()
    return out


def compare(ours, ref, tol, what, skip=()):
    """The worst relative error over gpucnn's outputs (each must be in ``ref``), leaving out names that
    start with any of ``skip``."""
    missing = sorted(set(ours) - set(ref))
    if missing:
        raise AssertionError(f"{what}: the reference has no {missing}")
    return C.check(((k, ours[k], ref[k]) for k in ours if not k.startswith(tuple(skip))), tol, what)


def check_float64_step(args, torch, name, x_h, y_h):
    """(2) above; returns the worst relative error. In --dry the gpucnn side runs on the CPU path (a
    float64 simulated step would double the run; the simulated float32 step is checked instead)."""
    tdev = "cuda" if args.device == "cuda" else "cpu"
    model = fresh(name, "float64")
    tmodel = to_torch(model, torch, tdev)
    with backend.cpu_path() if args.dry else contextlib.nullcontext():
        ours = step_ours(model, sgd(model), SoftmaxCrossEntropy(), backend.asarray(x_h.astype(np.float64)),
                         backend.asarray(y_h))
    theirs = step_torch(torch, tmodel, torch.tensor(x_h.astype(np.float64), device=tdev),
                        torch.tensor(y_h, device=tdev))
    return compare(ours, theirs, C.TOLERANCE["fp64"], f"{name}: one float64 step, gpucnn vs PyTorch")


def check_sim_step(name, x_h, y_h):
    """--dry: one float32 step of a fresh net on the simulator, then a second one, each counted by
    gpucnn.profile, and the first compared with the same step on the CPU path. Returns (worst relative
    error, first step's profile, second step's profile)."""
    model = fresh(name, "float32")
    opt, loss = sgd(model), SoftmaxCrossEntropy()
    x, y = backend.asarray(x_h), backend.asarray(y_h)
    with gpucnn.profile() as first:
        ours = step_ours(model, opt, loss, x, y)
    with gpucnn.profile() as steady:     # the optimizer's state and any workspaces exist from the first; eager:
        gpucnn_step(model, loss, opt, x, y, graph=False)    # a second step would be captured, a replay launches nothing
    with backend.cpu_path():
        model = fresh(name, "float32")
        ref = step_ours(model, sgd(model), SoftmaxCrossEntropy(), x, y)
    # in float32 an update (new - old parameter) carries the parameter's rounding, which can be percents of
    # a small update: the velocities and new parameters are compared instead
    err = compare(ours, ref, C.TOLERANCE["sim"], f"{name}: float32 step, sim vs the CPU path", skip=("update",))
    return err, first, steady


# ------------------------------------------------------------------------------------------ the step table

class Settings:
    def __init__(self, args):
        dev = args.device
        if dev == "cuda":
            self.repeats, self.warmup = args.repeats or (20 if args.quick else 50), 3 if args.quick else 5
            self.nets = NETS
        elif dev == "cpu":
            self.repeats, self.warmup = args.repeats or (6 if args.quick else 12), 1
            self.nets = QUICK_CPU_NETS if args.quick else NETS
        else:
            self.repeats, self.warmup = 0, 0
            self.nets = DRY_NETS
        self.nets = [(n, b) for n, b in self.nets if args.only in n]


def _counts(p):
    return {"launches": p.launches, "bytes": p.bytes_allocated,
            "by_family": {f: sum(c[k] for k in ("numba", "cupy", "cublas")) for f, c in p.by_family().items()}}


def _has_graph_switch():
    """Whether Sequential.train_step takes ``graph=`` (capture the step as a CUDA graph, or not)."""
    step = getattr(gpucnn.Sequential, "train_step", None)
    return step is not None and "graph" in inspect.signature(step).parameters


def step_row(args, torch, s, name, batch, precision, first_precision=True):
    """Check, count, time and measure one net at one batch size; returns its row."""
    dev = args.device
    tdev = "cuda" if dev == "cuda" else "cpu"
    row = {"net": name, "batch": batch, "precision": precision}
    model = build(name)
    rng = np.random.default_rng(1)
    x_h = rng.standard_normal((batch,) + tuple(model.input_shape), dtype=np.float32)
    y_h = rng.integers(0, model.output_shape[0], batch).astype(np.int64)

    # 1. correctness, before any timing (see "checking" above)
    try:
        if args.dry:
            row["err_cpu_path"], first, steady = check_sim_step(name, x_h, y_h)
            row["counts_first_step"], row["counts"] = _counts(first), _counts(steady)
        if torch is not None:
            tol = C.TOLERANCE["tf32" if precision == "tf32" else "fp32"]
            with backend.cpu_path() if args.dry else contextlib.nullcontext():
                ours = forward_ours(model, backend.asarray(x_h), backend.asarray(y_h))
            ref = forward_torch(torch, to_torch(model, torch, tdev), torch.tensor(x_h, device=tdev),
                                torch.tensor(y_h, device=tdev))
            row["err_torch_fwd32"] = compare(ours, ref, tol,
                                             f"{name} batch {batch}: float32 forward, gpucnn vs PyTorch")
            if first_precision:      # the float64 step does not depend on the precision setting
                row["err_torch_step64"] = check_float64_step(args, torch, name, x_h, y_h)
    except AssertionError as e:
        row["error"] = str(e)
        return row
    if args.dry:
        return row

    # 2. time. The timed nets keep dropout on: a step's cost includes it.
    x, y = backend.asarray(x_h), backend.asarray(y_h)
    opt, loss = sgd(model), SoftmaxCrossEntropy()
    step = lambda: gpucnn_step(model, loss, opt, x, y)      # noqa: E731
    eager = step
    if dev == "cuda" and _has_graph_switch():
        eager = lambda: gpucnn_step(model, loss, opt, x, y, graph=False)     # noqa: E731
    tstep = None
    if torch is not None:
        tmodel = to_torch(model, torch, tdev)
        topt = torch.optim.SGD(tmodel.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        tx, ty = torch.tensor(x_h, device=tdev), torch.tensor(y_h, device=tdev)
        tstep = lambda: torch_step(torch, tmodel, topt, tx, ty)     # noqa: E731
    if dev == "cuda":
        runs = [(step, C.cupy_time)] + ([(eager, C.cupy_time)] if eager is not step else [])
        times = C.time_each(runs, s.repeats, s.warmup)
        if eager is not step:        # train_step captured the step as a CUDA graph: both are reported
            row["gpucnn_eager_ms"] = C.median_ms(times[1])
        if tstep is not None:
            (t,) = C.time_each([(tstep, C.torch_cuda_time(torch))], s.repeats, s.warmup)
    else:
        runs = [(step, C.wall_time)] + ([(tstep, C.wall_time)] if tstep else [])
        times = C.time_each(runs, s.repeats, s.warmup, rounds=3)     # a shared CPU: see _common.time_each
        t = times[1] if tstep else None
    row["gpucnn_ms"], row["gpucnn_min_ms"] = C.median_ms(times[0]), 1e3 * min(times[0])
    row["gpucnn_img_s"] = batch / (row["gpucnn_ms"] / 1e3)
    if tstep is not None:
        row["torch_ms"], row["torch_min_ms"] = C.median_ms(t), 1e3 * min(t)
        row["torch_img_s"] = batch / (row["torch_ms"] / 1e3)
        row["ratio"] = row["gpucnn_ms"] / row["torch_ms"]
    row["repeats"] = s.repeats

    # 3. counts, memory, PyTorch's kernel count and CUDA graph: after the timings, so as not to disturb them
    if dev == "cuda":
        with gpucnn.profile() as p:      # an eager steady-state step: a graph replay launches from no Python
            eager()
        row["counts"] = _counts(p)
        with gpucnn.profile(timing=True) as pt:     # and one more, with CUDA events around every launch
            eager()
        row["gpu_ms"] = pt.milliseconds
        row["gpu_ms_by_family"] = pt.family_milliseconds()
        print(f"  where one eager step's GPU time goes (CUDA events around each launch):\n{pt}")
        row["gpucnn_peak_mib"] = cupy_peak_bytes(step) / MiB
        if tstep is not None:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            tstep()
            torch.cuda.synchronize()
            row["torch_peak_mib"] = torch.cuda.max_memory_allocated() / MiB
            row["torch_kernels"] = torch_kernels_per_step(torch, tstep)
            try:
                replay = torch_graphed_step(torch, tmodel, topt, tx, ty)
                (t,) = C.time_each([(replay, C.torch_cuda_time(torch))], s.repeats, s.warmup)
                row["torch_graph_ms"] = C.median_ms(t)
                row["torch_graph_img_s"] = batch / (row["torch_graph_ms"] / 1e3)
                row["ratio_graph"] = row["gpucnn_ms"] / row["torch_graph_ms"]
            except Exception as e:      # report it and go on: the eager numbers stand
                row["torch_graph_error"] = f"{type(e).__name__}: {e}"
                print(f"  PyTorch's CUDA graph capture failed: {row['torch_graph_error']}")
    else:
        row["gpucnn_step_peak_mib"] = numpy_step_peak_bytes(step) / MiB
    return row


def free_device_memory(torch):
    """Between nets: each net's peak is measured from a clean pool. A model's layers, stages and cached steps refer
    to each other, so its arrays wait for the cycle collector: collect first, then give the pools' blocks back
    (the H200 run of 2026-12-04 showed LeNet-5 rows at AlexNet's 9,400 MiB: memory held from the net before)."""
    if ARGS.device == "cuda":
        import gc

        import cupy
        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()


def step_table(args, torch, m):
    s = Settings(args)
    precisions = C.precisions(args)
    rows, notes = [], []
    for precision in precisions:
        C.select_precision(precision, args, torch, gpucnn, notes)
        for name, batch in s.nets:
            t0 = time.perf_counter()
            row = step_row(args, torch, s, name, batch, precision, precision == precisions[0])
            free_device_memory(torch)
            C.keep_row(rows, row, f"  {name} batch {batch} {precision}: gpucnn {C.fmt(row.get('gpucnn_ms'))} ms, "
                                  f"torch {C.fmt(row.get('torch_ms'))} ms, launches "
                                  f"{C.fmt(row.get('counts', {}).get('launches'))} ({time.perf_counter() - t0:.1f} s)")
    for r in rows:
        r["check"] = C.check_status(r)
        if "counts" in r:
            r["launches"], r["bytes_per_step"] = r["counts"]["launches"], r["counts"]["bytes"]
        if "counts_first_step" in r:
            r["bytes_first_step"] = r["counts_first_step"]["bytes"]

    dev = args.device
    graphed = any("gpucnn_eager_ms" in r for r in rows)
    cols = [("net", "net"), ("batch", "batch")]
    if len(precisions) > 1:
        cols.append(("precision", "precision"))
    if not args.dry:            # the simulator's times mean nothing
        cols.append(("gpucnn ms/step" + (" (CUDA graph)" if graphed else ""), "gpucnn_ms"))
        if graphed:
            cols.append(("gpucnn eager ms/step", "gpucnn_eager_ms"))
        cols.append(("torch ms/step", "torch_ms"))
        if dev == "cuda":
            cols.append(("torch graph ms/step", "torch_graph_ms"))
        cols += [("gpucnn img/s", "gpucnn_img_s"), ("torch img/s", "torch_img_s"), ("ratio", "ratio")]
        if dev == "cuda":
            cols.append(("ratio vs torch graph", "ratio_graph"))
        else:               # on a shared CPU the fastest step is the one least disturbed by others
            cols += [("gpucnn min ms", "gpucnn_min_ms"), ("torch min ms", "torch_min_ms")]
    if dev != "cpu":
        cols += [("gpucnn kernels/step", "launches"), ("gpucnn bytes alloc/step", "bytes_per_step")]
    if args.dry:
        cols.append(("bytes alloc 1st step", "bytes_first_step"))
    if dev == "cuda":
        cols += [("torch kernels/step", "torch_kernels"), ("gpucnn peak MiB", "gpucnn_peak_mib"),
                 ("torch peak MiB", "torch_peak_mib")]
    elif dev == "cpu":
        cols.append(("gpucnn step peak MiB", "gpucnn_step_peak_mib"))
    if args.dry:
        cols.append(("err vs CPU path", "err_cpu_path"))
    cols += [("err fwd32 vs torch", "err_torch_fwd32"), ("err step64 vs torch", "err_torch_step64"), ("check", "check")]
    print()
    where = f" ({m['gpu']})" if "gpu" in m else f" ({m['cpu']}, {m['blas_threads']} threads)"
    print(f"## Training steps on {dev}{where}")
    if args.dry:
        print("no timings on the simulator; kernels/step and bytes allocated: gpucnn.profile over a second "
              "(steady-state) step, and bytes over the first; each cuBLAS call counts one launch\n")
    else:
        rounds = " in 3 rounds of blocks" if dev == "cpu" else ""
        print(f"synthetic data on the device; SGD lr {LR}, momentum {MOMENTUM}, weight decay {WEIGHT_DECAY}; median "
              f"of {s.repeats} steps{rounds} after {s.warmup} warm-up each; ratio = gpucnn ms / torch ms (below 1: "
              "gpucnn faster)"
              + ("; kernels/step: gpucnn.profile over an eager steady-state step (each cuBLAS call one); peak "
                 "MiB: device memory in use at the step's peak, weights and optimizer state included"
                 if dev == "cuda" else "; step peak MiB: NumPy memory a step allocates at once (tracemalloc), "
                 "weights and optimizer state excluded") + "\n")
    print(C.markdown_table(cols, rows))
    for r in rows:
        if r.get("counts"):
            print(f"\n{r['net']} batch {r['batch']} {r['precision']}: launches per family: "
                  + ", ".join(f"{f} {n}" for f, n in r["counts"]["by_family"].items() if n))
    return rows, notes, s


# ------------------------------------------------------------------------------------------ the CPU epoch

def epoch_data(n_images):
    try:
        train, _ = gpucnn.data.fashion_mnist()
        source = "Fashion-MNIST"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        n = 60000
        train = gpucnn.ArrayDataset(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8),
                                    rng.integers(0, 10, n), num_classes=10, name="synthetic")
        source = "synthetic uint8 images (Fashion-MNIST is not installed)"
    return train.limit(n_images), source


def gpucnn_epoch(ds, batch):
    """gpucnn's own training loop: Sequential.fit for one epoch (standardisation, shuffling, gathering,
    the steps, and the loss read back every step as fit does on the CPU)."""
    model = gpucnn.models.lenet5(seed=0)
    opt = gpucnn.optim.SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    t0 = time.perf_counter()
    hist = model.fit(ds, epochs=1, batch_size=batch, optimizer=opt, verbose=0, seed=0)
    return time.perf_counter() - t0, hist["loss"][0], hist["accuracy"][0]


def _load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def epoch_comparison(args, torch, threads):
    n_images = args.epoch_images or (10000 if args.quick else 60000)
    batch = 128
    if args.dry:
        n_images = 256          # the code path only, on the CPU path: the simulator would take hours
    ds, source = epoch_data(n_images)
    print(f"\n## One LeNet-5 epoch on the CPU: {len(ds):,} images of {source}, batch {batch}, {threads} threads")
    if args.dry:
        print("--dry: the code path only, on the CPU path (backend.cpu_path), no timing claims\n")
    runs = []
    for r in range(args.epoch_repeats):
        sides = ["gpucnn", "torch"] if r % 2 == 0 else ["torch", "gpucnn"]
        run = {"order": sides}
        for side in sides:
            if side == "torch" and torch is None:
                continue
            load_before = _load()
            if side == "gpucnn":
                with backend.cpu_path():
                    s, loss, acc = gpucnn_epoch(ds, batch)
            else:
                s, loss, acc = torch_epoch(torch, ds, batch, LR, MOMENTUM, WEIGHT_DECAY)
            # a shared machine: the load average says whether others ran at the same time
            load = [load_before, _load()]
            run[side] = {"seconds": s, "images_per_s": len(ds) / s, "train_loss": loss, "train_accuracy": acc,
                         "load_average_1min": load}
            took = "" if args.dry else f"{s:.2f} s, "
            print(f"  run {r + 1}: {side}: {took}loss {loss:.4f}, accuracy {acc:.4f} (load {load[0]:.2f} -> "
                  f"{load[1]:.2f})", flush=True)
        if "torch" in run:
            run["ratio"] = run["gpucnn"]["seconds"] / run["torch"]["seconds"]
        runs.append(run)
    timed = not args.dry
    rows = [{"run": i + 1, "first": r["order"][0],
             "gpucnn_s": r["gpucnn"]["seconds"] if timed else None,
             "torch_s": r.get("torch", {}).get("seconds") if timed else None,
             "ratio": r.get("ratio") if timed else None,
             "gpucnn_loss": r["gpucnn"]["train_loss"], "torch_loss": r.get("torch", {}).get("train_loss")}
            for i, r in enumerate(runs)]
    print()
    cols = [("run", "run"), ("first", "first")]
    if not args.dry:
        cols += [("gpucnn s", "gpucnn_s"), ("torch s", "torch_s"), ("ratio gpucnn/torch", "ratio")]
    print(C.markdown_table(cols + [("gpucnn train loss", "gpucnn_loss"), ("torch train loss", "torch_loss")], rows))
    return {"images": len(ds), "source": source, "batch": batch, "threads": threads, "dry": args.dry, "runs": runs}


def main():
    args = ARGS
    torch = C.load_torch(args)
    threads, how = C.match_torch_threads(torch)
    m = C.machine(args, torch)
    C.print_machine(m)
    result = {"machine": m, "quick": args.quick, "dry": args.dry, "tolerance": C.TOLERANCE}
    failed = []
    if not args.no_steps:
        if args.dry:
            print("--dry: the GPU code path on Numba's simulator (LeNet-5 at batch 1, 1x28x28), checked "
                  "against the CPU path" + (" and PyTorch" if torch else "") + "; launch counts, no timings.\n")
        rows, notes, s = step_table(args, torch, m)
        result.update({"steps": rows, "notes": notes, "repeats": s.repeats, "warmup": s.warmup})
        failed = [r for r in rows if "error" in r]
    if not args.no_epoch and args.device in ("cpu", "sim"):
        result["epoch"] = epoch_comparison(args, torch, threads)
    path = C.save_results(args, "train", result)
    return C.report_and_exit_code(path, failed, "net(s)")


if __name__ == "__main__":
    sys.exit(main())
