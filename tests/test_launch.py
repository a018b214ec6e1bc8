"""The host's work per Numba launch (gpucnn.launch): configured launches kept per kernel, argument types, grid,
stream and shared memory; views of bound buffers (gpucnn.launch.bind: a step's planned workspace, the flat
parameters, the optimizer's state) passed as wrappers made once; every other array converted at each launch.

Counted, never timed (gpucnn.profile's ``p.host``): from a training step's third eager run on, a step makes no
configured launch and no wrapper. Checked against ``launch.BIND = False`` (the path before binding: every array
converted at every launch, and on "sim" a configuration per launch), to the bit.
"""
import gc
import warnings

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, launch, models, optim
from gpucnn.backend import cuda, gpu_kernel
from gpucnn.losses import SoftmaxCrossEntropy


@gpu_kernel
def _axpy(x, y, out, a, n):
    i = cuda.grid(1)
    if i < n:
        out[i] = a * x[i] + y[i]


def _axpy_launch(x, y, out, a=2.0):
    backend.launch(_axpy, x.size, x, y, out, a, x.size, threads=4)


class _Owner:
    """Something that owns buffers (as an Arena or a model does)."""


def _keys_in(buf):
    lo = backend._address(buf)
    return [k for k in launch._wrapped if lo <= k[0] < lo + buf.nbytes]


@pytest.mark.sim
def test_sim_a_bound_buffer_is_wrapped_once_and_written_in_place(rng):
    owner, buf = _Owner(), rng.standard_normal(24)
    backend.bind(owner, buf)
    x = buf[:8]                             # a view of the bound buffer
    transient = rng.standard_normal(8)      # not bound: converted at every launch
    for run in range(3):
        before = buf.copy()
        with gpucnn.profile() as p:
            _axpy_launch(x, transient, buf[16:])
        np.testing.assert_array_equal(buf[16:], 2.0 * before[:8] + transient)
        np.testing.assert_array_equal(buf[:16], before[:16])
        assert p.host == {"configured": int(run == 0), "wrapped": 2 * int(run == 0), "converted": 1}, (run, p.host)
    assert len(_keys_in(buf)) == 2
    with gpucnn.profile() as p:             # other views (another shape) of the buffer, another grid
        _axpy_launch(buf[:4], buf[4:8], buf[8:12])
    assert p.host == {"configured": 1, "wrapped": 3, "converted": 0}, p.host
    np.testing.assert_array_equal(buf[8:12], 2.0 * buf[:4] + buf[4:8])


@pytest.mark.sim
def test_sim_binding_other_buffers_or_losing_the_owner_drops_the_wrappers(rng):
    owner, a, b = _Owner(), rng.standard_normal(12), rng.standard_normal(12)
    backend.bind(owner, a, b)
    _axpy_launch(a[:4], b[:4], a[4:8])
    assert len(_keys_in(a)) == 2 and len(_keys_in(b)) == 1
    backend.bind(owner, a, b)               # the same buffers again: nothing changes
    assert len(_keys_in(a)) == 2 and len(_keys_in(b)) == 1
    backend.bind(owner, b)                  # a is no longer persistent: its wrappers go, b keeps its own
    assert _keys_in(a) == [] and len(_keys_in(b)) == 1
    with gpucnn.profile() as p:
        _axpy_launch(a[:4], b[:4], a[4:8])
    assert p.host["wrapped"] == 0 and p.host["converted"] == 2, p.host
    key = id(owner)
    del owner
    gc.collect()
    assert key not in launch._bindings and _keys_in(b) == []
    with gpucnn.profile() as p:
        _axpy_launch(a[:4], b[:4], a[4:8])
    assert p.host == {"configured": 0, "wrapped": 0, "converted": 3}, p.host


@pytest.mark.sim
def test_sim_a_dropped_workspace_plan_is_unbound(rng):
    """An Arena binds its block when it plans it and unbinds it when a run leaves the plan (or the arena goes)."""
    arena = backend.Arena()
    for run in range(2):
        with backend.workspace(arena):
            x, out = backend.empty((8,), np.float64, np.empty(1)), backend.empty((8,), np.float64, np.empty(1))
            x[...] = rng.standard_normal(8)
            _axpy_launch(x, x, out)
            np.testing.assert_array_equal(out, 3.0 * x)
    assert arena.slab is not None and len(_keys_in(arena.slab)) == 2
    slab = arena.slab
    with backend.workspace(arena):          # another path: the plan's views no longer fit
        backend.empty((5,), np.float32, np.empty(1))
    assert arena.recording and _keys_in(slab) == [] and id(arena) in launch._bindings
    del arena
    gc.collect()
    assert _keys_in(slab) == []


@pytest.mark.sim
def test_sim_a_non_contiguous_argument_is_refused_bound_or_not(rng):
    owner, buf = _Owner(), rng.standard_normal((4, 4))
    for bound in (False, True):
        if bound:
            backend.bind(owner, buf)
        with pytest.raises(ValueError, match=r"_axpy>: arrays passed to GPU kernels must be C-contiguous"):
            _axpy_launch(buf[:, 0], buf[:, 1], buf[:, 2])


def _steps(make, shape, classes, rng, steps=3):
    """``steps`` eager training steps of a fresh ``make()`` on one batch: (p.host per step, losses, parameters)."""
    model = make()
    opt = optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = backend.asarray(rng.standard_normal(shape).astype(np.float32))
    y = backend.asarray(rng.integers(0, classes, shape[0]))
    hosts, losses = [], []
    for _ in range(steps):
        with gpucnn.profile() as p:
            losses.append(float(model.train_step(x, y, SoftmaxCrossEntropy(), opt, graph=False)))
        hosts.append(dict(p.host, launches=sum(c["numba"] for c in p.counts.values())))
    return hosts, losses, backend.to_numpy(model.flat.param).copy()


