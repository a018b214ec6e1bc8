"""What the tests of the convolution's variants (test_conv, test_groups, test_conv_transpose) share: a NaN-proof
comparison, a net trained beside its PyTorch twin, the GPU path ("sim") of a layer or a net against the CPU, and
the convolution's definition one product at a time (reference_conv, reference_conv_backward)."""
import contextlib

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.testing import check_backward
from conftest import assert_close as _assert_close


def assert_close(actual, expected, dtype=None, what=""):
    """conftest's assert_close, refusing NaN too (a NaN passes any "error > tolerance" test: an unwritten or
    mis-indexed output of a GPU kernel on "sim" can be exactly that)."""
    assert np.isfinite(backend.to_numpy(actual)).all(), f"{what}: not finite"
    _assert_close(actual, expected, dtype, what)


def assert_gradients(layer, shape, rng):
    """float64 finite differences (gpucnn.testing.check_backward) of ``layer``'s backward at a fresh input of
    ``shape``, for the input and every parameter."""
    report = check_backward(layer, rng.standard_normal(shape))
    assert set(report) == {"x", *layer.params}


def torch_steps(model, x, y, lr, steps):
    """The losses of ``steps`` plain SGD steps of the same net in PyTorch, and its parameters after them."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    params = [torch.tensor(backend.to_numpy(v).copy(), requires_grad=True) for l in model.layers
              for v in l.params.values()]
    opt = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        h, it = torch.tensor(x), iter(params)
        for layer in model.layers:
            if isinstance(layer, (L.Conv2D, L.ConvTranspose2D)):
                w, b = next(it), next(it) if layer.bias else None
                if isinstance(layer, L.Conv2D):
                    h = F.conv2d(h, w, b, layer.stride, layer.padding, groups=layer.groups)
                else:
                    h = F.conv_transpose2d(h, w, b, layer.stride, layer.padding, layer.output_padding,
                                           groups=layer.groups)
            elif isinstance(layer, L.Dense):
                h = F.linear(h, next(it), next(it))
            elif isinstance(layer, L.MaxPool2D):
                h = F.max_pool2d(h, layer.kernel, layer.stride, layer.padding)
            elif isinstance(layer, L.Flatten):
                h = h.flatten(1)
            else:
                h = {"ReLU": torch.relu, "Tanh": torch.tanh}[layer.name](h)
        loss = F.cross_entropy(h, torch.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().numpy() for p in params]


def train_like_torch(model, x, y, steps=3, lr=0.1):
    """Train ``model`` ``steps`` SGD steps and check its losses and parameters against PyTorch's (float64)."""
    want_losses, want_params = torch_steps(model, x, y, lr, steps)
    opt = gpucnn.optim.SGD(model, lr=lr)
    losses = [float(model.train_step(x, y, SoftmaxCrossEntropy(), opt)) for _ in range(steps)]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
    assert losses[-1] < losses[0]
    got = [backend.to_numpy(v) for l in model.layers for v in l.params.values()]
    for i, (a, b) in enumerate(zip(got, want_params)):
        assert_close(a, b, "float64", f"parameter {i} after {steps} steps")


def assert_sim_layer_matches_cpu(layer, shape, need_gx, rng):
    """forward and backward of ``layer`` on the GPU path ("sim") against the CPU path, on fresh float32 inputs."""
    layer.needs_input_grad = need_gx
    x = rng.standard_normal(shape).astype(np.float32)
    assert backend.on_gpu(x)
    y = layer.forward(x)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = layer.backward(gy)
    gw, gb = layer.grads["weight"].copy(), layer.grads["bias"].copy()
    with backend.cpu_path():
        assert_close(y, layer.forward(x), "float32", "forward")
        gx_cpu = layer.backward(gy)
    assert (gx is None) == (gx_cpu is None) == (not need_gx)
    if need_gx:
        assert_close(gx, gx_cpu, "float32", "gx")
    assert_close(gw, layer.grads["weight"], "float32", "gw")
    assert_close(gb, layer.grads["bias"], "float32", "gb")


def assert_sim_steps_match_cpu(make, x, y, steps=2):
    """``steps`` SGD steps of the net ``make()`` builds, on the GPU path ("sim": from its second step in the
    workspace's planned memory, where a buffer released too early shows) and on the CPU path: the same losses
    and parameters within float32 rounding."""
    results = []
    for cpu in (False, True):
        net = make()
        opt = gpucnn.optim.SGD(net, lr=0.1)
        with backend.cpu_path() if cpu else contextlib.nullcontext():
            losses = [float(net.train_step(x, y, SoftmaxCrossEntropy(), opt, graph=False)) for _ in range(steps)]
        results.append((losses, [backend.to_numpy(v).copy() for l in net.layers for v in l.params.values()]))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        assert_close(a, b, "float32", f"parameters after {steps} steps, sim vs CPU")


def reference_conv(x, w, b, stride, padding):
    """The definition, one output element at a time (tiny sizes only)."""
    N, C, H, W = x.shape
    Cout, _, KH, KW = w.shape
    (SH, SW), (PH, PW) = stride, padding
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    y = np.zeros((N, Cout, OH, OW))
    for n, o, oh, ow in np.ndindex(N, Cout, OH, OW):
        acc = 0.0 if b is None else b[o]
        for c, kh, kw in np.ndindex(C, KH, KW):
            h, w_ = oh * SH - PH + kh, ow * SW - PW + kw
            if 0 <= h < H and 0 <= w_ < W:
                acc += w[o, c, kh, kw] * x[n, c, h, w_]
        y[n, o, oh, ow] = acc
    return y


def reference_conv_backward(x, w, gy, stride, padding):
    """gx, gw, gb of the definition: every product x * w of the forward sends gy to both factors."""
    N, C, H, W = x.shape
    Cout, _, KH, KW = w.shape
    (SH, SW), (PH, PW) = stride, padding
    gx, gw = np.zeros(x.shape), np.zeros(w.shape)
    for n, o, oh, ow in np.ndindex(*gy.shape):
        for c, kh, kw in np.ndindex(C, KH, KW):
            h, w_ = oh * SH - PH + kh, ow * SW - PW + kw
            if 0 <= h < H and 0 <= w_ < W:
                gx[n, c, h, w_] += gy[n, o, oh, ow] * w[o, c, kh, kw]
                gw[o, c, kh, kw] += gy[n, o, oh, ow] * x[n, c, h, w_]
    return gx, gw, gy.sum(axis=(0, 2, 3))
