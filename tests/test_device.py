"""Device selection: what ``import gpucnn`` loads, how a device is chosen, and the errors when one cannot be.

Numba decides once per process whether ``numba.cuda`` is the simulator or the real GPU, so every check of
what a fresh process does runs in a subprocess.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, losses, memory
from conftest import GPU_PROBLEM, assert_close

ROOT = Path(gpucnn.__file__).resolve().parents[1]
HAVE_CUPY = importlib.util.find_spec("cupy") is not None


def run_python(code: str, device: str | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (GPUCNN_DEVICE=device, or unset) and return the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCNN_DEVICE", "NUMBA_ENABLE_CUDASIM")}
    if device is not None:
        env["GPUCNN_DEVICE"] = device
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"subprocess failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- fresh processes

def test_import_loads_no_gpu_library():
    out = run_python("""
        import json, sys
        heavy = lambda: sorted(m for m in ("cupy", "numba.cuda") if m in sys.modules)
        import gpucnn
        import gpucnn.kernels.activation, gpucnn.kernels.conv, gpucnn.kernels.dense, gpucnn.kernels.dropout
        import gpucnn.kernels.loss, gpucnn.kernels.norm, gpucnn.kernels.optim, gpucnn.kernels.pool
        import gpucnn.model, gpucnn.optim
        after_import = heavy()
        dev = gpucnn.device()
        print(json.dumps({"after_import": after_import, "device": dev, "after_device": heavy()}))
    """)
    assert out["after_import"] == [], "import gpucnn must not import CuPy or numba.cuda"
    if GPU_PROBLEM:
        # no usable GPU here: the default is the CPU; finding that out may import CuPy (to ask it for a
        # device) where CuPy is installed, but never numba.cuda
        assert out["device"] == "cpu"
        assert out["after_device"] == (["cupy"] if HAVE_CUPY else [])
    else:
        assert out["device"] == "cuda"


# ids that are not "sim"/"gpu": conftest reads item.keywords, which hold the ids as well as the marks
@pytest.mark.parametrize("value", ["sim", " Sim "], ids=["plain", "mixed-case-and-spaces"])
def test_environment_selects_sim(value):
    out = run_python("""
        import json, gpucnn
        from gpucnn import backend
        print(json.dumps({"device": gpucnn.device(), "simulator": backend.numba_cuda_sim_active()}))
    """, device=value)
    assert out == {"device": "sim", "simulator": True}


def test_environment_with_unknown_device_is_a_value_error():
    out = run_python("""
        import json, gpucnn
        try:
            gpucnn.device()
            print(json.dumps({"error": None}))
        except ValueError as e:
            print(json.dumps({"error": str(e)}))
    """, device="tpu")
    assert out["error"] == "use_device: expected one of ('cpu', 'cuda', 'sim'), got 'tpu'"


def use_device_after(setup: str, name: str) -> dict:
    """In a fresh interpreter that has imported json and gpucnn: ``setup``, then ``gpucnn.use_device(name)``.
    Returns {"error": the DeviceError's message or None, "device": gpucnn.device() afterwards}."""
    return run_python("import json, gpucnn\n" + textwrap.dedent(setup) + textwrap.dedent(f"""
        try:
            gpucnn.use_device({name!r})
            error = None
        except gpucnn.DeviceError as e:
            error = str(e)
        print(json.dumps({{"error": error, "device": gpucnn.device()}}))
    """))


def test_cuda_after_sim_is_a_device_error():
    out = use_device_after("""
        from gpucnn import backend
        gpucnn.use_device("sim")
        backend._cuda_problem = lambda: None        # pretend a usable GPU, so only the ordering is wrong
    """, "cuda")
    assert out["device"] == "sim", "a refused use_device must leave the device as it was"
    assert out["error"] == ("use_device('cuda'): this process already uses 'sim'; 'sim' and 'cuda' cannot "
                            "share a process (Numba picks one at import)")


def test_sim_after_cuda_is_a_device_error():
    out = use_device_after("""
        import sys, types
        from gpucnn import backend
        sys.modules["cupy"] = types.ModuleType("cupy")   # pretend CuPy and a usable GPU
        backend._cuda_problem = lambda: None
        gpucnn.use_device("cuda")
    """, "sim")
    assert out["device"] == "cuda"
    assert out["error"] == ("use_device('sim'): this process already uses 'cuda'; 'sim' and 'cuda' cannot "
                            "share a process (Numba picks one at import)")


def test_sim_after_real_numba_cuda_is_a_device_error():
    # a program that imported numba.cuda itself (the real target) cannot switch it to the simulator
    out = use_device_after("""
        import numba.cuda
    """, "sim")
    assert out["device"] != "sim"
    assert out["error"] is not None and out["error"].startswith(
        "numba.cuda was already imported as the real CUDA target in this process, so gpucnn cannot use 'sim'")
    assert "GPUCNN_DEVICE=sim" in out["error"]


# ---------------------------------------------------------------------------------------- this process

def test_cuda_without_cupy_says_how_to_install_it(monkeypatch):
    real = backend.importlib.util.find_spec
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    before = gpucnn.device()
    with pytest.raises(gpucnn.DeviceError, match=r"use_device\('cuda'\): CuPy is not installed\. .*"
                                                 r"pip install 'gpucnn\[cuda12\]'"):
        gpucnn.use_device("cuda")
    assert gpucnn.device() == before


@pytest.mark.parametrize("name", ["gpu", "CUDA", "", "cpu0"], ids=["gpu-name", "upper-case", "empty", "cpu0"])
def test_unknown_device_name_is_a_value_error(name):
    before = gpucnn.device()
    with pytest.raises(ValueError, match=rf"use_device: expected one of \('cpu', 'cuda', 'sim'\), got '{name}'"):
        gpucnn.use_device(name)
    assert gpucnn.device() == before


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_asarray_to_numpy_round_trip(dtype, rng):
    host = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    strided = host.transpose(2, 0, 1)                     # not C-contiguous
    dev = gpucnn.asarray(strided)
    assert dev.flags.c_contiguous and dev.dtype == np.dtype(dtype) and dev.shape == (5, 3, 4)
    back = gpucnn.to_numpy(dev)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, strided)
    # a dtype converts on the way in; a list is an array too
    assert gpucnn.to_numpy(gpucnn.asarray(host, dtype="float32")).dtype == np.float32
    np.testing.assert_array_equal(gpucnn.to_numpy(gpucnn.asarray([[1, 2], [3, 4]])), [[1, 2], [3, 4]])


