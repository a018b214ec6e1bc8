"""CORAL ordinal regression: CoralHead (one shared weight, K-1 biases), CoralLoss and coral_predict, and CORAL
through Sequential.fit and evaluate (the loss says how its logits are read: K-1 columns score K ranks)."""
import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, optim
from gpucnn.kernels import coral as KC
from gpucnn.losses import MSE, CoralLoss, coral_predict
from gpucnn.model import Sequential
from gpucnn.profile import record_launches
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


# ------------------------------------------------------------------------------------------------ fit and evaluate

def ordinal_net(rng, K=5):
    return Sequential([L.Conv2D(1, 3, 3, rng=rng), L.ReLU(), L.Flatten(), L.Dense(3 * 4 * 4, 8, rng=rng), L.Tanh(),
                       L.CoralHead(8, K, rng=rng)], input_shape=(1, 6, 6))


def ordinal_data(rng, n, K=5):
    """Raw uint8 images whose brightness grows with the rank, plus noise: an easy ordinal task."""
    y = rng.integers(0, K, n)
    x = np.clip(rng.normal(40 + 40 * y[:, None, None, None], 30, (n, 1, 6, 6)), 0, 255).astype(np.uint8)
    return x, y


def numpy_recount(logits, y, K):
    """CORAL's loss, accuracy and mean absolute rank error of logits (N, K-1), in float64 from the definition."""
    z = logits.astype(np.float64)
    levels = y[:, None] > np.arange(K - 1)[None, :]
    log_sig, log_one_minus = -np.logaddexp(0, -z), -np.logaddexp(0, z)
    loss = -(np.where(levels, log_sig, log_one_minus)).sum(axis=1).mean()
    rank = (z > 0).sum(axis=1)
    return loss, (rank == y).mean(), np.abs(rank - y).mean()


@pytest.mark.parametrize("device", DEVICES)
def test_fit_reads_ranks_and_history_matches_a_host_recount(device, rng, monkeypatch):
    """fit with CoralLoss: each epoch's loss and accuracy equal a recount, on the host with coral_predict, of the
    logits and losses of every step (so the device tally reads ranks, not an argmax over K-1 columns)."""
    K = 5
    model = ordinal_net(rng, K)
    x, y = ordinal_data(rng, 37, K)                       # 37 = 3 batches of 12 and a last one of 1
    steps = []
    real = Sequential.train_step

    def recording(self, xb, yb, *a, **k):
        value = real(self, xb, yb, *a, **k)
        steps.append((float(value), backend.to_numpy(self.last_output).copy(), backend.to_numpy(yb).copy()))
        return value

    monkeypatch.setattr(Sequential, "train_step", recording)
    epochs = 3 if device == "cpu" else 2
    hist = model.fit((x, y), epochs=epochs, batch_size=12, loss=CoralLoss(), verbose=0,
                     optimizer=optim.Adam(model, lr=0.02), validation=(x[:20], y[:20]))
    assert len(steps) == 4 * epochs
    for e in range(epochs):
        epoch = steps[4 * e:4 * e + 4]
        n = sum(len(t) for _, _, t in epoch)
        hits = sum(int((coral_predict(z) == t).sum()) for _, z, t in epoch)
        assert n == 37 and hist["accuracy"][e] == hits / n
        assert hist["loss"][e] == pytest.approx(sum(v * len(t) for v, _, t in epoch) / n, rel=1e-12)
        assert all(z.shape == (len(t), K - 1) for _, z, t in epoch)
        assert 0 <= hist["val_accuracy"][e] <= 1 and np.isfinite(hist["val_loss"][e])
    assert hist["loss"][-1] < hist["loss"][0]             # it learns the easy task
    # with the last weights: the validation entry is evaluate's, as for softmax
    again = model.evaluate((x[:20], y[:20]), batch_size=12, loss=CoralLoss())
    assert again["accuracy"] == hist["val_accuracy"][-1] and again["loss"] == hist["val_loss"][-1]


@pytest.mark.parametrize("device", DEVICES)
def test_evaluate_with_coral_loss_against_a_numpy_recount(device, rng):
    K = 6
    model = ordinal_net(rng, K)
    x, y = ordinal_data(rng, 23, K)
    model.fit((x, y), epochs=2, batch_size=8, loss=CoralLoss(), verbose=0, optimizer=optim.Adam(model, lr=0.03))
    got = model.evaluate((x, y), batch_size=7, loss=CoralLoss())        # 7, 7, 7, 2: a partial last batch
    logits = backend.to_numpy(model.predict(x, batch_size=7))
    loss, accuracy, mae = numpy_recount(logits, y, K)
    assert list(got) == ["loss", "accuracy", "mae"]
    assert got["loss"] == pytest.approx(loss, rel=2e-6)
    assert got["accuracy"] == accuracy and got["mae"] == pytest.approx(mae, rel=1e-15)
    assert 0 < got["mae"] and len(set((logits > 0).sum(axis=1))) > 1, "a trivial model proves little"


