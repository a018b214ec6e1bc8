"""Test set-up: which process runs which tests, fresh random inputs, and the comparison tolerance.

Numba picks simulator or GPU once per process, so the suite runs in two processes:
    python -m pytest                         # CPU tests (and -m gpu ones where a GPU is usable)
    GPUCNN_DEVICE=sim python -m pytest -m sim   # the GPU code path on Numba's CUDA simulator
A test in the wrong process is skipped with a reason that says where it runs.

tests/run_all.sh splits the sim suite over processes (``GPUCNN_TEST_SHARD=k/n``: every n-th sim test, the registry
checks left out); each writes which ElementwiseKernels it ran to ``GPUCNN_SIM_RECORDS`` (a folder), and a last
process runs the registry checks over all of them (tests/test_registry.py).
"""
import json
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import gpucnn
from gpucnn import backend

SIM = os.environ.get("GPUCNN_DEVICE", "").strip().lower() == "sim"
CUDA = os.environ.get("GPUCNN_DEVICE", "").strip().lower() == "cuda"
if SIM:
    gpucnn.use_device("sim")
elif not CUDA:
    gpucnn.use_device("cpu")          # the CPU suite runs on the CPU even on a GPU machine

GPU_PROBLEM = backend._cuda_problem()
RUN_LAST = ("test_every_registered_kernel_was_exercised", "test_every_cupy_call_passes_cupys_argument_checks")
SHARD = os.environ.get("GPUCNN_TEST_SHARD", "")
SIM_RECORDS = os.environ.get("GPUCNN_SIM_RECORDS", "")


def pytest_collection_modifyitems(config, items):
    # the registry checks must see every other sim test's kernels run: run them last
    items.sort(key=lambda it: it.name in RUN_LAST)
    if SHARD and SIM:
        _keep_shard(config, items)
    for item in items:
        sim, gpu = item.get_closest_marker("sim"), item.get_closest_marker("gpu")
        if sim and not SIM:
            item.add_marker(pytest.mark.skip(reason="sim test: runs in its own process, GPUCNN_DEVICE=sim pytest -m sim"))
        elif SIM and not sim:
            item.add_marker(pytest.mark.skip(reason="CPU test: runs in the default process (pytest without GPUCNN_DEVICE=sim)"))
        elif CUDA and not gpu:
            item.add_marker(pytest.mark.skip(reason="CPU test: runs in the default process (pytest without GPUCNN_DEVICE=cuda)"))
        elif gpu and GPU_PROBLEM:
            item.add_marker(pytest.mark.skip(reason=f"no usable CUDA GPU: {GPU_PROBLEM}"))


@pytest.fixture
def rng(request):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def tol(dtype):
    """rtol relative to the largest magnitude: float32 rounding vs float64 rounding."""
    return 2e-4 if np.dtype(dtype) == np.float32 else 1e-7


def assert_close(actual, expected, dtype=None, what=""):
    """|actual - expected| <= tol * max|expected| elementwise, NaN exactly where the reference has NaN; the worst
    index in the message."""
    a = backend.to_numpy(actual).astype(np.float64)
    e = backend.to_numpy(expected).astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    t = tol(dtype or backend.to_numpy(actual).dtype)
    a, e = np.atleast_1d(a), np.atleast_1d(e)
    nan = np.isnan(a) != np.isnan(e)            # a NaN where the reference has a number (or none where it has one)
    if nan.any():
        i = np.unravel_index(int(np.argmax(nan)), nan.shape)
        raise AssertionError(f"{what}: {int(nan.sum())} NaN mismatches, first at {i} ({a[i]!r} vs {e[i]!r})")
    scale = max(np.abs(e[np.isfinite(e)]).max(initial=0.0), 1e-30)
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
    err[(a == e) | (np.isnan(a) & np.isnan(e))] = 0.0   # equal infinities and matching NaNs are no error
    err[np.isnan(err)] = np.inf                          # what is left: infinities of opposite signs
    if err.size and err.max() > t * scale:
        i = np.unravel_index(int(np.argmax(err)), err.shape)
        raise AssertionError(f"{what}: max error {err.max():.3e} at {i} ({a[i]!r} vs {e[i]!r}) "
                             f"> {t:g} * max|expected| {scale:.3e}")


