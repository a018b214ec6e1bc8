"""What every self-test check is made of: the GPU path and the CPU path it is compared with (:class:`Paths`), the
comparison of their arrays against the tests' tolerance (:class:`Comparison`), and a check's :class:`Result`."""
from __future__ import annotations

import contextlib

import numpy as np

import gpucnn
from gpucnn import backend

TOL = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-7}      # tests/conftest.py's tol()
PASS, FAIL, XFAIL, SKIP, TIME = "pass", "FAIL", "xfail", "skip", "time"


class Result:
    """What a check found: ``status`` (PASS, FAIL, ...), ``value`` (the max error or a time, as text), ``note``."""

    def __init__(self, status, value="", note=""):
        self.status, self.value, self.note = status, value, note


# ----------------------------------------------------------------------------------------------------- the two paths

class Paths:
    """The GPU path under test and the CPU path it is compared with, on "cuda" or "sim"."""

    def __init__(self, device):
        self.device = device

    @contextlib.contextmanager
    def cpu(self):
        """Inside: NumPy arrays take the CPU path (on "cuda" the device is "cpu" meanwhile: layers refuse NumPy
        input while "cuda" is selected; on "sim" backend.cpu_path())."""
        if self.device == "sim":
            with backend.cpu_path():
                yield
            return
        gpucnn.use_device("cpu")
        try:
            yield
        finally:
            gpucnn.use_device(self.device)

    def put(self, a):
        """A host array onto the GPU path (CuPy on "cuda", NumPy on "sim")."""
        return gpucnn.asarray(a)

    def on_gpu(self, a) -> bool:
        return backend.is_cupy(a) if self.device == "cuda" else isinstance(a, np.ndarray)

    def sync(self):
        backend.synchronize()       # waits for the GPU on "cuda"; nothing to wait for on "sim"


def _host(a):
    return None if a is None else np.array(gpucnn.to_numpy(a), copy=True)


class Comparison:
    """The worst relative error over named arrays, and what did not match (shape, dtype, device, tolerance)."""

    def __init__(self, paths):
        self.paths, self.worst, self.worst_name, self.problems = paths, 0.0, "", []

    def add(self, name, got, want, dtype, on_device=True):
        """Compare ``got`` (from the GPU path; on the device unless ``on_device`` is False) with ``want``."""
        if want is None or got is None:
            if (want is None) != (got is None):
                self.problems.append(f"{name}: {'missing' if got is None else 'unexpected'} on the GPU")
            return
        if on_device and not self.paths.on_gpu(got):
            self.problems.append(f"{name} is a {type(got).__module__}.{type(got).__name__}, not on the GPU")
        g, w = _host(got), np.asarray(want)
        if g.shape != w.shape:
            self.problems.append(f"{name}: shape {g.shape}, expected {w.shape}")
            return
        if g.dtype != w.dtype:
            self.problems.append(f"{name}: {g.dtype} on the GPU, {w.dtype} on the CPU")
        scale = max(float(np.abs(w).max(initial=0.0)), 1e-30)
        err = float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max(initial=0.0)) / scale
        if not np.isfinite(err):
            err = float("inf")
        if err >= self.worst:
            self.worst, self.worst_name = err, name
        if err > TOL[np.dtype(dtype)]:
            self.problems.append(f"{name}: max error {err:.2e} > tol {TOL[np.dtype(dtype)]:g}")

    def result(self, note=""):
        value = f"{self.worst:.1e}"
        if self.problems:
            more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return Result(FAIL, value, self.problems[0] + more)
        return Result(PASS, value, note or (f"worst: {self.worst_name}" if self.worst_name else ""))
