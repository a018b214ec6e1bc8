"""Conv2D: finite differences, a nested-loop reference (hypothesis), PyTorch, the GPU path ("sim") against
the CPU, and every error message."""
import json

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from gpucnn import backend, layers as L
from gpucnn.kernels import conv as K
from conftest import assert_close, assert_compiles_for_a_real_gpu
from conv_helpers import assert_gradients, assert_sim_layer_matches_cpu, reference_conv, reference_conv_backward


# (layer arguments, input shape): each a case the index arithmetic could get wrong
CASES = {
    "plain": (dict(in_channels=2, out_channels=3, kernel_size=3), (2, 2, 5, 5)),
    "stride 2": (dict(in_channels=2, out_channels=3, kernel_size=3, stride=2), (2, 2, 7, 6)),
    "padding 1": (dict(in_channels=2, out_channels=3, kernel_size=3, padding=1), (2, 2, 4, 4)),
    "stride and padding per axis": (dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1),
                                         padding=(1, 0)), (2, 2, 5, 6)),
    "non-square input and kernel": (dict(in_channels=1, out_channels=2, kernel_size=(2, 3)), (2, 1, 4, 6)),
    "batch 1": (dict(in_channels=2, out_channels=2, kernel_size=3, padding=1), (1, 2, 4, 5)),
    "kernel as large as the padded input": (dict(in_channels=2, out_channels=2, kernel_size=(6, 5), padding=1),
                                            (2, 2, 4, 3)),
    "stride larger than kernel": (dict(in_channels=1, out_channels=2, kernel_size=2, stride=3), (2, 1, 7, 8)),
    "no bias": (dict(in_channels=2, out_channels=3, kernel_size=3, bias=False), (2, 2, 5, 4)),
}


@pytest.mark.parametrize("case", CASES)
def test_check_backward(case, rng):
    kw, shape = CASES[case]
    assert_gradients(L.Conv2D(**kw, rng=rng), shape, rng)


@settings(max_examples=200, deadline=None)
@given(N=st.integers(1, 3), C=st.integers(1, 3), Cout=st.integers(1, 3), H=st.integers(1, 7), W=st.integers(1, 7),
       KH=st.integers(1, 4), KW=st.integers(1, 4), SH=st.integers(1, 3), SW=st.integers(1, 3),
       PH=st.integers(0, 2), PW=st.integers(0, 2), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_matches_nested_loops(N, C, Cout, H, W, KH, KW, SH, SW, PH, PW, bias, seed):
    rng = np.random.default_rng(seed)
    layer = L.Conv2D(C, Cout, (KH, KW), (SH, SW), (PH, PW), bias=bias, dtype="float64", rng=rng)
    x = rng.standard_normal((N, C, H, W))
    if H + 2 * PH < KH or W + 2 * PW < KW:
        with pytest.raises(ValueError, match="Conv2D: kernel .* is larger than the padded input"):
            layer.output_shape((C, H, W))
        with pytest.raises(ValueError, match="Conv2D: kernel .* is larger than the padded input"):
            layer.forward(x)
        return
    y = layer.forward(x)
    formula = (N, Cout, (H - KH + 2 * PH) // SH + 1, (W - KW + 2 * PW) // SW + 1)
    assert y.shape == formula == (N,) + layer.output_shape((C, H, W))
    w, b = layer.params["weight"], layer.params.get("bias")
    assert_close(y, reference_conv(x, w, b, (SH, SW), (PH, PW)), "float64", "forward")
    gy = rng.standard_normal(y.shape)
    gx = layer.backward(gy)
    rgx, rgw, rgb = reference_conv_backward(x, w, gy, (SH, SW), (PH, PW))
    assert_close(gx, rgx, "float64", "gx")
    assert_close(layer.grads["weight"], rgw, "float64", "gw")
    if bias:
        assert_close(layer.grads["bias"], rgb, "float64", "gb")


@settings(max_examples=100, deadline=None)
@given(N=st.integers(1, 2), C=st.integers(1, 2), H=st.integers(1, 6), W=st.integers(1, 6), KH=st.integers(1, 3),
       KW=st.integers(1, 3), SH=st.integers(1, 3), SW=st.integers(1, 3), PH=st.integers(0, 1), PW=st.integers(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_col2im_is_the_adjoint_of_im2col(N, C, H, W, KH, KW, SH, SW, PH, PW, seed):
    # <im2col(x), c> == <x, col2im(c)>: col2im adds back exactly what im2col copied, nothing else
    assume(H + 2 * PH >= KH and W + 2 * PW >= KW)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, H, W))
    col = K.im2col(x, KH, KW, (SH, SW), (PH, PW))
    c = rng.standard_normal(col.shape)
    back = K.col2im(c, x.shape, KH, KW, (SH, SW), (PH, PW))
    assert back.shape == x.shape
    assert np.isclose((col * c).sum(), (x * back).sum(), rtol=1e-12, atol=1e-12)


def test_im2col_layout(rng):
    # documented layout: col[(c, kh, kw), (oh, ow, n)] = xpad[n, c, oh*SH + kh, ow*SW + kw]
    x = rng.standard_normal((2, 2, 5, 6))
    col = K.im2col(x, 3, 2, (2, 1), (1, 0))
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    OH, OW = 3, 5
    assert col.shape == (2 * 3 * 2, OH * OW * 2)
    for c, kh, kw, oh, ow, n in np.ndindex(2, 3, 2, OH, OW, 2):
        assert col[(c * 3 + kh) * 2 + kw, (oh * OW + ow) * 2 + n] == xpad[n, c, oh * 2 + kh, ow + kw]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (1, 0)), ((1, 3), (2, 1))])
