"""Dense and Flatten: finite differences, PyTorch, the GPU path ("sim") against the CPU, errors."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gpucnn import backend, layers as L
from gpucnn.kernels import dense as K
from gpucnn.testing import check_backward
from conftest import assert_close, assert_compiles_for_a_real_gpu


# ------------------------------------------------------------------------------------------------ finite differences
@pytest.mark.parametrize("n, bias", [(4, True), (3, False), (1, True)])
def test_check_backward_dense(n, bias, rng):
    layer = L.Dense(5, 3, bias=bias, rng=rng)
    report = check_backward(layer, rng.standard_normal((n, 5)))
    assert set(report) == ({"x", "weight", "bias"} if bias else {"x", "weight"})
    assert layer.params["weight"].dtype == np.float32         # restored after the float64 check


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (3, 4), (1, 2, 3)])
def test_check_backward_flatten(shape, rng):
    report = check_backward(L.Flatten(), rng.standard_normal(shape))
    assert report["x"]["max_rel_error"] < 1e-6


# ------------------------------------------------------------------------------------------------ PyTorch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
def test_against_torch(dtype, bias, rng):
    torch = pytest.importorskip("torch")
    layer = L.Dense(7, 4, bias=bias, dtype=dtype, rng=rng)
    x = rng.standard_normal((6, 7)).astype(dtype)
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = layer.backward(gy)
    t = torch.tensor(x, requires_grad=True)
    w = torch.tensor(layer.params["weight"], requires_grad=True)
    b = torch.tensor(layer.params["bias"], requires_grad=True) if bias else None
    ty = torch.nn.functional.linear(t, w, b)
    ty.backward(torch.tensor(gy))
    assert y.dtype == gx.dtype == layer.grads["weight"].dtype == np.dtype(dtype)
    assert_close(y, ty.detach().numpy(), dtype, "forward")
    assert_close(gx, t.grad.numpy(), dtype, "gx")
    assert_close(layer.grads["weight"], w.grad.numpy(), dtype, "gw")
    if bias:
        assert_close(layer.grads["bias"], b.grad.numpy(), dtype, "gb")


@pytest.mark.parametrize("activation", ["relu", "tanh", "identity"])
def test_fused_activation_against_torch(activation, rng):
    torch = pytest.importorskip("torch")
    act = {"relu": torch.relu, "tanh": torch.tanh, "identity": lambda t: t}[activation]
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in [(5, 6), (3, 6), (3,)])
    tx, tw, tb = map(torch.tensor, (x, w, b))
    F = torch.nn.functional
    assert_close(K.dense_forward(x, w, b, activation), act(F.linear(tx, tw, tb)).numpy(), "float32",
                 f"dense+{activation}")
    assert_close(K.dense_forward(x, w, None, activation), act(F.linear(tx, tw)).numpy(), "float32",
                 f"dense+{activation} without bias")


def test_backward_skips_what_is_not_needed(rng):
    x, w, gy = (rng.standard_normal(s) for s in [(4, 5), (3, 5), (4, 3)])
    gx, gw, gb = K.dense_backward(x, w, gy, need_gx=False, need_gb=False)
    assert gx is None and gb is None
    assert_close(gw, gy.T @ x, "float64", "gw")


# ------------------------------------------------------------------------------------------------ layer contract
def test_init_is_pytorch_default_and_reproducible():
    a = L.Dense(400, 120, rng=np.random.default_rng(3))
    b = L.Dense(400, 120, rng=np.random.default_rng(3))
    bound = 1 / math.sqrt(400)
    for name in ("weight", "bias"):
        assert np.array_equal(a.params[name], b.params[name])
        assert np.abs(a.params[name]).max() <= bound and np.abs(a.params[name]).max() > 0.9 * bound
    assert a.params["weight"].shape == (120, 400) and a.params["bias"].shape == (120,)
    assert a.params["weight"].dtype == np.float32 and a.num_params() == 400 * 120 + 120
    assert L.Dense(4, 2, dtype="float64").params["weight"].dtype == np.float64


def test_config_rebuilds_the_layer():
    for layer in (L.Dense(8, 3), L.Dense(8, 3, bias=False, dtype="float64", init="he"), L.Flatten()):
        cfg = json.loads(json.dumps(layer.config()))
        again = L.LAYER_TYPES[layer.name](**cfg)
        assert again.config() == cfg
        assert {k: v.shape for k, v in again.params.items()} == {k: v.shape for k, v in layer.params.items()}
    assert "bias" not in L.Dense(8, 3, bias=False).params


def test_backward_overwrites_grads(rng):
    layer = L.Dense(3, 2, rng=rng)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    gy = rng.standard_normal((4, 2)).astype(np.float32)
    layer.forward(x)
    layer.backward(gy)
    first = layer.grads["weight"].copy()
    layer.backward(gy)
    assert_close(layer.grads["weight"], first, "float32", "second backward")


def test_flatten_is_a_view_and_round_trips(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    f = L.Flatten()
    y = f.forward(x)
    assert y.shape == (2, 60) and np.shares_memory(y, x)
    assert np.array_equal(y[1], x[1].ravel())
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = f.backward(gy)
    assert gx.shape == x.shape and np.array_equal(gx.reshape(2, -1), gy)
    y_t = f.forward(x.transpose(0, 1, 3, 2))                 # not contiguous: reshape copies, values right
    assert np.array_equal(y_t[0], x[0].transpose(0, 2, 1).ravel())


@settings(deadline=None, max_examples=40)
@given(dims=st.lists(st.integers(1, 4), min_size=1, max_size=3), n=st.integers(1, 3), out=st.integers(1, 4))
def test_output_shapes_match_forward(dims, n, out):
    x = np.ones((n, *dims), np.float32)
    f = L.Flatten()
    h = f.forward(x)
    assert h.shape == (n, *f.output_shape(tuple(dims)))
    d = L.Dense(h.shape[1], out)
    assert d.forward(h).shape == (n, *d.output_shape(h.shape[1:])) == (n, out)


# ------------------------------------------------------------------------------------------------ errors
def test_errors():
    d = L.Dense(4, 2)
    with pytest.raises(ValueError, match=r"Dense: expected a 2-d input \(N, 4\), got shape \(2, 1, 2, 2\); "
                                         r"use Flatten first"):
        d.forward(np.ones((2, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"Dense: expected a 2-d input \(N, 4\), got shape \(4,\); a single sample"):
        d.forward(np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"Dense: expected 4 input features, got 5 \(input shape \(3, 5\)\)"):
        d.forward(np.ones((3, 5), np.float32))
    with pytest.raises(TypeError, match="Dense: input is float64 but the layer's parameters are float32"):
        d.forward(np.ones((3, 4)))
    with pytest.raises(TypeError, match="Dense: expected a float input .* got int64"):
        d.forward(np.ones((3, 4), np.int64))
    with pytest.raises(RuntimeError, match="Dense: backward called before forward"):
        d.backward(np.ones((3, 2), np.float32))
    d.forward(np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"Dense: backward got a gradient of shape \(3, 4\), "
                                         r"expected the forward output's \(3, 2\)"):
        d.backward(np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="Dense: backward got a float64 gradient but the layer is float32"):
        d.backward(np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"Dense: expected an input shape \(4,\), got \(1, 2, 2\); use Flatten first"):
        d.output_shape((1, 2, 2))
    with pytest.raises(ValueError, match=r"Dense: expected 4 input features, got 5"):
        d.output_shape((5,))
    with pytest.raises(ValueError, match="Dense: expected positive integer in_features and out_features, got 0 and 2"):
        L.Dense(0, 2)
    with pytest.raises(TypeError, match="Dense: dtype must be float32 or float64, got int32"):
        L.Dense(2, 2, dtype="int32")
    f = L.Flatten()
    with pytest.raises(ValueError, match=r"Flatten: expected an input \(N, \.\.\.\) with a batch axis and at least "
                                         r"2 dims, got shape \(5,\)"):
        f.forward(np.ones(5, np.float32))
    with pytest.raises(RuntimeError, match="Flatten: backward called before forward"):
        f.backward(np.ones((2, 3), np.float32))
    f.forward(np.ones((2, 3, 2), np.float32))
    with pytest.raises(ValueError, match=r"Flatten: backward got a gradient of shape \(2, 5\), "
                                         r"expected the forward output's \(2, 6\)"):
        f.backward(np.ones((2, 5), np.float32))


# ------------------------------------------------------------------------------------------------ a real GPU's compiler
def test_bias_grad_kernel_compiles_for_a_real_gpu_in_the_input_dtype():
    """As in test_pool: the simulator would accept what a GPU cannot compile; lower it for a real one."""
    assert_compiles_for_a_real_gpu("""
        import gpucnn.kernels.dense as D
        D.cuda = cuda
        f32, a2 = types.float32, types.Array(types.float32, 2, "C")
        # (gy, y, gz, gb, partials, tickets, kind, slope, write_gz): the bias gradient fused with the activation's
        # backward, over many blocks (gpucnn.kernels.reduce)
        sigs = {D._bias_grad_kernel: (a2, a2, a2, types.Array(f32, 1, "C"), a2, types.Array(types.int32, 1, "C"),
                                      types.int64, f32, types.boolean)}
    """, timeout=300)


# ------------------------------------------------------------------------------------------------ GPU path, simulated
@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_sim_forward_matches_cpu(activation, dtype, rng):
    x, w, b = (rng.standard_normal(s).astype(dtype) for s in [(3, 5), (4, 5), (4,)])
    for bias in (b, None):
        y = K.dense_forward(x, w, bias, activation)
        with backend.cpu_path():
            y_ref = K.dense_forward(x, w, bias, activation)
        assert y.dtype == np.dtype(dtype)
        assert_close(y, y_ref, dtype, f"dense forward, {activation}, bias={bias is not None}")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, out", [(3, 4), (1, 130), (9, 70)])    # 130 features: 5 tiles of 32; 9 rows: 2 chunks
def test_sim_backward_matches_cpu(n, out, dtype, rng):
    x, w, gy = (rng.standard_normal(s).astype(dtype) for s in [(n, 5), (out, 5), (n, out)])
    got = K.dense_backward(x, w, gy)
    with backend.cpu_path():
        ref = K.dense_backward(x, w, gy)
    for g, r, what in zip(got, ref, ("gx", "gw", "gb")):
        assert g.dtype == np.dtype(dtype), what
        assert_close(g, r, dtype, what)


@pytest.mark.sim
def test_sim_layer(rng):
    layer = L.Dense(6, 3, rng=rng)
    x = rng.standard_normal((2, 2, 3)).astype(np.float32)
    f = L.Flatten()
    y = layer.forward(f.forward(x))
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = f.backward(layer.backward(gy))
    grads = dict(layer.grads)
    with backend.cpu_path():
        y_ref = layer.forward(f.forward(x))
        gx_ref = f.backward(layer.backward(gy))
    assert_close(y, y_ref, "float32", "forward")
    assert_close(gx, gx_ref, "float32", "gx")
    for k in grads:
        assert_close(grads[k], layer.grads[k], "float32", k)
