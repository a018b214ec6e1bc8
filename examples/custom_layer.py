"""Write your own layer: a parametric ReLU whose forward and backward are Numba CUDA kernels.

PReLU (He et al., 2015) is a ReLU whose slope for negative inputs is learned, one per channel:

    y = x            where x > 0
    y = a[c] * x     elsewhere (c: the channel of x)

    dL/dx    = dL/dy            where x > 0, a[c] * dL/dy elsewhere
    dL/da[c] = sum of dL/dy * x over the elements of channel c where x <= 0 (every image, every pixel)

A gpucnn layer is written in two parts, as the built-in ones are: kernel functions that know nothing of
layers (a Numba kernel for the GPU and its NumPy twin for the CPU, the public function picking one with
``backend.on_gpu``), and a thin Layer subclass that owns the parameter, the cache and the shape checks.
Then this example

1. checks the backward pass against finite differences with ``gpucnn.testing.check_backward``;
2. runs the GPU code on the "sim" device (Numba's CUDA simulator; in a second process when this one runs
   on the CPU, since Numba picks simulator or GPU once per process) and compares it with the CPU twin;
3. trains a small CNN that uses the layer, saves it, loads it back (a Layer subclass is registered by its
   class name, so Sequential.load finds it) and checks that the loaded model predicts the same.

Writes custom_layer.png: the learned slopes, the activations they give, and the checks' errors.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import argparse
import json
import os
import subprocess
import sys

import numpy as np

import gpucnn
from gpucnn import backend, layers as L, optim
from gpucnn.backend import cuda, gpu_device, gpu_kernel, launch, on_gpu
from gpucnn.layers import Layer
from gpucnn.layers.base import check_input, init_uniform
from gpucnn.model import Sequential
from gpucnn.testing import check_backward


# ---------------------------------------------------------------------------------------------- GPU kernels
# Arrays reach the kernels as (N, C, inner) views, inner = H*W (1 after a Dense layer): one thread per element,
# except the slope gradient: one thread per (channel, image) sums its inner elements, and the (C, N) partial
# sums are then added over the images. No two threads write the same place: no atomics, deterministic.

@gpu_device
def element(i, shape):
    """The indices (n, c, j) of flat index i into an (N, C, inner) array: a device function, written once for
    the kernels that go over every element (compiled into each, not launched)."""
    C, inner = shape[1], shape[2]
    return i // (inner * C), (i // inner) % C, i % inner


@gpu_kernel
def prelu_forward_kernel(x, a, y):
    i = cuda.grid(1)
    if i >= x.size:
        return
    n, c, j = element(i, x.shape)
    v = x[n, c, j]
    y[n, c, j] = v if v > 0 else a[c] * v


@gpu_kernel
def prelu_backward_input_kernel(x, a, gy, gx):
    i = cuda.grid(1)
    if i >= x.size:
        return
    n, c, j = element(i, x.shape)
    g = gy[n, c, j]
    gx[n, c, j] = g if x[n, c, j] > 0 else a[c] * g


@gpu_kernel
def prelu_backward_slope_kernel(x, gy, partial):
    i = cuda.grid(1)
    N, C, inner = x.shape[0], x.shape[1], x.shape[2]
    if i >= C * N:
        return
    c = i // N
    n = i % N
    total = 0.0
    for j in range(inner):
        v = x[n, c, j]
        if v <= 0:
            total += gy[n, c, j] * v
    partial[c, n] = total


# ---------------------------------------------------------------------------------------------- the kernel functions

def _three_d(x):
    """(N, C, ...) as a C-contiguous (N, C, inner) array (a view when x is contiguous)."""
    return backend.xp(x).ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)


def _per_channel(a, ndim):
    """The slopes (C,) shaped to broadcast against an (N, C, ...) array."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def prelu_forward(x, a):
    """y = x where x > 0, a[c] * x elsewhere, for x (N, C, ...) and a (C,)."""
    if on_gpu(x):
        x3 = _three_d(x)
        y = backend.empty(x3.shape, x.dtype, x)
        launch(prelu_forward_kernel, x3.size, x3, a, y)
        return y.reshape(x.shape)
    return np.where(x > 0, x, _per_channel(a, x.ndim) * x)