def test_numpy_input_on_cuda_is_a_type_error(monkeypatch, rng):
    made = {"Conv2D": (L.Conv2D(3, 4, 3), (2, 3, 8, 8)), "Dense": (L.Dense(5, 2), (2, 5)),
            "ReLU": (L.ReLU(), (2, 5)), "MaxPool2D": (L.MaxPool2D(2), (1, 1, 4, 4)),
            "BatchNorm2D": (L.BatchNorm2D(3), (2, 3, 4, 4)),
            "SoftmaxCrossEntropy": (losses.SoftmaxCrossEntropy(), (2, 5))}
    monkeypatch.setattr(backend, "_device", "cuda")      # as if on a GPU machine; put back after the test
    for name, (layer, shape) in made.items():
        x = rng.standard_normal(shape).astype(np.float32)
        args = (x, np.array([0, 1])) if name == "SoftmaxCrossEntropy" else (x,)
        with pytest.raises(TypeError, match=rf"^{name}: the device is 'cuda' but the input is a NumPy array; "
                                            r"move it first with gpucnn.asarray\(x\)"):
            layer.forward(*args)


# ---------------------------------------------------------------------------------------- the same errors on "sim"

BAD_INPUTS = [
    ("conv wrong channels", lambda: L.Conv2D(3, 4, 3), (1, 2, 8, 8), "float32",
     ValueError, r"^Conv2D: expected 3 input channels, got 2 \(input shape \(1, 2, 8, 8\)\)"),
    ("conv kernel too large", lambda: L.Conv2D(1, 2, 5, padding=0), (1, 1, 3, 8), "float32",
     ValueError, r"^Conv2D: kernel 5 is larger than the padded input along height \(input 3 \+ 2\*padding 0"),
    ("conv wrong dtype", lambda: L.Conv2D(1, 2, 3), (1, 1, 5, 5), "float64",
     TypeError, r"^Conv2D: input is float64 but the layer's parameters are float32"),
    ("conv integer image", lambda: L.Conv2D(1, 2, 3), (1, 1, 5, 5), "uint8",
     TypeError, r"^Conv2D: expected a float input \(float32\), got uint8"),
    ("maxpool window too large", lambda: L.MaxPool2D(5), (1, 2, 3, 3), "float32",
     ValueError, r"^MaxPool2D: kernel 5 is larger than the padded input along height"),
    ("avgpool window too large", lambda: L.AvgPool2D((2, 4)), (1, 2, 3, 3), "float32",
     ValueError, r"^AvgPool2D: kernel 4 is larger than the padded input along width"),
    ("dense wrong features", lambda: L.Dense(10, 4), (2, 9), "float32",
     ValueError, r"^Dense: expected 10 input features, got 9"),
    ("dense without flatten", lambda: L.Dense(12, 4), (2, 3, 2, 2), "float32",
     ValueError, r"^Dense: expected a 2-d input \(N, 12\), got shape \(2, 3, 2, 2\); use Flatten first"),
    ("batchnorm wrong channels", lambda: L.BatchNorm2D(4), (2, 3, 2, 2), "float32",
     ValueError, r"^BatchNorm2D: expected 4 input channels, got 3"),
]


