"""``gpucnn selftest``: the first command to run on a machine with a CUDA GPU (also ``python -m gpucnn.selftest``).

It says which GPU, driver and libraries it found, then runs every op family on the GPU against the CPU path
(the NumPy twins, the reference), forward and backward, in float32 and float64, at the shapes training uses;
a few LeNet-5 and alexnet_small training steps, eager against the CPU and graphed against eager (bit for
bit); the bad inputs that must raise the same error on the GPU as on the CPU (an out-of-range label there
would read garbage silently); and how long the kernels take to compile and a training step takes to run.
It prints one row per check and exits 0 when nothing failed, 1 when something did, 2 when there is no
usable GPU (it says why). It needs no data set and no PyTorch.

    gpucnn selftest                     # on the GPU (the first run also compiles every kernel)
    gpucnn selftest --quick             # smaller shapes, fewer steps
    gpucnn selftest --device sim        # the same checks through Numba's CUDA simulator, at toy shapes
    gpucnn selftest --only conv         # only the checks whose name contains "conv"

A GPU result agrees with the CPU when ``max|gpu - cpu| <= tol * max|cpu|`` for every array the op returns or
updates (tol 2e-4 in float32, 1e-7 in float64: the tests' tolerance); the "error/time" column shows that
ratio, the worst over the op's arrays.

Rows: ``pass``, ``FAIL``, ``xfail`` (a known limitation, not a failure: today CuPy refuses cuBLAS calls while
a CUDA graph is captured, so train_step warns and runs eagerly; the row still checks that those steps equal
eager ones bit for bit), ``skip`` (a check this device cannot make: graph rows on "sim" where train_step
captures graphs on "cuda" only) and ``time`` (a measurement, never a failure).

The package: this file holds the run (the sizes per device, the header, the table, the exit status);
compare.py the two paths and the comparison every check makes; ops.py, training.py and bad_inputs.py the
rows (op families; training steps and timings; bad inputs); __main__.py runs ``python -m gpucnn.selftest``.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time
import traceback
import warnings
import zlib

import numpy as np

import gpucnn
from gpucnn import backend, layers as L, models
from gpucnn.model import Sequential

from .bad_inputs import error_checks
from .compare import FAIL, PASS, SKIP, TIME, XFAIL, Paths, Result
from .ops import op_checks
from .training import timing_checks, training_checks

DESCRIPTION = ("Check gpucnn on this GPU: every op family against the CPU path, training steps eager and "
               "graphed, bad inputs, kernel compile and step times. Exit 0: nothing failed; 1: a check failed; "
               "2: no usable GPU.")
WIDTH = (54, 6, 10)     # the name, result and value columns of the table


# ----------------------------------------------------------------------------------------------------- sizes

def sizes(device: str, quick: bool) -> dict:
    """The shapes and step counts of a run. On "cuda" the layers of LeNet-5 at its batch of 64 and AlexNet's
    at a modest batch; on "sim" toy shapes with the same layer configurations (the simulator runs every CUDA
    thread as a Python thread: a LeNet-5 step at batch 1 takes about 2 s on one core)."""
    if device == "cuda":
        n, na = (16, 2) if quick else (64, 8)
        return dict(
            conv=[("LeNet c1 5x5 pad 2", (1, 6, 5, 1, 2), (n, 1, 28, 28), ("gemm", "direct")),
                  ("LeNet c3 5x5", (6, 16, 5, 1, 0), (n, 6, 14, 14), ("gemm", "direct")),
                  ("AlexNet 3x3 pad 1", (192, 384, 3, 1, 1), (na, 192, 13, 13), ("gemm", "winograd")),
                  ("AlexNet c1 11x11/4 pad 2", (3, 96, 11, 4, 2), (na, 3, 224, 224), ("gemm",)),
                  ("AlexNet c2 groups 2", (96, 256, 5, 1, 2, 2), (na, 96, 27, 27), ("gemm",)),
                  ("AlexNet c4 groups 2", (384, 384, 3, 1, 1, 2), (na, 384, 13, 13),
                   ("gemm", "winograd"))],
            conv_transpose=[("autoencoder up 3x3/2", (32, 16, 3, 2, 1, 1, 1), (n, 32, 7, 7), ("gemm",)),
                            ("autoencoder 3x3 pad 1", (8, 32, 3, 1, 1, 0, 1), (n, 8, 7, 7), ("gemm", "winograd")),
                            ("3x3/2 groups 2", (32, 16, 3, 2, 1, 1, 2), (n, 32, 7, 7), ("gemm",))],
            dense=[("400->120", (400, 120), (n, 400)), ("1024->1024", (1024, 1024), (16, 1024))],
            act=(n, 6, 28, 28), pool=(n, 6, 28, 28), pool_overlap=(na, 96, 55, 55), lrn=(na, 96, 27, 27),
            bn=(n, 16, 10, 10), dropout=(n, 400), loss=(n, 10),
            optim_layers=lambda dt: [L.Conv2D(6, 16, 5, dtype=dt), L.Dense(400, 120, dtype=dt),
                                     L.BatchNorm2D(16, dtype=dt)],
            clip_layers=lambda dt: [L.Dense(400, 120, dtype=dt), L.Tanh(), L.Dense(120, 84, dtype=dt)],
            lenet_batch=n, alex=("alexnet_small(in_channels=3, input_size=32)", _alexnet_small, (16, 3, 32, 32)),
            train_steps=4 if quick else 6, timing_steps=5 if quick else 20)
    return dict(
        conv=[("LeNet c1 5x5 pad 2", (1, 6, 5, 1, 2), (1, 1, 8, 8), ("gemm", "direct")),
              ("LeNet c3 5x5", (6, 16, 5, 1, 0), (1, 6, 7, 7), ("gemm", "direct")),
              ("AlexNet-like 3x3 pad 1", (4, 6, 3, 1, 1), (2, 4, 6, 6), ("gemm", "winograd")),
              ("AlexNet-like 11x11/4 pad 2", (3, 4, 11, 4, 2), (1, 3, 15, 15), ("gemm",)),
              ("3x3 pad 1 groups 2", (4, 6, 3, 1, 1, 2), (2, 4, 6, 6), ("gemm", "winograd"))],
        conv_transpose=[("3x3/2 pad 1 out 1", (4, 2, 3, 2, 1, 1, 1), (2, 4, 3, 3), ("gemm",)),
                        ("3x3 pad 1", (4, 2, 3, 1, 1, 0, 1), (2, 4, 3, 3), ("winograd",)),
                        ("3x3/2 groups 2", (4, 2, 3, 2, 1, 1, 2), (2, 4, 3, 3), ("gemm",))],
        dense=[("400->120", (400, 120), (2, 400))],
        act=(2, 3, 4, 4), pool=(2, 3, 6, 6), pool_overlap=(1, 4, 7, 7), lrn=(2, 6, 4, 4),
        bn=(4, 3, 3, 3), dropout=(4, 20), loss=(4, 10),
        optim_layers=lambda dt: [L.Conv2D(2, 3, 3, dtype=dt), L.Dense(12, 5, dtype=dt), L.BatchNorm2D(3, dtype=dt)],
        clip_layers=lambda dt: [L.Dense(12, 8, dtype=dt), L.Tanh(), L.Dense(8, 4, dtype=dt)],
        lenet_batch=1, alex=("alexnet_small's layers, few channels, 8x8", _alexnet_small_narrow, (2, 3, 8, 8)),
        train_steps=2 if quick else 4, timing_steps=1 if quick else 3)


def _alexnet_small(seed):
    return models.alexnet_small(in_channels=3, input_size=32, seed=seed)


def _alexnet_small_narrow(seed):
    """alexnet_small's layers (five 3x3 convs, three max pools, two dropouts, three dense) with few channels
    on 8x8 images: the real one costs the simulator half a minute a step."""
    r = np.random.default_rng(seed)
    return Sequential([
        L.Conv2D(3, 4, 3, padding=1, rng=r), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(4, 6, 3, padding=1, rng=r), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(6, 8, 3, padding=1, rng=r), L.ReLU(),
        L.Conv2D(8, 6, 3, padding=1, rng=r), L.ReLU(),
        L.Conv2D(6, 6, 3, padding=1, rng=r), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(),
        L.Dropout(0.5, seed=1), L.Dense(6, 16, rng=r), L.ReLU(),
        L.Dropout(0.5, seed=2), L.Dense(16, 16, rng=r), L.ReLU(),
        L.Dense(16, 10, rng=r),
    ], input_shape=(3, 8, 8))


# ----------------------------------------------------------------------------------------------------- the run

def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "none"


def header(device) -> list:
    """Lines naming the GPU, its compute capability, the driver and runtime, and the library versions."""
    lines = [f"gpucnn selftest on {device!r}" + (" (Numba's CUDA simulator: the GPU code on the CPU, no GPU used)"
                                                 if device == "sim" else "")]
    cupy_version = "not installed"
    try:
        import cupy
        cupy_version = cupy.__version__
    except Exception as e:      # noqa: BLE001 - installed for another CUDA, libraries missing, ...
        cupy_version = f"does not import ({type(e).__name__})" if _version("cupy") != "not installed" else cupy_version
    if device == "cuda":
        try:
            import cupy
            dev = cupy.cuda.Device()
            props = cupy.cuda.runtime.getDeviceProperties(dev.id)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            cc = str(dev.compute_capability)         # "90" for 9.0
            lines.append(f"GPU {dev.id}: {name}, compute capability {cc[:-1]}.{cc[-1]}, "
                         f"{props['totalGlobalMem'] / 2 ** 30:.1f} GiB, {props['multiProcessorCount']} SMs")
            lines.append(f"CUDA driver {_cuda_version(cupy.cuda.runtime.driverGetVersion())}, runtime "
                         f"{_cuda_version(cupy.cuda.runtime.runtimeGetVersion())} (CuPy's)")
        except Exception as e:      # noqa: BLE001 - the checks below say more
            lines.append(f"GPU: could not be described ({type(e).__name__}: {e})")
    else:
        lines.append("GPU: none used")
    lines.append(f"gpucnn {gpucnn.__version__}, python {platform.python_version()}, numpy {_version('numpy')}, "
                 f"numba {_version('numba')}, numba-cuda {_version('numba-cuda')}, cupy {cupy_version}")
    return lines


def _row(name, status, value, note):
    w = WIDTH
    return f"{name:<{w[0]}} {status:<{w[1]}} {value:>{w[2]}}  {note}"


def run_checks(paths, checks, out):
    """Run each (name, fn) check, print its row as it finishes, return the results."""
    print(_row("check", "result", "error/time", "note"), file=out)
    print(_row("-" * WIDTH[0], "-" * WIDTH[1], "-" * WIDTH[2], "----"), file=out)
    results = []
    for name, fn in checks:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = fn(paths, rng)
        except Exception as e:      # noqa: BLE001 - a crash is a failed check, and the run goes on
            where = traceback.extract_tb(e.__traceback__)[-1]
            r = Result(FAIL, "", f"{type(e).__name__}: {' '.join(str(e).split())[:150]} "
                                 f"({os.path.basename(where.filename)}:{where.lineno})")
        results.append((name, r))
        print(_row(name, r.status, r.value, r.note), file=out, flush=True)
    return results


def add_arguments(p):
    """The self-test's options, on ``p`` (its own parser, or the ``gpucnn selftest`` subcommand's)."""
    env = os.environ.get("GPUCNN_DEVICE", "").strip().lower()
    p.add_argument("--device", choices=("cuda", "sim"), default=env if env in ("cuda", "sim") else "cuda",
                   help="cuda (default) or sim: the same checks through Numba's CUDA simulator at toy shapes")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps")
    p.add_argument("--only", metavar="TEXT", default=None,
                   help="run only the checks whose name contains TEXT (e.g. conv, f64, train)")
    return p


def run(args, out=None) -> int:
    """Run the self-test for parsed ``args`` (device, quick, only); returns the exit status: 0 nothing failed,
    1 a check failed, 2 no usable device (or no check selected)."""
    out = out or sys.stdout
    if args.device == "cuda":
        why = backend._cuda_problem()
        if why:
            print(f"gpucnn selftest: no usable CUDA GPU: {why}. (`gpucnn selftest --device sim` runs the same "
                  "checks on Numba's CUDA simulator, without a GPU)", file=sys.stderr)
            return 2
    sz = sizes(args.device, args.quick)
    # timing first: its first step must be the process's first GPU work, to see the kernels compile
    checks = timing_checks(sz) + op_checks(sz) + training_checks(sz) + error_checks()
    if args.only:
        checks = [(n, f) for n, f in checks if args.only.lower() in n.lower()]
        if not checks:
            print(f"gpucnn selftest: no check name contains {args.only!r}", file=sys.stderr)
            return 2
    try:
        gpucnn.use_device(args.device)      # before anything imports numba.cuda: it is sim or GPU per process
    except backend.DeviceError as e:
        print(f"gpucnn selftest: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for line in header(args.device):
        print(line, file=out)
    print(file=out)
    results = run_checks(Paths(args.device), checks, out)
    count = {s: sum(r.status == s for _, r in results) for s in (PASS, FAIL, XFAIL, SKIP, TIME)}
    print(f"\n{count[PASS]} passed, {count[FAIL]} failed, {count[XFAIL]} expected failures, {count[SKIP]} skipped, "
          f"{count[TIME]} timings, in {time.perf_counter() - t0:.1f} s on {args.device!r}", file=out)
    if count[FAIL]:
        print("FAILED: " + ", ".join(n for n, r in results if r.status == FAIL), file=out)
    return 1 if count[FAIL] else 0


def main(argv=None) -> int:
    """``python -m gpucnn.selftest [--device cuda|sim] [--quick] [--only TEXT]``; returns the exit status."""
    parser = add_arguments(argparse.ArgumentParser(prog="gpucnn selftest", description=DESCRIPTION))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:     # --help, or a mistake argparse has printed
        return e.code
    return run(args)