def prelu_backward(x, a, gy):
    """(dL/dx, dL/da) from dL/dy."""
    if on_gpu(gy):
        x3, gy3 = _three_d(x), _three_d(gy)
        N, C, _ = x3.shape
        gx = backend.empty(x3.shape, gy.dtype, gy)
        launch(prelu_backward_input_kernel, x3.size, x3, a, gy3, gx)
        partial = backend.empty((C, N), gy.dtype, gy)
        launch(prelu_backward_slope_kernel, C * N, x3, gy3, partial)
        return gx.reshape(x.shape), partial.sum(axis=1)
    negative = x <= 0
    gx = np.where(negative, _per_channel(a, x.ndim) * gy, gy)
    axes = (0,) + tuple(range(2, x.ndim))
    ga = np.where(negative, gy * x, 0).sum(axis=axes)
    return gx, ga.astype(gy.dtype, copy=False)


# ---------------------------------------------------------------------------------------------- the layer

class PReLU(Layer):
    """Parametric ReLU: one learned slope per channel for the negative inputs (initially ``init``, 0.25 as
    in the paper and PyTorch). Takes (N, channels, ...) inputs."""

    def __init__(self, channels: int, init: float = 0.25, dtype="float32"):
        super().__init__()
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"PReLU: channels must be a positive int, got {channels!r}")
        self.channels, self.init, self.dtype = int(channels), float(init), np.dtype(dtype)
        self.params["slope"] = init_uniform((self.channels,), 1, self.dtype,
                                            init=lambda shape, rng: np.full(shape, self.init))
        self.grads = {"slope": None}
        self._x = None

    def output_shape(self, input_shape):
        if len(input_shape) < 1 or input_shape[0] != self.channels:
            raise ValueError(f"PReLU: expected an input shape ({self.channels}, ...), got {tuple(input_shape)}")
        return tuple(input_shape)

    def forward(self, x, training=True):
        check_input(self.name, x, None, f"(N, {self.channels}, ...)", self.dtype)
        if x.ndim < 2:
            raise ValueError(f"PReLU: expected an input (N, {self.channels}, ...), got shape {tuple(x.shape)}")
        check_input(self.name, x, None, f"(N, {self.channels}, ...)", channels=self.channels)
        self._x = x
        return prelu_forward(x, self.params["slope"])

    def backward(self, gy):
        x = self._need("_x")
        if tuple(gy.shape) != tuple(x.shape):
            raise ValueError(f"PReLU: backward got a gradient of shape {tuple(gy.shape)}, "
                             f"expected the forward output's {tuple(x.shape)}")
        gx, self.grads["slope"] = prelu_backward(x, self.params["slope"], gy)
        return gx

    def config(self):
        return {"channels": self.channels, "init": self.init, "dtype": self.dtype.name}


# ---------------------------------------------------------------------------------------------- the checks

def gradient_check(rng):
    """check_backward on float64 inputs, with random slopes of both signs; returns the relative errors."""
    layer = PReLU(3, dtype="float64")
    layer.params["slope"][...] = gpucnn.asarray(rng.uniform(-0.5, 0.5, 3))
    x = gpucnn.asarray(rng.standard_normal((2, 3, 4, 5)))
    report = check_backward(layer, x)
    errors = {name: r["max_rel_error"] for name, r in report.items()}
    print(f"check_backward(PReLU): passed; worst relative error {errors['x']:.1e} for the input, "
          f"{errors['slope']:.1e} for the slopes")
    return errors