@pytest.mark.parametrize("channels", [(3, 4), (12, 16)])   # 16 x 72 weights: the CPU's single-GEMM path
def test_against_torch(channels, stride, padding, dtype, rng):
    torch = pytest.importorskip("torch")
    layer = L.Conv2D(*channels, (3, 2), stride, padding, dtype=dtype, rng=rng)
    x = rng.standard_normal((2, channels[0], 7, 6)).astype(dtype)
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gx = layer.backward(gy)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.params["weight"], requires_grad=True)
    tb = torch.tensor(layer.params["bias"], requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=padding)
    ty.backward(torch.tensor(gy))
    assert y.dtype == gx.dtype == layer.grads["weight"].dtype == layer.grads["bias"].dtype == np.dtype(dtype)
    assert_close(y, ty.detach().numpy(), dtype, "forward")
    assert_close(gx, tx.grad.numpy(), dtype, "gx")
    assert_close(layer.grads["weight"], tw.grad.numpy(), dtype, "gw")
    assert_close(layer.grads["bias"], tb.grad.numpy(), dtype, "gb")


# a convolution and its transpose, each from a 5x5 input to a 3x3 output, for the tests of the layer contract
TWO_WAYS = {"Conv2D": (lambda rng: L.Conv2D(2, 3, 3, rng=rng), (2, 2, 5, 5), (2, 3, 3, 3)),
            "ConvTranspose2D": (lambda rng: L.ConvTranspose2D(2, 3, 3, padding=2, rng=rng), (2, 2, 5, 5), (2, 3, 3, 3))}


@pytest.mark.parametrize("layer", TWO_WAYS)
def test_backward_overwrites_grads_and_a_first_layer_skips_the_input_gradient(layer, rng):
    make, x_shape, y_shape = TWO_WAYS[layer]
    layer = make(rng)
    x = rng.standard_normal(x_shape).astype(np.float32)
    gy = rng.standard_normal(y_shape).astype(np.float32)
    layer.forward(x)
    gx = layer.backward(gy).copy()
    gw = layer.grads["weight"].copy()
    assert_close(layer.backward(gy), gx, "float32", "second backward's gx")
    assert_close(layer.grads["weight"], gw, "float32", "second backward's gw (overwritten, not added)")
    layer.needs_input_grad = False
    assert layer.backward(gy) is None
    assert_close(layer.grads["weight"], gw, "float32", "gw without gx")


