"""LocalResponseNorm and BatchNorm2D: finite differences, the CPU path against PyTorch, the GPU path
("sim") against the CPU, and the errors."""
import numpy as np
import pytest

from gpucnn import backend, layers as L
from gpucnn.kernels import norm as K
from gpucnn.testing import check_backward
from conftest import assert_close

# alpha large enough that the normalisation term matters in the gradient, k away from 1
LRN_ARGS = dict(alpha=0.5, beta=0.75, k=1.5)


def _bn(C, rng, dtype="float32", **kw):
    """A BatchNorm2D with random gamma/beta and running statistics, so that none of them is trivial."""
    layer = L.BatchNorm2D(C, dtype=dtype, **kw)
    layer.params["gamma"][...] = rng.standard_normal(C) + 1
    layer.params["beta"][...] = rng.standard_normal(C)
    layer.buffers["running_mean"][...] = rng.standard_normal(C)
    layer.buffers["running_var"][...] = rng.random(C) + 0.5
    return layer


# ---------------------------------------------------------------------------- finite differences
@pytest.mark.parametrize("shape, size", [
    ((2, 7, 3, 4), 5),     # windows clipped at both edges and whole in the middle
    ((2, 3, 2, 3), 5),     # C smaller than size: every window clipped
    ((2, 1, 3, 3), 5),     # C = 1: the window is the channel itself
    ((2, 6, 2, 3), 4),     # even size: the window reaches 2 channels back, 1 forward
    ((1, 4, 2, 2), 2),
    ((2, 3, 2, 2), 1),
])
def test_lrn_check_backward(shape, size, rng):
    check_backward(L.LocalResponseNorm(size, **LRN_ARGS), rng.standard_normal(shape) * 2)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 2, 1, 1), (1, 3, 2, 1)])
def test_batchnorm_check_backward(shape, training, rng):
    layer = _bn(shape[1], rng)
    report = check_backward(layer, rng.standard_normal(shape) * 3 + 1, training=training)
    assert set(report) == {"x", "gamma", "beta"}


def test_batchnorm_keeps_its_dtype_after_check_backward(rng):
    layer = _bn(3, rng)
    check_backward(layer, rng.standard_normal((2, 3, 2, 2)))
    y = layer.forward(rng.standard_normal((2, 3, 2, 2)).astype(np.float32))
    assert y.dtype == np.float32 and layer.buffers["running_var"].dtype == np.float32


# ---------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("C, size", [(8, 5), (6, 4), (3, 5), (5, 3)])
def test_lrn_against_torch(C, size, dtype, rng):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal((3, C, 4, 5)) * 3).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    layer = L.LocalResponseNorm(size, **LRN_ARGS)
    y = layer.forward(x)
    gx = layer.backward(gy)
    t = torch.tensor(x, requires_grad=True)
    # PyTorch divides alpha by size: its alpha * size is our alpha
    ty = torch.nn.functional.local_response_norm(t, size, alpha=LRN_ARGS["alpha"] * size,
                                                 beta=LRN_ARGS["beta"], k=LRN_ARGS["k"])
    ty.backward(torch.tensor(gy))
    assert y.dtype == gx.dtype == np.dtype(dtype)
    assert_close(y, ty.detach().numpy(), dtype, "LRN forward")
    assert_close(gx, t.grad.numpy(), dtype, "LRN backward")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batchnorm_against_torch(dtype, rng):
    torch = pytest.importorskip("torch")
    C = 4
    layer = L.BatchNorm2D(C, eps=1e-3, momentum=0.2, dtype=dtype)
    ref = torch.nn.BatchNorm2d(C, eps=1e-3, momentum=0.2, dtype=getattr(torch, dtype))
    gamma, beta = rng.standard_normal(C) + 1, rng.standard_normal(C)
    layer.params["gamma"][...] = gamma
    layer.params["beta"][...] = beta
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(gamma))
        ref.bias.copy_(torch.tensor(beta))

    def step(training):
        x = (rng.standard_normal((3, C, 4, 5)) * 2 + rng.standard_normal((1, C, 1, 1))).astype(dtype)
        gy = rng.standard_normal(x.shape).astype(dtype)
        ref.train(training)
        ref.zero_grad()
        t = torch.tensor(x, requires_grad=True)
        ty = ref(t)
        ty.backward(torch.tensor(gy))
        y = layer.forward(x, training=training)
        gx = layer.backward(gy)
        mode = "train" if training else "eval"
        assert y.dtype == gx.dtype == np.dtype(dtype)
        assert_close(y, ty.detach().numpy(), dtype, f"{mode} forward")
        assert_close(gx, t.grad.numpy(), dtype, f"{mode} grad x")
        assert_close(layer.grads["gamma"], ref.weight.grad.numpy(), dtype, f"{mode} grad gamma")
        assert_close(layer.grads["beta"], ref.bias.grad.numpy(), dtype, f"{mode} grad beta")

    for _ in range(4):
        step(training=True)
    assert_close(layer.buffers["running_mean"], ref.running_mean.numpy(), dtype, "running_mean")
    assert_close(layer.buffers["running_var"], ref.running_var.numpy(), dtype, "running_var")
    before = backend.to_numpy(layer.buffers["running_mean"]).copy()
    step(training=False)
    assert np.array_equal(backend.to_numpy(layer.buffers["running_mean"]), before), "eval changed running_mean"


