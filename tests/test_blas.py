"""The capture-safe GEMM: cuBLAS through nvmath-python on gpucnn's own handle (gpucnn.blas, provider "nvmath").

On "sim" the provider makes the calls it makes on "cuda", with the same arguments, to gpucnn.simblas, which reads
the operands from the raw pointers, leading dimensions and trans flags as cuBLAS does: a wrong argument is a wrong
number here. The calls are then sent to the real ``nvmath.bindings.cublas`` functions (their wheels import without
a driver), so a call that "cuda" would make with the wrong number or kinds of arguments fails here.
"""
import re
import warnings

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, blas, capture, models, optim, simblas
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.memory import _address
from conftest import GPU_PROBLEM, assert_close
from test_capture import _capture


@pytest.fixture
def nvmath_provider(monkeypatch):
    monkeypatch.setattr(blas, "_provider", blas._provider)     # put back after the test
    blas.use_provider("nvmath")
    yield
    gpucnn.set_precision("fp32")


def _operand(rng, shape, how, dtype):
    """Fresh values of ``shape`` laid out as ``how``: "rows" (C order), "cols" (a transposed view of a C array),
    "padded" (rows of a wider array: ld > columns)."""
    if how == "rows":
        return rng.standard_normal(shape).astype(dtype)
    if how == "cols":
        return np.ascontiguousarray(rng.standard_normal(shape).astype(dtype).swapaxes(-1, -2)).swapaxes(-1, -2)
    return rng.standard_normal(shape[:-1] + (shape[-1] + 3,)).astype(dtype)[..., 1:shape[-1] + 1]


LAYOUTS = ["rows", "cols", "padded"]
SHAPES = {                      # a, b (a batch is 3-d; a 2-d operand is shared by the batch)
    "2-d": ((5, 7), (7, 3)),
    "a row": ((1, 6), (6, 4)),
    "a column": ((4, 6), (6, 1)),
    "batch": ((4, 3, 5), (4, 5, 6)),
    "batch @ shared": ((4, 3, 5), (5, 6)),
    "shared @ batch": ((3, 5), (4, 5, 6)),
}


# ------------------------------------------------------------------------------------------------ the arguments

def test_gemm_call_is_the_column_major_transpose_of_the_row_major_product():
    """C = A B row-major is C^T = B^T A^T column-major: cuBLAS's A is our B. Worked out by hand for one product
    with each operand as it is and as a transposed view (conv's ``col.T``): never a copy."""
    a, b, out = np.empty((5, 7), np.float32), np.empty((7, 3), np.float32), np.empty((5, 3), np.float32)
    pa, pb, pc = (_address(x) for x in (a, b, out))
    name, args = blas.gemm_call(a, b, out)
    one = _address(blas._SCALARS[np.dtype(np.float32)])
    assert name == "gemm_ex"
    assert args == (0, 0, 3, 5, 7, one, pb, 0, 3, pa, 0, 7, one + 4, pc, 0, 3, 68, -1)
    bt = np.empty((3, 7), np.float32)                     # b as the transposed view of a (3, 7) array
    name, args = blas.gemm_call(a, bt.T, out)
    assert args[:2] == (1, 0) and args[6:9] == (_address(bt), 0, 7)
    at = np.empty((7, 5), np.float64)
    name, args = blas.gemm_call(at.T, b.astype(np.float64), out.astype(np.float64), tf32=True)
    assert args[:2] == (0, 1) and args[9:12] == (_address(at), 1, 5) and args[-2] == 70
    assert blas.gemm_call(a, b, out, tf32=True)[1][-2] == 77 and blas.gemm_call(a, b, out)[1][-2] == 68


def test_gemm_call_says_why_it_cannot_read_an_operand_in_place():
    a, b, out = np.empty((6, 8), np.float32), np.empty((4, 3), np.float32), np.empty((3, 3), np.float32)
    assert "neither rows nor columns contiguous" in blas.gemm_call(a[::2, ::2], b, out)
    assert "dtypes float32 @ float64" in blas.gemm_call(a[:3, :4], b.astype(np.float64), out)
    assert "not chaining" in blas.gemm_call(a[:3, :3], b, out)
    assert "an output of strides" in blas.gemm_call(a[:3, :4], b, np.empty((6, 6), np.float32)[::2, ::2])
    assert "a batch of 2" in blas.gemm_call(np.empty((3, 3, 4), np.float32), b, np.empty((2, 3, 3), np.float32))
    assert "2-d @ 2-d -> 3-d" in blas.gemm_call(a[:3, :4], b, np.empty((2, 3, 3), np.float32))