def test_kernel_functions_with_activation_and_no_bias(rng):
    x = rng.standard_normal((2, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    y, col = K.conv2d_forward(x, w, None, 1, 1, activation="relu")
    assert_close(y, np.maximum(reference_conv(x, w, None, (1, 1), (1, 1)), 0), "float64", "relu(conv)")
    gy = rng.standard_normal(y.shape)
    gx, gw, gb = K.conv2d_backward(x.shape, col, w, gy, 1, 1, need_gx=False, need_gb=False)
    assert gx is None and gb is None
    ref_gx, ref_gw, _ = reference_conv_backward(x, w, gy, (1, 1), (1, 1))
    assert_close(gw, ref_gw, "float64", "gw")
    gx, gw, gb = K.conv2d_backward(x.shape, col, w, gy, 1, 1, need_gw=False, need_gb=False)
    assert gw is None and gb is None
    assert_close(gx, ref_gx, "float64", "gx alone")


def test_params_init_and_config(rng):
    layer = L.Conv2D(3, 5, (3, 2), stride=(2, 1), padding=1, rng=rng)
    w, b = layer.params["weight"], layer.params["bias"]
    assert w.shape == (5, 3, 3, 2) and b.shape == (5,) and w.dtype == b.dtype == np.float32
    bound = 1 / np.sqrt(3 * 3 * 2)       # PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound and np.abs(w).max() > bound / 2
    assert layer.num_params() == 5 * 3 * 3 * 2 + 5
    config = json.loads(json.dumps(layer.config()))
    assert config == {"in_channels": 3, "out_channels": 5, "kernel_size": [3, 2], "stride": [2, 1],
                      "padding": [1, 1], "bias": True, "dtype": "float32", "init": "default"}
    assert L.Conv2D(**config).config() == config
    assert "bias" not in L.Conv2D(3, 5, 3, bias=False).params
    assert layer.output_shape((3, 9, 8)) == (5, 5, 9)


# ------------------------------------------------------------------------------------------ errors

def test_constructor_errors():
    with pytest.raises(ValueError, match="Conv2D: in_channels must be positive, got 0"):
        L.Conv2D(0, 2, 3)
    with pytest.raises(ValueError, match="Conv2D: out_channels must be positive, got -1"):
        L.Conv2D(1, -1, 3)
    with pytest.raises(TypeError, match="Conv2D: in_channels must be an int, got 2.0"):
        L.Conv2D(2.0, 1, 3)
    with pytest.raises(ValueError, match=r"Conv2D: kernel_size must be positive, got \(3, 0\)"):
        L.Conv2D(1, 1, (3, 0))
    with pytest.raises(ValueError, match="Conv2D: stride must be positive, got 0"):
        L.Conv2D(1, 1, 3, stride=0)
    with pytest.raises(ValueError, match=r"Conv2D: padding must be zero or positive, got \(-1, 0\)"):
        L.Conv2D(1, 1, 3, padding=(-1, 0))
    with pytest.raises(TypeError, match="Conv2D: kernel_size must be an int or a pair of ints, got 2.5"):
        L.Conv2D(1, 1, 2.5)
    with pytest.raises(TypeError, match=r"Conv2D: stride must be an int or a pair of ints, got \(1, 2, 3\)"):
        L.Conv2D(1, 1, 3, stride=(1, 2, 3))
    with pytest.raises(TypeError, match="Conv2D: dtype must be float32 or float64, got int32"):
        L.Conv2D(1, 1, 3, dtype="int32")


def test_input_errors():
    layer = L.Conv2D(2, 3, 3)
    with pytest.raises(ValueError, match=r"Conv2D: expected a 4-d input \(N, C, H, W\), got shape \(2, 5, 5\)"):
        layer.forward(np.ones((2, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"Conv2D: expected 2 input channels, got 3 \(input shape \(1, 3, 5, 5\)\)"):
        layer.forward(np.ones((1, 3, 5, 5), np.float32))
    with pytest.raises(TypeError, match="Conv2D: input is float64 but the layer's parameters are float32"):
        layer.forward(np.ones((1, 2, 5, 5)))
    with pytest.raises(TypeError, match="Conv2D: expected a float input .* got uint8"):
        layer.forward(np.ones((1, 2, 5, 5), np.uint8))
    with pytest.raises(TypeError, match="Conv2D: expected an array"):
        layer.forward([[1.0]])
    with pytest.raises(ValueError, match=r"Conv2D: expected an input shape \(C, H, W\), got \(2, 5\)"):
        layer.output_shape((2, 5))
    with pytest.raises(ValueError, match="Conv2D: expected 2 input channels, got 4"):
        layer.output_shape((4, 5, 5))


@pytest.mark.parametrize("what", ["forward", "output_shape"])
def test_kernel_larger_than_padded_input(what):
    layer = L.Conv2D(1, 1, (3, 5), padding=(0, 1))
    # width: 2 + 2*1 = 4 < 5, so O = (2 - 5 + 2*1)/1 + 1 = 0
    expected = (r"Conv2D: kernel 5 is larger than the padded input along width \(input 2 \+ 2\*padding 1 = 4\): "
                r"the output size O = \(W - K \+ 2P\)/S \+ 1 = \(2 - 5 \+ 2\*1\)/1 \+ 1 = 0 < 1")
    with pytest.raises(ValueError, match=expected):
        if what == "forward":
            layer.forward(np.ones((1, 1, 3, 2), np.float32))
        else:
            layer.output_shape((1, 3, 2))
    with pytest.raises(ValueError, match="conv: kernel 5 is larger than the padded input 2 \\+ 2\\*1"):
        K.im2col(np.ones((1, 1, 3, 2)), 3, 5, 1, (0, 1))


@pytest.mark.parametrize("layer", TWO_WAYS)
def test_backward_errors(layer, rng):
    make, x_shape, y_shape = TWO_WAYS[layer]
    name, layer = layer, make(rng)
    with pytest.raises(RuntimeError, match=f"{name}: backward called before forward"):
        layer.backward(np.ones(y_shape, np.float32))
    layer.forward(rng.standard_normal(x_shape).astype(np.float32))
    with pytest.raises(ValueError, match=rf"{name}: backward got a gradient of shape \(2, 3, 3, 4\), "
                                         r"expected the forward output's \(2, 3, 3, 3\)"):
        layer.backward(np.ones((2, 3, 3, 4), np.float32))
    with pytest.raises(TypeError, match=f"{name}: backward got a float64 gradient, expected float32"):
        layer.backward(np.ones(y_shape))


# ------------------------------------------------------------------------------------------ GPU path on "sim"
# Tiny shapes: every simulated thread costs ~150 us. 5x6 input, 3x2 kernel, stride (2, 1), padding (1, 0):
# OH, OW = 3, 5 and col has 2*3*2 x 3*5*2 = 360 entries.
SIM_STRIDE, SIM_PAD = (2, 1), (1, 0)


def _sim_inputs(rng, dtype, N=2, C=2, Cout=3):
    x = rng.standard_normal((N, C, 5, 6)).astype(dtype)
    w = rng.standard_normal((Cout, C, 3, 2)).astype(dtype)
    b = rng.standard_normal(Cout).astype(dtype)
    return x, w, b


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernel,stride,padding", [((3, 2), SIM_STRIDE, SIM_PAD),
                                                   ((2, 2), (3, 3), (0, 1))])   # stride > kernel: gaps
def test_sim_im2col_col2im(kernel, stride, padding, dtype, rng):
    x, _, _ = _sim_inputs(rng, dtype)
    col = K.im2col(x, *kernel, stride, padding)
    c = rng.standard_normal(col.shape).astype(dtype)
    back = K.col2im(c, x.shape, *kernel, stride, padding)
    with backend.cpu_path():
        col_ref = K.im2col(x, *kernel, stride, padding)
        back_ref = K.col2im(c, x.shape, *kernel, stride, padding)
    assert col.dtype == back.dtype == np.dtype(dtype)
    assert_close(col, col_ref, dtype, "im2col")
    assert_close(back, back_ref, dtype, "col2im")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias,activation", [(True, "identity"), (False, "identity"), (True, "tanh"),
                                             (False, "leaky_relu")])
