"""Fusion: a Conv2D or Dense computes the activation after it (and a Conv2D the pooling after that) in its own
epilogue kernels, inside a Sequential built with fuse=True. Here: the plan, the fused model against the same
model unfused (fuse=False) and against PyTorch, finite differences through fused stages, the epilogue kernels
alone (CPU against plain NumPy, the GPU path on "sim" against the CPU), and a real GPU compiler's view of them."""

import numpy as np
import pytest

from gpucnn import backend, layers as L, optim
from gpucnn.kernels import activation as A
from gpucnn.kernels import pool as P
from gpucnn.layers.base import Act, Pool
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.model import Sequential
from gpucnn.testing import check_backward
from conftest import assert_close, assert_compiles_for_a_real_gpu


# ------------------------------------------------------------------------------------------------ small nets

def conv_act_pool(act, pool, dtype="float64", seed=0):
    """conv -> act -> pool twice (the second without activation), then dense -> act -> dense."""
    rng = np.random.default_rng(seed)
    acts = {"tanh": L.Tanh, "relu": L.ReLU, "sigmoid": L.Sigmoid, "leaky": lambda: L.LeakyReLU(0.2)}
    pools = {"avg": lambda: L.AvgPool2D(2), "max": lambda: L.MaxPool2D(2),
             "max3s2p1": lambda: L.MaxPool2D(3, stride=2, padding=1), "avg3s2": lambda: L.AvgPool2D(3, stride=2)}
    layers = [L.Conv2D(2, 3, 3, padding=1, dtype=dtype, rng=rng), acts[act](), pools[pool](),
              L.Conv2D(3, 4, 2, dtype=dtype, rng=rng), pools[pool](),
              L.Flatten()]
    shape = Sequential([*layers], input_shape=(2, 11, 12)).output_shape
    layers += [L.Dense(shape[0], 5, dtype=dtype, rng=rng), acts[act](), L.Dense(5, 3, dtype=dtype, rng=rng)]
    return layers


def twin(make, fuse):
    return Sequential(make(), input_shape=(2, 11, 12), fuse=fuse)


def run_pass(model, x, y):
    """Forward, loss, full backward: the outputs and every gradient (copies)."""
    loss = SoftmaxCrossEntropy()
    out = model.forward(x)
    value = loss.forward(out, y)
    gx = model.backward(loss.backward())
    res = {"out": out.copy(), "loss": np.asarray(value).copy(), "gx": gx.copy()}
    for i, layer in enumerate(model.layers):
        for k, g in layer.grads.items():
            res[f"{i}.{k}"] = backend.to_numpy(g).copy()
    return res


CASES = [("tanh", "avg"), ("relu", "max"), ("sigmoid", "max3s2p1"), ("leaky", "avg3s2")]


# ------------------------------------------------------------------------------------------------ the plan

def test_the_plan():
    model = Sequential(conv_act_pool("tanh", "avg"), input_shape=(2, 11, 12))
    plan = [[type(l).__name__ for l in st.layers] for st in model.stages]
    assert plan == [["Conv2D", "Tanh", "AvgPool2D"], ["Conv2D", "AvgPool2D"], ["Flatten"], ["Dense", "Tanh"],
                    ["Dense"]]
    unfused = Sequential(conv_act_pool("tanh", "avg"), input_shape=(2, 11, 12), fuse=False)
    assert [len(st.layers) for st in unfused.stages] == [1] * 9


def test_what_is_not_fused(rng):
    class MyTanh(L.Tanh):
        """A user's subclass may compute something else: never fused."""
    model = Sequential([L.Conv2D(1, 2, 3), MyTanh(), L.MaxPool2D(2), L.Dense(2, 2), L.LeakyReLU(-0.5),
                        L.Dense(2, 2), L.ReLU(), L.ReLU()])
    plan = [[type(l).__name__ for l in st.layers] for st in model.stages]
    # a conv whose activation is not fusable keeps its pooling apart too (conv -> pool needs them adjacent);
    # LeakyReLU with a negative slope is positive where its input is negative: its y cannot drive backward
    assert plan == [["Conv2D"], ["MyTanh"], ["MaxPool2D"], ["Dense"], ["LeakyReLU"], ["Dense", "ReLU"], ["ReLU"]]