def test_the_enums_are_nvmaths():
    cublas = pytest.importorskip("nvmath.bindings.cublas", reason="nvmath-python is not installed here")
    import nvmath
    assert (simblas.OP_N, simblas.OP_T) == (cublas.Operation.N, cublas.Operation.T)
    assert (simblas.POINTER_MODE_HOST, simblas.POINTER_MODE_DEVICE) == (cublas.PointerMode.HOST,
                                                                        cublas.PointerMode.DEVICE)
    assert simblas.DEFAULT_MATH == cublas.Math.DEFAULT_MATH
    assert (simblas.COMPUTE_32F, simblas.COMPUTE_32F_FAST_TF32, simblas.COMPUTE_64F) == (
        cublas.ComputeType.COMPUTE_32F, cublas.ComputeType.COMPUTE_32F_FAST_TF32, cublas.ComputeType.COMPUTE_64F)
    assert (simblas.CUDA_R_32F, simblas.CUDA_R_64F) == (nvmath.CudaDataType.CUDA_R_32F, nvmath.CudaDataType.CUDA_R_64F)
    assert simblas.GEMM_DEFAULT == cublas.GemmAlgo.DEFAULT


def _signature(fn):
    """Parameter names from a Cython function's docstring: "name(intptr_t handle, int transa, ...) -> ..."."""
    head = fn.__doc__.strip().splitlines()[0]
    params = head[head.index("(") + 1:head.index(")")]
    return [p.split()[-1] for p in params.split(",") if p.strip()]


def test_simblas_functions_have_nvmaths_parameters():
    cublas = pytest.importorskip("nvmath.bindings.cublas", reason="nvmath-python is not installed here")
    import inspect
    for name in ("create", "destroy", "set_stream", "set_workspace", "set_pointer_mode", "set_math_mode",
                 "gemm_ex", "gemm_strided_batched_ex"):
        assert list(inspect.signature(getattr(simblas, name)).parameters) == _signature(getattr(cublas, name)), name


def test_workspace_sizes_are_nvidias():
    assert simblas.workspace_bytes((9, 0)) == simblas.workspace_bytes((10, 0)) == 32 * 1024 * 1024
    assert simblas.workspace_bytes((8, 9)) == simblas.workspace_bytes((7, 5)) == 4 * 1024 * 1024


# ------------------------------------------------------------------------------------------------ the provider