def test_sim_forward(bias, activation, dtype, rng):
    x, w, b = _sim_inputs(rng, dtype, N=1 if bias else 2)
    b = b if bias else None
    y, col = K.conv2d_forward(x, w, b, SIM_STRIDE, SIM_PAD, activation, 0.1)
    with backend.cpu_path():
        y_ref, _ = K.conv2d_forward(x, w, b, SIM_STRIDE, SIM_PAD, activation, 0.1)
        col_ref = K.im2col(x, w.shape[2], w.shape[3], SIM_STRIDE, SIM_PAD)   # the GPU keeps im2col's matrix
    assert y.dtype == np.dtype(dtype)
    assert_close(y, y_ref, dtype, f"forward ({activation})")
    assert_close(col, col_ref, dtype, "col")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("need_gx", [True, False])
def test_sim_backward(need_gx, dtype, rng):
    x, w, _ = _sim_inputs(rng, dtype, C=1 if need_gx else 2)
    _, col = K.conv2d_forward(x, w, None, SIM_STRIDE, SIM_PAD)          # each path keeps its own lowering
    gy = rng.standard_normal((x.shape[0], w.shape[0], 3, 5)).astype(dtype)
    gx, gw, gb = K.conv2d_backward(x.shape, col, w, gy, SIM_STRIDE, SIM_PAD, need_gx=need_gx)
    with backend.cpu_path():
        _, col_cpu = K.conv2d_forward(x, w, None, SIM_STRIDE, SIM_PAD)
        gx_ref, gw_ref, gb_ref = K.conv2d_backward(x.shape, col_cpu, w, gy, SIM_STRIDE, SIM_PAD, need_gx=need_gx)
    assert_close(gw, gw_ref, dtype, "gw")
    assert_close(gb, gb_ref, dtype, "gb")
    if need_gx:
        assert gx.dtype == np.dtype(dtype)
        assert_close(gx, gx_ref, dtype, "gx")
    else:
        assert gx is None and gx_ref is None


