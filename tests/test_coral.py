"""CORAL ordinal regression: CoralHead (one shared weight, K-1 biases), CoralLoss and coral_predict."""
import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, optim
from gpucnn.losses import CoralLoss, coral_predict
from gpucnn.testing import check_backward
from conftest import assert_close

DEVICES = ["cpu", pytest.param("sim", marks=pytest.mark.sim)]


def torch_coral_loss(torch, z, y, K):
    """The issue's definition, written in PyTorch: the mean over the batch of
    -sum_k [logsigmoid(z_k) level_k + (logsigmoid(z_k) - z_k)(1 - level_k)], level_k = [y > k]."""
    levels = (torch.tensor(y)[:, None] > torch.arange(K - 1)[None, :]).to(z.dtype)
    ls = torch.nn.functional.logsigmoid(z)
    return (-(ls * levels + (ls - z) * (1 - levels)).sum(dim=1)).mean()


def test_head_starts_with_coral_pytorchs_biases_and_one_shared_weight(rng):
    head = L.CoralHead(7, 5, rng=rng)
    assert head.params["weight"].shape == (1, 7) and head.num_params() == 7 + 4
    np.testing.assert_array_equal(head.params["bias"], np.float32([1.0, 0.75, 0.5, 0.25]))
    assert head.output_shape((7,)) == (4,)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_loss_and_head_against_torch(dtype, rng):
    torch = pytest.importorskip("torch")
    K, N, F = 6, 9, 5
    head = L.CoralHead(F, K, dtype=dtype, rng=rng)
    x = rng.standard_normal((N, F)).astype(dtype)
    y = rng.integers(0, K, N)
    loss = CoralLoss()
    z = head.forward(x)
    value = loss.forward(z, y)
    gx = head.backward(loss.backward())
    tw = torch.tensor(head.params["weight"], requires_grad=True)
    tb = torch.tensor(head.params["bias"], requires_grad=True)
    tx = torch.tensor(x, requires_grad=True)
    tz = tx @ tw.T + tb
    tl = torch_coral_loss(torch, tz, y, K)
    tl.backward()
    assert_close(z, tz.detach().numpy(), dtype, "logits")
    assert_close(value, tl.detach().numpy(), dtype, "loss")
    assert_close(gx, tx.grad.numpy(), dtype, "dL/dx")
    assert_close(head.grads["weight"], tw.grad.numpy(), dtype, "dL/dw (shared by every task)")
    assert_close(head.grads["bias"], tb.grad.numpy(), dtype, "dL/db")


def test_finite_differences(rng):
    check_backward(L.CoralHead(4, 5, dtype="float64", rng=rng), rng.standard_normal((3, 4)))
    z = rng.standard_normal((6, 4)) * 3
    check_backward(CoralLoss(), z, target=rng.integers(0, 5, 6))


def test_predict_counts_the_tasks_that_say_above():
    z = np.array([[2.0, 1.0, -0.5], [-1.0, -2.0, -3.0], [0.5, 0.1, 3.0]], np.float32)
    np.testing.assert_array_equal(coral_predict(z), [2, 0, 3])      # not forced to be rank-consistent


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ranks_are_the_same_error_on_every_device(device, rng):
    z = rng.standard_normal((3, 4)).astype(np.float32)           # K = 5: ranks 0..4
    with pytest.raises(ValueError, match=r"CoralLoss: labels must be in \[0, 5\) for 5 classes, got 5 at index 1"):
        CoralLoss().forward(z, np.array([0, 5, 2]))
    with pytest.raises(TypeError, match=r"CoralLoss: labels must be integer class indices"):
        CoralLoss().forward(z, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"CoralHead: expected 4 input features, got 3"):
        L.CoralHead(4, 5).forward(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_trains_in_a_sequential_and_round_trips(device, rng, tmp_path):
    """A CNN with a CoralHead trains with train_step (loss goes down on an easy ordinal task) and saves/loads."""
    model = gpucnn.Sequential([L.Conv2D(1, 3, 3, rng=rng), L.ReLU(), L.Flatten(), L.Dense(3 * 4 * 4, 8, rng=rng),
                               L.Tanh(), L.CoralHead(8, 4, rng=rng)], input_shape=(1, 6, 6))
    y = rng.integers(0, 4, 16)
    x = (rng.standard_normal((16, 1, 6, 6)) * 0.3 + y[:, None, None, None]).astype(np.float32)
    opt = optim.Adam(model, lr=0.02)
    first = float(model.train_step(x, y, CoralLoss(), opt, graph=False))
    for _ in range(60 if device == "cpu" else 25):       # the simulator is slow: a shorter run, a lower bar
        last = float(model.train_step(x, y, CoralLoss(), opt, graph=False))
    assert last < (0.4 if device == "cpu" else 0.6) * first, (first, last)
    assert (coral_predict(model.predict(x)) == y).mean() > (0.8 if device == "cpu" else 0.5)   # chance: 0.25
    path = model.save(tmp_path / "coral.npz")
    again = gpucnn.Sequential.load(path)
    np.testing.assert_array_equal(again.predict(x), model.predict(x))


@pytest.mark.sim
def test_sim_matches_cpu(rng):
    head = L.CoralHead(6, 5, rng=rng)
    x = rng.standard_normal((7, 6)).astype(np.float32)
    y = rng.integers(0, 5, 7)
    loss = CoralLoss()
    z = head.forward(x)
    value = loss.forward(z, y)
    gx = head.backward(loss.backward())
    got = {"z": z, "loss": value, "gx": gx, **{f"grad {k}": v.copy() for k, v in head.grads.items()}}
    with backend.cpu_path():
        loss = CoralLoss()
        z = head.forward(x)
        value = loss.forward(z, y)
        gx = head.backward(loss.backward())
        ref = {"z": z, "loss": value, "gx": gx, **{f"grad {k}": v for k, v in head.grads.items()}}
    for k in ref:
        assert_close(got[k], ref[k], "float32", f"CORAL {k} (sim vs cpu)")
    np.testing.assert_array_equal(coral_predict(got["z"]), coral_predict(ref["z"]))
