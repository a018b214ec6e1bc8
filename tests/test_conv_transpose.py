"""ConvTranspose2D: finite differences, PyTorch's conv_transpose2d, the adjoint of Conv2D, the errors, training in
a Sequential (against PyTorch, with an activation after it), fit, summary, save/load, and the GPU path ("sim")
against the CPU, for both algorithms."""
import json

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L
from conv_helpers import (assert_close, assert_gradients, assert_sim_layer_matches_cpu, assert_sim_steps_match_cpu,
                          train_like_torch)
from test_groups import _grouped_net

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (layer arguments, input shape): stride 2, padding, output_padding, groups 2 and 3, non-square, both algorithms
CASES = {
    "plain": (dict(in_channels=2, out_channels=3, kernel_size=3), (2, 2, 4, 3)),
    "stride 2, padding 1, output_padding 1": (dict(in_channels=3, out_channels=2, kernel_size=3, stride=2,
                                                   padding=1, output_padding=1), (2, 3, 4, 5)),
    "per-axis stride, padding, output_padding; non-square kernel": (
        dict(in_channels=2, out_channels=4, kernel_size=(3, 2), stride=(2, 3), padding=(1, 0),
             output_padding=(0, 2)), (1, 2, 3, 4)),
    "stride larger than kernel (gaps)": (dict(in_channels=1, out_channels=2, kernel_size=2, stride=3), (2, 1, 3, 2)),
    "groups 2, stride 2": (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2),
                           (2, 4, 3, 4)),
    "groups 3, no bias": (dict(in_channels=3, out_channels=3, kernel_size=(2, 3), groups=3, bias=False),
                          (2, 3, 3, 3)),
    "winograd, padding 1": (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, algorithm="winograd"),
                            (2, 2, 5, 4)),
    "winograd, groups 2, padding (0, 1)": (dict(in_channels=4, out_channels=2, kernel_size=3, padding=(0, 1),
                                                groups=2, algorithm="winograd"), (1, 4, 3, 5)),
}


@pytest.mark.parametrize("case", CASES)
def test_check_backward(case, rng):
    kw, shape = CASES[case]
    assert_gradients(L.ConvTranspose2D(**kw, dtype="float64", rng=rng), shape, rng)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_against_torch(case, dtype, rng):
    kw, shape = CASES[case]
    layer = L.ConvTranspose2D(**kw, dtype=dtype, rng=rng)
    G = kw.get("groups", 1)
    assert layer.params["weight"].shape == (kw["in_channels"], kw["out_channels"] // G) + layer.kernel_size
    x = rng.standard_normal(shape).astype(dtype)
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = layer.backward(gy)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.params["weight"], requires_grad=True)
    tb = torch.tensor(layer.params["bias"], requires_grad=True) if layer.bias else None
    ty = F.conv_transpose2d(tx, tw, tb, layer.stride, layer.padding, layer.output_padding, groups=G)
    ty.backward(torch.tensor(gy))
    assert y.shape == tuple(ty.shape) == (shape[0],) + layer.output_shape(shape[1:])
    assert y.dtype == gx.dtype == layer.grads["weight"].dtype == np.dtype(dtype)
    assert_close(y, ty.detach().numpy(), dtype, "forward")
    assert_close(gx, tx.grad.numpy(), dtype, "gx")
    assert_close(layer.grads["weight"], tw.grad.numpy(), dtype, "gw")
    if layer.bias:
        assert_close(layer.grads["bias"], tb.grad.numpy(), dtype, "gb")


@pytest.mark.parametrize("groups", [1, 2])
def test_is_the_adjoint_of_conv2d(groups, rng):
    # with the same weights: <conv(x), u> == <x, conv_transpose(u)>, and Conv2D maps its output back to x's size
    conv = L.Conv2D(4, 6, 3, stride=2, padding=1, bias=False, groups=groups, dtype="float64", rng=rng)
    up = L.ConvTranspose2D(6, 4, 3, stride=2, padding=1, output_padding=1, bias=False, groups=groups,
                           dtype="float64")
    up.params["weight"][...] = conv.params["weight"]
    x = rng.standard_normal((2, 4, 8, 6))
    z = conv.forward(x)
    u = rng.standard_normal(z.shape)
    back = up.forward(u)
    assert back.shape == x.shape
    assert np.isclose((z * u).sum(), (x * back).sum(), rtol=1e-12, atol=1e-12)


