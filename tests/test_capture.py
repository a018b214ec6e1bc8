"""Graph capture on "sim": a training step is captured as on "cuda", under the rules a capture on a GPU has.

On an H200 no step was ever captured: CuPy refuses every cuBLAS call while a stream captures, so each batch
shape warned and ran eagerly, and "sim", which never captured, could not notice. Now "sim" captures too and
refuses what CUDA and CuPy refuse then, in their words: a host read of a device array, a sync, an allocation
outside the step's workspace, a GEMM through CuPy (the "cupy" provider). With the capture-safe provider
("nvmath": cuBLAS on gpucnn's own handle, see gpucnn.blas; its rules in gpucnn.simblas) whole LeNet-5 and
alexnet_small steps capture, and N replays equal N eager steps bit for bit.
"""
import operator
import warnings

import numpy as np
import pytest

from gpucnn import backend, blas, capture, layers as L, models, optim
from gpucnn.elementwise import ElementwiseKernel
from gpucnn.layers.base import Layer
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.model import Sequential

_add_one = ElementwiseKernel("T x", "T y", "y = x + T(1)", "capture_test_add_one")


def _batches(rng, shapes, steps):
    return [(rng.standard_normal(s).astype(np.float32), rng.integers(0, 10, s[0]))
            for s in shapes for _ in range(steps)]


@pytest.fixture(params=["cupy"])
def provider(request, monkeypatch):
    """The GEMM provider a test runs under (gpucnn.blas.use_provider), put back after it."""
    monkeypatch.setattr(blas, "_provider", blas._provider)
    blas.use_provider(request.param)
    return request.param


cupy_provider = pytest.mark.parametrize("provider", ["cupy"], indirect=True)
nvmath_provider = pytest.mark.parametrize("provider", ["nvmath"], indirect=True)


def _train(make_model, make_opt, batches, graph, lr_at=None, clip_norm=None):
    """Train a fresh model on ``batches``; returns (model, optimizer, loss, losses read after each step)."""
    model = make_model()
    opt, loss = make_opt(model), SoftmaxCrossEntropy()
    values = []
    for t, (x, y) in enumerate(batches):
        if t == lr_at:
            opt.lr = 0.01                   # a schedule's change, under replay
        values.append(float(model.train_step(x, y, loss, opt, clip_norm=clip_norm, graph=graph)))
    return model, opt, loss, values


def _params(model):
    return {f"{i}.{k}": v.copy() for i, layer in enumerate(model.layers) for k, v in layer.params.items()}


def _assert_same_training(a, b):
    (ma, oa, la, va), (mb, ob, lb, vb) = a, b
    assert va == vb
    pa, pb = _params(ma), _params(mb)
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), f"{k} differs"
    for s, arr in oa.flat_state.items():
        assert np.array_equal(arr, ob.flat_state[s]), f"optimizer state {s} differs"
    counters = lambda m, o, l: [getattr(x, "step", None) for x in m.layers] + [o.steps, l.step]
    assert counters(ma, oa, la) == counters(mb, ob, lb)


def _sgd(model):
    return optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)


# ------------------------------------------------------------------------------------------------ cuBLAS through CuPy

@pytest.mark.sim
@cupy_provider
def test_sim_lenet5_capture_fails_on_cublas_warns_once_and_trains_as_eager(rng, provider):
    """What the H200 did (GEMMs through cupy.matmul): capturing LeNet-5's step fails with CuPy's own error at
    the first GEMM, which then names the package that makes GEMMs capturable, and the model trains eagerly;
    one warning per model (not one per batch shape), and the same numbers as graph=False."""
    make = lambda: models.lenet5(seed=0)
    batches = _batches(rng, [(2, 1, 28, 28), (1, 1, 28, 28)], 2)      # the second run of each shape captures
    with pytest.warns(UserWarning) as seen:
        graphed = _train(make, _sgd, batches, graph=True)
    assert len(seen) == 1, [str(w.message) for w in seen]
    message = str(seen[0].message)
    assert "NotImplementedError: calling cuBLAS API during stream capture is currently unsupported" in message
    assert "install nvmath-python==1.0.1" in message
    assert "this model's steps run eagerly" in message and "29 per LeNet-5 step" in message
    assert "Other batch shapes that fail to capture fall back silently" in message
    assert [st.graph for st in graphed[0]._steps.values()] == [False, False]       # both shapes tried, failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager = _train(make, _sgd, batches, graph=False)
    _assert_same_training(graphed, eager)


