"""Activations: finite differences, the CPU path against PyTorch, the GPU path ("sim") against the CPU."""
import math

import numpy as np
import pytest

from gpucnn import backend, layers as L, optim
from gpucnn.backend import gpu_device
from gpucnn.kernels import activation as K
from gpucnn.kernels.activations import Activation, register
from gpucnn.layers.base import Act
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.model import Sequential
from gpucnn.testing import check_backward
from conftest import assert_close
from test_fusion import Whole, run_pass

LAYERS = [L.ReLU, lambda: L.LeakyReLU(0.1), L.Tanh, L.Sigmoid]


@pytest.mark.parametrize("make", LAYERS)
def test_check_backward(make, rng):
    check_backward(make(), rng.standard_normal((2, 3, 4, 5)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_against_torch(dtype, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 4, 5)).astype(dtype) * 3
    gy = rng.standard_normal(x.shape).astype(dtype)
    refs = [torch.relu, lambda t: torch.nn.functional.leaky_relu(t, 0.1), torch.tanh, torch.sigmoid]
    for make, ref in zip(LAYERS, refs):
        layer = make()
        y = layer.forward(x)
        gx = layer.backward(gy)
        t = torch.tensor(x, requires_grad=True)
        ty = ref(t)
        ty.backward(torch.tensor(gy))
        assert y.dtype == np.dtype(dtype)
        assert_close(y, ty.detach().numpy(), dtype, f"{layer.name} forward")
        assert_close(gx, t.grad.numpy(), dtype, f"{layer.name} backward")


def test_sigmoid_extreme_inputs_are_finite():
    y = L.Sigmoid().forward(np.array([-1e4, 0.0, 1e4], np.float32))
    assert np.all(np.isfinite(y)) and y[0] == 0 and y[2] == 1


def test_bias_activation_cpu(rng):
    y = rng.standard_normal((2, 3, 4, 4))
    b = rng.standard_normal(3)
    out = K.bias_activation(y.copy(), b, "tanh")
    assert_close(out, np.tanh(y + b[None, :, None, None]), "float64", "bias+tanh")


def test_errors():
    with pytest.raises(TypeError, match="ReLU: expected a float input"):
        L.ReLU().forward(np.ones((2, 2), np.uint8))
    with pytest.raises(RuntimeError, match="Tanh: backward called before forward"):
        L.Tanh().backward(np.ones(3))
    with pytest.raises(ValueError, match="expected one of"):
        K.activation_forward("swish", np.ones(3))


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_sim_matches_cpu(kind, dtype, rng):
    x = (rng.standard_normal((2, 3, 5)) * 3).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    y = K.activation_forward(kind, x, 0.1)
    gx = K.activation_backward(kind, x, y, gy, 0.1)
    with backend.cpu_path():
        y_ref = K.activation_forward(kind, x, 0.1)
        gx_ref = K.activation_backward(kind, x, y_ref, gy, 0.1)
    assert_close(y, y_ref, dtype, f"{kind} forward")
    assert_close(gx, gx_ref, dtype, f"{kind} backward")


@pytest.mark.sim
@pytest.mark.parametrize("kind", K.KINDS)
def test_sim_bias_activation(kind, rng):
    y = rng.standard_normal((2, 3, 2, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    out = K.bias_activation(y.copy(), b, kind, 0.1)
    with backend.cpu_path():
        ref = K.bias_activation(y.copy(), b, kind, 0.1)
    assert_close(out, ref, "float32", f"bias+{kind}")


@pytest.mark.sim
@pytest.mark.parametrize("layout", ["same", "gemm"])
def test_sim_bias_gradient_over_many_blocks_is_deterministic(layout, rng):
    """The bias gradient of a channel is summed by several blocks, each a chunk, their partial sums added by the
    channel's last block (gpucnn.kernels.reduce): the CPU's sums within rounding, the same bits every run, and the
    ticket counters back at zero after each launch."""
    from gpucnn.kernels import reduce
    from gpucnn.profile import record_launches
    gy = rng.standard_normal((3, 4, 20)).astype(np.float32)
    y = np.tanh(rng.standard_normal(gy.shape)).astype(np.float32)
    with record_launches() as log:
        runs = [K.activation_bias_backward(gy, y, "tanh", layout=layout) for _ in range(2)]
    assert [r.blocks for r in log] == [8, 8]            # 4 channels, 2 blocks each
    assert not reduce.tickets(8, gy).any()
    with backend.cpu_path():
        gz_ref, gb_ref = K.activation_bias_backward(gy, y, "tanh", layout=layout)
    assert np.array_equal(runs[0][1], runs[1][1]) and np.array_equal(runs[0][0], runs[1][0])
    assert_close(runs[0][0], gz_ref, "float32", "gz")
    assert_close(runs[0][1], gb_ref, "float32", "gb")


# ------------------------------------------------------------------------------------------------ a new activation
# Softplus, log(1 + exp(x)), written once: its C for the ElementwiseKernels, its Numba device functions for the
# fused kernels, its NumPy functions for the CPU. Its derivative is sigmoid(x) = 1 - exp(-y), read from the output.

@gpu_device
def _softplus(v, slope, zero, one):
    return max(v, zero) + math.log1p(math.exp(-abs(v)))      # exp(-|v|) <= 1: never overflows


@gpu_device
def _softplus_grad(g, y, slope, zero, one):
    return g * -math.expm1(-y)


def _softplus_np(x, slope, out):
    e = np.exp(-np.abs(x))
    np.log1p(e, out=e)
    return np.add(np.maximum(x, 0, out=out), e, out=out)


def _softplus_grad_np(g, y, slope, out):
    d = np.expm1(-y)
    np.negative(d, out=d)
    return np.multiply(g, d, out=out)


register(Activation("softplus", "fmax(v, T(0)) + log1p(exp(-fabs(v)))", "g * -expm1(-v)", "y",
                    _softplus, _softplus_grad, _softplus_np, _softplus_grad_np))
SOFTPLUS_INPUT = (2, 6, 7)


def softplus_net(dtype="float64", seed=0):
    """conv -> softplus -> max pool -> dense -> softplus -> dense: both of gpucnn's fused epilogues."""
    rng = np.random.default_rng(seed)
    return [L.Conv2D(2, 3, 3, padding=1, dtype=dtype, rng=rng), L.ActivationLayer("softplus"), L.MaxPool2D(2),
            L.Flatten(), L.Dense(27, 4, dtype=dtype, rng=rng), L.ActivationLayer("softplus"),
            L.Dense(4, 3, dtype=dtype, rng=rng)]


@pytest.fixture
def planner_asks_the_layer():
    """gpucnn.step's planner asks the layer what it would fuse as (layer.epilogue()): nothing to patch any more."""
    assert L.ActivationLayer("softplus").epilogue() == Act("softplus", 0.0)


def softplus_model(fuse, dtype="float64"):
    model = Sequential(softplus_net(dtype), input_shape=SOFTPLUS_INPUT, fuse=fuse)
    plan = [len(st.layers) for st in model.stages]
    assert plan == ([3, 1, 2, 1] if fuse else [1] * 7), plan
    return model


def softplus_batch(rng, n=2):
    x = rng.standard_normal((n,) + SOFTPLUS_INPUT)
    x += np.arange(x.size).reshape(x.shape) * 1e-3     # no near-ties for a window's maximum
    return x, rng.integers(0, 3, n)


def test_a_new_activation_is_one_record(rng):
    x = rng.standard_normal((2, 3, 4, 5)) * 3
    x.flat[:2] = [-1e4, 1e4]
    layer = L.ActivationLayer("softplus")
    assert layer.keeps == "y" and layer.fusable() and layer.config() == {"kind": "softplus", "slope": 0.0}
    assert_close(layer.forward(x), np.logaddexp(0, x), "float64", "softplus forward")
    check_backward(L.ActivationLayer("softplus"), rng.standard_normal((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="expected one of"):
        L.ActivationLayer("swish")


@pytest.mark.parametrize("fuse", [True, False])
def test_a_new_activation_trains_fused_and_unfused(fuse, planner_asks_the_layer, rng):
    x, y = softplus_batch(rng)
    report = check_backward(Whole(softplus_model(fuse)), x, y)
    assert len(report) == 1 + 6
    a, b = run_pass(softplus_model(fuse), x, y), run_pass(softplus_model(not fuse), x, y)
    for k in b:
        assert_close(a[k], b[k], "float64", k)
    models = [softplus_model(f) for f in (fuse, not fuse)]
    opts = [optim.SGD(m, lr=0.1, momentum=0.9) for m in models]
    for _ in range(3):
        values = [float(m.train_step(x, y, SoftmaxCrossEntropy(), o)) for m, o in zip(models, opts)]
        assert values[0] == pytest.approx(values[1], rel=1e-12)


@pytest.mark.sim
@pytest.mark.parametrize("fuse", [True, False])
def test_sim_a_new_activation_trains_fused_and_unfused(fuse, planner_asks_the_layer, rng):
    x, y = softplus_batch(rng, 1)
    whole = Whole(softplus_model(fuse))
    check_backward(whole, x, y)         # the GPU path against finite differences
    for dtype in ("float64", "float32"):
        xd = x.astype(dtype)
        got = run_pass(softplus_model(fuse, dtype), xd, y)
        with backend.cpu_path():
            ref = run_pass(softplus_model(not fuse, dtype), xd, y)
        for k in ref:
            assert_close(got[k], ref[k], dtype, k)
    models = [softplus_model(fuse, "float32"), softplus_model(not fuse, "float32")]
    opts = [optim.SGD(m, lr=0.1) for m in models]
    values = [float(models[0].train_step(x.astype(np.float32), y, SoftmaxCrossEntropy(), opts[0]))]
    with backend.cpu_path():
        values.append(float(models[1].train_step(x.astype(np.float32), y, SoftmaxCrossEntropy(), opts[1])))
    assert values[0] == pytest.approx(values[1], rel=1e-5)


@pytest.mark.sim
def test_sim_registering_recompiles_the_fused_kernels(rng):
    """register() rewrites act/act_grad: kernels compiled before it compile again (and under another name in Numba's
    disk cache, whose key cannot see what act calls). Here the table is written again unchanged, as register does."""
    from gpucnn.kernels import activations as A
    z = rng.standard_normal((3, 2, 2, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    before = K.bias_activation_nchw(z.copy(), b, "softplus")
    name = K._bias_act_nchw_kernel.fn.__qualname__
    assert K._bias_act_nchw_kernel._jitted is not None
    A._generate_dispatch()
    assert K._bias_act_nchw_kernel._jitted is None and K.act is A.act
    assert name.startswith("_bias_act_nchw_kernel__") and K._bias_act_nchw_kernel.fn.__qualname__ == name
    assert np.array_equal(K.bias_activation_nchw(z.copy(), b, "softplus"), before)
