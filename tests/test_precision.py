"""gpucnn.set_precision: "fp32" or "tf32" for the float32 GEMMs (cuBLAS on "cuda", emulated on "sim")."""
import numpy as np
import pytest

import gpucnn
from gpucnn import backend, blas, layers as L
from gpucnn.losses import SoftmaxCrossEntropy
from conftest import assert_close


@pytest.fixture(autouse=True)
def fp32_after():
    yield
    gpucnn.set_precision("fp32")


@pytest.fixture(params=["cupy", "nvmath"])
def provider(request, monkeypatch):
    """Each GEMM provider (gpucnn.blas): cupy.matmul, and cuBLAS on gpucnn's handle through nvmath-python."""
    if request.param == "nvmath" and request.node.get_closest_marker("gpu"):
        pytest.importorskip("nvmath.bindings.cublas", reason="nvmath-python is not installed here")
    monkeypatch.setattr(blas, "_provider", blas._provider)
    blas.use_provider(request.param)
    return request.param


def tf32_reference(x, mode="truncate"):
    """An 11-bit significand (1 implicit + 10 stored) by frexp: an independent twin of backend.to_tf32's bit
    arithmetic. "truncate" (toward zero: what TF32 tensor cores read) or "nearest" (ties away from zero)."""
    x = np.asarray(x, np.float64)
    m, e = np.frexp(x)                                   # x = m * 2**e, 0.5 <= |m| < 1
    cut = np.floor(np.abs(m) * 2.0 ** 11 + (0.5 if mode == "nearest" else 0.0))
    return np.ldexp(np.sign(m) * cut / 2.0 ** 11, e).astype(np.float32)


def test_set_precision_values_and_errors():
    assert gpucnn.precision() == "fp32"
    assert gpucnn.set_precision("tf32") == "fp32"
    assert gpucnn.precision() == "tf32"
    assert gpucnn.set_precision("fp32") == "tf32"
    with pytest.raises(ValueError, match=r"set_precision: expected one of \('fp32', 'tf32'\), got 'fp16'"):
        gpucnn.set_precision("fp16")
    assert gpucnn.precision() == "fp32"


def test_to_tf32_matches_an_independent_truncation(rng):
    x = (rng.standard_normal(20000) * np.exp(rng.uniform(-20, 20, 20000))).astype(np.float32)
    halves = np.float32(1) + np.float32(2.0 ** -11) * np.arange(1, 9, 2, dtype=np.float32)   # halfway: cut down
    x = np.concatenate([x, halves, -halves])
    r = backend.to_tf32(x)
    np.testing.assert_array_equal(r, tf32_reference(x))
    assert (r.view(np.uint32) & 0x1FFF == 0).all()                      # 13 low mantissa bits cleared
    assert (np.abs(r) <= np.abs(x)).all() and (np.abs(r - x) < np.abs(x) * 2.0 ** -10).all()
    assert not np.array_equal(r, tf32_reference(x, "nearest"))         # the two models differ
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    np.testing.assert_array_equal(backend.to_tf32(special), special)


def test_tf32_on_a_gpu_without_tensor_float_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_device", "cuda")
    monkeypatch.setattr(blas, "_compute_capability", lambda: (7, 5))
    with pytest.raises(ValueError, match=r"set_precision\('tf32'\): this GPU \(compute capability 7.5\) has no "
                                         r"TF32 tensor cores"):
        gpucnn.set_precision("tf32")
    assert gpucnn.precision() == "fp32"
    monkeypatch.setattr(blas, "_compute_capability", lambda: (9, 0))
    assert gpucnn.set_precision("tf32") == "fp32"


def test_cpu_gemms_ignore_tf32(rng):
    # BLAS has no TF32: on "cpu" the setting changes nothing, bit for bit
    layer = L.Dense(50, 7, rng=rng)
    x = rng.standard_normal((4, 50)).astype(np.float32)
    y32 = layer.forward(x)
    gpucnn.set_precision("tf32")
    np.testing.assert_array_equal(layer.forward(x), y32)