def _small():
    return Sequential([L.Flatten(), L.Dense(16, 10, rng=np.random.default_rng(0))], input_shape=(1, 4, 4))


@pytest.mark.sim
@cupy_provider
def test_sim_the_warning_is_once_per_model_not_once_per_process(rng, provider):
    batches = _batches(rng, [(2, 1, 4, 4), (3, 1, 4, 4)], 2)
    with pytest.warns(UserWarning, match="cuBLAS") as seen:
        _train(_small, _sgd, batches, graph=True)
        _train(_small, _sgd, batches, graph=True)
    assert len(seen) == 2


# ------------------------------------------------------------------------------------------------ each rule

def _capture(body, x):
    """Capture ``body(x)`` inside a workspace whose plan an eager run of the same body made first."""
    arena = backend.Arena()

    def fn(x):
        with backend.workspace(arena):
            return body(x)

    fn(x)
    return backend.capture_graph(fn, x)


def _in_workspace(read):
    """A body that takes a workspace buffer, writes it with a kernel, then does ``read`` on it."""
    def body(x):
        a = backend.empty(x.shape, x.dtype, x)
        _add_one(x, a)
        return read(a)
    return body


HOST_READS = {
    "float": lambda a: float(a[0]),
    "bool": lambda a: bool(a[0]),
    "int": lambda a: int(a[0]),
    "index": lambda a: operator.index(a[0:1].view(np.int32)[0]),
    "item": lambda a: a.item(0),
    "tolist": lambda a: a.tolist(),
    "to_numpy": lambda a: backend.to_numpy(a),
    "iterate": lambda a: [float(v) for v in a],
    "a 0-d view": lambda a: float(a.reshape(-1)[1:2].reshape(())),
}


@pytest.mark.sim
@pytest.mark.parametrize("read", sorted(HOST_READS))
def test_sim_a_host_read_of_a_workspace_array_in_a_capture_raises_cupys_error(read):
    x = np.arange(4, dtype=np.float32)
    graph, _, error = _capture(_in_workspace(HOST_READS[read]), x)
    assert graph is None and isinstance(error, backend.CaptureError)
    assert str(error) == "the current stream is capturing, so D2H transfers are disallowed"
    HOST_READS[read](x)                                 # outside a capture the same read works
    assert not isinstance(x, backend.CapturedArray)


@pytest.mark.sim
def test_sim_outside_a_capture_a_captured_array_is_an_ordinary_array():
    c = capture._captured(np.arange(4, dtype=np.float32))
    assert float(c[1]) == 1 and bool(c[1]) and int(c[2]) == 2 and c.item(3) == 3 and c.tolist() == [0, 1, 2, 3]
    assert backend.to_numpy(c).sum() == 6 and [float(v) for v in c] == [0, 1, 2, 3]
    np.testing.assert_array_equal(c * 2 + np.ones(4, np.float32), [1, 3, 5, 7])
    c[0] = 5
    np.add(c, 1, out=c)
    np.testing.assert_array_equal(c, [6, 2, 3, 4])


@pytest.mark.sim
def test_sim_a_host_read_of_the_batch_input_in_a_capture_raises():
    graph, _, error = _capture(lambda x: float(x[0, 1]), np.ones((2, 3), np.float32))
    assert str(error) == backend.D2H_IN_CAPTURE