def test_provider_is_a_visible_choice(monkeypatch, capsys):
    monkeypatch.setattr(blas, "_provider", None)
    monkeypatch.setenv("GPUCNN_BLAS", "cupy")
    assert blas.provider() == "cupy"
    assert blas.use_provider("nvmath") == "cupy" and blas.provider() == "nvmath"
    with pytest.raises(ValueError, match=r"use_provider: expected one of \('nvmath', 'cupy'\), got 'cublas'"):
        blas.use_provider("cublas")
    monkeypatch.setattr(blas, "_provider", None)
    monkeypatch.setenv("GPUCNN_BLAS", "mkl")
    with pytest.raises(ValueError, match=r"GPUCNN_BLAS: expected one of \('nvmath', 'cupy'\), got 'mkl'"):
        blas.provider()
    monkeypatch.delenv("GPUCNN_BLAS")
    monkeypatch.setattr(blas, "_nvmath_installed", lambda: False)
    monkeypatch.setattr(blas, "_provider", None)
    assert blas.provider() == "cupy"                    # nvmath-python not installed: CuPy's matmul, as before
    monkeypatch.setattr(blas._backend, "_device", "sim")
    assert blas.provider() == "nvmath"                  # "sim" needs no package for it: the same everywhere
    monkeypatch.setattr(blas._backend, "_device", "cpu")
    from gpucnn import cli
    assert cli.main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^gemm: cupy \(cupy\.matmul: .*install nvmath-python==1\.0\.1", out, re.M), out
    assert re.search(r"^nvmath-python: ", out, re.M), out


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lb", LAYOUTS)
@pytest.mark.parametrize("la", LAYOUTS)
@pytest.mark.parametrize("shapes", list(SHAPES))
def test_sim_every_layout_is_read_in_place(shapes, la, lb, dtype, rng, nvmath_provider, monkeypatch):
    """Each operand as rows, a transposed view or padded rows (ld > columns), 2-d and batched: set_stream,
    set_workspace and one GEMM on the operands' own memory (simblas reads only the arrays passed), equal to
    float64's product."""
    record, calls = simblas._record, []
    monkeypatch.setattr(simblas, "_record", lambda name, **args: (calls.append(name), record(name, **args)))
    sa, sb = SHAPES[shapes]
    a, b = _operand(rng, sa, la, dtype), _operand(rng, sb, lb, dtype)
    shape = np.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1])
    outs = {"a new output": None, "a transposed output": np.empty(shape[:-2] + shape[:-3:-1], dtype).swapaxes(-1, -2)}
    for what, out in outs.items():
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error")              # no fallback to cupy.matmul
            got = blas.matmul(a, b, out=out)
        assert out is None or got is out
        assert_close(got, a.astype(np.float64) @ b.astype(np.float64), dtype, what)
        gemm = "gemm_ex" if len(shape) == 2 else "gemm_strided_batched_ex"
        assert calls[-3:] == ["set_stream", "set_workspace", gemm], calls


@pytest.mark.sim
def test_sim_precision_picks_the_compute_type_whatever_cupy_tf32_says(rng, nvmath_provider, monkeypatch):
    """fp32 is COMPUTE_32F (full float32) even with CUPY_TF32=1 (CuPy's switch, not our handle's); tf32 is
    COMPUTE_32F_FAST_TF32, and its result is the product of the truncated inputs."""
    monkeypatch.setenv("CUPY_TF32", "1")
    a, b = rng.standard_normal((6, 300)).astype(np.float32), rng.standard_normal((300, 5)).astype(np.float32)
    seen = []
    monkeypatch.setattr(simblas, "_record", lambda name, **args: seen.append(args.get("compute_type")))
    y32 = blas.matmul(a, b)
    gpucnn.set_precision("tf32")
    yt = blas.matmul(a, b)
    yd = blas.matmul(a.astype(np.float64), b.astype(np.float64))
    assert [c for c in seen if c is not None] == [68, 77, 70]
    np.testing.assert_allclose(y32, a.astype(np.float64) @ b, rtol=0, atol=2e-4 * np.abs(y32).max())
    tf = blas.to_tf32(a).astype(np.float64) @ blas.to_tf32(b).astype(np.float64)
    assert_close(yt, tf, "float32", "tf32 vs the product of truncated inputs")
    assert np.abs(yt - tf).max() * 10 < np.abs(y32 - tf).max()      # far nearer the truncated product
    np.testing.assert_allclose(yd, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-12)