def compare_gpu_with_cpu(rng):
    """The GPU kernels (on "sim" or "cuda") against the NumPy twins, float32 and float64, tiny shapes."""
    results = {}
    for dtype in ("float32", "float64"):
        x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
        gy = rng.standard_normal(x.shape).astype(dtype)
        a = rng.uniform(-0.5, 0.5, 3).astype(dtype)
        y_gpu = prelu_forward(gpucnn.asarray(x), gpucnn.asarray(a))
        gx_gpu, ga_gpu = prelu_backward(gpucnn.asarray(x), gpucnn.asarray(a), gpucnn.asarray(gy))
        with backend.cpu_path():
            y_cpu = prelu_forward(x, a)
            gx_cpu, ga_cpu = prelu_backward(x, a, gy)
        diff = {name: float(np.abs(gpucnn.to_numpy(g).astype(np.float64) - c).max() / max(np.abs(c).max(), 1e-30))
                for name, g, c in (("forward", y_gpu, y_cpu), ("input gradient", gx_gpu, gx_cpu),
                                   ("slope gradient", ga_gpu, ga_cpu))}
        results[dtype] = diff
        print(f"GPU kernels on {gpucnn.device()} against the CPU twin, {dtype}: largest difference relative to "
              f"the largest value: " + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    worst = max(max(d.values()) for d in results.values())
    ok = worst <= 2e-4
    print(f"GPU path agrees with the CPU path: {ok}")
    return results, ok


def run_sim_check_in_subprocess(args):
    """Numba picks simulator or GPU once per process: run this example's sim check in a fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCNN_DEVICE", "NUMBA_ENABLE_CUDASIM")}
    cmd = [sys.executable, os.path.abspath(__file__), "--device", "sim", "--sim-check", "--out", str(args.out)]
    print(f"running the GPU code on the simulator in a second process: {' '.join(cmd[1:])}")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines()[1:]:         # its first line is its own setup banner
        print("  | " + line)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(f"error: the simulator check failed (exit {done.returncode})")
    return json.loads((args.out / "sim_check.json").read_text())


# ---------------------------------------------------------------------------------------------- training

def small_cnn():
    """Two conv + PReLU + max-pool stages and a classifier: 1x28x28 -> 10 classes."""
    rng = np.random.default_rng(0)
    return Sequential([
        L.Conv2D(1, 8, 5, rng=rng), PReLU(8), L.MaxPool2D(2),           # 8 x 24 x 24 -> 8 x 12 x 12
        L.Conv2D(8, 16, 5, rng=rng), PReLU(16), L.MaxPool2D(2),         # 16 x 8 x 8 -> 16 x 4 x 4
        L.Flatten(), L.Dense(16 * 4 * 4, 10, rng=rng),
    ], input_shape=(1, 28, 28))


def train_and_reload(args):
    train, test = _common.fashion_mnist()
    n, epochs = (2000, 2) if args.quick else (20000, 4)
    model = small_cnn()
    model.summary()
    print(f"training on the first {n} Fashion-MNIST images for {epochs} epochs")
    history = model.fit(train.limit(n), epochs=epochs, batch_size=64, verbose=2, validation=test.limit(1000),
                        optimizer=optim.SGD(model, lr=0.05, momentum=0.9))
    prelus = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, PReLU)]
    for i, layer in prelus:
        s = gpucnn.to_numpy(layer.params["slope"])
        slopes = np.round(s.astype(np.float64), 3).tolist()
        print(f"layer {i} PReLU({layer.channels}) learned slopes: {slopes} (all started at 0.25)")
    path = args.out / "prelu_cnn.npz"
    model.save(str(path))
    _common.saved(path)
    loaded = Sequential.load(str(path))
    images = test.images[:256]
    same = float(np.abs(gpucnn.to_numpy(loaded.predict(images)) - gpucnn.to_numpy(model.predict(images))).max())
    print(f"loaded {path.name}: layer classes {[type(layer).__name__ for layer in loaded.layers]}; "
          f"max |logits difference| against the trained model {same:.1e}")
    return model, prelus, history


def picture(prelus, grad_errors, gpu_results, gpu_name, history):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.6), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1, 1.2, 1.1])

    # (1) the activations the first PReLU learned
    i, first = prelus[0]
    slopes = gpucnn.to_numpy(first.params["slope"])
    xs = np.linspace(-3, 3, 61)
    for c, a in enumerate(slopes):
        a1.plot(xs, np.where(xs > 0, xs, a * xs), lw=1.2, label=f"channel {c}: a = {a:.2f}")
    a1.plot(xs, np.where(xs > 0, xs, 0.25 * xs), "k--", lw=1, label="initial: a = 0.25")
    a1.axhline(0, color="0.7", lw=0.8)
    a1.axvline(0, color="0.7", lw=0.8)
    a1.set_xlabel("x")
    a1.set_ylabel("PReLU(x)")
    a1.legend(fontsize=7, ncol=2)
    a1.set_title(f"the activations learned by layer {i} (one per channel)", fontsize=10)

    # (2) every learned slope
    offset = 0
    for i, layer in prelus:
        s = gpucnn.to_numpy(layer.params["slope"])
        a2.bar(np.arange(offset, offset + len(s)), s, label=f"layer {i}: PReLU({len(s)})")
        offset += len(s) + 2
    a2.axhline(0.25, color="black", ls="--", lw=1, label="initial slope 0.25")
    a2.axhline(0, color="0.6", lw=0.8)
    a2.set_xticks([])
    a2.set_xlabel("channel")
    a2.set_ylabel("learned slope a for x < 0")
    acc = history["val_accuracy"][-1]
    a2.set_title(f"learned slopes after training (validation accuracy {acc:.3f})", fontsize=10)
    a2.legend(fontsize=8)

    # (3) how the layer was checked
    names, values, colours = [], [], []
    for k, v in grad_errors.items():
        names.append(f"finite diff.\n{'input' if k == 'x' else k}")
        values.append(v)
        colours.append("tab:purple")
    for dtype, diffs in gpu_results.items():
        for k, v in diffs.items():
            names.append(f"{gpu_name} vs CPU\n{k.replace(' gradient', ' grad')}\n{dtype}")
            values.append(v)
            colours.append("tab:blue" if dtype == "float32" else "tab:cyan")
    floor = 1e-18                                  # exact agreement drawn at the floor of the log scale
    a3.bar(range(len(values)), [max(v, floor) for v in values], color=colours)
    a3.set_yscale("log")
    a3.set_ylim(floor / 10, 1)
    a3.axhline(2e-4, color="tab:red", lw=1, ls="--", label="float32 tolerance 2e-4")
    a3.set_xticks(range(len(values)), names, fontsize=6)
    a3.set_ylabel("largest relative error")
    a3.legend(fontsize=8, loc="upper right")
    a3.set_title("the checks: backward vs finite differences (float64),\n"
                 f"GPU kernels on {gpu_name} vs the NumPy twin (1e-18: exact)", fontsize=10)
    return fig


def main():
    def options(parser):
        parser.add_argument("--sim-check", action="store_true", help=argparse.SUPPRESS)

    args = _common.setup("custom_layer", __doc__, options)
    rng = np.random.default_rng(0)
    if args.sim_check:                     # the second process: only the GPU-against-CPU comparison
        results, ok = compare_gpu_with_cpu(rng)
        (args.out / "sim_check.json").write_text(json.dumps(results) + "\n")
        raise SystemExit(0 if ok else 1)

    print("\n1. The backward pass against finite differences")
    grad_errors = gradient_check(rng)

    print("\n2. The GPU kernels against the CPU twin")
    if args.device == "cpu":
        gpu_results, gpu_name = run_sim_check_in_subprocess(args), "sim"
    else:
        (gpu_results, ok), gpu_name = compare_gpu_with_cpu(rng), args.device
        if not ok:
            raise SystemExit("error: the GPU path disagrees with the CPU path")

    print("\n3. A CNN with PReLU layers, trained, saved and loaded back")
    if args.device == "sim":
        print("skipped on 'sim': the simulator runs every GPU thread in Python (about 150 us each); "
              "train on 'cpu' or 'cuda'")
        return
    model, prelus, history = train_and_reload(args)
    fig = picture(prelus, grad_errors, gpu_results, gpu_name, history)
    fig.savefig(args.out / "custom_layer.png", dpi=110)
    _common.saved(args.out / "custom_layer.png")


if __name__ == "__main__":
    main()
