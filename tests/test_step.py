"""The step runner (gpucnn.step): buffer lifetimes as layers declare them, the NaN-poison mode that shows a read
after a declared end of life, the recompute policy, how deep a kernel launch sits below train_step, and
checkpoints written before the runner moved out of gpucnn/model.py.

Poison: each test that wants it turns it on itself (``poisoned``); CI also runs the whole "sim" suite and the CPU
training-step tests with GPUCNN_POISON=1 (tests/run_all.sh), so every training step there is checked too.
"""
import os
import sys

import numpy as np
import pytest

from gpucnn import backend, layers as L, memory, models, optim, step
from gpucnn.layers.base import Layer
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.model import Sequential
from conftest import assert_close

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "e09d93d")
MAX_FRAMES = 6      # gpucnn frames from train_step down to the one that launches (the budget)


@pytest.fixture
def poisoned():
    old = memory.poison(True)
    yield
    memory.poison(old)


@pytest.fixture
def unpoisoned():
    old = memory.poison(False)
    yield
    memory.poison(old)


def params_of(model):
    return {f"{i}.{k}": backend.to_numpy(a).copy() for i, layer in enumerate(model.layers)
            for k, a in [*layer.params.items(), *layer.buffers.items()]}


def nets():
    """name -> (make, batch shape, classes): the nets the lifetime tests train (small: "sim" runs them too)."""
    def norms():
        r = np.random.default_rng(5)
        return Sequential([L.Conv2D(1, 4, 3, padding=1, rng=r), L.BatchNorm2D(4), L.ReLU(),
                           L.LocalResponseNorm(size=3), L.MaxPool2D(3, stride=2), L.Flatten(),
                           L.Dropout(0.4, seed=2), L.Dense(36, 8, rng=r), L.LeakyReLU(-0.1),     # (not fused)
                           L.Dropout(0.0), L.Dense(8, 4, rng=r)], input_shape=(1, 8, 8))
    return {
        "lenet5": (lambda: models.lenet5(seed=0), (2, 1, 28, 28), 10),
        "lenet5 relu/max": (lambda: models.lenet5(activation="relu", pool="max", seed=0), (2, 1, 28, 28), 10),
        "alexnet_small": (lambda: models.alexnet_small(input_size=8, seed=0), (1, 1, 8, 8), 10),
        "alexnet_small, winograd": (lambda: models.alexnet_small(input_size=8, seed=0, winograd=True), (1, 1, 8, 8),
                                    10),
        "batchnorm, LRN, dropout": (norms, (3, 1, 8, 8), 4),
    }


def batches(rng, shape, classes, n=3):
    return [(rng.standard_normal(shape).astype(np.float32), rng.integers(0, classes, shape[0])) for _ in range(n)]


def train(model, data, clip_norm=None, opt=None):
    opt = opt or optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    losses = [float(model.train_step(x, y, SoftmaxCrossEntropy(), opt, clip_norm=clip_norm)) for x, y in data]
    return losses, params_of(model)


# ------------------------------------------------------------------------------------------ poison

class _Square(Layer):
    """y = x * x, whose backward reads x: ``declare`` says whether its forward declares it (the right lifetime),
    declares nothing (a wrong one: x ends when the next stage has read it), or never calls save_for_backward
    (a layer written before declarations existed: everything it touched is kept until its backward)."""

    def __init__(self, declare="x"):
        super().__init__()
        self.declare = declare

    def forward(self, x, training=True):
        self._x = x
        if self.declare == "x":
            self.save_for_backward(x)
        elif self.declare == "nothing":
            self.save_for_backward()
        return x * x

    def backward(self, gy):
        return 2 * self._x * gy


def square_net(declare, seed=0):
    r = np.random.default_rng(seed)
    return Sequential([L.Conv2D(1, 2, 3, padding=1, rng=r), L.Tanh(), L.Flatten(), L.Dense(32, 6, rng=r),
                       _Square(declare), L.Dense(6, 3, rng=r)], input_shape=(1, 4, 4))


def test_poison_shows_a_wrong_lifetime_as_nan(rng, poisoned):
    """A layer that reads its input in backward but declares nothing: in poison mode that input (the Dense's
    output) is NaN by then, and so is every weight after the update. Declared, the same net trains as an
    undeclared layer's (which keeps everything) and as without poison, to the bit."""
    data = batches(rng, (2, 1, 4, 4), 3, n=2)
    losses, wrong = train(square_net("nothing"), data[:1])
    assert np.isfinite(losses).all() and np.isnan(wrong["3.weight"]).all() and np.isnan(wrong["0.weight"]).all()
    right = train(square_net("x"), data)
    legacy = train(square_net(None), data)
    memory.poison(False)
    plain = train(square_net("x"), data)
    for k, v in plain[1].items():
        assert np.isfinite(v).all()
        np.testing.assert_array_equal(right[1][k], v, err_msg=k)
        np.testing.assert_array_equal(legacy[1][k], v, err_msg=k)
    assert right[0] == legacy[0] == plain[0]