@pytest.mark.sim
def test_sim_a_sync_in_a_capture_raises_cudas_error():
    graph, _, error = _capture(lambda x: backend.synchronize(), np.ones(3, np.float32))
    assert isinstance(error, backend.CaptureError)
    assert str(error) == "cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing"
    backend.synchronize()                               # outside: nothing to wait for on "sim"


@pytest.mark.sim
@pytest.mark.parametrize("provider", ["cupy", "nvmath"], indirect=True)
def test_sim_a_gemm_in_a_capture_raises_cupys_cublas_error_unless_capture_safe(provider, rng):
    """Through cupy.matmul: CuPy's error, then which package enables graphs. Through the capture-safe
    provider: recorded, and the graph's launch computes the GEMM of the inputs it then holds."""
    w = rng.standard_normal((3, 3)).astype(np.float32)
    x = rng.standard_normal((2, 3)).astype(np.float32)
    graph, out, error = _capture(lambda x: backend.matmul(x, w, out=backend.empty((2, 3), np.float32, x)), x)
    if provider == "cupy":
        assert type(error) is NotImplementedError and graph is None
        assert str(error).startswith("calling cuBLAS API during stream capture is currently unsupported (CuPy's "
                                     "words: gpucnn's GEMMs go through cupy.matmul; install nvmath-python==1.0.1")
        return
    assert error is None, error
    x[...] = rng.standard_normal((2, 3))
    graph.launch()
    np.testing.assert_allclose(out, x.astype(np.float64) @ w, rtol=1e-6, atol=1e-6)


_captured_run = {"now": False}     # True while the captured run, which asks for what the eager run did not


ALLOCATIONS = {
    "empty outside the workspace": lambda x: _outside(lambda: backend.empty((5,), np.float32, x)),
    "zeros outside the workspace": lambda x: _outside(lambda: backend.zeros((5,), np.float32, x)),
    "persistent_empty": lambda x: backend.persistent_empty((3,), np.uint32, x),
    "a request the plan lacks": lambda x: backend.empty((7,) if _captured_run["now"] else (5,), np.float32, x),
    "an elementwise output the plan lacks": lambda x: _add_one(x[:2] if _captured_run["now"] else x),
    "a ufunc without out=": lambda x: x * 2,
    "a reduction": lambda x: x.sum(),
    "a copy": lambda x: x.copy(),
    "astype": lambda x: x.astype(np.float64),
    "fancy indexing": lambda x: x[[0, 1]],
    "a non-contiguous ascontiguousarray": lambda x: backend.xp(x).ascontiguousarray(x[::2]),
    "a NumPy function": lambda x: np.concatenate([x, x]),
}


def _outside(make):
    with backend.no_workspace():
        return make()


@pytest.mark.sim
@pytest.mark.parametrize("what", sorted(ALLOCATIONS))
def test_sim_an_allocation_outside_the_plan_in_a_capture_raises(what, monkeypatch):
    x = np.arange(4, dtype=np.float32)
    arena = backend.Arena()

    def fn(x):
        with backend.workspace(arena):
            return ALLOCATIONS[what](x)

    fn(x)                                               # eagerly: it works (and plans the workspace)
    monkeypatch.setitem(_captured_run, "now", True)
    graph, _, error = backend.capture_graph(fn, x)
    assert graph is None and isinstance(error, backend.CaptureError), error
    assert "graph is captured" in str(error)