@pytest.mark.sim
def test_sim_a_layout_cublas_cannot_read_falls_back_once_and_loudly(rng, nvmath_provider):
    a = rng.standard_normal((6, 8)).astype(np.float32)[::2, ::2]
    b = rng.standard_normal((4, 3)).astype(np.float32)
    blas._fallbacks.discard(blas.gemm_call(a, b, np.empty((3, 3), np.float32)))
    with pytest.warns(UserWarning, match=r"a GEMM with an operand of strides \(64, 8\) .* runs through cupy.matmul"):
        y = blas.matmul(a, b)
    assert_close(y, a.astype(np.float64) @ b, "float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once per layout
        blas.matmul(a, b)
    graph, _, error = _capture(lambda x: blas.matmul(x[::2, ::2], b, out=backend.empty((3, 3), np.float32, x)),
                               rng.standard_normal((6, 8)).astype(np.float32))
    assert graph is None and isinstance(error, capture.CaptureError)
    assert str(error).startswith("matmul: an operand of strides (64, 8)") and "cannot be captured" in str(error)


# ------------------------------------------------------------------------------------------------ the capture rules

@pytest.mark.sim
def test_sim_a_gemm_is_captured_and_its_launch_computes_the_new_inputs(rng, nvmath_provider):
    w = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    graph, y, error = _capture(lambda x: blas.matmul(x, w, out=backend.empty((4, 3), np.float32, x)), x)
    assert error is None, error
    y[...] = -1
    x[...] = rng.standard_normal((4, 5))                # a new batch in the graph's input
    assert np.all(y == -1)                              # nothing ran while capturing
    graph.launch()
    assert_close(y, x.astype(np.float64) @ w, "float32")


def _raw_gemm(handle, x, y, out):
    """simblas's gemm_ex for out = x @ y, arguments as gpucnn.blas makes them, the operands exposed."""
    name, args = blas.gemm_call(x, y, out)
    simblas.expose((x, y, out), (blas._SCALARS[out.dtype],))
    getattr(simblas, name)(handle, *args)


RULES = {   # what the body does before its GEMM in the capture -> the words of the refusal
    "the workspace not set after set_stream": (
        lambda h, ws: simblas.set_stream(h, capture.current_stream()),
        "whose workspace was not set after its last set_stream"),
    "set_stream after set_workspace": (
        lambda h, ws: (simblas.set_workspace(h, _address(ws), ws.nbytes),
                       simblas.set_stream(h, capture.current_stream())),
        "whose workspace was not set after its last set_stream"),
    "another stream": (
        lambda h, ws: (simblas.set_stream(h, 0), simblas.set_workspace(h, _address(ws), ws.nbytes)),
        "a cuBLAS GEMM on stream 0x0 while stream"),
    "a small workspace": (
        lambda h, ws: (simblas.set_stream(h, capture.current_stream()),
                       simblas.set_workspace(h, _address(ws), 4 << 20)),
        "a cuBLAS workspace of 4,194,304 bytes in a graph capture, under the 33,554,432"),
}


@pytest.mark.sim
@pytest.mark.parametrize("rule", list(RULES) + ["all set"])
def test_sim_a_capture_refuses_what_cublas_could_not_capture(rule, rng):
    handle = simblas.create()
    simblas.set_pointer_mode(handle, simblas.POINTER_MODE_HOST)
    ws = np.empty(simblas.workspace_bytes(simblas.COMPUTE_CAPABILITY), np.uint8)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    prepare, words = RULES.get(rule, (lambda h, ws: (simblas.set_stream(h, capture.current_stream()),
                                                     simblas.set_workspace(h, _address(ws),
                                                                           ws.nbytes)), None))

    def body(x):
        out = backend.empty((4, 3), np.float32, x)
        prepare(handle, ws)
        _raw_gemm(handle, x, w, out)
        return out

    x = rng.standard_normal((4, 5)).astype(np.float32)
    graph, out, error = _capture(body, x)
    if words is None:
        assert error is None, error
        graph.launch()
        assert_close(out, x.astype(np.float64) @ w, "float32")
    else:
        assert graph is None and isinstance(error, capture.CaptureError) and words in str(error), error


@pytest.mark.sim
def test_sim_cublas_checks_its_arguments_and_the_scalars_pointer_mode(rng):
    handle = simblas.create()
    x, w = rng.standard_normal((4, 5)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    out = np.empty((4, 3), np.float32)
    name, args = blas.gemm_call(x, w, out)
    simblas.expose((x, w, out), (blas._SCALARS[out.dtype],))
    bad = list(args)
    bad[8] = 2                                          # ldb 2 < 3 rows of cuBLAS's A (our w^T)
    with pytest.raises(simblas.SimCublasError, match=r"CUBLAS_STATUS_INVALID_VALUE: lda 2 < max\(1, 3\)"):
        simblas.gemm_ex(handle, *bad)
    bad = list(args)
    bad[5] = _address(x)                 # alpha read from device memory under pointer mode host
    with pytest.raises(simblas.SimCublasError, match=r"alpha at 0x[0-9a-f]+ is device memory, read under pointer "
                                                     r"mode host"):
        simblas.gemm_ex(handle, *bad)
    with pytest.raises(simblas.SimCublasError, match="CUBLAS_STATUS_NOT_INITIALIZED"):
        simblas.gemm_ex(12345, *args)
    simblas.gemm_ex(handle, *args)
    assert_close(out, x.astype(np.float64) @ w, "float32")


@pytest.mark.sim
def test_sim_no_handle_is_made_and_nothing_allocated_by_a_gemm_in_a_capture(rng, nvmath_provider, monkeypatch):
    w = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    graph, _, error = _capture(lambda x: blas.matmul(x, w), x)
    assert isinstance(error, capture.CaptureError) and "allocating 48 bytes (float32(4, 3)) by matmul without out=" \
        in str(error)
    monkeypatch.setattr(blas, "_handles", {})
    graph, _, error = backend.capture_graph(lambda x: blas.matmul(x, w, out=np.empty((4, 3), np.float32)), x)
    assert isinstance(error, capture.CaptureError) and "cuBLAS handle and its workspace are made at the first GEMM" \
        in str(error)


# ------------------------------------------------------------------------------------------------ the real nvmath

def _exercise_every_gemm(rng):
    """A training step of each net whose GEMMs differ (conv, Winograd, dense, float64), fp32 and tf32."""
    from gpucnn import layers as L
    from gpucnn.model import Sequential
    nets = [lambda: models.lenet5(seed=0),
            lambda: Sequential([L.Conv2D(2, 3, 3, padding=1, algorithm="winograd", rng=np.random.default_rng(1)),
                                L.ReLU(), L.Flatten(), L.Dense(3 * 6 * 6, 4, rng=np.random.default_rng(2))],
                               input_shape=(2, 6, 6)),
            lambda: Sequential([L.Flatten(), L.Dense(12, 5, dtype="float64", rng=np.random.default_rng(3))],
                               input_shape=(3, 2, 2))]
    for precision in ("fp32", "tf32"):
        gpucnn.set_precision(precision)
        for make in nets:
            model = make()
            x = rng.standard_normal((2,) + model.input_shape).astype(model.dtype)
            model.train_step(x, rng.integers(0, 4, 2), SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1), graph=False)


@pytest.mark.sim
def test_every_cublas_call_passes_nvmaths_argument_checks(rng, nvmath_provider):
    """Every distinct cuBLAS call the sim runs made through the provider (this test's steps and any before it),
    sent to the real ``nvmath.bindings.cublas`` function with a null handle. The arguments are converted (their
    count and kinds, each int within its C type) before the library is reached; without a driver the only error
    allowed is nvmath's NotSupportedError "CUDA driver is not found" (or the cuBLAS library not found), with
    one, cuBLAS's answer to a null handle."""
    cublas = pytest.importorskip("nvmath.bindings.cublas", reason="nvmath-python is not installed here: the "
                                                                  "argument check needs its bindings")
    from cuda.pathfinder import DynamicLibNotFoundError
    from nvmath.bindings._internal.utils import NotSupportedError
    _exercise_every_gemm(rng)
    calls = sorted(simblas.CALLS.items(), key=repr)
    assert {"create", "set_stream", "set_workspace", "set_pointer_mode", "set_math_mode", "gemm_ex",
            "gemm_strided_batched_ex"} <= {name for (name, _), _ in calls}
    failures = [f"{name}{args}: an argument that is not a Python int" for (name, _), args in calls
                if any(type(v) is not int for v in args)]     # Cython would take a float for an int, truncated
    for (name, spec), args in calls:
        if name == "create" and GPU_PROBLEM is None:
            continue                                    # with a driver it would make a handle
        args = tuple(0 if k == "handle" else v for (k, _, _), v in zip(spec, args))
        try:
            getattr(cublas, name)(*args)
        except NotSupportedError as e:
            if not str(e).startswith("CUDA driver is not found"):
                failures.append(f"{name}{args}: NotSupportedError: {e}")
        except DynamicLibNotFoundError:
            pass
        except cublas.cuBLASError as e:
            if GPU_PROBLEM is not None:
                failures.append(f"{name}{args}: {e}")
        except Exception as e:      # noqa: BLE001 - every other error is a call "cuda" would fail
            failures.append(f"{name}{args}: {type(e).__name__}: {e}")
        else:
            failures.append(f"{name}{args}: returned, with a null handle")
    assert not failures, "nvmath.bindings.cublas refuses calls the 'cuda' path makes:\n" + "\n".join(failures)