# ---------------------------------------------------------------------------- the layer contract
def test_config_rebuilds_and_output_shape():
    lrn = L.LocalResponseNorm(3, alpha=1e-3, beta=0.5, k=1.0)
    assert L.LocalResponseNorm(**lrn.config()).config() == lrn.config() == \
        {"size": 3, "alpha": 1e-3, "beta": 0.5, "k": 1.0}
    bn = L.BatchNorm2D(6, eps=1e-4, momentum=0.3, dtype="float64")
    assert L.BatchNorm2D(**bn.config()).config() == bn.config()
    assert bn.config()["dtype"] == "float64" and bn.num_params() == 12
    assert lrn.output_shape((5, 7, 9)) == (5, 7, 9)
    assert bn.output_shape((6, 7, 9)) == (6, 7, 9)


def test_batchnorm_initial_state():
    bn = L.BatchNorm2D(3)
    assert np.array_equal(bn.params["gamma"], np.ones(3, np.float32))
    assert np.array_equal(bn.params["beta"], np.zeros(3, np.float32))
    assert np.array_equal(bn.buffers["running_mean"], np.zeros(3, np.float32))
    assert np.array_equal(bn.buffers["running_var"], np.ones(3, np.float32))
    assert all(a.dtype == np.float32 for a in list(bn.params.values()) + list(bn.buffers.values()))


def test_batchnorm_training_output_is_normalised(rng):
    x = (rng.standard_normal((8, 3, 5, 5)) * 4 + 7).astype(np.float32)
    y = L.BatchNorm2D(3).forward(x)
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    assert np.allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-3)