@pytest.mark.sim
def test_sim_nothing_runs_while_capturing_and_a_launch_replays_the_recorded_work():
    """As on a GPU: the capture records kernels and writes (with the scalars they were given), the launch runs
    them; the workspace arrays are CapturedArrays only inside the capture."""
    x = np.arange(4, dtype=np.float32)
    arena, seen = backend.Arena(), []

    def fn(x):
        with backend.workspace(arena):
            a = backend.zeros(x.shape, x.dtype, x)     # fill recorded
            _add_one(x, a)                             # kernel recorded
            np.multiply(a, 3, out=a)                   # ufunc with out= recorded
            a[0] = -1                                  # item assignment recorded
            seen.append(type(a))
            return a

    out = fn(x).copy()
    graph, (a,), error = backend.capture_graph(lambda x: (fn(x),), x)
    assert error is None and seen[-1] is backend.CapturedArray and type(a) is np.ndarray
    a[...] = 7
    x[...] = 10                                         # a new batch in the graph's input
    assert np.all(a == 7)                               # nothing ran
    graph.launch()
    np.testing.assert_array_equal(a, [-1, 33, 33, 33])
    assert not np.array_equal(a, out)


class _Peek(Layer):
    """A layer that reads its input on the host in forward (a hidden host read)."""

    def output_shape(self, input_shape):
        return input_shape

    def forward(self, x, training=True):
        self.first = float(x.reshape(-1)[0])
        return x

    def backward(self, gy):
        return gy


@pytest.mark.sim
@nvmath_provider
def test_sim_a_layer_that_reads_on_the_host_cannot_be_captured(rng, provider):
    """The capture finds a hidden host read in a step whose GEMMs are capturable: the step falls back."""
    make = lambda: Sequential([L.Flatten(), _Peek(), L.Dense(16, 10, rng=np.random.default_rng(0))],
                              input_shape=(1, 4, 4))
    batches = _batches(rng, [(2, 1, 4, 4)], 3)
    with pytest.warns(UserWarning, match="D2H transfers are disallowed"):
        graphed = _train(make, _sgd, batches, graph=True)
    _assert_same_training(graphed, _train(make, _sgd, batches, graph=False))


# ------------------------------------------------------------------------------------------------ the rest is clean

def _dropout_net():
    rng = np.random.default_rng(0)
    return Sequential([L.Conv2D(1, 4, 3, padding=1, rng=rng), L.ReLU(), L.MaxPool2D(2), L.Flatten(),
                       L.Dropout(0.5, seed=4), L.Dense(4 * 14 * 14, 16, rng=rng), L.Tanh(),
                       L.Dropout(0.25, seed=5), L.Dense(16, 10, rng=rng)], input_shape=(1, 28, 28))


def _adam(model):
    return optim.Adam(model, lr=0.01, weight_decay=1e-4)


def _lenet5_direct():
    """LeNet-5 with both convolutions by the direct algorithm (gpucnn.kernels.direct)."""
    model = models.lenet5(seed=0)
    for layer in model.layers[0], model.layers[3]:
        layer.algorithm = "direct"
    return model


NETS = {    # name -> (model, optimizer, clip_norm, batch shapes in step order)
    "lenet5 sgd": (lambda: models.lenet5(seed=0), _sgd, None, "aabbab"),
    "lenet5 direct sgd": (_lenet5_direct, _sgd, None, "aaa"),
    "lenet5 adam clipped": (lambda: models.lenet5(seed=0), _adam, 0.5, "aabbab"),
    "alexnet_small sgd": (lambda: models.alexnet_small(input_size=8, seed=0), _sgd, None, "aaa"),
    "dropout adam": (_dropout_net, _adam, None, "aabbab"),
}