def test_output_size_formula_and_macs():
    layer = L.ConvTranspose2D(4, 6, (3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2)
    # O = (H - 1)*S - 2P + K + output_padding
    assert layer.output_shape((4, 5, 7)) == (6, (5 - 1) * 2 - 2 + 3 + 1, (7 - 1) * 3 + 2 + 2)
    assert layer.macs((4, 5, 7)) == 4 * 3 * 3 * 2 * 5 * 7          # every weight once per input position
    assert layer.describe() == "ConvTranspose2D(groups=2)"


def test_init_and_config(rng):
    layer = L.ConvTranspose2D(3, 4, 3, stride=2, output_padding=1, groups=1, rng=rng)
    w = layer.params["weight"]
    bound = 1 / np.sqrt(4 * 3 * 3)          # PyTorch's: fan_in = weight.shape[1] * KH * KW = out/groups * K*K
    assert w.shape == (3, 4, 3, 3) and np.abs(w).max() <= bound and np.abs(w).max() > bound / 2
    config = json.loads(json.dumps(layer.config()))
    assert config["output_padding"] == [1, 1] and "groups" not in config
    assert L.ConvTranspose2D(**config).config() == config


@pytest.mark.parametrize("kw,error,message", [
    (dict(stride=2, output_padding=2), ValueError, r"ConvTranspose2D: output_padding must be >= 0 and smaller than "
                                                   r"the stride along each axis, got output_padding \(2, 2\) with "
                                                   r"stride \(2, 2\)"),
    (dict(output_padding=(0, 1)), ValueError, r"output_padding \(0, 1\) with stride \(1, 1\)"),
    (dict(stride=2, output_padding=-1), ValueError, r"output_padding \(-1, -1\) with stride \(2, 2\)"),
    (dict(output_padding=0.5), TypeError, "ConvTranspose2D: output_padding must be an int or a pair of ints"),
    (dict(groups=3), ValueError, r"ConvTranspose2D: in_channels \(4\) and out_channels \(6\) must both be "
                                 r"divisible by groups \(3\)"),
    (dict(stride=2, algorithm="winograd"), ValueError, r"ConvTranspose2D: algorithm 'winograd' \(F\(2x2, 3x3\)\) "
                                                       r"computes 3x3 convolutions with stride 1"),
    (dict(padding=-1), ValueError, r"ConvTranspose2D: padding must be zero or positive, got -1"),
])
def test_constructor_errors(kw, error, message):
    with pytest.raises(error, match=message):
        L.ConvTranspose2D(4, 6, 3, **kw)


def _errors():
    """(call, error type): every bad input of a ConvTranspose2D, for the CPU test and the sim comparison."""
    layer = L.ConvTranspose2D(2, 3, 3, padding=2)
    return [
        (lambda: layer.forward(np.ones((1, 3, 4, 4), np.float32)), ValueError,
         r"ConvTranspose2D: expected 2 input channels, got 3 \(input shape \(1, 3, 4, 4\)\)"),
        (lambda: layer.forward(np.ones((2, 4, 4), np.float32)), ValueError,
         r"ConvTranspose2D: expected a 4-d input \(N, C, H, W\), got shape \(2, 4, 4\)"),
        (lambda: layer.forward(np.ones((1, 2, 4, 4))), TypeError,
         "ConvTranspose2D: input is float64 but the layer's parameters are float32"),
        # (1 - 1)*1 - 2*2 + 3 + 0 = -1: the padding crops more than there is
        (lambda: layer.forward(np.ones((1, 2, 1, 4), np.float32)), ValueError,
         r"ConvTranspose2D: the output height O = \(H - 1\)\*S - 2P \+ K \+ output_padding = \(1 - 1\)\*1 - 2\*2 \+ "
         r"3 \+ 0 = -1 < 1"),
        (lambda: L.ConvTranspose2D(2, 3, 3).backward(np.ones((1, 3, 6, 6), np.float32)), RuntimeError,
         "ConvTranspose2D: backward called before forward"),
    ]


@pytest.mark.parametrize("i", range(5))
def test_input_errors(i):
    call, error, message = _errors()[i]
    with pytest.raises(error, match=message):
        call()


def test_backward_shape_and_dtype_errors(rng):
    layer = L.ConvTranspose2D(2, 3, 3, stride=2)
    layer.forward(rng.standard_normal((1, 2, 3, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"ConvTranspose2D: backward got a gradient of shape \(1, 3, 6, 7\), "
                                         r"expected the forward output's \(1, 3, 7, 7\)"):
        layer.backward(np.ones((1, 3, 6, 7), np.float32))
    with pytest.raises(TypeError, match="ConvTranspose2D: backward got a float64 gradient, expected float32"):
        layer.backward(np.ones((1, 3, 7, 7)))


# ------------------------------------------------------------------------------------------ in a Sequential

def _upsampling_net(seed, dtype="float64", algorithm="gemm"):
    """A conv, then a grouped transposed conv (stride 2) with a ReLU after it, a winograd-able 3x3 one with a tanh
    after it, and a classifier."""
    r = np.random.default_rng(seed)
    return gpucnn.Sequential([
        L.Conv2D(1, 4, 3, stride=2, dtype=dtype, rng=r), L.ReLU(),
        L.ConvTranspose2D(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dtype=dtype, rng=r), L.ReLU(),
        L.ConvTranspose2D(4, 2, 3, padding=1, dtype=dtype, rng=r, algorithm=algorithm), L.Tanh(),
        L.MaxPool2D(2), L.Flatten(), L.Dense(2 * 3 * 4, 3, dtype=dtype, rng=r)], input_shape=(1, 7, 9))


@pytest.mark.parametrize("algorithm", ["gemm", "winograd", "direct"])
def test_trains_as_pytorch_and_is_not_fused(algorithm, rng):
    model = _upsampling_net(int(rng.integers(2 ** 31)), algorithm=algorithm)
    assert model.output_shape == (3,)
    heads = [(type(st.head).__name__, len(st.layers)) for st in model.stages]
    assert heads[:3] == [("Conv2D", 2), ("ConvTranspose2D", 1), ("ReLU", 1)]   # its activation runs as its own layer
    train_like_torch(model, rng.standard_normal((3, 1, 7, 9)), rng.integers(0, 3, 3))


def test_fit_summary_save_load_predict(tmp_path, rng):
    model = _upsampling_net(int(rng.integers(2 ** 31)), "float32", "winograd")
    images = rng.integers(0, 255, (12, 1, 7, 9)).astype(np.uint8)
    labels = rng.integers(0, 3, 12)
    history = model.fit((images, labels), epochs=2, batch_size=4, optimizer=gpucnn.optim.SGD(model, lr=0.05),
                        verbose=0)
    assert len(history["loss"]) == 2 and np.isfinite(history["loss"]).all()
    text = model.summary(file=False)
    row = next(l for l in text.splitlines() if "ConvTranspose2D(groups=2)" in l)
    assert f"{4 * 2 * 9 * 3 * 4:,}" in row and "(4, 6, 8)" in row          # MACs: weights x input positions
    back = gpucnn.Sequential.load(model.save(str(tmp_path / "up.npz")))
    assert [type(l).__name__ for l in back.layers] == [type(l).__name__ for l in model.layers]
    assert back.layers[2].config() == model.layers[2].config() and back.layers[4].algorithm == "winograd"
    np.testing.assert_array_equal(back.predict(images), model.predict(images))
    assert back.evaluate((images, labels))["loss"] == model.evaluate((images, labels))["loss"]


# ------------------------------------------------------------------------------------------ GPU path on "sim"
# ConvTranspose2D's, and test_groups.py's grouped Conv2D's: layers (each with and without its input gradient) and
# nets of two training steps. Tiny shapes: every simulated thread costs ~150 us.
SIM_CASES = {
    "ConvTranspose2D gemm, stride (2, 1), output_padding (1, 0), groups 2": (L.ConvTranspose2D, dict(
        in_channels=2, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), output_padding=(1, 0),
        groups=2), (2, 2, 3, 4)),
    "ConvTranspose2D gemm, stride 3 (gaps)": (L.ConvTranspose2D, dict(in_channels=1, out_channels=2,
                                                                      kernel_size=2, stride=3), (1, 1, 2, 3)),
    "ConvTranspose2D winograd, padding 1": (L.ConvTranspose2D, dict(in_channels=2, out_channels=2, kernel_size=3,
                                                                    padding=1, algorithm="winograd"), (2, 2, 4, 3)),
    "Conv2D gemm, groups 2, stride (2, 1)": (L.Conv2D, dict(in_channels=4, out_channels=4, kernel_size=(3, 2),
                                                            stride=(2, 1), padding=(1, 0), groups=2), (2, 4, 5, 6)),
    "Conv2D gemm, groups 3": (L.Conv2D, dict(in_channels=3, out_channels=6, kernel_size=2, groups=3), (1, 3, 4, 3)),
    "Conv2D winograd, groups 2": (L.Conv2D, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, groups=2,
                                                 algorithm="winograd"), (2, 2, 5, 4)),
}


@pytest.mark.sim
@pytest.mark.parametrize("need_gx", [True, False])
@pytest.mark.parametrize("case", SIM_CASES)
def test_sim_layer_matches_cpu(case, need_gx, rng):
    cls, kw, shape = SIM_CASES[case]
    assert_sim_layer_matches_cpu(cls(**kw, rng=rng), shape, need_gx, rng)


@pytest.mark.sim
@pytest.mark.parametrize("algorithm", ["gemm", "winograd", "direct"])
@pytest.mark.parametrize("net,shape,classes", [(_upsampling_net, (2, 1, 7, 9), 3), (_grouped_net, (2, 2, 8, 10), 5)])
def test_sim_train_steps_match_cpu(net, shape, classes, algorithm, rng):
    seed = int(rng.integers(2 ** 31))
    assert_sim_steps_match_cpu(lambda: net(seed, "float32", algorithm), rng.standard_normal(shape).astype(np.float32),
                               rng.integers(0, classes, shape[0]))


@pytest.mark.sim
@pytest.mark.parametrize("i", range(5))
def test_sim_errors_same_as_cpu(i):
    call, error, message = _errors()[i]
    with pytest.raises(error, match=message) as gpu:
        call()
    call, _, _ = _errors()[i]
    with backend.cpu_path():
        with pytest.raises(error) as cpu:
            call()
    assert str(gpu.value) == str(cpu.value)