# ---------------------------------------------------------------------------- errors
def test_lrn_errors(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    with pytest.raises(ValueError,
                       match=r"LocalResponseNorm: expected a 4-d input \(N, C, H, W\), got shape \(3, 4, 4\)"):
        L.LocalResponseNorm().forward(x[0])
    with pytest.raises(TypeError, match="LocalResponseNorm: expected a float input"):
        L.LocalResponseNorm().forward(np.ones((2, 3, 4, 4), np.uint8))
    with pytest.raises(RuntimeError, match="LocalResponseNorm: backward called before forward"):
        L.LocalResponseNorm().backward(x)
    with pytest.raises(ValueError, match="LocalResponseNorm: size must be at least 1.*got 0"):
        L.LocalResponseNorm(0)
    with pytest.raises(TypeError, match="LocalResponseNorm: size must be an int.*got 2.5"):
        L.LocalResponseNorm(2.5)
    with pytest.raises(ValueError, match="LocalResponseNorm: k must be > 0.*got 0.0"):
        L.LocalResponseNorm(k=0)
    with pytest.raises(ValueError, match="LocalResponseNorm: alpha must be >= 0, got -1.0"):
        L.LocalResponseNorm(alpha=-1)
    with pytest.raises(TypeError, match="LocalResponseNorm: beta must be a number, got 'x'"):
        L.LocalResponseNorm(beta="x")
    with pytest.raises(ValueError, match=r"LocalResponseNorm: expected a 4-d input .* sample shape \(4, 4\)"):
        L.LocalResponseNorm().output_shape((4, 4))
    layer = L.LocalResponseNorm()
    layer.forward(x)
    with pytest.raises(ValueError, match=r"LocalResponseNorm: backward got a gradient of shape \(2, 3, 4\)"):
        layer.backward(x[:, :, :, 0])


def test_batchnorm_errors(rng):
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    bn = L.BatchNorm2D(3)
    with pytest.raises(ValueError, match=r"BatchNorm2D: expected a 4-d input \(N, C, H, W\), got shape \(2, 3, 16\)"):
        bn.forward(x.reshape(2, 3, 16))
    with pytest.raises(ValueError, match=r"BatchNorm2D: expected 3 input channels, got 4"):
        bn.forward(rng.standard_normal((2, 4, 4, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"BatchNorm2D: expected 3 input channels, got 4 \(sample shape"):
        bn.output_shape((4, 5, 5))
    with pytest.raises(ValueError, match="BatchNorm2D: expected a 4-d input"):
        bn.output_shape((3, 5))
    with pytest.raises(TypeError, match="BatchNorm2D: input is float64 but the layer's parameters are float32"):
        bn.forward(x.astype(np.float64))
    with pytest.raises(RuntimeError, match="BatchNorm2D: backward called before forward"):
        bn.backward(x)
    with pytest.raises(ValueError, match="BatchNorm2D: training needs more than one value per channel"):
        bn.forward(x[:1, :, :1, :1])
    bn.forward(x[:1, :, :1, :1], training=False)       # eval needs no batch statistics
    with pytest.raises(ValueError, match=r"BatchNorm2D: backward got a gradient of shape \(2, 3, 4, 4\)"):
        bn.backward(x)
    with pytest.raises(ValueError, match="BatchNorm2D: eps must be > 0.*got 0.0"):
        L.BatchNorm2D(3, eps=0)
    with pytest.raises(ValueError, match="BatchNorm2D: momentum must be in \\[0, 1\\], got 1.5"):
        L.BatchNorm2D(3, momentum=1.5)
    with pytest.raises(ValueError, match="BatchNorm2D: num_features must be a positive int.*got 0"):
        L.BatchNorm2D(0)
    with pytest.raises(TypeError, match="BatchNorm2D: eps must be a number, got None"):
        L.BatchNorm2D(3, eps=None)


# ---------------------------------------------------------------------------- the GPU path on the simulator
@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("size", [5, 4])
def test_sim_lrn_matches_cpu(size, dtype, rng):
    x = (rng.standard_normal((2, 3, 2, 3)) * 2).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    args = (size, LRN_ARGS["alpha"], LRN_ARGS["beta"], LRN_ARGS["k"])
    y, scale = K.lrn_forward(x, *args)
    gx = K.lrn_backward(x, y, scale, gy, *args)
    with backend.cpu_path():
        y_ref, scale_ref = K.lrn_forward(x, *args)
        gx_ref = K.lrn_backward(x, y_ref, scale_ref, gy, *args)
    assert y.dtype == gx.dtype == scale.dtype == np.dtype(dtype)
    assert_close(scale, scale_ref, dtype, "LRN scale")
    assert_close(y, y_ref, dtype, "LRN forward")
    assert_close(gx, gx_ref, dtype, "LRN backward")


@pytest.mark.sim
def test_sim_batchnorm_statistics_over_blocks_are_stable(rng):
    """Each block's chunk keeps its own sum and squared deviations; the last block combines them (Chan, Golub and
    LeVeque). Values 1e8 away from zero with a spread of 1 (a one-pass sum of squares, 1e16 each, would lose every
    digit of the variance in float64) give NumPy's two-pass statistics, and two runs the same bits."""
    from gpucnn.kernels import reduce
    x = 1e8 + rng.standard_normal((3, 2, 5, 7))
    runs = []
    for _ in range(2):
        stats = [np.zeros(2), np.ones(2)]
        _, (_, inv_std) = K.batchnorm_forward(x, np.ones(2), np.zeros(2), *stats, 0.0, 1.0, True)
        runs.append((inv_std, *stats))
        assert not reduce.tickets(4, x).any()
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    M = x.size // 2
    var = x.var(axis=(0, 2, 3))
    assert_close(runs[0][1], x.mean(axis=(0, 2, 3)), "float64", "mean")
    assert_close(runs[0][2], var * M / (M - 1), "float64", "running (unbiased) variance")
    assert_close(runs[0][0], 1 / np.sqrt(var), "float64", "inv_std")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("block", [None, 4])   # 4 threads a channel: each sums several values first
def test_sim_batchnorm_matches_cpu(training, dtype, block, rng, monkeypatch):
    if block:
        monkeypatch.setattr(K, "_BLOCK", block)
    C = 3
    x = (rng.standard_normal((2, C, 2, 3)) * 2 + 1).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    stats = [rng.standard_normal(C).astype(dtype), (rng.random(C) + 0.5).astype(dtype)]
    stats_ref = [a.copy() for a in stats]
    y, cache = K.batchnorm_forward(x, gamma, beta, *stats, 1e-5, 0.1, training)
    gx, ggamma, gbeta = K.batchnorm_backward(gy, cache, gamma, training)
    with backend.cpu_path():
        y_ref, cache_ref = K.batchnorm_forward(x, gamma, beta, *stats_ref, 1e-5, 0.1, training)
        gx_ref, ggamma_ref, gbeta_ref = K.batchnorm_backward(gy, cache_ref, gamma, training)
    assert y.dtype == gx.dtype == ggamma.dtype == np.dtype(dtype)
    for name, a, b in [("y", y, y_ref), ("xhat", cache[0], cache_ref[0]), ("inv_std", cache[1], cache_ref[1]),
                       ("running_mean", stats[0], stats_ref[0]), ("running_var", stats[1], stats_ref[1]),
                       ("gx", gx, gx_ref), ("ggamma", ggamma, ggamma_ref), ("gbeta", gbeta, gbeta_ref)]:
        assert_close(a, b, dtype, name)
