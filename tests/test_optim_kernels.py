"""Optimizer update kernels: the CPU path against torch.optim, the GPU path ("sim") against the CPU,
and the errors. Every update is in place, so each test keeps its arrays and steps them several times."""
import numpy as np
import pytest

from gpucnn import backend
from gpucnn.kernels import optim as K
from conftest import assert_close

SGD_CASES = [  # momentum, nesterov, weight_decay
    (0.0, False, 0.0),
    (0.0, False, 0.05),
    (0.9, False, 0.0),
    (0.9, False, 0.05),
    (0.9, True, 0.0),
    (0.8, True, 0.05),
]
ADAM_CASES = [  # weight_decay, decoupled (AdamW)
    (0.0, False),
    (0.1, False),
    (0.1, True),
    (0.0, True),
]
STEPS = 5


def _state(rng, dtype, shape=(3, 4)):
    param = rng.standard_normal(shape).astype(dtype)
    return param, np.zeros_like(param), np.zeros_like(param)


# ---------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum, nesterov, weight_decay", SGD_CASES)
def test_sgd_against_torch(momentum, nesterov, weight_decay, dtype, rng):
    torch = pytest.importorskip("torch")
    param, velocity, _ = _state(rng, dtype)
    start = param.copy()
    p = torch.tensor(start.copy(), requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for k in range(STEPS):
        grad = rng.standard_normal(param.shape).astype(dtype)
        K.sgd_update(param, grad, velocity if momentum else None, 0.1, momentum, weight_decay, nesterov)
        p.grad = torch.tensor(grad)
        opt.step()
        assert param.dtype == np.dtype(dtype)
        assert_close(param, p.detach().numpy(), dtype, f"param after step {k + 1}")
        assert_close(param - start, p.detach().numpy() - start, dtype, f"param's change after step {k + 1}")
        if momentum:
            assert_close(velocity, opt.state[p]["momentum_buffer"].numpy(), dtype, f"velocity after step {k + 1}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay, decoupled", ADAM_CASES)
def test_adam_against_torch(weight_decay, decoupled, dtype, rng):
    torch = pytest.importorskip("torch")
    param, m, v = _state(rng, dtype)
    start = param.copy()
    p = torch.tensor(start.copy(), requires_grad=True)
    make = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = make([p], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay)
    for step in range(1, STEPS + 1):
        grad = rng.standard_normal(param.shape).astype(dtype)
        K.adam_update(param, grad, m, v, 0.01, 0.9, 0.99, 1e-6, weight_decay, step, decoupled)
        p.grad = torch.tensor(grad)
        opt.step()
        assert param.dtype == m.dtype == v.dtype == np.dtype(dtype)
        assert_close(param, p.detach().numpy(), dtype, f"param after step {step}")
        assert_close(param - start, p.detach().numpy() - start, dtype, f"param's change after step {step}")
        assert_close(m, opt.state[p]["exp_avg"].numpy(), dtype, f"m after step {step}")
        assert_close(v, opt.state[p]["exp_avg_sq"].numpy(), dtype, f"v after step {step}")


def test_sgd_first_step_sets_velocity_to_gradient(rng):
    # PyTorch's first momentum step sets v = g; velocity zeros must give exactly that
    param, velocity, _ = _state(rng, "float32")
    grad = rng.standard_normal(param.shape).astype(np.float32)
    g = grad + np.float32(0.05) * param
    K.sgd_update(param, grad, velocity, 0.1, 0.9, 0.05)
    assert np.array_equal(velocity, g)


def test_updates_are_in_place(rng):
    param, m, v = _state(rng, "float32")
    before = param.copy()
    ids = (id(param), id(m), id(v))
    assert K.adam_update(param, np.ones_like(param), m, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1) is None
    assert (id(param), id(m), id(v)) == ids
    # Adam's first step moves every entry by lr against the gradient's sign
    assert_close(param, before - np.float32(0.1), "float32", "first Adam step")


# ---------------------------------------------------------------------------- errors
def test_errors(rng):
    param, velocity, v = _state(rng, "float32")
    grad = np.ones_like(param)
    with pytest.raises(ValueError, match="sgd_update: momentum 0.9 needs a velocity array.*got None"):
        K.sgd_update(param, grad, None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="sgd_update: Nesterov momentum needs momentum > 0"):
        K.sgd_update(param, grad, velocity, 0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"sgd_update: grad must match param \(shape \(3, 4\), float32\), "
                                         r"got shape \(4, 3\), float32"):
        K.sgd_update(param, grad.T.copy(), None, 0.1)
    with pytest.raises(ValueError, match=r"sgd_update: velocity must match param .* got shape \(3, 4\), float64"):
        K.sgd_update(param, grad, velocity.astype(np.float64), 0.1, momentum=0.9)
    with pytest.raises(ValueError, match="adam_update: step counts from 1.*got 0"):
        K.adam_update(param, grad, velocity, v, 0.1, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match=r"adam_update: v must match param"):
        K.adam_update(param, grad, velocity, v[:2], 0.1, 0.9, 0.999, 1e-8, 0.0, 1)


# ---------------------------------------------------------------------------- the GPU path on the simulator
def _run_steps(update, arrays, grads):
    for step, grad in enumerate(grads, start=1):
        update(*arrays, grad, step)
    return arrays


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("momentum, nesterov, weight_decay", [SGD_CASES[1], SGD_CASES[3], SGD_CASES[5]])
def test_sim_sgd_matches_cpu(momentum, nesterov, weight_decay, dtype, rng):
    param, velocity, _ = _state(rng, dtype, (2, 3, 5))
    grads = [rng.standard_normal(param.shape).astype(dtype) for _ in range(3)]

    def update(param, velocity, grad, step):
        K.sgd_update(param, grad, velocity if momentum else None, 0.1, momentum, weight_decay, nesterov)

    gpu = _run_steps(update, (param.copy(), velocity.copy()), grads)
    with backend.cpu_path():
        cpu = _run_steps(update, (param.copy(), velocity.copy()), grads)
    assert not np.array_equal(gpu[0], param), "the update did not change param"
    assert_close(gpu[0] - param, cpu[0] - param, dtype, "param's change")
    for name, a, b in zip(("param", "velocity"), gpu, cpu):
        assert a.dtype == np.dtype(dtype)
        assert_close(a, b, dtype, name)


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay, decoupled", ADAM_CASES[1:3])
def test_sim_adam_matches_cpu(weight_decay, decoupled, dtype, rng):
    param, m, v = _state(rng, dtype, (2, 3, 5))
    grads = [rng.standard_normal(param.shape).astype(dtype) for _ in range(3)]

    def update(param, m, v, grad, step):
        K.adam_update(param, grad, m, v, 0.01, 0.9, 0.99, 1e-6, weight_decay, step, decoupled)

    gpu = _run_steps(update, (param.copy(), m.copy(), v.copy()), grads)
    with backend.cpu_path():
        cpu = _run_steps(update, (param.copy(), m.copy(), v.copy()), grads)
    assert not np.array_equal(gpu[0], param), "the update did not change param"
    assert_close(gpu[0] - param, cpu[0] - param, dtype, "param's change")
    for name, a, b in zip(("param", "m", "v"), gpu, cpu):
        assert a.dtype == np.dtype(dtype)
        assert_close(a, b, dtype, name)