@pytest.mark.sim
def test_sim_tf32_rounds_gemm_inputs_and_float64_is_untouched(rng, provider):
    layer = L.Dense(300, 5, rng=rng)
    x = rng.standard_normal((3, 300)).astype(np.float32)
    y32 = layer.forward(x)
    gpucnn.set_precision("tf32")
    y = layer.forward(x)
    w, b = layer.params["weight"], layer.params["bias"]
    expect = tf32_reference(x).astype(np.float64) @ tf32_reference(w).astype(np.float64).T + b
    assert_close(y, expect, "float32", "tf32 dense forward vs truncated inputs")
    err = np.abs(y - y32).max() / np.abs(y32).max()
    assert 1e-6 < err < 2e-3, f"tf32 vs fp32 relative difference {err:.2e}"
    layer64 = L.Dense(300, 5, dtype="float64", rng=rng)
    x64 = x.astype(np.float64)
    y64 = layer64.forward(x64)
    gpucnn.set_precision("fp32")
    np.testing.assert_array_equal(layer64.forward(x64), y64)           # float64: the same bits under either
    with backend.cpu_path():
        assert_close(layer64.forward(x64), y64, "float64", "float64 dense, sim vs cpu")


@pytest.mark.sim
def test_sim_train_step_keeps_one_step_per_precision(rng):
    model = gpucnn.Sequential([L.Conv2D(1, 2, 3, rng=rng), L.Tanh(), L.Flatten(), L.Dense(2 * 4 * 4, 3, rng=rng)],
                              input_shape=(1, 6, 6))
    opt = gpucnn.optim.SGD(model, lr=0.1)
    loss = SoftmaxCrossEntropy()
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    y = np.array([0, 2])
    model.train_step(x, y, loss, opt)
    gpucnn.set_precision("tf32")
    model.train_step(x, y, loss, opt)
    assert len(model._steps) == 2          # a captured graph bakes in cuBLAS's compute type: one per precision


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n", [(256, 384, 128), (6, 25, 78400), (120, 400, 256), (4096, 2400, 64)])
def test_gpu_tf32_is_cublas_tensor_float_and_fp32_is_full_float32(m, k, n, rng, provider):
    """What cuBLAS's TF32 GEMM does to its inputs, on shapes that pick different kernels (LeNet's conv1, a
    dense layer, a tall AlexNet-like one): the result must match inputs truncated to 10 mantissa bits (the
    "sim" emulation) within float32 accumulation, and be farther from round-to-nearest. The first H200 run
    measured 3.25e-5 from the nearest model (the old emulation) on the first shape. Through both providers:
    CuPy's compute type, and the compute type of gpucnn's own cuBLAS calls."""
    import cupy
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    models = {mode: tf32_reference(a, mode).astype(np.float64) @ tf32_reference(b, mode).astype(np.float64)
              for mode in ("truncate", "nearest")}

    def rel(x, ref):
        return np.abs(x - ref).max() / np.abs(ref).max()

    ga, gb = cupy.asarray(a), cupy.asarray(b)
    gpucnn.set_precision("fp32")
    y32 = backend.matmul(ga, gb).get()
    assert blas.provider() == provider, "cuBLAS through nvmath did not start (see the warning)"
    assert rel(y32, exact) < 1e-5, "fp32 must not cut its inputs"
    cc = blas._compute_capability()
    if cc < (8, 0):
        with pytest.raises(ValueError, match="no TF32 tensor cores"):
            gpucnn.set_precision("tf32")
        return
    gpucnn.set_precision("tf32")
    yt = backend.matmul(ga, gb).get()
    errs = {mode: rel(yt, ref) for mode, ref in models.items()}
    print(f"\ntf32 GEMM {m}x{k}x{n}: relative error vs truncated inputs {errs['truncate']:.2e}, "
          f"vs rounded inputs {errs['nearest']:.2e}, vs exact {rel(yt, exact):.2e}")
    assert errs["truncate"] < 1e-5 < rel(yt, exact), errs
    assert errs["truncate"] < errs["nearest"], errs
