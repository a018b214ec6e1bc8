"""The direct convolution (algorithm "direct", gpucnn/kernels/direct.py): against PyTorch's conv2d and autograd,
finite differences, what it saves, its errors, its launch sizes, a real GPU's compiler, and the GPU path ("sim")
against the CPU and PyTorch, alone, in a layer, and training LeNet-5 beside im2col + GEMM."""
import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, models
from gpucnn.kernels import conv as K
from gpucnn.kernels import direct as D
from gpucnn.kernels import reduce
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.testing import check_backward
from conftest import assert_compiles_for_a_real_gpu
from conv_helpers import assert_close, assert_sim_layer_matches_cpu

torch = pytest.importorskip("torch")

# (N, C, H, W, Cout, kernel, stride, padding, groups): LeNet's two kinds, groups, strides, padding per axis,
# non-square kernels, a kernel larger than its stride (AlexNet c1's kind) and a stride larger than its kernel
SHAPES = {
    "LeNet c1 kind: one channel, 6 outputs, padding 2": (3, 1, 8, 8, 6, 5, 1, 2, 1),
    "LeNet c3 kind: 6 channels, 16 outputs": (2, 6, 7, 7, 16, 5, 1, 0, 1),
    "groups 2, stride 2, padding 1": (2, 4, 7, 6, 6, 3, 2, 1, 2),
    "non-square kernel, per-axis stride and padding": (2, 3, 6, 9, 5, (2, 3), (1, 2), (1, 0), 1),
    "11x11 kernel, stride 4, padding 2": (1, 3, 15, 15, 4, 11, 4, 2, 1),
    "1x1 kernel, groups 3": (2, 6, 4, 5, 3, 1, 1, 0, 3),
    "stride larger than the kernel": (2, 2, 9, 9, 3, 2, 3, 1, 1),
}