_REAL_GPU_COMPILE = """
import sys
import types as pytypes
from numba import cuda, types
from numba.cuda import compiler, dispatcher
from gpucnn import backend
# A device function called from a kernel is compiled for "the current device", which needs a driver; with
# none here, name the target the kernels are lowered for (cc 8.0) instead.
dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(8, 0))


def float64_in(cres):
    doubles = sorted(str(v) for v, t in cres.type_annotation.typemap.items() if t == types.float64)
    return doubles or (" double " in cres.library.get_llvm_str())


{setup}
for k, sig in sigs.items():
    backend.bind_globals(k.fn.__globals__, cuda)       # the module's device functions, compiled
    cres = compiler.compile_cuda(k.fn, types.void, sig, cc=(8, 0))
    if float64_in(cres):
        sys.exit(f"{{k.name}}: float64 in a float32 kernel: {{float64_in(cres)}}")
    for name, dev in k.fn.__globals__.items():          # and in the device functions it called
        for types_, dres in getattr(dev, "overloads", {{}}).items():
            if any(getattr(t, "dtype", t) == types.float32 for t in types_) and float64_in(dres):
                sys.exit(f"{{k.name}} -> {{name}}{{types_}}: float64 in a float32 device function: {{float64_in(dres)}}")
print("ok")
"""


def assert_compiles_for_a_real_gpu(setup: str, timeout: int = 600):
    """Lower Numba kernels for a real GPU (cc 8.0) with no GPU present and refuse float64 arithmetic in
    float32 kernels (10x slower on most GPUs): the simulator runs kernels as Python and would accept both.
    ``setup`` binds each kernel module's ``cuda`` to numba.cuda and defines ``sigs``: kernel -> argument
    types. Runs in a subprocess, since numba.cuda in this process may be the simulator."""
    code = _REAL_GPU_COMPILE.format(setup=textwrap.dedent(setup))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUCNN_DEVICE")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if "compile_cuda" in r.stderr and ("ImportError" in r.stderr or "AttributeError" in r.stderr):
        pytest.skip("this numba-cuda has no numba.cuda.compiler.compile_cuda")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


def _keep_shard(config, items):
    """GPUCNN_TEST_SHARD=k/n: keep every n-th sim test from the k-th (round robin: a parametrized family's slow
    cases land in different shards); the registry checks, which must see every kernel, are left to a last run."""
    k, n = (int(v) for v in SHARD.split("/"))
    sim = [it for it in items if it.get_closest_marker("sim") and it.name.split("[")[0] not in RUN_LAST]
    keep = {id(it) for it in sim[k::n]}
    dropped = [it for it in items if id(it) not in keep]
    items[:] = [it for it in items if id(it) in keep]
    config.hook.pytest_deselected(items=dropped)


def pytest_sessionfinish(session, exitstatus):
    """With GPUCNN_SIM_RECORDS (a folder) on "sim": which ElementwiseKernels this process ran through the host build
    and each distinct call it made, for the registry checks of a later process."""
    if SIM and SIM_RECORDS:
        from gpucnn import elementwise
        os.makedirs(SIM_RECORDS, exist_ok=True)
        with open(os.path.join(SIM_RECORDS, f"sim-{os.getpid()}.json"), "w") as f:
            json.dump({"host_runs": sorted(elementwise.HOST_RUNS),
                       "cupy_calls": sorted(elementwise.CUPY_CALLS, key=repr)}, f)


def recorded_sim_runs():
    """(host runs, CuPy calls) of this process and of every process that wrote to GPUCNN_SIM_RECORDS."""
    from gpucnn import elementwise
    runs, calls = set(elementwise.HOST_RUNS), set(elementwise.CUPY_CALLS)
    tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v  # noqa: E731 (JSON lists back)
    if SIM_RECORDS and os.path.isdir(SIM_RECORDS):
        for name in sorted(os.listdir(SIM_RECORDS)):
            with open(os.path.join(SIM_RECORDS, name)) as f:
                record = json.load(f)
            runs.update(record["host_runs"])
            calls.update(tuples(c) for c in record["cupy_calls"])
    return runs, calls
