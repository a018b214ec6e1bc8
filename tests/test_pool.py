"""Pooling: finite differences, a nested-loop reference, PyTorch, the GPU path ("sim") against the CPU."""
import json

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from gpucnn import backend, layers as L
from gpucnn.kernels import pool as K
from gpucnn.testing import check_backward
from conftest import assert_close, assert_compiles_for_a_real_gpu

POOLS = [L.MaxPool2D, L.AvgPool2D]

# input shape, kernel_size, stride, padding: the windows every kind of test below runs
CASES = {
    "2x2 side by side": ((2, 3, 6, 6), 2, None, 0),
    "3x3 stride 2 overlapping": ((2, 2, 7, 7), 3, 2, 0),
    "3x3 stride 2 padded": ((2, 2, 6, 6), 3, 2, 1),
    "non-square": ((2, 2, 5, 7), (2, 3), (1, 2), (1, 1)),
    "batch 1, last row uncovered": ((1, 3, 5, 5), 2, 2, 0),
}
CASE_IDS = list(CASES)


def distinct(rng, shape):
    """Values without ties, spaced far beyond finite differences' eps, so the max is unambiguous."""
    size = int(np.prod(shape))
    return (rng.permutation(size).reshape(shape) - size / 2) * 0.1


def pairs(layer):
    return layer.kernel, layer.stride, layer.padding