class AbsorbingDoubler(L.Layer):
    """A user's head layer: 2x, and the activation it is given as an epilogue, computed here by NumPy (a name of its
    own: layer classes are registered by name, and tests/test_model.py has a Doubler)."""

    def absorbs(self, *epilogues):
        return [type(e) for e in epilogues] == [Act]

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def forward(self, x, training=True, activation=None):
        self.given = activation
        return np.tanh(2 * x) if activation is not None else 2 * x


def test_the_planner_asks_the_layers(rng):
    """No type test decides a plan: a user's head that absorbs an activation (Layer.absorbs) is given the next
    layer's epilogue value (Layer.epilogue), and a fused pooling layer's own fields are left alone (its stage
    holds the switches)."""
    model = Sequential([AbsorbingDoubler(), L.Tanh(), L.Conv2D(2, 3, 3, dtype="float64", rng=rng), L.ReLU(),
                        L.MaxPool2D(2)], input_shape=(2, 6, 6))
    assert [[type(l).__name__ for l in st.layers] for st in model.stages] == [["AbsorbingDoubler", "Tanh"],
                                                                              ["Conv2D", "ReLU", "MaxPool2D"]]
    assert model.stages[0].fused == {"activation": Act("tanh", 0.0)}
    assert model.stages[1].fused == {"activation": Act("relu", 0.0), "pool": Pool("max", (2, 2), (2, 2), (0, 0))}
    x = rng.standard_normal((2, 2, 6, 6))
    y = model.forward(x, training=False)
    pool = model.layers[4]
    assert model.layers[0].given == Act("tanh", 0.0) and pool.switches is None and pool._x_shape is None
    switches = model.stages[1].switches.copy()
    alone = x
    for layer in model.layers:
        alone = layer.forward(alone, training=False)
    np.testing.assert_allclose(y, alone, rtol=1e-12)
    np.testing.assert_array_equal(switches, pool.switches)


def test_layers_alone_still_compute_their_own_op(rng):
    model = Sequential(conv_act_pool("tanh", "avg", "float32"), input_shape=(2, 11, 12))
    x = rng.standard_normal((2, 2, 11, 12)).astype(np.float32)
    model.forward(x)
    h = rng.standard_normal((2, 3, 11, 12)).astype(np.float32)
    assert_close(model.layers[1].forward(h), np.tanh(h), "float32", "Tanh alone inside a fused model")
    assert model.layers[2].forward(h).shape == (2, 3, 5, 6)


# ------------------------------------------------------------------------------------------------ fused == unfused

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("act,pool", CASES)
def test_fused_equals_unfused(act, pool, dtype, rng):
    x = rng.standard_normal((3, 2, 11, 12)).astype(dtype)
    y = rng.integers(0, 3, 3)
    fused = twin(lambda: conv_act_pool(act, pool, dtype), True)
    plain = twin(lambda: conv_act_pool(act, pool, dtype), False)
    a, b = run_pass(fused, x, y), run_pass(plain, x, y)
    assert a.keys() == b.keys() and len(a) == 3 + 8
    for k in b:
        assert a[k].dtype == b[k].dtype
        assert_close(a[k], b[k], dtype, k)
    if "max" in pool:   # the stage holds the fused pooling's switches, those the pooling layer computes alone
        assert np.array_equal(fused.stages[0].switches, plain.layers[2].switches)


@pytest.mark.parametrize("act,pool", CASES[:2])
def test_train_steps_fused_equal_unfused(act, pool, rng):
    x = rng.standard_normal((4, 2, 11, 12))
    y = rng.integers(0, 3, 4)
    models = [twin(lambda: conv_act_pool(act, pool), fuse) for fuse in (True, False)]
    opts = [optim.SGD(m, lr=0.1, momentum=0.9, weight_decay=1e-3) for m in models]
    for _ in range(3):
        values = [float(m.train_step(x, y, SoftmaxCrossEntropy(), o)) for m, o in zip(models, opts)]
        assert values[0] == pytest.approx(values[1], rel=1e-12)
    for la, lb in zip(*(m.layers for m in models)):
        for k in la.params:
            assert_close(la.params[k], lb.params[k], "float64", k)


class Whole:
    """A model and its loss as one function for check_backward, parameters as "i.name"."""

    def __init__(self, model):
        self.model = model
        self.params = {f"{i}.{k}": v for i, l in enumerate(model.layers) for k, v in l.params.items()}
        self.grads = {}

    def forward(self, x, target):
        for key, v in self.params.items():
            i, k = key.split(".", 1)
            self.model.layers[int(i)].params[k] = v
        self.loss = SoftmaxCrossEntropy()
        return self.loss.forward(self.model.forward(x), target)

    def backward(self):
        gx = self.model.backward(self.loss.backward())
        self.grads = {f"{i}.{k}": l.grads[k] for i, l in enumerate(self.model.layers) for k in l.params}
        return gx