NETS = {"lenet5": (lambda: models.lenet5(seed=0), (2, 1, 28, 28), 10),
        "alexnet_small": (lambda: models.alexnet_small(input_size=8, seed=0), (1, 1, 8, 8), 10)}


def _check_bound_steps(net, rng, monkeypatch):
    """The first run configures its launches and records the workspace on separate buffers (converted); the second
    runs on the planned block and wraps its views once; from the third on only the batch and the labels, new
    arrays to the step, are converted. Against BIND = False (everything converted at every launch; "sim" then
    configures every launch, "cuda" kept its configured launches already): the same losses and parameters, to
    the bit."""
    make, shape, classes = NETS[net]
    seed = int(rng.integers(2 ** 31))
    runs = {}
    for bind in (False, True):
        monkeypatch.setattr(launch, "BIND", bind)
        runs[bind] = _steps(make, shape, classes, np.random.default_rng(seed))
    before, after = runs[False][0], runs[True][0]
    print(f"\n{net}: host work per eager step, before binding {before}, after {after}")
    arrays = before[0]["converted"]
    for b, a in zip(before, after):
        assert b["wrapped"] == 0 and b["converted"] == arrays > 2 * b["launches"], b
        assert a["launches"] == b["launches"] > 0, (a, b)
        if backend.device() == "sim":       # (the kernels' configured launches of earlier tests are kept)
            assert b["configured"] == b["launches"], b
    assert after[1]["configured"] == 0 and after[1]["wrapped"] > 0, after
    for a in after[2:]:
        assert a == {"configured": 0, "wrapped": 0, "converted": 2, "launches": a["launches"]}, a
    assert runs[True][1] == runs[False][1]
    np.testing.assert_array_equal(runs[True][2], runs[False][2])


@pytest.mark.sim
@pytest.mark.parametrize("net", list(NETS))
def test_sim_from_the_third_eager_step_a_step_makes_no_wrapper_and_no_configuration(net, rng, monkeypatch):
    _check_bound_steps(net, rng, monkeypatch)


@pytest.mark.gpu
def test_gpu_from_the_third_eager_step_a_step_makes_no_wrapper_and_no_configuration(rng, monkeypatch):
    """As on "sim", with real launches: wrappers from cuda.as_cuda_array, steps equal to the bit."""
    _check_bound_steps("lenet5", rng, monkeypatch)


@pytest.mark.sim
def test_sim_a_step_captured_on_its_first_planned_run_wraps_its_views_then(rng):
    """The first run records the workspace; the second is captured as a graph (every allocation refused) and is the
    first to run on the planned block, so its views are wrapped while capturing. The replays equal eager steps."""
    from test_speed import tiny
    x, y = rng.standard_normal((2, 1, 4, 4)), rng.integers(0, 3, 2)
    runs = {}
    for graph in (False, True):
        model = tiny("float64", seed=3)
        opt, loss = optim.SGD(model, lr=0.05, momentum=0.9), SoftmaxCrossEntropy()
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # a capture that fails warns
            runs[graph] = [float(model.train_step(x, y, loss, opt, graph=graph)) for _ in range(4)]
        st = next(iter(model._steps.values()))
        assert bool(st.graph) == graph and len(_keys_in(st.arena.slab)) > 0
    assert runs[True] == runs[False]


def test_a_cuda_wrapper_gives_numba_the_arguments_of_the_array_it_wraps():
    """What "cuda" passes for a bound view (launch._wrap_cuda: cuda.as_cuda_array(a, sync=False)), put through real
    numba-cuda's argument preparation (_Kernel._prepare_args), here without a GPU: the CUDA context is faked, the
    array is a CUDA-array-interface description of a strided view. Numba must take the wrapper as device memory
    as it is (no copy, no write-back) with the view's pointer, shape and strides, and never sync its stream."""
    from test_device import run_python
    out = run_python("""
        import contextlib, json
        from numba import cuda
        from numba.cuda import api, dispatcher, types
        from numba.cuda.cudadrv import devices
        from gpucnn import backend, launch

        streams = []
        class Context:
            def create_external_stream(self, ptr):
                streams.append(ptr)
                class Stream:
                    def synchronize(self):
                        raise AssertionError("the wrapper synchronised the array's stream")
                return Stream()
        devices._runtime.ensure_context = lambda: contextlib.nullcontext()
        api.current_context = lambda: Context()
        backend._numba_cuda = cuda

        class View:     # a float32 (3, 5) view with row stride 32 bytes, as CuPy describes one
            __cuda_array_interface__ = {"shape": (3, 5), "strides": (32, 4), "typestr": "<f4",
                                        "data": (0x7F00000A1000, False), "version": 3, "stream": 0x1234}
        w = launch._wrap_cuda(None, View())
        args, writeback = [], []
        class Kernel:
            extensions = []
        dispatcher._Kernel._prepare_args(Kernel(), types.Array(types.float32, 2, "A"), w, 0, writeback, args)
        print(json.dumps({"args": [int(a) for a in args], "writeback": len(writeback), "streams": streams}))
    """)
    # meminfo, parent, size, itemsize, data pointer, shape, strides: Numba's array argument, from the description
    assert out["args"] == [0, 0, 15, 4, 0x7F00000A1000, 3, 5, 32, 4], out
    assert out["writeback"] == 0 and out["streams"] == [0x1234], out
