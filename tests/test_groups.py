"""Grouped convolution (Conv2D(groups=G)): finite differences, PyTorch, one convolution per group, the grouped
lowerings' layouts, errors, checkpoints, AlexNet's two towers, multiply-adds in summary(), and the GPU path
("sim") against the CPU, for both algorithms."""
import json

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, models
from gpucnn.kernels import conv as K
from gpucnn.kernels import mec
from gpucnn.kernels import winograd as WG
from conv_helpers import assert_close, assert_gradients, train_like_torch

torch = pytest.importorskip("torch")
F = torch.nn.functional


# (layer arguments, input shape): groups 2 and 3, stride 2, padding, non-square, and both algorithms
CASES = {
    "groups 2": (dict(in_channels=4, out_channels=6, kernel_size=3, groups=2), (2, 4, 5, 5)),
    "groups 3, stride 2, padding 1": (dict(in_channels=3, out_channels=6, kernel_size=3, stride=2, padding=1,
                                           groups=3), (2, 3, 7, 6)),
    "groups 2, non-square kernel and input, per-axis stride and padding": (
        dict(in_channels=4, out_channels=2, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), groups=2),
        (1, 4, 6, 5)),
    "depthwise (groups = channels), no bias": (dict(in_channels=3, out_channels=3, kernel_size=2, groups=3,
                                                    bias=False), (2, 3, 4, 5)),
    "winograd, groups 2, padding 1": (dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=2,
                                           algorithm="winograd"), (2, 4, 5, 4)),
    "winograd, groups 3, odd sizes": (dict(in_channels=6, out_channels=3, kernel_size=3, padding=(0, 1), groups=3,
                                           algorithm="winograd"), (1, 6, 5, 7)),
}


@pytest.mark.parametrize("case", CASES)
def test_check_backward(case, rng):
    kw, shape = CASES[case]
    assert_gradients(L.Conv2D(**kw, dtype="float64", rng=rng), shape, rng)


def torch_conv(layer, x, gy):
    """y, gx, gw, gb of torch.nn.functional.conv2d with the layer's weights (gb None without a bias)."""
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(backend.to_numpy(layer.params["weight"]), requires_grad=True)
    tb = torch.tensor(backend.to_numpy(layer.params["bias"]), requires_grad=True) if layer.bias else None
    ty = F.conv2d(tx, tw, tb, stride=layer.stride, padding=layer.padding, groups=layer.groups)
    ty.backward(torch.tensor(gy))
    return ty.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), None if tb is None else tb.grad.numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_against_torch(case, dtype, rng):
    kw, shape = CASES[case]
    layer = L.Conv2D(**kw, dtype=dtype, rng=rng)
    assert layer.params["weight"].shape == (kw["out_channels"], kw["in_channels"] // kw["groups"]) + \
        layer.kernel_size
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = layer.backward(gy)
    ty, tgx, tgw, tgb = torch_conv(layer, x, gy)
    assert y.dtype == gx.dtype == layer.grads["weight"].dtype == np.dtype(dtype)
    assert_close(y, ty, dtype, "forward")
    assert_close(gx, tgx, dtype, "gx")
    assert_close(layer.grads["weight"], tgw, dtype, "gw")
    if layer.bias:
        assert_close(layer.grads["bias"], tgb, dtype, "gb")


@pytest.mark.parametrize("algorithm", ["gemm", "winograd", "direct"])
def test_a_grouped_convolution_is_one_convolution_per_group(algorithm, rng):
    G, Cg, Cog = 3, 2, 2
    layer = L.Conv2D(G * Cg, G * Cog, 3, padding=1, groups=G, dtype="float64", rng=rng, algorithm=algorithm)
    x = rng.standard_normal((2, G * Cg, 5, 6))
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape)
    gx = layer.backward(gy)
    for g in range(G):
        c, o = slice(g * Cg, (g + 1) * Cg), slice(g * Cog, (g + 1) * Cog)
        one = L.Conv2D(Cg, Cog, 3, padding=1, dtype="float64", algorithm=algorithm)
        one.params["weight"][...] = layer.params["weight"][o]
        one.params["bias"][...] = layer.params["bias"][o]
        assert_close(y[:, o], one.forward(x[:, c]), "float64", f"group {g}: y")
        assert_close(gx[:, c], one.backward(gy[:, o]), "float64", f"group {g}: gx")
        assert_close(layer.grads["weight"][o], one.grads["weight"], "float64", f"group {g}: gw")