@pytest.mark.parametrize("device", DEVICES)
def test_bad_ranks_in_fit_and_evaluate_are_the_same_error_on_every_device(device, rng):
    K = 5
    model = ordinal_net(rng, K)
    x, y = ordinal_data(rng, 10, K)
    bad = y.copy()
    bad[3] = K                                            # K-1 = 4 logit columns, but 5 ranks: 5 is out
    msg = r"labels must be in \[0, 5\) for 5 classes, got 5 at index 3$"
    with pytest.raises(ValueError, match=r"^Sequential\.fit: " + msg):
        model.fit((x, bad), loss=CoralLoss(), verbose=0)
    with pytest.raises(ValueError, match=r"^Sequential\.fit \(validation\): " + msg):
        model.fit((x, y), loss=CoralLoss(), verbose=0, validation=(x, bad))
    with pytest.raises(ValueError, match=r"^Sequential\.evaluate: " + msg):
        model.evaluate((x, bad), loss=CoralLoss())
    y4 = np.minimum(y, K - 2)                               # rank K-1 = 4 is a valid rank, but not a softmax class
    model.evaluate((x, np.where(y4 == 0, K - 1, y4)), loss=CoralLoss())
    with pytest.raises(ValueError, match=r"^Sequential\.evaluate: labels must be in \[0, 4\) for 4 classes, got 4"):
        model.evaluate((x, np.full(10, K - 1)))              # the default loss reads 4 columns as 4 classes
    with pytest.raises(TypeError, match=r"^MSE: fit and evaluate read predictions as integer class labels"):
        model.fit((x, y), loss=MSE(), verbose=0)


@pytest.mark.sim
def test_a_bad_rank_that_reaches_the_gpu_kernels_is_raised_from_fits_device_sums(rng, monkeypatch):
    """Inside fit the GPU path does not check labels per step (no sync): a bad rank that slipped past the
    host check is counted by the tally's device flag, and fit raises when it reads the sums."""
    import gpucnn.model
    model = ordinal_net(rng)
    x, y = ordinal_data(rng, 6)
    y[2] = 7
    monkeypatch.setattr(gpucnn.model, "check_labels", lambda *a, **k: None)     # as if the host check missed it
    with pytest.raises(ValueError, match=r"^Sequential\.fit: labels must be in \[0, 5\) for 5 classes; 1 label\(s\) "
                                         r"outside it reached the GPU kernels \(epoch 1, step 1\)$"):
        model.fit((x, y), batch_size=6, loss=CoralLoss(), verbose=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N, K", [(11, 6), (13, 70)])      # 70: three tiles of 32 tasks on the GPU path
def test_scores_and_tally_on_every_device(device, N, K, rng):
    """The batch's hits [rank == y], bad labels [y outside [0, K)] and sum of |rank - y| against NumPy written from
    the definition, for int32 and int64 labels, logits at exactly 0 (not "above") and NaN (not "above"), bad labels
    both ways; tally adds loss * N, hits and bad labels to fit's sums."""
    z = rng.standard_normal((N, K - 1)).astype(np.float32)
    z[0, :] = 0
    z[1, 2] = np.nan
    rank = (np.nan_to_num(z, nan=-1) > 0).sum(axis=1)
    y = rng.integers(0, K, N)
    y[[0, 2]] = rank[[0, 2]]                  # two hits at least
    y[4], y[7] = -1, K
    ok = (y >= 0) & (y < K)
    expected = [(ok & (rank == y)).sum(), (~ok).sum(), np.where(ok, np.abs(rank - y), 0).sum()]
    assert expected[2] > 0, "a trivial case proves little"
    for labels in (y, y.astype(np.int32)):
        got = KC.scores(z, labels)
        assert got.dtype == np.float64 and got.shape == (3,)
        np.testing.assert_array_equal(backend.to_numpy(got), expected)
        acc = np.zeros(3)
        value = np.asarray(np.float32(rng.uniform(0.5, 2)))
        KC.tally(value, z, labels, acc)
        KC.tally(value, z, labels, acc)
        np.testing.assert_array_equal(acc, [2 * float(value) * N, 2 * expected[0], 2 * expected[1]])


@pytest.mark.sim
def test_the_tally_and_the_scores_are_one_launch_each_on_the_gpu_path(rng):
    z = rng.standard_normal((9, 4)).astype(np.float32)
    y = rng.integers(0, 5, 9)
    with gpucnn.profile() as p:
        KC.tally(np.asarray(np.float32(1.5)), z, y, np.zeros(3))
    assert p.launches == 1 and p.counts["coral"]["numba"] == 1
    with gpucnn.profile() as p:
        CoralLoss().scores(z, y)
    assert p.launches == 1 and p.counts["coral"]["numba"] == 1


@pytest.mark.sim
def test_sim_head_backward_over_many_blocks_matches_cpu_to_the_bit_every_run(rng):
    """gb (sums over rows) and s (sums over 69 tasks: three tiles of 32) over several chunks of rows: equal to the
    CPU's within rounding, and the same bits on a second run (no float atomics)."""
    N, T, F = 11, 69, 5
    x = rng.standard_normal((N, F)).astype(np.float32)
    w = rng.standard_normal((1, F)).astype(np.float32)
    gz = rng.standard_normal((N, T)).astype(np.float32)
    with record_launches() as log:
        first = KC.coral_backward(x, w, gz)
    assert [r.blocks for r in log if r.kernel == "coral._sums_kernel"] == [3 * 2]     # 3 tiles x 2 chunks of rows
    again = KC.coral_backward(x, w, gz)
    with backend.cpu_path():
        ref = KC.coral_backward(x, w, gz)
    for name, a, b, r in zip(("gx", "gw", "gb"), first, again, ref):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b), err_msg=name)
        assert_close(a, r, "float32", f"CORAL backward {name} (sim vs cpu)")