class _ForgetfulDense(L.Dense):
    """Dense that declares its output but not its input, which its backward reads for the weight gradient."""

    def save_for_backward(self, x, y):
        super().save_for_backward(y)
        return x, y


def test_poison_catches_a_real_layer_declaring_too_little(rng, poisoned):
    """The same with gpucnn's own Dense told to declare one array too few: its input (the Dense before it, which
    keeps nothing of its output) is NaN when its weight gradient reads it."""
    def net(klass):
        r = np.random.default_rng(1)
        return Sequential([L.Conv2D(1, 2, 3, rng=r), L.ReLU(), L.Flatten(), L.Dense(8, 7, rng=r),
                           klass(7, 5, rng=r), L.Tanh(), L.Dense(5, 3, rng=r)], input_shape=(1, 4, 4))
    data = batches(rng, (2, 1, 4, 4), 3, n=1)
    bad = train(net(_ForgetfulDense), data)[1]
    good = train(net(L.Dense), data)[1]
    assert np.isnan(bad["4.weight"]).all() and np.isfinite(good["4.weight"]).all()


def test_poison_fills_what_a_step_declared_dead_and_nothing_else(rng, poisoned):
    """After a step in poison mode, what layers declared for backward (LRN's scale, dropout's mask, BatchNorm's
    normalised input, max pooling's switches) holds NaN or the integer sentinel; the batch, the labels, the
    logits, the loss, the parameters and the running statistics hold numbers."""
    make, shape, classes = nets()["batchnorm, LRN, dropout"]
    model = make()
    (x, y), = batches(rng, shape, classes, n=1)
    keep_x, keep_y = x.copy(), y.copy()
    value = model.train_step(x, y, SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1, momentum=0.9))
    lrn, pool, drop, bn = model.layers[3], model.layers[4], model.layers[6], model.layers[1]
    for name, a in (("LRN scale", lrn._scale), ("LRN input", lrn._x), ("dropout mask", drop._mask),
                    ("BatchNorm xhat", bn._cache[0])):
        assert np.isnan(backend.to_numpy(a)).all(), name
    switches = backend.to_numpy(pool.switches)
    assert (switches == np.iinfo(switches.dtype).min).all()
    np.testing.assert_array_equal(x, keep_x)
    np.testing.assert_array_equal(y, keep_y)
    assert np.isfinite(float(value)) and np.isfinite(backend.to_numpy(model.last_output)).all()
    for k, v in params_of(model).items():
        assert np.isfinite(v).all(), k


@pytest.mark.parametrize("net", list(nets()))
def test_nets_train_identically_with_poison_on(net, rng, unpoisoned):
    """Every end of life the runner declares is after the last read: filling each array with NaN there changes
    no bit of the losses or the weights (here on "cpu"; test_sim_... on the GPU path)."""
    _check_poison_changes_nothing(net, rng)


@pytest.mark.sim
@pytest.mark.parametrize("net", ["batchnorm, LRN, dropout"])
def test_sim_nets_train_identically_with_poison_on(net, rng, unpoisoned):
    """The same on "sim", where the released memory is also handed to later buffers by the workspace plan (the
    net with the most kinds of layers, two steps: the simulator is slow, and CI runs the whole sim suite
    poisoned, test_speed's LeNet-5, alexnet_small and Winograd steps included)."""
    _check_poison_changes_nothing(net, rng, steps=2)


def _check_poison_changes_nothing(net, rng, steps=3):
    make, shape, classes = nets()[net]
    data = batches(rng, shape, classes, n=steps)
    plain = train(make(), data, clip_norm=1.0)
    memory.poison(True)
    poisoned = train(make(), data, clip_norm=1.0)
    assert poisoned[0] == plain[0] and np.isfinite(plain[0]).all(), net
    for k, v in plain[1].items():
        np.testing.assert_array_equal(poisoned[1][k], v, err_msg=f"{net}: {k}")