def inputs(case, dtype, rng):
    """x, w, gz (GEMM layout) of fresh normal numbers in ``dtype``, and (stride, padding, groups)."""
    N, C, H, W, Cout, k, s, p, G = case
    (KH, KW), (SH, SW), (PH, PW) = K._two(k), K._two(s), K._two(p)
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    w = rng.standard_normal((Cout, C // G, KH, KW)).astype(dtype)
    return x, w, rng.standard_normal((Cout, OH, OW, N)).astype(dtype), ((SH, SW), (PH, PW), G)


def direct_pass(x, w, gz, geometry):
    """z, gx, gw by the direct algorithm (forward, then backward on what it saved)."""
    stride, padding, G = geometry
    z, saved = D.DIRECT.forward(x, w, stride, padding, G)
    gx, gw = D.DIRECT.backward(saved, w, gz)
    return z, gx, gw


def torch_pass(x, w, gz, geometry):
    """z (GEMM layout), gx, gw by PyTorch's conv2d and autograd in float64 on the CPU."""
    stride, padding, G = geometry
    tx = torch.tensor(backend.to_numpy(x), dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(backend.to_numpy(w), dtype=torch.float64, requires_grad=True)
    tz = torch.nn.functional.conv2d(tx, tw, None, stride, padding, groups=G)
    tz.backward(torch.tensor(backend.to_numpy(gz).transpose(3, 0, 1, 2), dtype=torch.float64))
    return tz.detach().numpy().transpose(1, 2, 3, 0), tx.grad.numpy(), tw.grad.numpy()


def assert_all_close(got, want, dtype):
    for name, a, b in zip(("z", "gx", "gw"), got, want):
        assert a.dtype == np.dtype(dtype), name
        assert_close(a, b, dtype, name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", SHAPES)
def test_matches_pytorch(case, dtype, rng):
    x, w, gz, geometry = inputs(SHAPES[case], dtype, rng)
    assert_all_close(direct_pass(x, w, gz, geometry), torch_pass(x, w, gz, geometry), dtype)


@pytest.mark.parametrize("kw, shape", [
    (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (2, 2, 5, 4)),
    (dict(in_channels=4, out_channels=2, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2), (1, 4, 6, 5)),
])
def test_finite_differences(kw, shape, rng):
    layer = L.Conv2D(**kw, dtype="float64", rng=rng, algorithm="direct")
    assert set(check_backward(layer, rng.standard_normal(shape))) == {"x", "weight", "bias"}


def test_saves_x_itself_and_lowers_nothing(rng):
    x, w, _, geometry = inputs(SHAPES["groups 2, stride 2, padding 1"], "float64", rng)
    z, saved = D.DIRECT.forward(x, w, *geometry)
    assert saved.lowered is None and saved.x is x and saved.algorithm is D.DIRECT and saved.groups == 2
    assert D.DIRECT.lower(x, 3, 2, 1, 2) is x
    assert saved.relower() is x and saved.x is None          # no copy: x, as forward saw it


def test_each_gradient_alone_into_a_flat_buffer_and_the_inputs_untouched(rng):
    x, w, gz, geometry = inputs(SHAPES["LeNet c3 kind: 6 channels, 16 outputs"], "float64", rng)
    copies = [a.copy() for a in (x, w, gz)]
    _, ref_gx, ref_gw = torch_pass(x, w, gz, geometry)
    _, saved = D.DIRECT.forward(x, w, *geometry)
    gx, gw = D.DIRECT.backward(saved, w, gz, need_gw=False)
    assert gw is None
    assert_close(gx, ref_gx, "float64", "gx alone")
    assert_close(D.DIRECT.grad_input(saved, w, gz), ref_gx, "float64", "grad_input")
    flat = np.full(w.size + 3, np.nan)
    gx, gw = D.DIRECT.backward(saved, w, gz, need_gx=False, gw_out=flat[2:2 + w.size].reshape(w.shape))
    assert gx is None and np.shares_memory(gw, flat) and np.isnan(flat[:2]).all() and np.isnan(flat[-1])
    assert_close(gw, ref_gw, "float64", "gw into a view")
    assert_close(D.DIRECT.grad_weight(saved, gz), ref_gw, "float64", "grad_weight")
    for a, b in zip((x, w, gz), copies):
        np.testing.assert_array_equal(a, b)


def test_conv_transpose_runs_on_it(rng):
    # ConvTranspose2D runs an algorithm's passes the other way round: grad_input forward, forward and grad_weight back
    layer = L.ConvTranspose2D(4, 2, 3, stride=2, padding=1, groups=2, dtype="float64", rng=rng, algorithm="direct")
    x = rng.standard_normal((2, 4, 3, 4))
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape)
    gx = layer.backward(gy)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.params["weight"], requires_grad=True)
    ty = torch.nn.functional.conv_transpose2d(tx, tw, torch.tensor(layer.params["bias"]), 2, 1, groups=2)
    ty.backward(torch.tensor(gy))
    for name, a, b in (("y", y, ty.detach().numpy()), ("gx", gx, tx.grad.numpy()),
                       ("gw", layer.grads["weight"], tw.grad.numpy())):
        assert_close(a, b, "float64", name)


# ------------------------------------------------------------------------------------------ errors

LIMITS = r"kernels of at most 16x16 with strides of at most 16"


def test_supports_and_errors(rng):
    assert D.DIRECT.supports(16, 16) and D.DIRECT.supports((1, 16), (16, 1))
    assert not D.DIRECT.supports(17, 1) and not D.DIRECT.supports((3, 17), 1) and not D.DIRECT.supports(3, (1, 17))
    with pytest.raises(ValueError, match=rf"Conv2D: algorithm 'direct' \(direct convolution\) computes {LIMITS}; "
                                         r"this layer has a 17x17 kernel with stride \(1, 1\): use algorithm 'gemm'"):
        L.Conv2D(1, 2, 17, algorithm="direct")
    with pytest.raises(ValueError, match=r"Conv2D: algorithm 'direct' .* a 3x3 kernel with stride \(1, 17\)"):
        L.Conv2D(1, 2, 3, stride=(1, 17), algorithm="direct")
    with pytest.raises(ValueError, match=r"Conv2D: algorithm must be one of \('gemm', 'winograd', 'direct'\)"):
        L.Conv2D(1, 2, 3, algorithm="fft")
    x = rng.standard_normal((1, 4, 20, 20))
    with pytest.raises(ValueError, match=rf"direct: computes {LIMITS}, got a 17x17 kernel with stride \(1, 1\)"):
        D.DIRECT.forward(x, rng.standard_normal((2, 4, 17, 17)), 1, 0)
    with pytest.raises(ValueError, match=r"direct: with 2 group\(s\) expected weights \(Cout, C/G, KH, KW\) = "
                                         r"\(a multiple of 2, 2, KH, KW\) for 4 input channels, got \(2, 4, 3, 3\)"):
        D.DIRECT.forward(x, rng.standard_normal((2, 4, 3, 3)), 1, 0, groups=2)
    with pytest.raises(ValueError, match=r"conv: kernel 5 is larger than the padded input 3 \+ 2\*0"):
        D.DIRECT.forward(rng.standard_normal((1, 1, 3, 8)), rng.standard_normal((2, 1, 5, 5)), 1, 0)


# ------------------------------------------------------------------------------------------ launch sizes

# (N, C, H, W, Cout, kernel, stride, padding): LeNet-5's convolutions at the batches gpucnn runs them (a fit's last
# batch of 44, predict_proba's 100), AlexNet's (gpucnn's, one tower) at 128
GRID_SHAPES = [(n, 1, 28, 28, 6, 5, 1, 2) for n in (1, 44, 100, 256, 1024)] + \
              [(n, 6, 14, 14, 16, 5, 1, 0) for n in (1, 44, 100, 256, 1024)] + \
              [(128, 3, 224, 224, 96, 11, 4, 2), (128, 96, 27, 27, 256, 5, 1, 2), (128, 256, 13, 13, 384, 3, 1, 1),
               (128, 384, 13, 13, 384, 3, 1, 1), (128, 384, 13, 13, 256, 3, 1, 1)]


@pytest.mark.parametrize("itemsize", [4, 8])
@pytest.mark.parametrize("shape", GRID_SHAPES, ids=str)
def test_grid_fits_shared_memory_and_fills_the_gpu(shape, itemsize):
    N, C, H, W, Cout, k, s, p = shape
    OH, OW = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    g = D.grid((N, C, H, W), (Cout, C, k, k), OH, OW, s, s, itemsize)     # as "cuda" sizes it (this is "cpu")
    TOW, R = g.CG * D.PPT, (g.TOH - 1) * s + k
    assert g.shared_bytes == (D.OPT * k * k + g.TN * ((R * ((TOW - 1) * s + k)) | 1)) * itemsize <= K.SHARED_LIMIT
    assert g.threads % 32 == 0 and g.TN * g.TOH * g.CG <= g.threads <= 256
    assert g.blocks == -(-Cout // D.OPT) * -(-OH // g.TOH) * -(-OW // TOW) * -(-N // g.TN)
    assert reduce.fills(max(N * C * H * W, Cout * OH * OW * N), g.blocks, g.threads)
    assert 1 <= g.TN <= D.TN_MAX and N - (-(-N // g.TN) - 1) * g.TN > 0    # no empty tile of images


def test_lenet_grids():
    # LeNet-5 at batch 256: c1 448 blocks of 224 threads (32 images x 7 groups of 4 columns), 21,008 B; c3 320 of 96
    assert D.grid((256, 1, 28, 28), (6, 1, 5, 5), 28, 28, 1, 1, 4) == (32, 1, 7, 448, 224, 21008)
    assert D.grid((256, 6, 14, 14), (16, 6, 5, 5), 10, 10, 1, 1, 4) == (32, 1, 3, 320, 96, 10768)
    assert D.grid((100, 1, 28, 28), (6, 1, 5, 5), 28, 28, 1, 1, 4).TN == 25       # 4 tiles of 25, not 32+32+32+4


def test_kernel_compiles_for_a_real_gpu_in_float32():
    assert_compiles_for_a_real_gpu("""
        import gpucnn.kernels.direct as D
        D.cuda = cuda
        a = types.Array(types.float32, 4, "C")
        sigs = {D._direct_forward_kernel: (a, a, a) + (types.int64,) * 7}
    """)


# ------------------------------------------------------------------------------------------ GPU path on "sim"
# Small shapes: each simulated thread is a Python thread. Together they cover a last tile of images (5 = 3 + 2 on
# "sim"), of output channels (6 = 4 + 2; 16 = 4 x 4), of rows (TOH > 1) and of columns (OW not a multiple of 4).
SIM_SHAPES = {
    "LeNet c1 kind": (2, 1, 6, 7, 6, 5, 1, 2, 1),
    "LeNet c3 kind, 5 images": (5, 3, 6, 6, 16, 3, 1, 0, 1),
    "groups 2, stride 2, padding 1": (2, 4, 7, 6, 6, 3, 2, 1, 2),
    "non-square kernel, per-axis stride and padding": (1, 2, 5, 9, 3, (2, 3), (1, 2), (1, 0), 1),
}


@pytest.mark.sim
@pytest.mark.parametrize("case, dtype", [(c, d) for c in SIM_SHAPES for d in ("float32", "float64")])
def test_sim_matches_cpu_and_pytorch(case, dtype, rng):
    x, w, gz, geometry = inputs(SIM_SHAPES[case], dtype, rng)
    with gpucnn.profile() as p:                         # (the GPU path: NumPy arrays on "sim")
        got = direct_pass(x, w, gz, geometry)
    assert p.counts["direct"]["numba"] == 1           # forward: one kernel, no im2col
    with backend.cpu_path():
        cpu = direct_pass(x, w, gz, geometry)
    assert_all_close(got, cpu, dtype)
    assert_all_close(got, torch_pass(x, w, gz, geometry), dtype)


@pytest.mark.sim
def test_sim_forward_is_one_launch_and_backward_is_gemms(rng):
    x, w, gz, geometry = inputs(SIM_SHAPES["groups 2, stride 2, padding 1"], "float32", rng)
    with gpucnn.profile() as fwd:
        _, saved = D.DIRECT.forward(x, w, *geometry)
    with gpucnn.profile() as bwd:
        D.DIRECT.backward(saved, w, gz)
    assert fwd.launches == fwd.counts["direct"]["numba"] == 1 and fwd.bytes_allocated == 4 * gz.size    # z alone
    assert "direct" not in bwd.counts and bwd.counts["conv"]["numba"] == 2     # im2col, col2im; GEMMs per group


@pytest.mark.sim
@pytest.mark.parametrize("need_gx", [True, False])
def test_sim_layer_matches_cpu(need_gx, rng):
    layer = L.Conv2D(3, 5, (3, 2), stride=(2, 1), padding=1, groups=1, rng=rng, algorithm="direct")
    assert_sim_layer_matches_cpu(layer, (3, 3, 7, 6), need_gx, rng)


@pytest.mark.sim
def test_sim_errors_same_as_cpu(rng):
    x = rng.standard_normal((1, 4, 20, 20)).astype(np.float32)
    for w, groups in ((rng.standard_normal((2, 4, 17, 17)), 1), (rng.standard_normal((2, 4, 3, 3)), 2)):
        with pytest.raises(ValueError) as gpu:
            D.DIRECT.forward(x, w.astype(np.float32), 1, 0, groups)
        with backend.cpu_path():
            with pytest.raises(ValueError) as cpu:
                D.DIRECT.forward(x, w.astype(np.float32), 1, 0, groups)
        assert str(gpu.value) == str(cpu.value) and str(gpu.value).startswith("direct: ")


def _lenet5(seed, algorithm):
    model = models.lenet5(seed=seed)
    for layer in model.layers:
        if isinstance(layer, L.Conv2D):
            layer.algorithm = algorithm
    return model


@pytest.mark.sim
def test_sim_lenet5_trains_as_with_gemm(rng):
    # 3 SGD-momentum steps of LeNet-5 (the second and third in the workspace's planned memory, where a buffer ended
    # too early shows; CI runs this with GPUCNN_POISON=1) by "direct" and by "gemm": equal within float32 rounding
    seed = int(rng.integers(2 ** 31))
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 2)
    results, launches = {}, {}
    for algorithm in ("direct", "gemm"):
        model = _lenet5(seed, algorithm)
        opt = gpucnn.optim.SGD(model, lr=0.1, momentum=0.9)
        with gpucnn.profile() as p:
            losses = [float(model.train_step(x, y, SoftmaxCrossEntropy(), opt, graph=False)) for _ in range(3)]
        results[algorithm] = losses, [backend.to_numpy(v).copy() for l in model.layers for v in l.params.values()]
        launches[algorithm] = p.counts["direct"]["numba"]
    assert launches == {"direct": 6, "gemm": 0}         # both convolutions' forward, 3 steps
    np.testing.assert_allclose(results["direct"][0], results["gemm"][0], rtol=1e-5)
    assert results["direct"][0][2] < results["direct"][0][0]
    for a, b in zip(results["direct"][1], results["gemm"][1]):
        assert_close(a, b, "float32", "parameters after 3 steps, direct vs gemm")