@pytest.mark.sim
def test_sim_bias_grad_long_rows(rng):
    # 300 numbers a row: each of the 256 threads of a block sums one or two, then the tree reduction
    gy2 = rng.standard_normal((1, 300))
    assert_close(K._bias_grad(gy2), gy2.sum(axis=1), "float64", "bias gradient")


@pytest.mark.sim
def test_sim_layer_matches_cpu(rng):
    assert_sim_layer_matches_cpu(L.Conv2D(2, 3, (3, 2), SIM_STRIDE, SIM_PAD, rng=rng), (1, 2, 5, 6), True, rng)


@pytest.mark.sim
def test_sim_shape_error_same_as_cpu():
    layer = L.Conv2D(1, 1, 4)
    x = np.ones((1, 1, 3, 5), np.float32)
    assert backend.on_gpu(x)
    with pytest.raises(ValueError, match="Conv2D: kernel 4 is larger than the padded input along height") as gpu:
        layer.forward(x)
    with backend.cpu_path():
        with pytest.raises(ValueError) as cpu:
            layer.forward(x)
    assert str(gpu.value) == str(cpu.value)


# ------------------------------------------------------------------------------------------ im2col/col2im kernels
# The GPU's data movement comes in two versions (K.DATA_MOVEMENT): "plain", a thread per element, and "tiled",
# a tile of images x columns staged in shared memory. Both must give the CPU's numbers to the bit (col2im adds
# in the CPU's order). K.TILE shrinks the tile so that tiny shapes on the simulator still cross tile edges.
# (tile, x shape, kernel, stride, padding)
TILED_CASES = {
    "batch 1, wider than the tile": (2, (1, 2, 5, 6), (3, 2), (2, 1), (1, 0)),
    "batch 3 across tiles of 2, padding": (2, (3, 1, 4, 7), (2, 3), 1, 1),
    "batch 3 in a tile of 3 x 5 columns": (4, (3, 2, 4, 7), (3, 2), (1, 2), (0, 1)),
    "kernel as large as the padded input": (2, (2, 2, 4, 3), (6, 5), 1, 1),
    "stride larger than kernel (gaps)": (4, (3, 1, 7, 8), (2, 2), 3, 0),
    "batch 33, the default tile of 32": (32, (33, 1, 3, 4), (2, 2), 1, 1),
    "batch 33, 34 output columns, stride 2": (32, (33, 1, 2, 67), (1, 3), 2, (0, 1)),
}