@pytest.mark.sim
def test_sim_wrong_lifetime_is_nan_and_right_ones_equal_the_cpu(rng, poisoned):
    """On the GPU path the wrongly declared input is both poisoned and reused: NaN again. Declared right (or not
    at all), the step equals the CPU path's."""
    data = batches(rng, (2, 1, 4, 4), 3, n=2)
    assert np.isnan(train(square_net("nothing"), data[:1])[1]["3.weight"]).all()
    for declare in ("x", None):
        sim = train(square_net(declare), data)
        with backend.cpu_path():
            cpu = train(square_net(declare), data)
        assert_close(np.array(sim[0]), np.array(cpu[0]), "float32", f"losses, declare={declare}")
        for k, v in cpu[1].items():
            assert_close(sim[1][k], v, "float32", f"{k}, declare={declare}")


# ------------------------------------------------------------------------------------------ lifetimes

@pytest.mark.sim
def test_sim_saved_arrays_end_after_their_backward_and_not_before(rng, monkeypatch):
    """The recorded spans of a LeNet-5 (relu, max) step: conv1's GEMM output z, neither returned nor declared, ends
    when conv1's forward returns; conv1's pooled output, which conv2 lowers and declares not, once conv2's
    forward has read it; conv2's lowered input and pooling switches (declared) together once conv2's backward
    ran, before conv1's switches; no buffer is released twice, and only the logits and the loss outlive the step."""
    monkeypatch.setattr(memory.Arena, "PLAN", False)       # separate buffers: addresses name them after the step
    model = models.lenet5(activation="relu", pool="max", seed=0)
    (x, y), = batches(rng, (2, 1, 28, 28), 10, n=1)
    released = []
    real = memory.Arena.release

    def release(arena, a, address=None):
        address = memory._address(a) if address is None and getattr(a, "size", 0) else address
        if address in arena._live:
            released.append(arena._live[address])
        return real(arena, a, address)

    monkeypatch.setattr(memory.Arena, "release", release)
    value = model.train_step(x, y, SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1), graph=False)
    arena = next(iter(model._steps.values())).arena
    spans, buffers = arena.spans, arena.buffers
    assert len(set(released)) == len(released), "a buffer was released twice"
    at_end = {memory._address(buffers[k]) for k, (_, death) in enumerate(spans) if death is None}
    assert at_end == {memory._address(model.last_output), memory._address(value)}
    first = lambda shape, kind="f": next(k for k, b in enumerate(buffers)  # noqa: E731
                                         if b.shape == shape and b.dtype.kind == kind)
    z1, y1, col2 = first((6, 28 * 28 * 2)), first((2, 6, 14, 14)), first((6, 5, 5, 10, 10, 2))
    sw1, sw2 = first((2, 6, 14, 14), "i"), first((2, 16, 5, 5), "i")
    dense1 = first((2, 120))
    assert spans[z1][1] < spans[col2][0] and spans[col2][0] < spans[y1][1] < spans[dense1][0]
    assert abs(spans[col2][1] - spans[sw2][1]) <= 3 and spans[sw2][1] < spans[sw1][1]


def test_release_since_keeps_what_shares_memory_with_a_kept_array():
    like = np.zeros(1, np.float32)
    arena = backend.Arena()
    with backend.workspace(arena):
        backend.empty((4,), np.float32, like)
        mark = memory.mark()
        b, c, d = (backend.empty((6,), np.float32, like) for _ in range(3))
        memory.release(c)
        memory.release_since(mark, keep=[b[2:].reshape(2, 2)])     # a view inside b keeps b
        assert set(arena._live.values()) == {0, 1}
        memory.release_since(0)
        assert not arena._live
    assert [s[1] for s in arena.spans] == [6, 7, 4, 5]     # deaths on the clock (each request, each release ticks)
    assert memory.mark() is None


def test_recompute_is_the_runners_policy(monkeypatch):
    """step.RECOMPUTE_ABOVE is the one place; Conv2D.RECOMPUTE_ABOVE reads and sets it (deleting restores the
    default); outside a training step, or on the CPU, everything is kept."""
    assert L.Conv2D.RECOMPUTE_ABOVE == step.RECOMPUTE_ABOVE == step.DEFAULT_RECOMPUTE_ABOVE
    L.Conv2D.RECOMPUTE_ABOVE = 0
    try:
        assert step.RECOMPUTE_ABOVE == 0
    finally:
        del L.Conv2D.RECOMPUTE_ABOVE
    assert step.RECOMPUTE_ABOVE == step.DEFAULT_RECOMPUTE_ABOVE
    monkeypatch.setattr(step, "RECOMPUTE_ABOVE", 0)
    assert L.Conv2D.RECOMPUTE_ABOVE == 0
    big = np.ones((4, 4), np.float32)
    assert memory.keep_for_backward(big)                   # no step running
    with backend.workspace(backend.Arena(), recompute_above=0):
        assert memory.keep_for_backward(big)               # a NumPy array on "cpu": not the GPU path