@pytest.mark.sim
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_same_error_on_gpu_path(case, rng):
    _, make, shape, dtype, error, message = case
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    with pytest.raises(error, match=message) as on_gpu_path:
        make().forward(x)
    with backend.cpu_path():
        with pytest.raises(error, match=message) as on_cpu_path:
            make().forward(x)
    assert str(on_gpu_path.value) == str(on_cpu_path.value)


@pytest.mark.sim
def test_sim_runs_gpu_code_on_numpy_arrays(rng):
    # the point of "sim": NumPy arrays in and out, the GPU code path in between
    x = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    assert gpucnn.device() == "sim" and backend.on_gpu(x)
    with backend.cpu_path():
        assert not backend.on_gpu(x)
        ref = L.MaxPool2D(2).forward(x)
    y = L.MaxPool2D(2).forward(x)
    assert isinstance(y, np.ndarray)
    assert_close(y, ref, "float32", "MaxPool2D on sim")


@pytest.mark.sim
def test_sim_running_out_of_device_memory_names_the_step_and_what_to_do(rng, monkeypatch):
    """CuPy's OutOfMemoryError inside train_step or predict becomes a DeviceMemoryError (a MemoryError) saying
    which step (batch shape, model), how many bytes were asked for, and what to do. "sim" emulates the limit."""
    from gpucnn import models, optim
    model = models.lenet5(seed=0)
    opt = optim.SGD(model, lr=0.01)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    monkeypatch.setattr(memory, "SIM_DEVICE_MEMORY", 200_000)     # conv1's im2col matrix is 313,600 bytes
    with pytest.raises(backend.DeviceMemoryError) as e:
        model.train_step(x, y, losses.SoftmaxCrossEntropy(), opt, graph=False)
    assert isinstance(e.value, MemoryError) and isinstance(e.value.__cause__, backend.OutOfMemoryError)
    assert str(e.value).startswith(
        "Sequential.train_step on a batch of shape (4, 1, 28, 28) (float32; a model of 12 layers, 61,706 parameters): "
        "the GPU ran out of memory allocating 313,600 bytes (OutOfMemoryError: Out of memory allocating 313,600 "
        "bytes). Train with a smaller batch, or lower Conv2D.RECOMPUTE_ABOVE")
    with pytest.raises(backend.DeviceMemoryError, match=r"^Sequential.predict on a batch of shape \(4, 1, 28, 28\) "
                       r".* allocating 313,600 bytes .* Pass a smaller batch_size \(now 256\)\.$"):
        model.predict(x)
    monkeypatch.setattr(memory, "SIM_DEVICE_MEMORY", None)
    model.train_step(x, y, losses.SoftmaxCrossEntropy(), opt, graph=False)
