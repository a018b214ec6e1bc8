"""The GPU suite: every op on a real CUDA GPU against the CPU path, at the shapes training uses.

The "sim" suite proves the GPU code at toy sizes; this one runs it on the hardware, at LeNet-5's batch of
64 and AlexNet's 224x224 images, where grids span many blocks and cuBLAS does the GEMMs. It needs CuPy and
a usable GPU; elsewhere conftest skips every test here and says why. Run it with

    GPUCNN_DEVICE=cuda python -m pytest -m gpu -s        # -s shows the GPU's name

(`python -m pytest -m gpu` works too: the suite selects "cuda" for its own tests and puts the CPU back).

Each test makes fresh random NumPy inputs, computes the reference on the "cpu" device, moves the same
inputs and parameters to the GPU (``gpucnn.asarray``, ``layer.to("cuda")``), runs the op there, brings the
results back (``gpucnn.to_numpy``) and compares with ``assert_close``.
"""
import contextlib

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, losses, optim
from gpucnn.kernels import dropout as KD
from gpucnn.kernels import optim as KO
from conftest import assert_close

pytestmark = pytest.mark.gpu

GPU = "cuda"


@pytest.fixture(scope="module", autouse=True)
def gpu_device():
    """Select the GPU for this module's tests (conftest selects the CPU for the default process)."""
    before = gpucnn.device()
    gpucnn.use_device(GPU)
    yield
    gpucnn.use_device(before)


@contextlib.contextmanager
def host():
    """Inside this block the device is "cpu": the reference runs on NumPy arrays (while "cuda" is
    selected, layers refuse NumPy input, as they should)."""
    before = gpucnn.device()
    gpucnn.use_device("cpu")
    try:
        yield
    finally:
        gpucnn.use_device(before)


def assert_on_gpu(a, what):
    assert backend.is_cupy(a), f"{what} is a {type(a).__module__}.{type(a).__name__}, not a CuPy array"


def _counters(obj):
    return {k: v for k, v in vars(obj).items() if isinstance(v, int) and not isinstance(v, bool)}


def compare_layer(make, x, rng, training=True):
    """One layer's forward and backward on the CPU, then on the GPU from the same parameters, buffers and
    counters; every output, gradient and updated buffer must agree. ``make`` runs on the host."""
    dtype = x.dtype
    with host():
        layer = make()
        buffers = {k: v.copy() for k, v in layer.buffers.items()}
        counters = _counters(layer)
        y = layer.forward(x, training=training)
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx = layer.backward(gy)
        ref = {"forward": y, "dL/dx": gx, **{f"grad {k}": v for k, v in layer.grads.items()},
               **{f"buffer {k}": v for k, v in layer.buffers.items()}}
        ref = {k: v.copy() for k, v in ref.items() if v is not None}
    # the same start on the GPU: buffers and counters as before the CPU pass, the parameters unchanged
    layer.buffers.update(buffers)
    for k, v in counters.items():
        setattr(layer, k, v)
    layer.to(GPU)
    y = layer.forward(gpucnn.asarray(x), training=training)
    assert_on_gpu(y, f"{layer.name} forward")
    gx = layer.backward(gpucnn.asarray(gy))
    got = {"forward": y, "dL/dx": gx, **{f"grad {k}": v for k, v in layer.grads.items()},
           **{f"buffer {k}": v for k, v in layer.buffers.items()}}
    got = {k: v for k, v in got.items() if v is not None}
    assert got.keys() == ref.keys()
    for k in ref:
        assert_on_gpu(got[k], f"{layer.name} {k}")
        assert got[k].dtype == ref[k].dtype, f"{layer.name} {k}: {got[k].dtype} on the GPU, {ref[k].dtype} on the CPU"
        assert_close(gpucnn.to_numpy(got[k]), ref[k], dtype, f"{layer.name} {k}")
    return layer


# ---------------------------------------------------------------------------------------- the device

def test_gpu_is_used(record_property):
    import cupy
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    memory_gib = props["totalGlobalMem"] / 2**30
    print(f"\ngpucnn GPU suite on device {dev.id}: {name}, compute capability {dev.compute_capability}, "
          f"{memory_gib:.1f} GiB, CuPy {cupy.__version__}")
    record_property("gpu", name)
    assert name
    assert gpucnn.device() == "cuda"
    assert_on_gpu(gpucnn.asarray(np.ones(3, np.float32)), "gpucnn.asarray")


