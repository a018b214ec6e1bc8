"""Activations: finite differences, the CPU path against PyTorch, the GPU path ("sim") against the CPU."""
import numpy as np
import pytest

from gpucnn import backend, layers as L
from gpucnn.kernels import activation as K
from gpucnn.testing import check_backward
from conftest import assert_close

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