@pytest.mark.parametrize("act,pool", CASES)
def test_check_backward_through_fused_stages(act, pool, rng):
    model = twin(lambda: conv_act_pool(act, pool), True)
    x = rng.standard_normal((2, 2, 11, 12))
    if "max" in pool:
        x += np.arange(x.size).reshape(x.shape) * 1e-3     # no near-ties for a window's maximum
    report = check_backward(Whole(model), x, rng.integers(0, 3, 2))
    assert len(report) == 1 + 8


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_lenet_against_torch(dtype, rng):
    torch = pytest.importorskip("torch")
    from gpucnn import models
    model = models.lenet5(activation="relu", pool="max", dtype=dtype, seed=3)
    assert len(model.stages) == 6
    x = rng.standard_normal((4, 1, 28, 28)).astype(dtype)
    y = rng.integers(0, 10, 4)
    ours = run_pass(model, x, y)
    nn = torch.nn
    tnet = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10)).to(getattr(torch, dtype))
    with torch.no_grad():
        for layer, m in zip(model.layers, tnet):
            for k, p in layer.params.items():
                getattr(m, k).copy_(torch.from_numpy(p.copy()))
    tx = torch.tensor(x, requires_grad=True)
    tout = tnet(tx)
    tloss = nn.functional.cross_entropy(tout, torch.tensor(y))
    tloss.backward()
    assert_close(ours["out"], tout.detach().numpy(), dtype, "logits")
    assert_close(ours["loss"], tloss.detach().numpy(), dtype, "loss")
    assert_close(ours["gx"], tx.grad.numpy(), dtype, "dL/dx")
    for i, m in enumerate(tnet):
        for k, p in m.named_parameters():
            assert_close(ours[f"{i}.{k}"], p.grad.numpy(), dtype, f"{i}.{k}")


def test_first_layer_computes_no_input_gradient_in_a_step(rng, monkeypatch):
    from gpucnn.kernels import conv as KC
    model = twin(lambda: conv_act_pool("relu", "max"), True)
    calls = []
    real = KC.GEMM.backward
    monkeypatch.setattr(KC.GEMM, "backward", lambda *a, **k: calls.append(k["need_gx"]) or real(*a, **k))
    model.train_step(rng.standard_normal((2, 2, 11, 12)), rng.integers(0, 3, 2), SoftmaxCrossEntropy(),
                     optim.SGD(model, lr=0.1))
    assert calls == [True, False]                   # conv 2 passes dL/dx on; conv 1, the first layer, does not
    assert model.layers[0].needs_input_grad          # and the flag is back for a plain backward
    assert model.backward(np.ones((2, 3))).shape == (2, 2, 11, 12)


def test_dense_needs_input_grad(rng):
    layer = L.Dense(4, 3, dtype="float64", rng=rng)
    x = rng.standard_normal((5, 4))
    gy = rng.standard_normal((5, 3))
    layer.forward(x)
    gx = layer.backward(gy)
    gw = layer.grads["weight"].copy()
    layer.needs_input_grad = False
    assert layer.backward(gy) is None
    assert_close(layer.grads["weight"], gw, "float64", "gw without gx")
    assert_close(gx, gy @ layer.params["weight"], "float64", "gx")


# ------------------------------------------------------------------------------------------------ the epilogues

def _windows_reference(a_nchw, mode, kernel, stride, padding):
    """The pooling of pool.py (NCHW), for the epilogues' (C, H, W, N) layout."""
    if mode == "max":
        return P.maxpool2d_forward(a_nchw, kernel, stride, padding)
    return P.avgpool2d_forward(a_nchw, kernel, stride, padding), None


POOLS = {"max 2x2": ("max", (2, 2), (2, 2), (0, 0)), "avg 2x2": ("avg", (2, 2), (2, 2), (0, 0)),
         "max 3x3/2 pad 1": ("max", (3, 3), (2, 2), (1, 1)), "avg 3x3/2 overlapping": ("avg", (3, 3), (2, 2), (0, 0)),
         "max 2x3/(1,2), last row uncovered": ("max", (2, 3), (2, 2), (0, 1)),
         "avg 2x2/2 pad 1": ("avg", (2, 2), (2, 2), (1, 1))}