# ------------------------------------------------------------------------------------------------ reference
def reference_pool(x, kernel, stride, padding, op):
    """Nested loops over every output and its window's real elements: (y, switches) for "max", y for "avg"."""
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    OH, OW = (H - KH + 2 * PH) // SH + 1, (W - KW + 2 * PW) // SW + 1
    y = np.zeros((N, C, OH, OW), x.dtype)
    switches = np.zeros((N, C, OH, OW), np.int64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    real = [(h, w) for h in range(oh * SH - PH, oh * SH - PH + KH)
                            for w in range(ow * SW - PW, ow * SW - PW + KW) if 0 <= h < H and 0 <= w < W]
                    if op == "avg":
                        y[n, c, oh, ow] = sum(x[n, c, h, w] for h, w in real) / (KH * KW)
                        continue
                    best = real[0]
                    for h, w in real:
                        if x[n, c, h, w] > x[n, c][best]:
                            best = (h, w)
                    y[n, c, oh, ow] = x[n, c][best]
                    switches[n, c, oh, ow] = best[0] * W + best[1]
    return (y, switches) if op == "max" else y


def reference_backward(gy, x_shape, kernel, stride, padding, switches=None):
    """Loops again: max sends gy to the switch, avg spreads gy / (KH*KW) over the window's real elements."""
    N, C, H, W = x_shape
    (KH, KW), (SH, SW), (PH, PW) = kernel, stride, padding
    gx = np.zeros(x_shape)
    for n, c, oh, ow in np.ndindex(*gy.shape):
        if switches is not None:
            h, w = divmod(int(switches[n, c, oh, ow]), W)
            gx[n, c, h, w] += gy[n, c, oh, ow]
            continue
        for h in range(max(oh * SH - PH, 0), min(oh * SH - PH + KH, H)):
            for w in range(max(ow * SW - PW, 0), min(ow * SW - PW + KW, W)):
                gx[n, c, h, w] += gy[n, c, oh, ow] / (KH * KW)
    return gx


# ------------------------------------------------------------------------------------------------ finite differences
@pytest.mark.parametrize("case", CASE_IDS)
@pytest.mark.parametrize("Pool", POOLS)
def test_check_backward(Pool, case, rng):
    shape, k, s, p = CASES[case]
    report = check_backward(Pool(k, s, p), distinct(rng, shape))
    assert report["x"]["max_rel_error"] < 1e-6


# ------------------------------------------------------------------------------------------------ properties
@st.composite
def windows(draw):
    KH, KW = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    return dict(shape=shape,
                kernel=(KH, KW), stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                padding=(draw(st.integers(0, KH // 2)), draw(st.integers(0, KW // 2))),
                ties=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


@settings(deadline=None, max_examples=60)
@given(w=windows(), pool=st.sampled_from(POOLS))
def test_output_shape_follows_the_formula(w, pool):
    N, C, H, W = w["shape"]
    layer = pool(w["kernel"], w["stride"], w["padding"])
    x = np.random.default_rng(w["seed"]).standard_normal(w["shape"]).astype(np.float32)
    sizes = [(n - k + 2 * p) // s + 1 if n - k + 2 * p >= 0 else 0
             for n, k, s, p in zip((H, W), w["kernel"], w["stride"], w["padding"])]
    if min(sizes) < 1:
        with pytest.raises(ValueError, match=r"larger than the padded input .* O = \(W - K \+ 2P\)/S \+ 1"):
            layer.output_shape((C, H, W))
        with pytest.raises(ValueError, match="larger than the padded input"):
            layer.forward(x)
        return
    y = layer.forward(x)
    assert y.shape == (N, C, *sizes) == (N, *layer.output_shape((C, H, W)))
    assert y.dtype == np.float32


@settings(deadline=None, max_examples=60)
@given(w=windows())
def test_pooling_equals_nested_loops(w):
    H, W = w["shape"][2:]
    assume(all(n - k + 2 * p >= 0 for n, k, p in zip((H, W), w["kernel"], w["padding"])))
    rng = np.random.default_rng(w["seed"])
    x = rng.integers(-2, 3, w["shape"]).astype(np.float64) if w["ties"] else rng.standard_normal(w["shape"])
    args = (w["kernel"], w["stride"], w["padding"])
    y, switches = K.maxpool2d_forward(x, *args)
    y_ref, switches_ref = reference_pool(x, *args, "max")
    assert np.array_equal(y, y_ref) and np.array_equal(switches, switches_ref)
    gy = rng.standard_normal(y.shape)
    assert_close(K.maxpool2d_backward(gy, switches, x.shape, *args),
                 reference_backward(gy, x.shape, *args, switches_ref), "float64", "max backward")
    assert_close(K.avgpool2d_forward(x, *args), reference_pool(x, *args, "avg"), "float64", "avg forward")
    assert_close(K.avgpool2d_backward(gy, x.shape, *args), reference_backward(gy, x.shape, *args),
                 "float64", "avg backward")


# ------------------------------------------------------------------------------------------------ special values
def test_ties_go_to_the_first_maximum_in_window_order():
    x = np.array([[[[1, 3, 3],
                    [3, 0, 3],
                    [2, 3, 1]]]], np.float32)
    y, switches = K.maxpool2d_forward(x, (2, 2), (1, 1), (0, 0))
    assert np.array_equal(y[0, 0], [[3, 3], [3, 3]])
    assert np.array_equal(switches[0, 0], [[1, 1], [3, 5]])


def test_padding_never_wins_even_against_minus_infinity():
    x = np.full((1, 1, 3, 3), -np.inf, np.float32)
    y, switches = K.maxpool2d_forward(x, (3, 3), (2, 2), (1, 1))
    assert np.all(y == -np.inf)
    assert np.array_equal(switches[0, 0], [[0, 1], [3, 4]])     # the first real element of each window


def test_nan_wins_and_is_its_windows_switch():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = np.nan
    y, switches = K.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0))
    assert np.isnan(y[0, 0, 0, 0]) and switches[0, 0, 0, 0] == 1      # the first NaN in window order
    assert np.array_equal(y[0, 0].ravel()[1:], [7, 13, 15])


def test_float32_stays_float32():
    x = np.ones((1, 1, 4, 4), np.float32)
    for layer in (L.AvgPool2D(2), L.AvgPool2D(3, 1, 1), L.MaxPool2D(2)):
        y = layer.forward(x)
        gx = layer.backward(np.ones_like(y))
        assert y.dtype == gx.dtype == np.float32, layer


# ------------------------------------------------------------------------------------------------ PyTorch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_against_torch(case, dtype, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    shape, k, s, p = CASES[case]
    x = rng.standard_normal(shape).astype(dtype)
    for layer in (L.MaxPool2D(k, s, p), L.AvgPool2D(k, s, p)):
        y = layer.forward(x)
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx = layer.backward(gy)
        t = torch.tensor(x, requires_grad=True)
        if isinstance(layer, L.MaxPool2D):
            ty, indices = F.max_pool2d(t, *pairs(layer), return_indices=True)
            assert np.array_equal(layer.switches, indices.numpy()), "switches differ from PyTorch's indices"
        else:
            ty = F.avg_pool2d(t, *pairs(layer), count_include_pad=True)
        ty.backward(torch.tensor(gy))
        assert y.dtype == gx.dtype == np.dtype(dtype)
        assert_close(y, ty.detach().numpy(), dtype, f"{layer!r} forward")
        assert_close(gx, t.grad.numpy(), dtype, f"{layer!r} backward")


@pytest.mark.parametrize("padding", [0, 1])
def test_ties_match_torch(padding, rng):
    torch = pytest.importorskip("torch")
    x = rng.integers(0, 3, (2, 3, 7, 7)).astype(np.float32)     # many ties in every window
    y, switches = K.maxpool2d_forward(x, (3, 3), (2, 2), (padding, padding))
    _, indices = torch.nn.functional.max_pool2d(torch.tensor(x), 3, 2, padding, return_indices=True)
    assert np.array_equal(switches, indices.numpy())


# ------------------------------------------------------------------------------------------------ layer contract
@pytest.mark.parametrize("Pool", POOLS)
def test_config_rebuilds_the_layer(Pool):
    for args in [(2,), (3, 2, 1), ((2, 3), (1, 2), (1, 0))]:
        layer = Pool(*args)
        cfg = json.loads(json.dumps(layer.config()))
        again = L.LAYER_TYPES[Pool.__name__](**cfg)
        assert pairs(again) == pairs(layer) and again.config() == cfg
    assert Pool(3).stride == (3, 3)       # stride defaults to the kernel size


def test_switches_are_exposed_after_forward(rng):
    layer = L.MaxPool2D(2)
    assert layer.switches is None
    x = distinct(rng, (1, 2, 4, 4))
    y = layer.forward(x)
    assert layer.switches.shape == y.shape
    assert np.array_equal(x.reshape(1, 2, 16)[0, np.arange(2)[:, None], layer.switches.reshape(2, 4)],
                          y.reshape(2, 4))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("Pool", POOLS)
def test_errors(Pool):
    name = Pool.__name__
    with pytest.raises(ValueError, match=rf"{name}: padding \(2, 2\) must be at most half the kernel size \(3, 3\)"):
        Pool(3, padding=2)
    with pytest.raises(ValueError, match=rf"{name}: expected kernel_size >= 1, stride >= 1 and padding >= 0"):
        Pool(0)
    with pytest.raises(ValueError, match=rf"{name}: expected kernel_size >= 1"):
        Pool(2, stride=(1, 0))
    with pytest.raises(TypeError, match=rf"{name}: kernel_size must be an int or a pair of ints, got 2.5"):
        Pool(2.5)
    layer = Pool(2)
    with pytest.raises(RuntimeError, match=rf"{name}: backward called before forward"):
        layer.backward(np.ones((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=rf"{name}: expected a 4-d input \(N, C, H, W\), got shape \(3, 4, 4\)"):
        layer.forward(np.ones((3, 4, 4), np.float32))
    with pytest.raises(TypeError, match=rf"{name}: expected a float input .* got uint8"):
        layer.forward(np.ones((1, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=rf"{name}: kernel 5 is larger than the padded input along height "
                                         r"\(input 2 \+ 2\*padding 1 = 4\)"):
        Pool(5, padding=1).forward(np.ones((1, 1, 2, 9), np.float32))
    with pytest.raises(ValueError, match=rf"{name}: kernel 3 is larger than the padded input along width "
                                         r"\(input 2 \+ 2\*padding 0 = 2\): the output size O = \(W - K \+ 2P\)/S"):
        Pool(3).output_shape((1, 8, 2))
    with pytest.raises(ValueError, match=rf"{name}: expected an input shape \(C, H, W\), got \(4, 4\)"):
        layer.output_shape((4, 4))
    layer.forward(np.ones((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=rf"{name}: backward got a gradient of shape \(2, 1, 4, 4\), "
                                         r"expected the forward output's \(2, 1, 2, 2\)"):
        layer.backward(np.ones((2, 1, 4, 4), np.float32))


def test_kernel_functions_refuse_what_the_gpu_kernels_cannot_do():
    x = np.ones((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"pool: padding \(2, 0\) must be at most half the kernel \(2, 2\)"):
        K.maxpool2d_forward(x, (2, 2), (1, 1), (2, 0))
    with pytest.raises(ValueError, match=r"pool: kernel 5 is larger than the padded input 4 \+ 2\*0"):
        K.avgpool2d_forward(x, (5, 1), (1, 1), (0, 0))


# ------------------------------------------------------------------------------------------------ a real GPU's compiler
def test_kernels_compile_for_a_real_gpu_in_the_input_dtype():
    """The simulator runs kernels as Python, so it accepts code a GPU cannot compile. Numba's CUDA
    front end types and lowers them to NVVM IR with no GPU present; a float32 kernel must not compute
    in float64 (10x slower on most GPUs). Runs in a subprocess: numba.cuda here may be the simulator."""
    assert_compiles_for_a_real_gpu("""
        import gpucnn.kernels.pool as P
        P.cuda = cuda
        f32, i32, i64, b1 = types.float32, types.int32, types.int64, types.boolean
        a = lambda t: types.Array(t, 4, "C")
        sigs = {P._pool2d_forward_kernel: (a(f32), a(f32), a(i32), b1) + (i64,) * 6,
                P._pool2d_backward_kernel: (a(f32), a(i32), a(f32), b1) + (i64,) * 6}
    """)


# ------------------------------------------------------------------------------------------------ GPU path, simulated
def sim_case(case, dtype, rng, ties=False):
    shape, k, s, p = CASES[case]
    x = (rng.integers(0, 3, shape) if ties else rng.standard_normal(shape)).astype(dtype)
    return x, pairs(L.MaxPool2D(k, s, p))      # the layer turns the case into (kernel, stride, padding) pairs


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_sim_matches_cpu(case, dtype, rng):
    x, args = sim_case(case, dtype, rng)
    y, switches = K.maxpool2d_forward(x, *args)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = K.maxpool2d_backward(gy, switches, x.shape, *args)
    ya = K.avgpool2d_forward(x, *args)
    gxa = K.avgpool2d_backward(gy, x.shape, *args)
    with backend.cpu_path():
        y_ref, switches_ref = K.maxpool2d_forward(x, *args)
        gx_ref = K.maxpool2d_backward(gy, switches_ref, x.shape, *args)
        ya_ref = K.avgpool2d_forward(x, *args)
        gxa_ref = K.avgpool2d_backward(gy, x.shape, *args)
    assert np.array_equal(switches, switches_ref) and switches.dtype == np.int32
    for got, ref, what in [(y, y_ref, "max forward"), (gx, gx_ref, "max backward"),
                           (ya, ya_ref, "avg forward"), (gxa, gxa_ref, "avg backward")]:
        assert got.dtype == np.dtype(dtype), what
        assert_close(got, ref, dtype, what)


@pytest.mark.sim
@pytest.mark.parametrize("case", ["3x3 stride 2 overlapping", "3x3 stride 2 padded", "non-square"])
def test_sim_ties_and_special_values_give_the_cpu_switches(case, rng):
    x, args = sim_case(case, "float32", rng, ties=True)
    x[0, 0, 0, :2] = np.nan          # windows holding NaNs, and windows of nothing but -inf (and padding)
    x[-1, -1] = -np.inf
    y, switches = K.maxpool2d_forward(x, *args)
    with backend.cpu_path():
        y_ref, switches_ref = K.maxpool2d_forward(x, *args)
    assert np.array_equal(switches, switches_ref)
    assert np.array_equal(y, y_ref, equal_nan=True)


@pytest.mark.sim
def test_sim_layers(rng):
    x = distinct(rng, (2, 2, 5, 5)).astype(np.float32)
    for layer in (L.MaxPool2D(3, 2, 1), L.AvgPool2D(3, 2, 1)):
        y = layer.forward(x)
        gy = np.ones_like(y)
        gx = layer.backward(gy)
        with backend.cpu_path():
            y_ref = layer.forward(x)
            gx_ref = layer.backward(gy)
        assert_close(y, y_ref, "float32", f"{layer!r} forward")
        assert_close(gx, gx_ref, "float32", f"{layer!r} backward")
