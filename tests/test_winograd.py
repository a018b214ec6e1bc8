"""Winograd F(2x2, 3x3): against conv's im2col + GEMM (fixed shapes and hypothesis), finite differences, the
adjoint identity, the errors, the GPU path ("sim") against the CPU, and a real GPU's compiler."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gpucnn
from gpucnn import backend
from gpucnn.kernels import conv as K
from gpucnn.kernels import winograd as WG
from gpucnn.testing import check_backward
from conftest import assert_close, assert_compiles_for_a_real_gpu


def assert_tight(actual, expected, what, rtol=1e-10):
    """float64: |actual - expected| <= rtol * max|expected| (the two algorithms round differently, no more)."""
    a, e = backend.to_numpy(actual), backend.to_numpy(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != expected {e.shape}"
    err, scale = np.abs(a - e).max(initial=0.0), np.abs(e).max(initial=0.0)
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} * max|expected| {scale:.3e}"


def gemm_reference(x, w, gz, padding):
    """z, gx, gw of conv.py's im2col + GEMM (its own lowering on the CPU: col comes from conv2d_gemm)."""
    z, col = K.conv2d_gemm(x, w, 1, padding)
    gx, gw = K.conv2d_gemm_backward(x.shape, col, w, gz, 1, padding)
    return z, gx, gw


def winograd_pass(x, w, gz, padding, **kw):
    z, saved = WG.winograd_gemm(x, w, padding)
    gx, gw = WG.winograd_gemm_backward(x.shape, saved, w, gz, padding, **kw)
    return z, gx, gw, saved


# (N, C, H, W, Cout, padding): even and odd sizes (a ragged last tile), each padding, N = 1, C = 1, non-square
SHAPES = {
    "even, no padding": (2, 3, 6, 6, 4, 0),
    "odd height and width, padding 1": (2, 3, 7, 5, 4, 1),
    "batch 1, one channel, padding 2": (1, 1, 5, 8, 2, 2),
    "padding per axis, Cout > C": (3, 2, 4, 9, 5, (0, 2)),
    "one output (3x3 input, no padding)": (2, 4, 3, 3, 3, 0),
    "1x1 input, padding 1": (2, 2, 1, 1, 3, 1),
    "Cout < C, wide": (2, 5, 6, 11, 2, 1),
}


def random_inputs(case, dtype, rng):
    """x, w and gz (fresh normal numbers in ``dtype``) and the padding of a case (N, C, H, W, Cout, padding)."""
    N, C, H, W, Cout, P = case
    PH, PW = WG._two(P)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Cout, C, 3, 3)).astype(dtype)
    return x, w, rng.standard_normal((Cout, H + 2 * PH - 2, W + 2 * PW - 2, N)).astype(dtype), P


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", SHAPES)
def test_matches_im2col_gemm(case, dtype, rng):
    x, w, gz, P = random_inputs(SHAPES[case], dtype, rng)
    z, gx, gw, (V, U) = winograd_pass(x, w, gz, P)
    assert z.flags.c_contiguous and gx.flags.c_contiguous
    assert z.dtype == gx.dtype == gw.dtype == V.dtype == U.dtype == np.dtype(dtype)
    # float32 against the float64 reference of the same numbers: Winograd's longer sums round a little more
    ref = gemm_reference(x.astype(np.float64), w.astype(np.float64), gz.astype(np.float64), P)
    for name, got, want in zip(("z", "gx", "gw"), (z, gx, gw), ref):
        if dtype == "float64":
            assert_tight(got, want, name)
        else:
            assert_close(got, want, dtype, name)


@settings(max_examples=100, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 3), Cout=st.integers(1, 3), H=st.integers(1, 8), W=st.integers(1, 8),
       PH=st.integers(0, 2), PW=st.integers(0, 2), seed=st.integers(0, 2**32 - 1))