@pytest.mark.sim
@nvmath_provider
@pytest.mark.parametrize("net", list(NETS))
def test_sim_a_whole_step_is_captured_and_n_replays_equal_n_eager_steps_bit_for_bit(net, rng, provider):
    """With the capture-safe GEMM, LeNet-5 (SGD with momentum; Adam with clipping), alexnet_small (SGD,
    dropout) and a net with dropout (Adam) capture at the second step of a batch shape and replay the recorded
    device work (LeNet-5 and the dropout net with two batch shapes, each with a graph of its own): the losses,
    weights, optimizer state and host counters equal eager training's to the bit, with the learning rate changed
    between steps and the dropout keys changing every step. So the step reads nothing on the host, syncs never,
    allocates nothing outside its workspace, and bakes no per-step value into its kernels' (or GEMMs') arguments.
    (alexnet_small: one batch shape, 3 steps, at 8x8: the simulator takes minutes per step of it otherwise.)"""
    make, make_opt, clip, plan = NETS[net]
    size = (1, 8, 8) if net.startswith("alexnet") else (1, 28, 28)
    shapes = {"a": (2,) + size if len(plan) > 3 else (1,) + size, "b": (1,) + size}
    batches = _batches(rng, [shapes[c] for c in plan], 1)     # eager, captured (each shape), then replays
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no capture failed
        graphed = _train(make, make_opt, batches, graph=True, lr_at=len(plan) - 1, clip_norm=clip)
        eager = _train(make, make_opt, batches, graph=False, lr_at=len(plan) - 1, clip_norm=clip)
    graphs = [st.graph for st in graphed[0]._steps.values()]
    assert len(graphs) == len(set(plan)) and all(isinstance(g, capture._SimGraph) and len(g.ops) >= 20
                                                 for g in graphs)
    _assert_same_training(graphed, eager)


@pytest.mark.sim
@nvmath_provider
def test_sim_fit_replays_one_graph_per_batch_shape_and_equals_eager_fit(rng, provider):
    """fit over 5 images in batches of 2 (shapes 2, 2, 1) for 2 epochs: each shape's step is captured (at its second
    run), then replayed; history and weights equal an eager fit's to the bit."""
    x = rng.integers(0, 256, (5, 1, 28, 28)).astype(np.uint8)
    y = rng.integers(0, 10, 5)
    runs = {}
    for graph in (True, False):
        model = models.lenet5(seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            history = model.fit((x, y), epochs=2, batch_size=2, optimizer=_adam(model), clip_norm=1.0, verbose=0,
                                graph=graph)
        runs[graph] = model, history
    (graphed, h_graph), (eager, h_eager) = runs[True], runs[False]
    assert sorted(st.x.shape[0] for st in graphed._steps.values() if st.graph) == [1, 2]
    assert h_graph["loss"] == h_eager["loss"] and h_graph["accuracy"] == h_eager["accuracy"]
    pg, pe = _params(graphed), _params(eager)
    assert all(np.array_equal(pg[k], pe[k]) for k in pe), [k for k in pe if not np.array_equal(pg[k], pe[k])]


@pytest.mark.sim
@nvmath_provider
def test_sim_switching_a_layers_algorithm_after_a_capture_is_not_replayed_from_the_old_graph(rng, provider):
    """models.use_winograd between steps of one batch shape: the captured Winograd step must not replay for the
    GEMM algorithm (the step runs once eagerly on the new path, then is captured again), so graphed training
    equals eager training."""
    from test_winograd import _twin_nets
    seed = int(rng.integers(2 ** 31))
    batches = _batches(rng, [(2, 2, 8, 10)] * 6, 1)
    batches = [(x, y % 5) for x, y in batches]
    runs = []
    for graph in (True, False):
        model = _twin_nets(np.random.default_rng(seed), "winograd", "float32")
        opt, loss = _sgd(model), SoftmaxCrossEntropy()
        values = []
        for t, (x, y) in enumerate(batches):
            models.use_winograd(model, t < 3)
            values.append(float(model.train_step(x, y, loss, opt, graph=graph)))
        runs.append((model, opt, loss, values))
    (st,) = runs[0][0]._steps.values()
    assert isinstance(st.graph, capture._SimGraph) and "gemm" in st.fingerprint and "winograd" not in st.fingerprint
    _assert_same_training(*runs)


# ------------------------------------------------------------------------------------------------ CuPy's words

def test_the_sync_message_is_cudas_as_cupy_words_it():
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")
    assert str(runtime.CUDARuntimeError(900)) == backend.SYNC_IN_CAPTURE      # cudaErrorStreamCaptureUnsupported
