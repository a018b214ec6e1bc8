"""Device memory of a training step, predicted without a GPU.

    python bench/memory.py             # LeNet-5 at 256 and 1024, alexnet_small at 256, AlexNet at 128
    python bench/memory.py --check     # first: on tiny nets the prediction equals a real simulated step's plan

On "cuda" a gpucnn training step holds: the flat parameters and gradients, the optimizer's state (one flat
buffer per slot), a few small per-layer buffers, the batch and the copy a CUDA graph reads it from, and the
step's workspace arena, laid out once to the step's peak (see gpucnn.backend.Arena). The arena's plan
depends only on the shapes and the lifetimes of the buffers the step asks for, never on their values. So it
can be found by running the step's GPU code path on "sim" with every kernel and GEMM skipped: the buffers
are requested and released exactly as on a GPU, and nothing is computed (seconds for AlexNet at batch 128,
where the simulator would take days). ``--check`` shows that skipping changes nothing: on small nets the
skipped and the real simulated steps plan the same arena, buffer for buffer.

What this leaves out: cuBLAS's own workspace, CuPy's rounding of each allocation (512 bytes), the CUDA
context, and the data set when it lives on the device. bench/train.py measures the real peak on a GPU
(through CuPy's memory pool); this script predicts it, and prints PyTorch's measured peak where one is known.
"""
import os
import sys

os.environ["GPUCNN_DEVICE"] = "sim"     # before gpucnn (and numba.cuda) are imported: the GPU code path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402

import _common as C  # noqa: E402

if C.ROOT not in sys.path:        # the checkout this script lives in
    sys.path.insert(0, C.ROOT)

import numpy as np  # noqa: E402

import gpucnn  # noqa: E402
from gpucnn import backend, layers as L, optim  # noqa: E402
from gpucnn.losses import SoftmaxCrossEntropy  # noqa: E402
from gpucnn.profile import shapes_only  # noqa: E402


def mini_alexnet(winograd=False):
    """AlexNet's layers in AlexNet's order (11x11/4 conv, LRN, overlapping max pools, 5x5 and 3x3 convs,
    dropout) with a few channels on 67x67 images: what --check runs for real on the simulator."""
    r = np.random.default_rng(0)
    model = gpucnn.Sequential([
        L.Conv2D(3, 4, 11, stride=4, padding=2, rng=r), L.ReLU(), L.LocalResponseNorm(), L.MaxPool2D(3, 2),
        L.Conv2D(4, 6, 5, padding=2, rng=r), L.ReLU(), L.LocalResponseNorm(), L.MaxPool2D(3, 2),
        L.Conv2D(6, 8, 3, padding=1, rng=r), L.ReLU(), L.Conv2D(8, 6, 3, padding=1, rng=r), L.ReLU(),
        L.Conv2D(6, 6, 3, padding=1, rng=r), L.ReLU(), L.MaxPool2D(3, 2), L.Flatten(),
        L.Dropout(0.5, seed=1), L.Dense(6, 8, rng=r), L.ReLU(), L.Dropout(0.5, seed=2), L.Dense(8, 8, rng=r),
        L.ReLU(), L.Dense(8, 4, rng=r)], input_shape=(3, 67, 67))
    return gpucnn.models.use_winograd(model) if winograd else model


def _named(name):
    return lambda: gpucnn.models.get(name, seed=0)


NETS = [("lenet5", 256, _named("lenet5")), ("lenet5", 1024, _named("lenet5")),
        ("alexnet_small", 256, _named("alexnet_small")), ("alexnet", 128, _named("alexnet")),
        ("alexnet, winograd", 128, lambda: gpucnn.models.alexnet(seed=0, winograd=True))]
CHECK_NETS = [("lenet5", 4, _named("lenet5")), ("mini alexnet", 2, mini_alexnet),
              ("mini alexnet, winograd", 2, lambda: mini_alexnet(winograd=True))]
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4      # bench/train.py's optimizer: SGD keeps one velocity slot
MiB = 2 ** 20
# PyTorch's peak for a comparable step, measured on a GPU (issue 6: torchvision's AlexNet, two-tower
# widths, no LRN, 224x224, batch 128, fp32, on an H100); a reference point, not the same network.
KNOWN_PEAKS = {("alexnet", 128): ("torchvision AlexNet, H100", 1500.0)}


# ------------------------------------------------------------------------------------------ one net