# ---------------------------------------------------------------------------------------- LeNet-5, batch 64

LENET_LAYERS = {
    "conv1": (lambda dt: L.Conv2D(1, 6, 5, padding=2, dtype=dt), (64, 1, 28, 28)),
    "conv2": (lambda dt: L.Conv2D(6, 16, 5, dtype=dt), (64, 6, 14, 14)),
    "conv1 direct": (lambda dt: L.Conv2D(1, 6, 5, padding=2, dtype=dt, algorithm="direct"), (64, 1, 28, 28)),
    "conv2 direct": (lambda dt: L.Conv2D(6, 16, 5, dtype=dt, algorithm="direct"), (64, 6, 14, 14)),
    "avgpool1": (lambda dt: L.AvgPool2D(2), (64, 6, 28, 28)),
    "avgpool2": (lambda dt: L.AvgPool2D(2), (64, 16, 10, 10)),
    "maxpool2": (lambda dt: L.MaxPool2D(2), (64, 16, 10, 10)),
    "tanh": (lambda dt: L.Tanh(), (64, 6, 28, 28)),
    "relu": (lambda dt: L.ReLU(), (64, 6, 28, 28)),
    "leaky_relu": (lambda dt: L.LeakyReLU(0.1), (64, 16, 10, 10)),
    "sigmoid": (lambda dt: L.Sigmoid(), (64, 120)),
    "flatten": (lambda dt: L.Flatten(), (64, 16, 5, 5)),
    "fc1": (lambda dt: L.Dense(400, 120, dtype=dt), (64, 400)),
    "fc2": (lambda dt: L.Dense(120, 84, dtype=dt), (64, 120)),
    "fc3": (lambda dt: L.Dense(84, 10, dtype=dt), (64, 84)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(LENET_LAYERS))
def test_lenet5_layer(name, dtype, rng):
    make, shape = LENET_LAYERS[name]
    compare_layer(lambda: make(dtype), (rng.standard_normal(shape) * 2).astype(dtype), rng)


def test_conv_without_input_gradient(rng):
    # the first layer of a network skips dL/dx: the GPU must skip it too and still give gw, gb
    def make():
        conv = L.Conv2D(1, 6, 5, padding=2)
        conv.needs_input_grad = False
        return conv
    layer = compare_layer(make, rng.standard_normal((64, 1, 28, 28)).astype(np.float32), rng)
    assert layer.grads["weight"] is not None and layer.grads["bias"] is not None


def test_lenet5_training_pass(rng):
    """The whole LeNet-5 chain and its loss, forward and backward, batch 64."""
    def chain(layers, loss, x, labels):
        h = x
        for layer in layers:
            h = layer.forward(h)
        value = loss.forward(h, labels)
        g = loss.backward()
        for layer in reversed(layers):
            g = layer.backward(g)
        return value, g, [dict(layer.grads) for layer in layers]

    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, size=64)
    with host():
        layers = [L.Conv2D(1, 6, 5, padding=2), L.Tanh(), L.AvgPool2D(2),
                  L.Conv2D(6, 16, 5), L.Tanh(), L.AvgPool2D(2), L.Flatten(),
                  L.Dense(400, 120), L.Tanh(), L.Dense(120, 84), L.Tanh(), L.Dense(84, 10)]
        ref_loss, ref_gx, ref_grads = chain(layers, losses.SoftmaxCrossEntropy(), x, labels)
        ref_grads = [{k: v.copy() for k, v in g.items()} for g in ref_grads]
    for layer in layers:
        layer.to(GPU)
    loss, gx, grads = chain(layers, losses.SoftmaxCrossEntropy(), gpucnn.asarray(x), gpucnn.asarray(labels))
    assert_on_gpu(loss, "the loss")
    assert_close(gpucnn.to_numpy(loss), ref_loss, "float32", "loss")
    assert_close(gpucnn.to_numpy(gx), ref_gx, "float32", "dL/dx")
    assert sum(len(g) for g in ref_grads) == 10
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        for k in r:
            assert_close(gpucnn.to_numpy(g[k]), r[k], "float32", f"layer {i} ({layers[i].name}) grad {k}")


# ---------------------------------------------------------------------------------------- AlexNet, batch 8