def _launched(monkeypatch):
    """The names of the kernels conv launches from now on (the test's spy on K.launch)."""
    names = []
    real = K.launch

    def spy(kernel, *args, **kwargs):
        names.append(kernel.name)
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(K, "launch", spy)
    return names


def _both_ways(x, c, kernel, stride, padding):
    col = K.im2col(x, *kernel, stride, padding)
    back = K.col2im(c, x.shape, *kernel, stride, padding)
    assert col.dtype == back.dtype == x.dtype
    return col, back


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", TILED_CASES)
def test_sim_tiled_data_movement_equals_plain_and_cpu_to_the_bit(case, dtype, rng, monkeypatch):
    tile, shape, kernel, stride, padding = TILED_CASES[case]
    monkeypatch.setattr(K, "TILE", tile)
    x = rng.standard_normal(shape).astype(dtype)
    with backend.cpu_path():
        col_ref = K.im2col(x, *kernel, stride, padding)
        c = rng.standard_normal(col_ref.shape).astype(dtype)
        back_ref = K.col2im(c, x.shape, *kernel, stride, padding)
    launched = _launched(monkeypatch)
    monkeypatch.setattr(K, "DATA_MOVEMENT", "tiled")
    col_tiled, back_tiled = _both_ways(x, c, kernel, stride, padding)
    monkeypatch.setattr(K, "DATA_MOVEMENT", "plain")
    col_plain, back_plain = _both_ways(x, c, kernel, stride, padding)
    assert launched == ["_im2col_tiled_kernel", "_col2im_tiled_kernel", "_im2col_kernel", "_col2im_kernel"]
    np.testing.assert_array_equal(col_tiled, col_ref, err_msg="tiled im2col")
    np.testing.assert_array_equal(col_plain, col_ref, err_msg="plain im2col")
    np.testing.assert_array_equal(back_tiled, back_ref, err_msg="tiled col2im")
    np.testing.assert_array_equal(back_plain, back_ref, err_msg="plain col2im")


@pytest.mark.sim
def test_sim_tiled_im2col_shrinks_its_tile_to_fit_shared_memory(rng, monkeypatch):
    # 3 images x 7 output columns of a 3-wide kernel: (6 + 3) | 1 = 9 numbers a row, 27 in all; 80 bytes hold
    # 3 rows of 5 (TOW 7 -> 4 -> 2), 8 bytes not one (the plain kernel instead)
    x = rng.standard_normal((3, 2, 4, 7)).astype(np.float32)
    with backend.cpu_path():
        col_ref = K.im2col(x, 2, 3, 1, 1)
    assert K._im2col_tiles(3, 7, 3, 1, 4) == (3, 7, 3 * 9 * 4)
    monkeypatch.setattr(K, "DATA_MOVEMENT", "tiled")
    monkeypatch.setattr(K, "SHARED_LIMIT", 80)
    assert K._im2col_tiles(3, 7, 3, 1, 4) == (3, 2, 3 * 5 * 4)
    launched = _launched(monkeypatch)
    np.testing.assert_array_equal(K.im2col(x, 2, 3, 1, 1), col_ref)
    monkeypatch.setattr(K, "SHARED_LIMIT", 8)
    assert K._im2col_tiles(3, 7, 3, 1, 4) is None
    np.testing.assert_array_equal(K.im2col(x, 2, 3, 1, 1), col_ref)
    assert launched == ["_im2col_tiled_kernel", "_im2col_kernel"]