def step_memory(name, batch, make, skip=True, seed=0):
    """Run two training steps of the net ``make()`` at ``batch`` on "sim" (the first records the buffers, the
    second runs on the plan) and return the bytes of each part of the step's device memory, and the arena."""
    model = make()
    opt = optim.SGD(model, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loss = SoftmaxCrossEntropy()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, model.output_shape[0], batch)
    with shapes_only() if skip else contextlib.nullcontext():
        for _ in range(2):          # eager steps (graph=False): what is counted is the step's own launches and plan
            model.train_step(x, y, loss, opt, graph=False)
        with gpucnn.profile() as p:
            model.train_step(x, y, loss, opt, graph=False)
    (st,) = model._steps.values()
    arena = st.arena
    flat = model.flat
    small = [opt._hyper_buf] + [getattr(layer, "_keys", None) for layer in model.layers]
    small += [a for layer in model.layers for a in layer.buffers.values()]
    row = {
        "net": name, "batch": batch,
        "params": int(model.num_params()),
        "param_bytes": int(flat.param.nbytes), "grad_bytes": int(flat.grad.nbytes),
        "optimizer_bytes": int(sum(a.nbytes for a in opt.flat_state.values())),
        "small_bytes": int(sum(a.nbytes for a in small if a is not None)),
        "batch_bytes": 2 * int(x.nbytes + y.nbytes),        # the batch, and the copy a CUDA graph reads
        "workspace_bytes": int(arena.nbytes), "workspace_separate_bytes": int(arena.sum_bytes),
        "workspace_buffers": len(arena.buffers), "planned": not arena.recording,
        "launches": p.launches, "bytes_allocated_per_step": p.bytes_allocated,
    }
    row["total_bytes"] = sum(row[k] for k in ("param_bytes", "grad_bytes", "optimizer_bytes", "small_bytes",
                                              "batch_bytes", "workspace_bytes"))
    known = KNOWN_PEAKS.get((name, batch))
    if known:
        row["known_peak"], row["known_peak_mib"] = known
    return row, arena


def check(nets):
    """The skipped run must plan what the real simulated run plans: the same buffers (shapes, dtypes), the
    same lifetimes, the same offsets. Returns the rows that differ (empty when all agree)."""
    failed = []
    for name, batch, make in nets:
        (real, a_real), (skipped, a_skip) = step_memory(name, batch, make, skip=False), step_memory(name, batch, make)
        same = (a_real.spans == a_skip.spans
                and [(b.shape, b.dtype) for b in a_real.buffers] == [(b.shape, b.dtype) for b in a_skip.buffers]
                and [backend._address(b) - backend._address(a_real.slab) for b in a_real.buffers]
                == [backend._address(b) - backend._address(a_skip.slab) for b in a_skip.buffers]
                and real["workspace_bytes"] == skipped["workspace_bytes"]
                and real["launches"] == skipped["launches"])
        print(f"  check {name} batch {batch}: {real['workspace_buffers']} buffers, workspace "
              f"{real['workspace_bytes']:,} bytes planned (real run) vs {skipped['workspace_bytes']:,} (skipped), "
              f"launches {real['launches']} vs {skipped['launches']}: {'same' if same else 'DIFFERENT'}")
        if not same:
            failed.append({"error": f"{name} batch {batch}: the skipped run plans another workspace than the "
                                    f"real one"})
    return failed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Device memory of a training step, predicted on 'sim' without "
                                            "computing.")
    p.add_argument("--check", action="store_true",
                   help="first run small nets for real on 'sim' and check the skipped run plans the same arena")
    p.add_argument("--only", default="", help="only the nets whose label contains this text (e.g. alexnet)")
    p.add_argument("--out", default=C.RESULTS, help="folder of the results JSON (default bench/results)")
    args = p.parse_args(argv)
    args.device = "sim"
    return args


def main():
    args = parse_args()
    m = C.machine(args)
    C.print_machine(m)
    failed = []
    if args.check:
        print("Checking that skipping the kernels changes no plan (real simulated steps, small nets):")
        failed = check([net for net in CHECK_NETS if args.only in net[0]])
        print()
    rows = []
    for name, batch, make in [net for net in NETS if args.only in net[0]]:
        row, _ = step_memory(name, batch, make)
        rows.append(row)
    for r in rows:
        for k in [k for k in r if k.endswith("_bytes")]:
            r[k[:-6] + "_mib"] = r[k] / MiB
        r["saved"] = 1 - r["workspace_bytes"] / r["workspace_separate_bytes"]
    cols = [("net", "net"), ("batch", "batch"), ("params", "params"), ("params MiB", "param_mib"),
            ("grads MiB", "grad_mib"), ("SGD momentum MiB", "optimizer_mib"), ("batch x2 MiB", "batch_mib"),
            ("workspace MiB (planned)", "workspace_mib"), ("as separate buffers MiB", "workspace_separate_mib"),
            ("saved by the plan", "saved"), ("predicted total MiB", "total_mib"),
            ("launches/step", "launches"), ("PyTorch peak MiB (measured)", "known_peak_mib")]
    print("## Device memory of one training step (SGD with momentum), predicted on 'sim' without computing\n")
    print(C.markdown_table(cols, rows))
    notes = sorted({f"{r['known_peak']}" for r in rows if "known_peak" in r})
    if notes:
        print(f"\nPyTorch's peak: {'; '.join(notes)} (issue 6), a reference point: another network's widths.")
    path = C.save_results(args, "memory", {"machine": m, "rows": rows, "checked": args.check})
    return C.report_and_exit_code(path, failed, "net(s)")


if __name__ == "__main__":
    sys.exit(main())