ALEXNET_CONVS = {   # (in, out, kernel, stride, padding), input (N, C, H, W)
    "c1": ((3, 96, 11, 4, 2), (8, 3, 224, 224)),
    "c2": ((96, 256, 5, 1, 2), (8, 96, 27, 27)),
    "c3": ((256, 384, 3, 1, 1), (8, 256, 13, 13)),
    "c4": ((384, 384, 3, 1, 1), (8, 384, 13, 13)),
    "c5": ((384, 256, 3, 1, 1), (8, 384, 13, 13)),
}


@pytest.mark.parametrize("name", list(ALEXNET_CONVS))
def test_alexnet_conv(name, rng):
    (cin, cout, k, s, p), shape = ALEXNET_CONVS[name]
    layer = compare_layer(lambda: L.Conv2D(cin, cout, k, stride=s, padding=p),
                          rng.standard_normal(shape).astype(np.float32), rng)
    assert layer.output_shape(shape[1:]) == {"c1": (96, 55, 55), "c2": (256, 27, 27)}.get(name, (cout, 13, 13))


@pytest.mark.parametrize("shape", [(8, 96, 55, 55), (8, 256, 27, 27), (64, 6, 28, 28)])
def test_maxpool_3x3_stride_2(shape, rng):
    compare_layer(lambda: L.MaxPool2D(3, stride=2), rng.standard_normal(shape).astype(np.float32), rng)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(8, 96, 55, 55), (8, 256, 27, 27)])
def test_local_response_norm(shape, dtype, rng):
    compare_layer(lambda: L.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0),
                  (rng.standard_normal(shape) * 10).astype(dtype), rng)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(8, 96, 55, 55), (64, 16, 10, 10), (64, 6, 1, 1)])
def test_batchnorm(shape, dtype, training, rng):
    def make():   # called on the host; trained-looking parameters and statistics, not the initial 1s and 0s
        bn = L.BatchNorm2D(shape[1], dtype=dtype)
        bn.params["gamma"] = rng.uniform(0.5, 1.5, shape[1]).astype(dtype)
        bn.params["beta"] = rng.standard_normal(shape[1]).astype(dtype)
        bn.buffers["running_mean"] = rng.standard_normal(shape[1]).astype(dtype)
        bn.buffers["running_var"] = rng.uniform(0.5, 2.0, shape[1]).astype(dtype)
        return bn
    compare_layer(make, (rng.standard_normal(shape) * 3 + 1).astype(dtype), rng, training=training)


@pytest.mark.parametrize("p", [0.5, 0.1])
@pytest.mark.parametrize("shape", [(8, 4096), (64, 120), (8, 256, 6, 6)])
def test_dropout(shape, p, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    for step in (0, 1, 1000):
        with host():
            ref = KD.dropout_mask(shape, p, 42, step, x)
        mask = KD.dropout_mask(shape, p, 42, step, gpucnn.asarray(x))
        assert_on_gpu(mask, "the dropout mask")
        np.testing.assert_array_equal(gpucnn.to_numpy(mask), ref, err_msg=f"mask of step {step}")
    layer = compare_layer(lambda: L.Dropout(p, seed=42), x, rng)
    assert layer.step == 1


# ---------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n, classes", [(64, 10), (8, 1000), (1, 2)])
def test_softmax_cross_entropy(n, classes, dtype, rng):
    logits = (rng.standard_normal((n, classes)) * 5).astype(dtype)
    labels = rng.integers(0, classes, size=n)
    with host():
        loss = losses.SoftmaxCrossEntropy()
        ref = loss.forward(logits, labels)
        ref_g = loss.backward()
        ref_p = loss.probs(logits)
    loss = losses.SoftmaxCrossEntropy()
    value = loss.forward(gpucnn.asarray(logits), gpucnn.asarray(labels))
    assert_on_gpu(value, "the loss")
    assert_close(gpucnn.to_numpy(value), ref, dtype, "cross-entropy")
    assert_close(gpucnn.to_numpy(loss.backward()), ref_g, dtype, "cross-entropy gradient")
    assert_close(gpucnn.to_numpy(loss.probs(gpucnn.asarray(logits))), ref_p, dtype, "softmax")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(64, 10), (8, 3, 32, 32)])