@pytest.mark.parametrize("kind", ["identity", "relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("H", [5, 6])            # 6: the 2x2 windows tile the input (the CPU's broadcast path)
def test_bias_activation_pool_cpu(H, pool, kind, rng):
    spec = POOLS[pool]
    z = rng.standard_normal((3, H, 6, 2))
    b = rng.standard_normal(3)
    a_ref = A.activation_forward(kind, np.ascontiguousarray((z + b[:, None, None, None]).transpose(3, 0, 1, 2)), 0.1)
    p_ref, sw_ref = _windows_reference(a_ref, *spec)
    a, p, sw = A.bias_activation_pool(z.copy(), b, kind, 0.1, spec)
    assert_close(a, a_ref.transpose(1, 2, 3, 0), "float64", "a")
    assert_close(p, p_ref, "float64", "pooled")
    if spec[0] == "max":
        assert np.array_equal(sw, sw_ref)
    gp = rng.standard_normal(p.shape)
    gz, gb = A.pool_activation_bias_backward(gp, sw, a, kind, 0.1, spec)
    gpool = P.maxpool2d_backward(gp, sw_ref, a_ref.shape, *spec[1:]) if spec[0] == "max" else \
        P.avgpool2d_backward(gp, a_ref.shape, *spec[1:])
    dz = A.activation_backward(kind, None, a_ref, gpool, 0.1) if kind in ("tanh", "sigmoid") else \
        A.activation_backward(kind, a_ref, None, gpool, 0.1)
    assert_close(gz, dz.transpose(1, 2, 3, 0), "float64", "gz")
    assert_close(gb, dz.sum(axis=(0, 2, 3)), "float64", "gb")


@pytest.mark.parametrize("kind", ["identity", "relu", "tanh", "sigmoid"])
def test_bias_activation_nchw_and_its_backward_cpu(kind, rng):
    z = rng.standard_normal((3, 4, 5, 2))
    b = rng.standard_normal(3)
    y = A.bias_activation_nchw(z.copy(), b, kind)
    ref = A.activation_forward(kind, (z + b[:, None, None, None]).transpose(3, 0, 1, 2))
    assert_close(y, ref, "float64", "y")
    gy = rng.standard_normal(y.shape)
    gz, gb = A.activation_bias_backward(gy, y, kind, layout="gemm")
    dz = A.activation_backward(kind, ref, ref, gy) if kind != "identity" else gy
    if kind == "relu":
        dz = A.activation_backward(kind, (z + b[:, None, None, None]).transpose(3, 0, 1, 2), None, gy)
    assert gz.shape == (3, 4, 5, 2)
    assert_close(gz, dz.transpose(1, 2, 3, 0), "float64", "gz")
    assert_close(gb, dz.sum(axis=(0, 2, 3)), "float64", "gb")
    out = np.zeros(3)
    _, gb2 = A.activation_bias_backward(gy, y, kind, layout="gemm", gb_out=out)
    assert gb2 is out and np.array_equal(out, gb)


def test_epilogue_errors(rng):
    z = rng.standard_normal((2, 4, 4, 1))
    with pytest.raises(ValueError, match="bias_activation_pool: pool mode must be 'max' or 'avg', got 'min'"):
        A.bias_activation_pool(z, None, "relu", 0.0, ("min", (2, 2), (2, 2), (0, 0)))
    with pytest.raises(ValueError, match=r"pool: kernel \(5, 5\) with padding \(0, 0\) does not fit the input 4x4"):
        A.bias_activation_pool(z, None, "relu", 0.0, ("max", (5, 5), (1, 1), (0, 0)))
    with pytest.raises(ValueError, match="activation_bias_backward: layout must be 'same' or 'gemm', got 'nhwc'"):
        A.activation_bias_backward(z, z, "relu", layout="nhwc")
    with pytest.raises(ValueError, match="activation: expected one of"):
        A.bias_activation_nchw(z, None, "swish")


# ------------------------------------------------------------------------------------------------ the GPU path (sim)

@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["identity", "relu", "leaky_relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("pool", ["max 3x3/2 pad 1", "avg 3x3/2 overlapping", "max 2x3/(1,2), last row uncovered",
                                  "max 2x2", "avg 2x2"])
def test_sim_pool_epilogues_match_cpu(pool, kind, dtype, rng):
    spec = POOLS[pool]
    H = 6 if pool.endswith("2x2") else 5         # 2x2 windows tiling the input: the CPU's broadcast path
    z = (rng.standard_normal((2, H, 6, 2)) * 2).astype(dtype)
    b = rng.standard_normal(2).astype(dtype)
    a, p, sw = A.bias_activation_pool(z.copy(), b, kind, 0.1, spec)
    with backend.cpu_path():
        a_ref, p_ref, sw_ref = A.bias_activation_pool(z.copy(), b, kind, 0.1, spec)
    assert p.dtype == np.dtype(dtype)
    assert_close(p, p_ref, dtype, "pooled")
    if spec[0] == "max":
        assert np.array_equal(sw, sw_ref)
    gp = rng.standard_normal(p.shape).astype(dtype)
    gz, gb = A.pool_activation_bias_backward(gp, sw, a, kind, 0.1, spec)
    with backend.cpu_path():
        gz_ref, gb_ref = A.pool_activation_bias_backward(gp, sw_ref, a_ref, kind, 0.1, spec)
    assert_close(gz, gz_ref, dtype, "gz")
    assert_close(gb, gb_ref, dtype, "gb")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["identity", "leaky_relu", "sigmoid"])
