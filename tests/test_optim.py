"""Optimizers against torch.optim step by step, their saved state, the schedules, and gradient clipping."""
import math

import numpy as np
import pytest

from gpucnn import backend, layers as L, optim
from gpucnn.model import Sequential
from conftest import assert_close


def _net(dtype, rng):
    return Sequential([L.Flatten(), L.Dense(6, 4, dtype=dtype, rng=rng), L.ReLU(),
                       L.Dense(4, 3, dtype=dtype, rng=rng)], input_shape=(6,))


def _fake_grads(model, t):
    """Gradients that depend on the parameters and the step (the same rule is applied to torch)."""
    for layer in model.layers:
        for k, p in layer.params.items():
            layer.grads[k] = (np.cos(p * (1 + t)) + p * 0.5).astype(p.dtype)


OPTIMIZERS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.02, weight_decay=0.3)),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,kw", OPTIMIZERS)
def test_against_torch(name, kw, dtype, rng):
    torch = pytest.importorskip("torch")
    model = _net(dtype, rng)
    tparams = [torch.tensor(p.copy()) for layer in model.layers for p in layer.params.values()]
    opt = getattr(optim, name)(model, **kw)
    topt = getattr(torch.optim, name)(tparams, **kw)
    for t in range(5):
        _fake_grads(model, t)
        for tp in tparams:
            tp.grad = torch.cos(tp * (1 + t)) + tp * 0.5
        opt.step()
        topt.step()
        ours = [p for layer in model.layers for p in layer.params.values()]
        for a, b in zip(ours, tparams):
            assert a.dtype == np.dtype(dtype)
            assert_close(a, b.numpy(), dtype, f"{name} {kw} step {t}")


@pytest.mark.parametrize("name,kw", [OPTIMIZERS[3], OPTIMIZERS[5], OPTIMIZERS[7]])
def test_state_dict_resumes_exactly(name, kw, rng):
    a, b = _net("float32", rng), _net("float32", rng)
    for la, lb in zip(a.layers, b.layers):
        for k in la.params:
            lb.params[k][...] = la.params[k]
    oa = getattr(optim, name)(a, **kw)
    for t in range(2):
        _fake_grads(a, t)
        oa.step()
    state = oa.state_dict()
    assert state["type"] == name and all(s["step"] == 2 for s in state["state"].values())
    for lb, la in zip(b.layers, a.layers):
        for k in la.params:
            lb.params[k][...] = la.params[k]
    ob = getattr(optim, name)(b, lr=123.0)      # the saved hyperparameters replace these
    ob.load_state_dict(state)
    assert ob.lr == oa.lr and ob.hyper() == oa.hyper()
    for t in range(2, 4):
        _fake_grads(a, t)
        _fake_grads(b, t)
        oa.step()
        ob.step()
    for la, lb in zip(a.layers, b.layers):
        for k in la.params:
            assert np.array_equal(la.params[k], lb.params[k])


def test_plain_sgd_keeps_no_velocity(rng):
    model = _net("float32", rng)
    opt = optim.SGD(model, lr=0.1)
    _fake_grads(model, 0)
    opt.step()
    assert all(set(s) == {"step"} for s in opt.state.values())


def test_errors(rng):
    model = _net("float32", rng)
    with pytest.raises(ValueError, match="SGD: lr must be a positive number, got 0"):
        optim.SGD(model, lr=0)
    with pytest.raises(ValueError, match="SGD: nesterov=True needs a momentum > 0"):
        optim.SGD(model, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"SGD: momentum must be in \[0, 1\)"):
        optim.SGD(model, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match=r"Adam: betas must be in \[0, 1\)"):
        optim.Adam(model, betas=(0.9, 1.0))
    with pytest.raises(RuntimeError, match=r"SGD.step: parameter 1.weight \(Dense.weight\) has no gradient"):
        optim.SGD(model, lr=0.1).step()
    with pytest.raises(ValueError, match="the state is of a SGD optimizer, not Adam"):
        optim.Adam(model).load_state_dict(optim.SGD(model, lr=0.1).state_dict())
    other = optim.SGD(_net("float32", rng), lr=0.1, momentum=0.5)
    _fake_grads(other.model, 0)
    other.step()
    state = other.state_dict()
    state["state"]["1.weight"]["velocity"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError,
                       match=r"state 1.weight.velocity is float32\(2, 2\), the parameter is float32\(4, 6\)"):
        optim.SGD(model, lr=0.1, momentum=0.5).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- schedules

def test_step_schedule_matches_torch():
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(topt, step_size=3, gamma=0.2)
    ours = optim.StepSchedule(3, 0.2)
    for epoch in range(10):
        assert math.isclose(ours.lr(epoch, 0.5), topt.param_groups[0]["lr"], rel_tol=1e-12), epoch
        topt.step()
        sched.step()