def test_mse(shape, dtype, rng):
    pred = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    with host():
        loss = losses.MSE()
        ref, ref_g = loss.forward(pred, target), loss.backward()
    loss = losses.MSE()
    value = loss.forward(gpucnn.asarray(pred), gpucnn.asarray(target))
    assert_close(gpucnn.to_numpy(value), ref, dtype, "MSE")
    assert_close(gpucnn.to_numpy(loss.backward()), ref_g, dtype, "MSE gradient")


# ---------------------------------------------------------------------------------------- optimizers

OPTIMIZERS = {
    "sgd": lambda layers: optim.SGD(layers, lr=0.1),
    "sgd_momentum_wd": lambda layers: optim.SGD(layers, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda layers: optim.SGD(layers, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda layers: optim.Adam(layers, lr=1e-3, weight_decay=1e-4),
    "adamw": lambda layers: optim.AdamW(layers, lr=1e-3),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_steps(name, dtype, rng):
    """Three steps with changing gradients over LeNet-5-sized parameters: parameters and state agree."""
    with host():
        layers = [L.Conv2D(6, 16, 5, dtype=dtype), L.Dense(400, 120, dtype=dtype), L.BatchNorm2D(16, dtype=dtype)]
        start = [{k: v.copy() for k, v in layer.params.items()} for layer in layers]
        grads = [[{k: rng.standard_normal(v.shape).astype(dtype) for k, v in layer.params.items()}
                  for layer in layers] for _ in range(3)]
        opt = OPTIMIZERS[name](layers)
        for step_grads in grads:
            for layer, g in zip(layers, step_grads):
                layer.grads = {k: v.copy() for k, v in g.items()}
            opt.step()
        ref = [{k: v.copy() for k, v in layer.params.items()} for layer in layers]
        ref_state = opt.state_dict()["state"]
    for layer, params in zip(layers, start):
        layer.params.update({k: v.copy() for k, v in params.items()})
        layer.to(GPU)
    opt = OPTIMIZERS[name](layers)
    for step_grads in grads:
        for layer, g in zip(layers, step_grads):
            layer.grads = {k: gpucnn.asarray(v) for k, v in g.items()}
        opt.step()
    for i, (layer, r) in enumerate(zip(layers, ref)):
        for k in r:
            assert_on_gpu(layer.params[k], f"{layer.name}.{k}")
            assert_close(gpucnn.to_numpy(layer.params[k]), r[k], dtype, f"{name}: layer {i} {layer.name}.{k}")
    state = opt.state_dict()["state"]
    assert state.keys() == ref_state.keys()
    for key, slots in ref_state.items():
        for s, v in slots.items():
            if isinstance(v, int):
                assert state[key][s] == v
            else:
                assert_close(state[key][s], v, dtype, f"{name}: state {key}.{s}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_update_kernels(dtype, rng):
    """The update kernels alone, on one AlexNet-sized weight (fc7: 4096 x 4096)."""
    shape = (4096, 4096)
    p0 = (rng.standard_normal(shape) * 0.01).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    m0 = (rng.standard_normal(shape) * 0.1).astype(dtype)
    v0 = rng.uniform(0, 0.1, shape).astype(dtype)

    p, vel = p0.copy(), m0.copy()
    KO.sgd_update(p, g, vel, 0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    dp, dvel = gpucnn.asarray(p0), gpucnn.asarray(m0)
    KO.sgd_update(dp, gpucnn.asarray(g), dvel, 0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    assert_close(gpucnn.to_numpy(dp), p, dtype, "sgd param")
    assert_close(gpucnn.to_numpy(dvel), vel, dtype, "sgd velocity")

    for decoupled in (False, True):
        p, m, v = p0.copy(), m0.copy(), v0.copy()
        KO.adam_update(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 7, decoupled=decoupled)
        dp, dm, dv = gpucnn.asarray(p0), gpucnn.asarray(m0), gpucnn.asarray(v0)
        KO.adam_update(dp, gpucnn.asarray(g), dm, dv, 1e-3, 0.9, 0.999, 1e-8, 1e-2, 7, decoupled=decoupled)
        for got, want, what in ((dp, p, "param"), (dm, m, "m"), (dv, v, "v")):
            assert_close(gpucnn.to_numpy(got), want, dtype, f"adam (decoupled={decoupled}) {what}")


def test_clip_grad_norm(rng):
    with host():
        layers = [L.Dense(400, 120), L.Dense(120, 84)]
        grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in layer.params.items()}
                 for layer in layers]
        for layer, g in zip(layers, grads):
            layer.grads = {k: v.copy() for k, v in g.items()}
        ref_norm = optim.clip_grad_norm(layers, 1.0)
        ref = [{k: v.copy() for k, v in layer.grads.items()} for layer in layers]
    for layer, g in zip(layers, grads):
        layer.to(GPU)
        layer.grads = {k: gpucnn.asarray(v) for k, v in g.items()}
    norm = optim.clip_grad_norm(layers, 1.0)
    assert_close(gpucnn.to_numpy(norm), ref_norm, "float32", "gradient norm")
    for layer, r in zip(layers, ref):
        for k in r:
            assert_close(gpucnn.to_numpy(layer.grads[k]), r[k], "float32", f"clipped {layer.name}.{k}")


# ---------------------------------------------------------------------------------------- what the first H200 run found

def test_gpucnn_launches_keep_numbas_occupancy_warning_to_themselves(rng):
    """A LeNet-5 step launches small grids (the loss, the bias gradients) and emits no NumbaPerformanceWarning
    (7 per main job on the H200); a user's own kernel on a small grid still gets Numba's warning."""
    import warnings

    from numba import cuda
    from numba.core.errors import NumbaPerformanceWarning
    model = gpucnn.models.lenet5(seed=0)
    model.to(GPU)
    opt = optim.SGD(model, lr=0.01, momentum=0.9)
    x = gpucnn.asarray(rng.standard_normal((64, 1, 28, 28)).astype(np.float32))
    y = gpucnn.asarray(rng.integers(0, 10, 64))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            model.train_step(x, y, losses.SoftmaxCrossEntropy(), opt, graph=False)
    assert not [w for w in seen if issubclass(w.category, NumbaPerformanceWarning)], [str(w.message) for w in seen]

    @cuda.jit
    def users_kernel(a):
        i = cuda.grid(1)
        if i < a.size:
            a[i] += 1

    with pytest.warns(NumbaPerformanceWarning, match="Grid size 1"):
        users_kernel[1, 32](cuda.to_device(np.zeros(8, np.float32)))


def test_bad_labels_raise_the_cpu_error_on_the_gpu(rng):
    logits = gpucnn.asarray(rng.standard_normal((2, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: labels must be in \[0, 3\) for 3 classes, got 3 at index 1"):
        losses.SoftmaxCrossEntropy().forward(logits, gpucnn.asarray(np.array([0, 3])))
    model = gpucnn.models.lenet5(seed=0)
    model.to(GPU)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) for 10 classes, got -1 at index 0"):
        model.train_step(gpucnn.asarray(rng.standard_normal((2, 1, 28, 28)).astype(np.float32)),
                         gpucnn.asarray(np.array([-1, 2])), losses.SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1))


def test_a_block_too_large_for_the_kernels_registers_is_a_clear_error():
    from gpucnn.kernels import activation as KA
    spec_limit = None
    a = gpucnn.asarray(np.zeros((4, 2, 2, 2), np.float32))
    try:
        backend.launch(KA._pool_act_bias_grad_kernel, 4 * 2048, a.reshape(2, 2, 2, 2), a.astype(np.int32),
                       a, a.copy(), gpucnn.asarray(np.zeros(4, np.float32)),
                       gpucnn.asarray(np.zeros((4, 1), np.float32)), gpucnn.asarray(np.zeros(4, np.int32)), 0,
                       np.float32(0.0), True, 2, 2, 2, 2, 0, 0, threads=2048, shared_bytes=2048 * 4)
    except backend.LaunchError as e:
        spec_limit = str(e)
    assert spec_limit and "registers per thread" in spec_limit, spec_limit


# ---------------------------------------------------------------------------------------- the capture-safe GEMM

@pytest.fixture
def nvmath_provider(monkeypatch):
    cublas = pytest.importorskip("nvmath.bindings.cublas", reason="nvmath-python is not installed here")
    from gpucnn import blas
    monkeypatch.setattr(blas, "_provider", blas._provider)
    blas.use_provider("nvmath")
    yield cublas
    gpucnn.set_precision("fp32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["rows", "a.T", "b.T", "both.T", "out.T", "padded", "batch", "batch @ shared"])
def test_nvmath_gemm_reads_every_layout_in_place(case, dtype, rng, nvmath_provider):
    """gpucnn's own cuBLAS calls (gpucnn.blas.gemm_call) against float64 NumPy, on the layouts the layers pass:
    row-major, transposed views (conv's col.T, w.T), an output that is a transposed view, rows of a wider
    array, and batches (Winograd's 16 GEMMs in one call)."""
    from gpucnn import blas
    m, k, n = 96, 75, 130
    sa, sb = ((16, m, k), (16, k, n)) if case == "batch" else ((16, m, k), (k, n)) if case == "batch @ shared" \
        else ((m, k), (k, n))
    a = rng.standard_normal(sa).astype(dtype)
    b = rng.standard_normal(sb).astype(dtype)
    ga, gb = gpucnn.asarray(a), gpucnn.asarray(b)
    if case in ("a.T", "both.T"):
        ga = gpucnn.asarray(np.ascontiguousarray(a.swapaxes(-1, -2))).swapaxes(-1, -2)
    if case in ("b.T", "both.T"):
        gb = gpucnn.asarray(np.ascontiguousarray(b.swapaxes(-1, -2))).swapaxes(-1, -2)
    if case == "padded":
        ga = gpucnn.asarray(np.pad(a, ((0, 0), (2, 3))))[:, 2:2 + k]
    out = None
    if case == "out.T":
        out = gpucnn.asarray(np.zeros((n, m), dtype)).T
    shape = np.broadcast_shapes(sa[:-2], sb[:-2]) + (m, n)
    assert not isinstance(blas.gemm_call(ga, gb, out if out is not None else gpucnn.asarray(np.empty(shape, dtype))),
                          str), "not read in place"
    y = backend.matmul(ga, gb, out=out)
    assert blas.provider() == "nvmath", "cuBLAS through nvmath did not start (see the warning)"
    assert_close(gpucnn.to_numpy(y), a.astype(np.float64) @ b.astype(np.float64), dtype, case)


def test_nvmath_handle_is_set_up_for_capture(rng, nvmath_provider):
    """gpucnn's handle: pointer mode host, default math (no TF32 unless the compute type asks), and the workspace
    NVIDIA asks for on this GPU, set on the current stream."""
    from gpucnn import blas
    cublas = nvmath_provider
    backend.matmul(gpucnn.asarray(rng.standard_normal((8, 8)).astype(np.float32)),
                   gpucnn.asarray(rng.standard_normal((8, 8)).astype(np.float32)))
    import cupy
    h = blas._handles[("cuda", cupy.cuda.Device().id)]
    assert cublas.get_pointer_mode(h.ptr) == cublas.PointerMode.HOST
    assert cublas.get_math_mode(h.ptr) == cublas.Math.DEFAULT_MATH
    assert cublas.get_stream(h.ptr) == cupy.cuda.get_current_stream().ptr
    assert h.workspace.nbytes == blas._sim.workspace_bytes(blas._compute_capability())


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
def test_nvmath_gemm_is_captured_in_a_cuda_graph_and_replays_bit_for_bit(precision, rng, nvmath_provider):
    """One GEMM (conv's weight gradient: gz @ col.T) captured by backend.capture_graph on a real stream: the
    capture succeeds, and each replay on new inputs equals the eager GEMM of those inputs to the bit."""
    from gpucnn import blas
    if precision == "tf32" and blas._compute_capability() < (8, 0):
        pytest.skip("no TF32 tensor cores below compute capability 8.0")
    gpucnn.set_precision(precision)
    gz = gpucnn.asarray(rng.standard_normal((64, 3000)).astype(np.float32))
    col = gpucnn.asarray(rng.standard_normal((150, 3000)).astype(np.float32))
    out = gpucnn.asarray(np.zeros((64, 150), np.float32))
    backend.matmul(gz, col.T, out=out)                  # eager first: the handle and workspace exist before
    graph, _, error = backend.capture_graph(lambda gz, col: backend.matmul(gz, col.T, out=out), gz, col)
    assert error is None, f"{type(error).__name__}: {error}"
    for _ in range(3):
        gz[...] = gpucnn.asarray(rng.standard_normal((64, 3000)).astype(np.float32))
        col[...] = gpucnn.asarray(rng.standard_normal((150, 3000)).astype(np.float32))
        graph.launch()
        backend.synchronize()
        replayed = gpucnn.to_numpy(out).copy()
        eager = gpucnn.to_numpy(backend.matmul(gz, col.T, out=gpucnn.asarray(np.zeros((64, 150), np.float32))))
        np.testing.assert_array_equal(replayed, eager)