@pytest.mark.sim
def test_sim_unknown_data_movement_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(K, "DATA_MOVEMENT", "fast")
    with pytest.raises(ValueError, match="conv.DATA_MOVEMENT must be 'tiled' or 'plain', got 'fast'"):
        K.im2col(np.ones((1, 1, 3, 3), np.float32), 2, 2, 1, 0)


def test_tile_shapes():
    # a full batch: 32 images x 32 columns; a small batch: a wider tile of about 1024 elements
    assert K._tile(128, 28) == (32, 28) and K._tile(33, 100) == (32, 32)
    assert K._tile(1, 5000) == (1, 1024) and K._tile(3, 5000) == (3, 341)
    # LeNet's first layer at batch 128 (28 output columns of a 5-wide kernel): 32 rows of 33, 4224 bytes;
    # AlexNet's (11 wide, stride 4) at batch 128 in float64: 32 rows of 135, 34560 bytes
    assert K._im2col_tiles(128, 28, 5, 1, 4) == (32, 28, 32 * 33 * 4)
    assert K._im2col_tiles(128, 55, 11, 4, 8) == (32, 32, 32 * 135 * 8)


def test_data_movement_kernels_compile_for_a_real_gpu():
    assert_compiles_for_a_real_gpu("""
        import gpucnn.kernels.conv as C
        C.cuda = cuda
        f32, i64 = types.float32, types.int64
        a = lambda t, n: types.Array(t, n, "C")
        sigs = {C._im2col_kernel: (a(f32, 4), a(f32, 6)) + (i64,) * 4,
                C._col2im_kernel: (a(f32, 6), a(f32, 4)) + (i64,) * 4,
                C._im2col_tiled_kernel: (a(f32, 4), a(f32, 6)) + (i64,) * 6,
                C._col2im_tiled_kernel: (a(f32, 6), a(f32, 4)) + (i64,) * 6}
    """)


@pytest.mark.parametrize("device", ["cpu", pytest.param("sim", marks=pytest.mark.sim)])
def test_grad_weight_over_a_long_reduction_matches_float64(device, rng):
    """AlexNet c2's geometry (96 -> 256 channels, 27x27, 5x5, pad 2; fewer images, and on "sim" fewer channels):
    every weight gradient sums
    N*27*27 products. float32 gw and gb must equal a float64 computation on the same inputs within float32
    rounding, on the CPU path and on the GPU path ("sim": im2col + the GEMM cuBLAS runs). The H200's bench
    saw 1.37e-2 between gpucnn and cuDNN at batch 128; this pins gpucnn's side against float64."""
    N, C, Cout = (2, 8, 16) if device == "sim" else (4, 96, 256)     # the simulator is slow: fewer channels
    x = rng.standard_normal((N, C, 27, 27)).astype(np.float32)
    w = (rng.random((Cout, C, 5, 5), dtype=np.float32) * 2 - 1) / np.float32(np.sqrt(C * 25))
    gy = rng.standard_normal((N, Cout, 27, 27)).astype(np.float32)
    _, col = K.conv2d_forward(x, w, None, 1, 2)
    _, gw, gb = K.conv2d_backward(x.shape, col, w, gy, 1, 2, need_gx=False)
    with backend.cpu_path():
        x64, w64, gy64 = x.astype(np.float64), w.astype(np.float64), gy.astype(np.float64)
        _, col64 = K.conv2d_forward(x64, w64, None, 1, 2)
        _, gw64, gb64 = K.conv2d_backward(x64.shape, col64, w64, gy64, 1, 2, need_gx=False)
    assert_close(gw, gw64, "float32", f"gw over {N * 27 * 27} positions ({device})")
    assert_close(gb, gb64, "float32", f"gb over {N * 27 * 27} positions ({device})")