def test_grouped_lowerings_stack_each_groups_own_lowering(rng):
    # MEC: group g's rows g*Hp .. (g+1)*Hp are the lowering of its channels alone; Winograd: its 16 rows of V
    x = rng.standard_normal((2, 6, 5, 4))
    Y = mec.lower(x, 3, 2, 2, 1, 1, 0, groups=3)
    assert Y.shape == (3 * 7, 2, 2, 3, 2)
    V = WG.WINOGRAD.lower(x, 3, 1, 1, groups=3)
    assert V.shape == (3 * 16, 2, 3, 2, 2)
    for g in range(3):
        xg = x[:, 2 * g:2 * g + 2]
        np.testing.assert_array_equal(Y[7 * g:7 * (g + 1)], mec.lower(xg, 3, 2, 2, 1, 1, 0))
        np.testing.assert_array_equal(V[16 * g:16 * (g + 1)], WG.WINOGRAD.lower(xg, 3, 1, 1))
    assert K.group_slices(3, 6, 12) == [(slice(0, 2), slice(0, 4)), (slice(2, 4), slice(4, 8)),
                                        (slice(4, 6), slice(8, 12))]


def test_init_config_and_describe(rng):
    layer = L.Conv2D(6, 4, (3, 2), groups=2, rng=rng)
    w = layer.params["weight"]
    assert w.shape == (4, 3, 3, 2) and layer.num_params() == 4 * 3 * 3 * 2 + 4
    bound = 1 / np.sqrt(3 * 3 * 2)          # fan_in: the (in_channels // groups) * KH * KW inputs one output reads
    assert np.abs(w).max() <= bound and np.abs(w).max() > bound / 2
    config = json.loads(json.dumps(layer.config()))
    assert config["groups"] == 2 and L.Conv2D(**config).config() == config
    assert "groups" not in L.Conv2D(6, 4, 3).config()        # old checkpoints (no such key) still match
    assert L.Conv2D(**{k: v for k, v in config.items() if k != "groups"}).groups == 1
    assert layer.describe() == "Conv2D(groups=2)" and L.Conv2D(6, 4, 3).describe() == "Conv2D"
    assert "groups=2" in repr(layer)


@pytest.mark.parametrize("kw,error,message", [
    (dict(in_channels=4, out_channels=6, groups=4), ValueError,
     r"Conv2D: in_channels \(4\) and out_channels \(6\) must both be divisible by groups \(4\)"),
    (dict(in_channels=3, out_channels=6, groups=2), ValueError,
     r"Conv2D: in_channels \(3\) and out_channels \(6\) must both be divisible by groups \(2\)"),
    (dict(in_channels=4, out_channels=4, groups=0), ValueError, "Conv2D: groups must be positive, got 0"),
    (dict(in_channels=4, out_channels=4, groups=2.0), TypeError, "Conv2D: groups must be an int, got 2.0"),
])
def test_constructor_errors(kw, error, message):
    with pytest.raises(error, match=message):
        L.Conv2D(kernel_size=3, **kw)


def test_input_channel_error_names_all_channels():
    layer = L.Conv2D(4, 2, 3, groups=2)
    with pytest.raises(ValueError, match=r"Conv2D: expected 4 input channels, got 2 \(input shape \(1, 2, 5, 5\)\)"):
        layer.forward(np.ones((1, 2, 5, 5), np.float32))


def _grouped_net(seed, dtype="float64", algorithm="gemm"):
    """Grouped convolutions in a net: fused ReLU + max pool after the first, tanh after the second, then dense."""
    r = np.random.default_rng(seed)
    return gpucnn.Sequential([
        L.Conv2D(2, 4, 3, padding=1, groups=2, dtype=dtype, rng=r, algorithm=algorithm), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(4, 6, 3, padding=(1, 0), groups=2, dtype=dtype, rng=r, algorithm=algorithm), L.Tanh(),
        L.Flatten(), L.Dense(6 * 4 * 3, 5, dtype=dtype, rng=r)], input_shape=(2, 8, 10))