def test_matches_im2col_gemm_on_random_shapes(N, C, Cout, H, W, PH, PW, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((Cout, C, 3, 3))
    if H + 2 * PH < 3 or W + 2 * PW < 3:
        with pytest.raises(ValueError, match="winograd: kernel 3 is larger than the padded input"):
            WG.winograd_gemm(x, w, (PH, PW))
        return
    gz = rng.standard_normal((Cout, H + 2 * PH - 2, W + 2 * PW - 2, N))
    z, gx, gw, _ = winograd_pass(x, w, gz, (PH, PW))
    for name, got, want in zip(("z", "gx", "gw"), (z, gx, gw), gemm_reference(x, w, gz, (PH, PW))):
        assert_tight(got, want, name)


class WinogradConv:
    """The pair of kernel functions as a layer, for gpucnn.testing.check_backward."""

    def __init__(self, w, padding):
        self.params, self.grads, self.padding = {"weight": w}, {}, padding

    def forward(self, x, training=True):
        self.x_shape = x.shape
        z, self.saved = WG.winograd_gemm(x, self.params["weight"], self.padding)
        return z

    def backward(self, gz):
        gx, self.grads["weight"] = WG.winograd_gemm_backward(self.x_shape, self.saved, self.params["weight"], gz,
                                                             self.padding)
        return gx


@pytest.mark.parametrize("shape,padding", [((2, 2, 5, 4), 1), ((1, 3, 4, 5), (2, 0))])
def test_finite_differences(shape, padding, rng):
    layer = WinogradConv(rng.standard_normal((3, shape[1], 3, 3)), padding)
    report = check_backward(layer, rng.standard_normal(shape))
    assert set(report) == {"x", "weight"}


@pytest.mark.parametrize("shape,Cout,padding", [((2, 3, 7, 6), 4, 1), ((3, 2, 8, 5), 2, 0), ((1, 1, 2, 3), 2, 2)])
def test_backward_is_the_adjoint(shape, Cout, padding, rng):
    # z is bilinear in (x, w): <z, g> == <x, gx(g)> == <w, gw(g)> when backward is forward's exact adjoint
    x = rng.standard_normal(shape)
    w = rng.standard_normal((Cout, shape[1], 3, 3))
    z, saved = WG.winograd_gemm(x, w, padding)
    g = rng.standard_normal(z.shape)
    gx, gw = WG.winograd_gemm_backward(x.shape, saved, w, g, padding)
    zg = (z * g).sum()
    assert np.isclose((x * gx).sum(), zg, rtol=1e-12, atol=1e-12)
    assert np.isclose((w * gw).sum(), zg, rtol=1e-12, atol=1e-12)


def test_each_gradient_alone_and_into_a_flat_buffer(rng):
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    z, saved = WG.winograd_gemm(x, w, 1)
    gz = rng.standard_normal(z.shape)
    _, ref_gx, ref_gw = gemm_reference(x, w, gz, 1)
    gx, gw = WG.winograd_gemm_backward(x.shape, saved, w, gz, 1, need_gw=False)
    assert gw is None
    assert_tight(gx, ref_gx, "gx alone")
    flat = np.full(w.size + 3, np.nan)
    gx, gw = WG.winograd_gemm_backward(x.shape, saved, w, gz, 1, need_gx=False,
                                       gw_out=flat[2:2 + w.size].reshape(w.shape))
    assert gx is None
    assert_tight(gw, ref_gw, "gw into a view")
    assert np.shares_memory(gw, flat) and np.isnan(flat[:2]).all() and np.isnan(flat[-1])


def test_transformed_input_layout(rng):
    # V[(i, j), c, th, tw, n] = (B^T d B)[i, j] for the 4x4 tile d at padded rows 2*th.., columns 2*tw..
    x = rng.standard_normal((2, 2, 5, 4))
    _, (V, U) = WG.winograd_gemm(x, rng.standard_normal((3, 2, 3, 3)), 1)
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 1)))     # one more row: OH = 5 is odd
    BT = WG._BT.astype(np.float64)
    assert V.shape == (16, 2, 3, 2, 2) and U.shape == (16, 3, 2)
    for c, th, tw, n in np.ndindex(2, 3, 2, 2):
        d = xpad[n, c, 2 * th:2 * th + 4, 2 * tw:2 * tw + 4]
        np.testing.assert_allclose(V[:, c, th, tw, n], (BT @ d @ BT.T).ravel(), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------ errors

def test_supported():
    assert WG.winograd_supported(3, 1) and WG.winograd_supported((3, 3), (1, 1))
    assert not WG.winograd_supported(5, 1)
    assert not WG.winograd_supported((3, 2), 1)
    assert not WG.winograd_supported(3, 2)
    assert not WG.winograd_supported(3, (1, 2))


def test_errors(rng):
    x = rng.standard_normal((1, 2, 6, 6))
    w5 = rng.standard_normal((2, 2, 5, 5))
    w3 = rng.standard_normal((2, 2, 3, 3))
    supported = r"Winograd F\(2x2, 3x3\) computes 3x3 convolutions with stride 1 only"
    with pytest.raises(ValueError, match=rf"winograd_gemm: {supported}, got a 5x5 kernel with stride \(1, 1\)"):
        WG.winograd_gemm(x, w5, 1)
    with pytest.raises(ValueError, match=rf"winograd_gemm: {supported}, got a 3x3 kernel with stride \(2, 2\)"):
        WG.winograd_gemm(x, w3, 1, stride=2)
    z, saved = WG.winograd_gemm(x, w3, 1)
    with pytest.raises(ValueError,
                       match=rf"winograd_gemm_backward: {supported}, got a 3x3 kernel with stride \(2, 1\)"):
        WG.winograd_gemm_backward(x.shape, saved, w3, z, 1, stride=(2, 1))
    with pytest.raises(ValueError, match=rf"winograd_gemm_backward: {supported}, got a 5x5 kernel"):
        WG.winograd_gemm_backward(x.shape, saved, w5, z, 1)
    with pytest.raises(ValueError, match=r"winograd_gemm_backward: gz has shape \(2, 6, 5, 1\), expected "
                                         r"\(Cout, OH, OW, N\) = \(2, 6, 6, 1\)"):
        WG.winograd_gemm_backward(x.shape, saved, w3, z[:, :, :5], 1)
    with pytest.raises(ValueError, match=r"winograd: kernel 3 is larger than the padded input 2 \+ 2\*0"):
        WG.winograd_gemm(rng.standard_normal((1, 2, 5, 2)), w3, 0)


# ------------------------------------------------------------------------------------------ GPU path on "sim"
# Tiny shapes: every simulated thread costs ~150 us (the largest launch here is 2*2*5*4 = 80 input elements).
SIM_SHAPES = {"odd height, padding 1": (2, 2, 5, 4, 3, 1),
              "no padding": (1, 1, 4, 4, 2, 0),
              "padding per axis, odd width": (2, 1, 3, 5, 2, (2, 1))}


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", SIM_SHAPES)
def test_sim_matches_cpu(case, dtype, rng):
    x, w, gz, P = random_inputs(SIM_SHAPES[case], dtype, rng)
    assert backend.on_gpu(x)
    z, gx, gw, (V, U) = winograd_pass(x, w, gz, P)
    with backend.cpu_path():
        z_ref, gx_ref, gw_ref, (V_ref, U_ref) = winograd_pass(x, w, gz, P)
    assert z.dtype == gx.dtype == gw.dtype == V.dtype == np.dtype(dtype)
    for name, got, want in [("V", V, V_ref), ("U", U, U_ref), ("z", z, z_ref), ("gx", gx, gx_ref),
                            ("gw", gw, gw_ref)]:
        assert_close(got, want, dtype, name)


@pytest.mark.sim
def test_sim_launches_and_one_gradient(rng):
    x = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    gz = rng.standard_normal((3, 5, 4, 2)).astype(np.float32)
    with gpucnn.profile() as fwd:
        z, saved = WG.winograd_gemm(x, w, 1)
    with gpucnn.profile() as bwd:
        WG.winograd_gemm_backward(x.shape, saved, w, gz, 1)
    with gpucnn.profile() as gw_only:
        gx, gw = WG.winograd_gemm_backward(x.shape, saved, w, gz, 1, need_gx=False)
    counts = lambda p: (p.counts["winograd"]["numba"], p.counts["winograd"]["cublas"])
    assert counts(fwd) == (2, 2) and counts(bwd) == (2, 3) and counts(gw_only) == (1, 2)
    assert gx is None
    with backend.cpu_path():
        _, saved_cpu = WG.winograd_gemm(x, w, 1)
        _, gw_ref = WG.winograd_gemm_backward(x.shape, saved_cpu, w, gz, 1, need_gx=False)
    assert_close(gw, gw_ref, "float32", "gw alone")


# ------------------------------------------------------------------------------------------ a real GPU's compiler

def test_kernels_compile_for_a_real_gpu_in_float32():
    """The simulator runs kernels as Python and accepts what a GPU cannot compile: lower the four kernels for
    a real GPU in float32 and refuse float64 arithmetic in them."""
    assert_compiles_for_a_real_gpu("""
        import gpucnn.kernels.winograd as WG
        WG.cuda = cuda
        f32, i64 = types.float32, types.int64
        a = lambda n: types.Array(f32, n, "C")
        sigs = {WG._input_transform_kernel: (a(4), a(5), i64, i64),
                WG._output_transform_kernel: (a(5), a(4)),
                WG._output_transform_adjoint_kernel: (a(4), a(5)),
                WG._input_transform_adjoint_kernel: (a(5), a(4), i64, i64)}
    """)


# ------------------------------------------------------------------------------------------------ the Conv2D switch

def _twin_nets(rng, algorithm, dtype="float64"):
    """A 3x3-conv net (fused ReLU + max pool, then tanh + avg pool, dense) with ``algorithm`` on both convs."""
    from gpucnn import layers as L
    seed = int(rng.integers(2 ** 31))
    r = np.random.default_rng(seed)
    return gpucnn.Sequential([
        L.Conv2D(2, 4, 3, padding=1, dtype=dtype, rng=r, algorithm=algorithm), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(4, 3, 3, padding=(1, 0), dtype=dtype, rng=r, algorithm=algorithm), L.Tanh(), L.AvgPool2D(2),
        L.Flatten(), L.Dense(3 * 2 * 1, 5, dtype=dtype, rng=r)], input_shape=(2, 8, 10))


def test_conv2d_winograd_layer_trains_as_the_gemm_layer(rng):
    from gpucnn.losses import SoftmaxCrossEntropy
    seed = int(rng.integers(2 ** 31))
    nets = {a: _twin_nets(np.random.default_rng(seed), a) for a in ("gemm", "winograd")}
    x = rng.standard_normal((3, 2, 8, 10))
    y = rng.integers(0, 5, 3)
    out = {}
    for algo, net in nets.items():
        opt = gpucnn.optim.SGD(net, lr=0.1, momentum=0.9)
        losses = [float(net.train_step(x, y, SoftmaxCrossEntropy(), opt)) for _ in range(3)]
        out[algo] = (losses, [backend.to_numpy(v).copy() for l in net.layers for v in l.params.values()])
    assert np.allclose(out["gemm"][0], out["winograd"][0], rtol=1e-12, atol=0)
    for a, b in zip(out["gemm"][1], out["winograd"][1]):
        assert_tight(b, a, "parameters after 3 SGD steps")


def test_conv2d_winograd_layer_finite_differences(rng):
    from gpucnn import layers as L
    layer = L.Conv2D(2, 3, 3, padding=1, dtype="float64", rng=rng, algorithm="winograd")
    check_backward(layer, rng.standard_normal((2, 2, 5, 4)))


def test_conv2d_algorithm_errors_and_checkpoint(tmp_path, rng):
    from gpucnn import layers as L
    with pytest.raises(ValueError, match=r"Conv2D: algorithm 'winograd' \(F\(2x2, 3x3\)\) computes 3x3 convolutions "
                                         r"with stride 1; this layer has a 5x5 kernel with stride \(1, 1\): use "
                                         r"algorithm 'gemm'"):
        L.Conv2D(1, 2, 5, algorithm="winograd")
    with pytest.raises(ValueError, match=r"Conv2D: algorithm 'winograd' .* a 3x3 kernel with stride \(2, 2\)"):
        L.Conv2D(1, 2, 3, stride=2, algorithm="winograd")
    with pytest.raises(ValueError, match=r"Conv2D: algorithm must be one of \('gemm', 'winograd', 'direct'\), "
                                         r"got 'fft'"):
        L.Conv2D(1, 2, 3, algorithm="fft")
    layer = L.Conv2D(1, 2, 3)
    layer.algorithm = "fast"            # changed between steps: checked at the next forward
    with pytest.raises(ValueError, match="got 'fast'"):
        layer.forward(np.ones((1, 1, 4, 4), np.float32))
    assert "algorithm" not in L.Conv2D(1, 2, 3).config()    # old checkpoints (no such key) still match
    net = _twin_nets(rng, "winograd", "float32")
    path = net.save(str(tmp_path / "w.npz"))
    back = gpucnn.Sequential.load(path)
    assert [l.algorithm for l in back.layers if isinstance(l, L.Conv2D)] == ["winograd", "winograd"]
    x = rng.standard_normal((2, 2, 8, 10)).astype(np.float32)
    np.testing.assert_array_equal(back.forward(x, training=False), net.forward(x, training=False))


def test_models_use_winograd_only_where_it_applies():
    m = gpucnn.models.alexnet(init="zeros", winograd=True)
    from gpucnn import layers as L
    assert [l.algorithm for l in m.layers if isinstance(l, L.Conv2D)] == ["gemm", "gemm", "winograd", "winograd",
                                                                          "winograd"]
    gpucnn.models.use_winograd(m, on=False)
    assert {l.algorithm for l in m.layers if isinstance(l, L.Conv2D)} == {"gemm"}


@pytest.mark.sim
def test_sim_winograd_net_train_step_matches_cpu(rng):
    from gpucnn.losses import SoftmaxCrossEntropy
    seed = int(rng.integers(2 ** 31))
    x = rng.standard_normal((2, 2, 8, 10)).astype(np.float32)
    y = rng.integers(0, 5, 2)
    results = []
    for cpu in (False, True):
        net = _twin_nets(np.random.default_rng(seed), "winograd", "float32")
        opt = gpucnn.optim.SGD(net, lr=0.1)
        if cpu:
            with backend.cpu_path():
                loss = net.train_step(x, y, SoftmaxCrossEntropy(), opt)
        else:
            loss = net.train_step(x, y, SoftmaxCrossEntropy(), opt)
        results.append((float(loss), [backend.to_numpy(v).copy() for l in net.layers for v in l.params.values()]))
    assert abs(results[0][0] - results[1][0]) <= 1e-5 * abs(results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b, "float32", "parameters after a step, sim vs CPU")