def test_sim_nchw_epilogues_match_cpu(kind, dtype, rng):
    z = rng.standard_normal((3, 2, 3, 2)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    for bias in (b, None):
        y = A.bias_activation_nchw(z.copy(), bias, kind, 0.1)
        with backend.cpu_path():
            y_ref = A.bias_activation_nchw(z.copy(), bias, kind, 0.1)
        assert_close(y, y_ref, dtype, "y")
    gy = rng.standard_normal(y.shape).astype(dtype)
    for layout in ("gemm", "same"):
        gz, gb = A.activation_bias_backward(gy, y, kind, 0.1, layout=layout)
        with backend.cpu_path():
            gz_ref, gb_ref = A.activation_bias_backward(gy, y_ref, kind, 0.1, layout=layout)
        assert gz.shape == gz_ref.shape
        assert_close(gz, gz_ref, dtype, f"gz ({layout})")
        assert_close(gb, gb_ref, dtype, f"gb ({layout})")


@pytest.mark.sim
@pytest.mark.parametrize("act,pool", CASES)
def test_sim_fused_model_matches_cpu(act, pool, rng):
    x = rng.standard_normal((2, 2, 11, 12)).astype(np.float32)
    y = rng.integers(0, 3, 2)
    model = twin(lambda: conv_act_pool(act, pool, "float32"), True)
    gpu = run_pass(model, x, y)
    with backend.cpu_path():
        cpu = run_pass(model, x, y)
    for k in cpu:
        assert_close(gpu[k], cpu[k], "float32", k)


# ------------------------------------------------------------------------------------------------ a real GPU's compiler

def test_epilogue_kernels_compile_for_a_real_gpu_in_the_input_dtype():
    """As test_pool's: the simulator accepts what a GPU cannot compile; lower every new Numba kernel of the
    fused path for a real GPU in float32 and refuse float64 arithmetic in it."""
    assert_compiles_for_a_real_gpu("""
        import gpucnn.kernels.activation as A, gpucnn.kernels.conv as C
        A.cuda = C.cuda = cuda
        f32, i32, i64, b1 = types.float32, types.int32, types.int64, types.boolean
        a = lambda t, n: types.Array(t, n, "C")
        sigs = {A._bias_act_nchw_kernel: (a(f32, 3), a(f32, 1), a(f32, 3), i64, f32, b1),
                A._bias_act_pool_kernel: (a(f32, 4), a(f32, 1), a(f32, 4), a(f32, 4), a(i32, 4), i64, f32, b1, b1)
                + (i64,) * 6,
                # (..., gb, partials, tickets, ...): the bias gradient over many blocks a channel (kernels.reduce)
                A._act_bias_grad_kernel: (a(f32, 3), a(f32, 3), a(f32, 3), a(f32, 1), a(f32, 2), a(i32, 1), i64, f32,
                                          b1, b1),
                A._pool_act_bias_grad_kernel: (a(f32, 4), a(i32, 4), a(f32, 4), a(f32, 4), a(f32, 1), a(f32, 2),
                                               a(i32, 1), i64, f32, b1) + (i64,) * 6,
                C._im2col_kernel: (a(f32, 4), a(f32, 6)) + (i64,) * 4,
                C._col2im_kernel: (a(f32, 6), a(f32, 4)) + (i64,) * 4}
    """)