@pytest.mark.parametrize("algorithm", ["gemm", "winograd", "direct"])
def test_grouped_net_trains_as_pytorch(algorithm, rng):
    x = rng.standard_normal((3, 2, 8, 10))
    y = rng.integers(0, 5, 3)
    train_like_torch(_grouped_net(int(rng.integers(2 ** 31)), algorithm=algorithm), x, y)


def test_grouped_net_save_load_round_trip(tmp_path, rng):
    net = _grouped_net(int(rng.integers(2 ** 31)), "float32", "winograd")
    back = gpucnn.Sequential.load(net.save(str(tmp_path / "g.npz")))
    assert [(l.groups, l.algorithm) for l in back.layers if isinstance(l, L.Conv2D)] == [(2, "winograd")] * 2
    x = rng.standard_normal((2, 2, 8, 10)).astype(np.float32)
    np.testing.assert_array_equal(back.predict(x), net.predict(x))


# ------------------------------------------------------------------------------------------ models and summary

def test_alexnet_two_towers():
    m = models.alexnet(init="zeros", groups=2)
    assert m.num_params() == 60_965_224
    assert [l.groups for l in m.layers if isinstance(l, L.Conv2D)] == [1, 2, 1, 2, 2]
    small = models.alexnet_small(init="zeros", groups=2)
    assert [l.groups for l in small.layers if isinstance(l, L.Conv2D)] == [2 if i in (1, 3, 4) else 1
                                                                          for i in range(5)]
    assert small.num_params() == models.alexnet_small(init="zeros").num_params() - (64 * 192 + 384 * 256
                                                                                      + 256 * 256) * 9 // 2


@pytest.mark.parametrize("make,total,grouped", [(lambda: models.lenet5(init="zeros"), 416_520, 0),
                                                (lambda: models.alexnet(init="zeros"), 1_135_256_096, 0),
                                                (lambda: models.alexnet(init="zeros", groups=2), 724_406_816, 3)])
def test_multiply_adds_in_summary(make, total, grouped):
    model = make()
    text = model.summary(file=False)
    assert f"Total multiply-adds: {total:,} per image" in text
    assert text.index("Total multiply-adds") < text.index("Total parameters")
    shapes = [model.input_shape] + model._trace(model.input_shape)[:-1]
    assert sum(l.macs(s) for l, s in zip(model.layers, shapes) if hasattr(l, "macs")) == total
    lines = text.splitlines()
    first_conv = next(l for l in lines if "Conv2D" in l)
    macs = model.layers[0].macs(model.input_shape)
    assert f"{macs:,}" in first_conv and first_conv.rstrip().endswith(f"{model.layers[0].num_params():,}")
    assert sum("Conv2D(groups=2)" in l for l in lines) == grouped


def test_macs_of_each_layer():
    # Conv2D: every weight once per output position; Dense: in * out
    assert L.Conv2D(6, 4, (3, 2), stride=2, groups=2).macs((6, 9, 8)) == 4 * 3 * 3 * 2 * 4 * 4
    assert L.Dense(7, 3).macs((7,)) == 21
    with pytest.raises(ValueError, match="Conv2D: expected 6 input channels, got 5"):
        L.Conv2D(6, 4, 3, groups=2).macs((5, 9, 8))


# ------------------------------------------------------------------------------------------ GPU path on "sim"
# Grouped Conv2D layers and nets on "sim" against the CPU: in test_conv_transpose.py, beside ConvTranspose2D's.

@pytest.mark.sim
def test_sim_errors_same_as_cpu():
    for make in (lambda: L.Conv2D(4, 6, 3, groups=4), lambda: L.Conv2D(4, 4, 3, groups=2).forward(
            np.ones((1, 2, 5, 5), np.float32))):
        with pytest.raises(ValueError) as gpu:
            make()
        with backend.cpu_path():
            with pytest.raises(ValueError) as cpu:
                make()
        assert str(gpu.value) == str(cpu.value) and "Conv2D" in str(gpu.value)