@pytest.mark.sim
def test_sim_recompute_policy_ends_the_lowered_input_at_once(rng):
    like = np.zeros(1, np.float32)
    arena = backend.Arena()
    with backend.workspace(arena, recompute_above=100):
        small, big = backend.empty((25,), np.float32, like), backend.empty((26,), np.float32, like)
        assert memory.keep_for_backward(small) and not memory.keep_for_backward(big)
        assert set(arena._live.values()) == {0}


# ------------------------------------------------------------------------------------------ frames

class _Frames:
    """A gpucnn.profile counter that, at every Numba launch, ElementwiseKernel call and GEMM, counts the gpucnn
    frames from train_step's down to the one that called the launch helper (launch, matmul, the kernel's call)."""
    HELPERS = ("gpucnn.launch", "gpucnn.blas", "gpucnn.elementwise")

    def __init__(self):
        self.chains = {}

    def count_alloc(self, family, nbytes):
        pass

    def count_host(self, kind):
        pass

    def count_launch(self, family, kind):
        f = sys._getframe(1)
        while f is not None and f.f_globals.get("__name__", "").startswith(self.HELPERS):
            f = f.f_back
        chain = []
        while f is not None:
            if f.f_globals.get("__name__", "").startswith("gpucnn."):
                chain.append(f"{f.f_globals['__name__']}.{f.f_code.co_name}")
            if f.f_code.co_name == "train_step" and f.f_globals.get("__name__") == "gpucnn.step":
                break
            f = f.f_back
        assert f is not None, f"a {kind} launch of {family} outside train_step: {chain}"
        self.chains[tuple(reversed(chain))] = kind


@pytest.mark.sim
@pytest.mark.parametrize("net", ["lenet5", "lenet5 relu/max", "alexnet_small", "batchnorm, LRN, dropout"])
def test_sim_every_launch_is_at_most_six_gpucnn_frames_below_train_step(net, rng, monkeypatch):
    """A reader follows train_step -> layer -> kernel function -> launch: at most six gpucnn frames, train_step's
    and the launching one included, for every Numba kernel, ElementwiseKernel and GEMM of a step (clipping, Adam,
    a recomputed lowering, Winograd's and im2col's passes included)."""
    make, shape, classes = nets()[net]
    if net == "alexnet_small":
        monkeypatch.setattr(step, "RECOMPUTE_ABOVE", 0)      # im2col again in backward: its own chain
    model = make()
    opt = optim.Adam(model, lr=1e-3) if "relu" in net else optim.SGD(model, lr=0.01, momentum=0.9)
    frames = _Frames()
    backend._counters.append(frames)
    try:
        for x, y in batches(rng, shape, classes, n=1):     # (a second step launches the same kernels)
            model.train_step(x, y, SoftmaxCrossEntropy(), opt, clip_norm=1.0 if "lenet5" in net else None)
    finally:
        backend._counters.remove(frames)
    assert {"numba", "cublas"} <= set(frames.chains.values()), frames.chains
    deepest = max(frames.chains, key=len)
    assert len(deepest) <= MAX_FRAMES, "\n".join(" -> ".join(c) for c in frames.chains if len(c) > MAX_FRAMES)
    assert all(c[0] == "gpucnn.step.train_step" for c in frames.chains)


# ------------------------------------------------------------------------------------------ old checkpoints

def test_checkpoints_written_before_the_move_load_and_resume_to_the_same_weights(tmp_path):
    """tests/data/e09d93d: a small model (BatchNorm buffers, a dropout step counter) saved by e09d93d's code
    (model.npz, and fit's training checkpoint last.npz after 1 of 3 epochs), and where e09d93d's resumed
    fit ended (resumed.npz). Here they load, and resuming ends on the same weights, bit for bit."""
    data = np.load(os.path.join(DATA, "data.npz"))
    want = np.load(os.path.join(DATA, "resumed.npz"))
    model = Sequential.load(os.path.join(DATA, "model.npz"))
    assert [type(layer).__name__ for layer in model.layers][:3] == ["Conv2D", "BatchNorm2D", "ReLU"]
    opt = optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3)
    hist = model.fit((data["x"], data["y"]), epochs=3, batch_size=5, optimizer=opt,
                     resume=os.path.join(DATA, "last.npz"), verbose=0, seed=5)
    assert hist["loss"] == list(want["loss"])
    assert model.layers[5].step == int(want["dropout_step"])
    for k, v in params_of(model).items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