@pytest.mark.parametrize("min_lr", [0.0, 0.01])
def test_cosine_schedule_matches_torch(min_lr):
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=8, eta_min=min_lr)
    ours = optim.CosineSchedule(8, min_lr=min_lr)
    for epoch in range(8):
        assert math.isclose(ours.lr(epoch, 0.1), topt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-15), epoch
        topt.step()
        sched.step()


def test_cosine_warmup_values():
    s = optim.CosineSchedule(10, min_lr=0.0, warmup_epochs=4)
    lrs = [s.lr(e, 1.0) for e in range(10)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])          # linear up to base_lr at epoch 4
    assert lrs[7] == pytest.approx((1 + math.cos(math.pi * 3 / 6)) / 2)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))                 # then strictly down
    assert s.lr(10, 1.0) == pytest.approx(0.0)


def test_schedule_errors():
    with pytest.raises(ValueError, match="StepSchedule: step_size must be an int >= 1, got 0"):
        optim.StepSchedule(0)
    with pytest.raises(ValueError, match=r"CosineSchedule: warmup_epochs must be an int in \[0, total_epochs\)"):
        optim.CosineSchedule(3, warmup_epochs=3)


# ---------------------------------------------------------------------------------------------- clipping

def _global_norm(model):
    return math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for l in model.layers for g in l.grads.values()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_clip_scales_the_global_norm(dtype, rng):
    model = _net(dtype, rng)
    _fake_grads(model, 0)
    before = {(i, k): g.copy() for i, l in enumerate(model.layers) for k, g in l.grads.items()}
    norm = optim.clip_grad_norm(model, 0.5)
    assert norm.shape == () and norm.dtype == np.dtype(dtype)
    assert math.isclose(float(norm), math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in before.values())),
                        rel_tol=1e-5)
    assert math.isclose(_global_norm(model), 0.5, rel_tol=1e-5)
    factor = 0.5 / (float(norm) + 1e-6)
    for (i, k), g in before.items():
        got = model.layers[i].grads[k]
        assert got.dtype == np.dtype(dtype)
        assert_close(got, g * factor, dtype, f"{i}.{k}")       # every gradient scaled by the same factor


def test_clip_leaves_small_gradients_alone(rng):
    model = _net("float32", rng)
    _fake_grads(model, 0)
    before = [g.copy() for l in model.layers for g in l.grads.values()]
    optim.clip_grad_norm(model, 1e6)
    assert all(np.array_equal(a, b) for a, b in zip(before, (g for l in model.layers for g in l.grads.values())))


def test_clip_matches_torch(rng):
    torch = pytest.importorskip("torch")
    model = _net("float64", rng)
    _fake_grads(model, 1)
    tparams = []
    for l in model.layers:
        for k, p in l.params.items():
            t = torch.tensor(p.copy(), requires_grad=True)
            t.grad = torch.tensor(l.grads[k].copy())
            tparams.append(t)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 0.3)
    norm = optim.clip_grad_norm(model, 0.3)
    assert math.isclose(float(norm), float(tnorm), rel_tol=1e-10)
    for g, t in zip((g for l in model.layers for g in l.grads.values()), tparams):
        assert_close(g, t.grad.numpy(), "float64", "clipped")


def test_clip_errors(rng):
    model = _net("float32", rng)
    with pytest.raises(RuntimeError, match="clip_grad_norm: no gradients; run backward first"):
        optim.clip_grad_norm(model, 1.0)
    with pytest.raises(ValueError, match="clip_grad_norm: max_norm must be > 0"):
        optim.clip_grad_norm(model, 0)


@pytest.mark.sim
@pytest.mark.parametrize("name,kw", [OPTIMIZERS[3], OPTIMIZERS[5], OPTIMIZERS[7]])
def test_sim_optimizer_and_clip_match_cpu(name, kw, rng):
    """The GPU path of a step (elementwise kernels) and of clipping (device scalars) against the CPU path."""
    model = _net("float64", rng)
    ref = _net("float64", rng)
    for la, lb in zip(model.layers, ref.layers):
        for k in la.params:
            lb.params[k][...] = la.params[k]
    opt, ref_opt = getattr(optim, name)(model, **kw), getattr(optim, name)(ref, **kw)
    for t in range(3):
        _fake_grads(model, t)
        optim.clip_grad_norm(model, 0.5)
        opt.step()
        with backend.cpu_path():
            _fake_grads(ref, t)
            optim.clip_grad_norm(ref, 0.5)
            ref_opt.step()
    for la, lb in zip(model.layers, ref.layers):
        for k in la.params:
            assert_close(la.params[k], lb.params[k], "float64", f"{name} {k}")
