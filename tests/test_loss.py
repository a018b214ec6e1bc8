"""Losses: finite differences, the CPU path against PyTorch, the GPU path ("sim") against the CPU, errors."""
import numpy as np
import pytest

from gpucnn import backend
from gpucnn.kernels import loss as K, reduce
from gpucnn.losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy, check_finite
from gpucnn.testing import check_backward
from conftest import assert_close

XENT_SHAPES = [(4, 5), (1, 3), (7, 10), (3, 1)]
EXTREME = np.array([[1e4, -1e4, 0.0, 3.0],      # one class dominates completely
                    [-1e4, -1e4, -1e4, -1e4],   # all equal, very negative
                    [1e4, 1e4 - 1, -1e4, 1e4],  # a near tie at the top
                    [2.0, -1.0, 0.5, 1e4]])
EXTREME_LABELS = np.array([1, 2, 0, 3])


def logsumexp_ref(z):
    """Cross-entropy rows in float64 by a route that does not share code with the library."""
    z = z.astype(np.float64)
    return np.logaddexp.reduce(z, axis=1)


# ---------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("shape", XENT_SHAPES)
def test_xent_check_backward(shape, rng):
    labels = rng.integers(0, shape[1], shape[0])
    check_backward(SoftmaxCrossEntropy(), rng.standard_normal(shape) * 2, target=labels)


def test_xent_check_backward_large_offsets(rng):
    # rows shifted by +-1e4: only the differences within a row matter, and the max subtraction keeps them
    z = rng.standard_normal((4, 5)) + 1e4 * rng.choice([-1.0, 1.0], size=(4, 1))
    check_backward(SoftmaxCrossEntropy(), z, target=rng.integers(0, 5, 4))


@pytest.mark.parametrize("shape", [(4, 3), (1, 1), (2, 3, 4, 4)])
def test_mse_check_backward(shape, rng):
    check_backward(MSE(), rng.standard_normal(shape), target=rng.standard_normal(shape))


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_xent_extreme_logits_finite_and_exact(dtype):
    loss = SoftmaxCrossEntropy()
    z = EXTREME.astype(dtype)
    value = loss.forward(z, EXTREME_LABELS)
    rows = logsumexp_ref(z) - z.astype(np.float64)[np.arange(4), EXTREME_LABELS]
    assert value.shape == () and value.dtype == np.dtype(dtype)
    assert np.isfinite(float(value))
    assert_close(value, rows.mean(), dtype, "extreme logits loss")
    g = loss.backward()
    assert np.all(np.isfinite(g))
    assert np.abs(g.sum(axis=1)).max() < 1e-6              # each row: softmax (sums to 1) minus a one-hot
    assert g[0, 1] == pytest.approx(-0.25, abs=1e-6)   # label 1 gets no probability in row 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_rows_sum_to_one(dtype, rng):
    p = K.softmax(EXTREME.astype(dtype))
    assert p.dtype == np.dtype(dtype) and np.all(np.isfinite(p))
    assert_close(p.sum(axis=1), np.ones(4), dtype, "softmax rows")
    z = rng.standard_normal((5, 6)).astype(dtype)
    ref = np.exp(z.astype(np.float64))
    assert_close(SoftmaxCrossEntropy().probs(z), ref / ref.sum(axis=1, keepdims=True), dtype, "softmax")
    assert_close(K.softmax(z[2]), ref[2] / ref[2].sum(), dtype, "softmax of one row")   # predict_proba(one image)


def test_mse_value_and_step(rng):
    loss = MSE()
    p, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    assert float(loss.forward(p, t)) == pytest.approx(float(np.mean((p - t) ** 2)), rel=1e-12)
    assert_close(loss.backward(), 2 * (p - t) / 12, "float64", "mse grad")
    assert loss.step == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("label_dtype", ["int64", "int32", "uint8"])
def test_xent_keeps_dtype(dtype, label_dtype, rng):
    loss = SoftmaxCrossEntropy()
    value = loss.forward(rng.standard_normal((6, 4)).astype(dtype), rng.integers(0, 4, 6).astype(label_dtype))
    assert isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.dtype(dtype)
    assert loss.backward().dtype == np.dtype(dtype)


# ---------------------------------------------------------------------------- against PyTorch


def against_torch(loss, name, x, target, dtype, what):
    """Our ``loss``'s value and gradient on (x, target) against torch.nn.functional's ``name`` loss."""
    torch = pytest.importorskip("torch")
    value = loss.forward(x, target)
    t = torch.tensor(x, requires_grad=True)
    tl = getattr(torch.nn.functional, name)(t, torch.tensor(target))
    tl.backward()
    assert_close(value, tl.detach().numpy(), dtype, f"{what} forward")
    assert_close(loss.backward(), t.grad.numpy(), dtype, f"{what} backward")
    return value


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(8, 10), (1, 4)])
def test_xent_against_torch(shape, dtype, rng):
    torch = pytest.importorskip("torch")
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    against_torch(SoftmaxCrossEntropy(), "cross_entropy", z, rng.integers(0, shape[1], shape[0]), dtype,
                  "cross_entropy")
    assert_close(K.softmax(z), torch.softmax(torch.tensor(z), 1).numpy(), dtype, "softmax")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_xent_extreme_against_torch(dtype):
    against_torch(SoftmaxCrossEntropy(), "cross_entropy", EXTREME.astype(dtype), EXTREME_LABELS, dtype,
                  "extreme cross_entropy")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(8, 3), (2, 3, 4, 4)])
def test_mse_against_torch(shape, dtype, rng):
    p = rng.standard_normal(shape).astype(dtype)
    y = rng.standard_normal(shape).astype(dtype)
    assert against_torch(MSE(), "mse_loss", p, y, dtype, "mse").dtype == np.dtype(dtype)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("labels, err, match", [
    (np.array([0, 1, 5]), ValueError, r"SoftmaxCrossEntropy: labels must be in \[0, 4\) for 4 classes, got 5 at index 2"),
    (np.array([0, -1, 2]), ValueError, r"SoftmaxCrossEntropy: labels must be in \[0, 4\).*got -1 at index 1"),
    (np.array([0, 1]), ValueError, r"SoftmaxCrossEntropy: 3 rows of logits but 2 labels"),
    (np.array([0.0, 1.0, 2.0]), TypeError, r"SoftmaxCrossEntropy: labels must be integer class indices, got dtype float64"),
    (np.eye(3, 4), TypeError, r"one-hot labels\? pass y.argmax\(axis=1\)"),
    (np.zeros((3, 1), np.int64), ValueError, r"SoftmaxCrossEntropy: expected labels of shape \(N,\).*got shape \(3, 1\)"),
    ([0, 1, 2], TypeError, r"SoftmaxCrossEntropy: expected the labels as an integer array, got list"),
])
@pytest.mark.parametrize("device", ["cpu", pytest.param("sim", marks=pytest.mark.sim)])
def test_xent_bad_labels(labels, err, match, device, rng):
    """The same error, word for word, on the CPU path and the GPU path ("sim"; the first H200 run: "cuda"
    returned without a word, "sim" failed later with a FloatingPointError)."""
    with pytest.raises(err, match=match):
        SoftmaxCrossEntropy().forward(rng.standard_normal((3, 4)), labels)


def test_xent_bad_logits(rng):
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: expected a 2-d input of logits"):
        SoftmaxCrossEntropy().forward(rng.standard_normal((3, 4, 1)), np.zeros(3, np.int64))
    with pytest.raises(TypeError, match="SoftmaxCrossEntropy: expected a float input"):
        SoftmaxCrossEntropy().forward(np.ones((3, 4), np.int64), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: expected at least one row and one class"):
        SoftmaxCrossEntropy().forward(np.ones((0, 4)), np.zeros(0, np.int64))


def test_check_labels_on_a_data_set():
    K.check_labels(np.array([0, 9, 3], np.uint8), 10, "fit")      # passes
    with pytest.raises(ValueError, match=r"fit: labels must be in \[0, 10\) for 10 classes, got 10 at index 1 \(and 1 more\)"):
        K.check_labels(np.array([0, 10, 3, 12]), 10, "fit")
    with pytest.raises(ValueError, match=r"fit: 5 rows of logits but 4 labels"):
        K.check_labels(np.array([0, 1, 2, 3]), 10, "fit", n=5)


@pytest.mark.parametrize("target, err, match", [
    (np.zeros((3, 5)), ValueError, r"MSE: the prediction has shape \(3, 4\) but the target has shape \(3, 5\)"),
    (np.zeros(12), ValueError, r"MSE: the prediction has shape \(3, 4\) but the target has shape \(12,\)"),
    (np.zeros((3, 4), np.float32), TypeError, r"MSE: the prediction is float64 but the target is float32"),
    (3.0, TypeError, r"MSE: expected the target as an array, got float"),
])
def test_mse_bad_target(target, err, match, rng):
    with pytest.raises(err, match=match):
        MSE().forward(rng.standard_normal((3, 4)), target)


@pytest.mark.parametrize("make", [SoftmaxCrossEntropy, MSE])
def test_backward_before_forward(make):
    with pytest.raises(RuntimeError, match=f"{make.__name__}: backward called before forward"):
        make().backward()


def test_nan_loss_raises_with_advice(rng):
    z = rng.standard_normal((3, 4))
    z[1, 2] = np.nan
    loss = SoftmaxCrossEntropy()
    loss.forward(rng.standard_normal((3, 4)), np.array([0, 1, 2]))   # step 0 is fine
    with pytest.raises(FloatingPointError, match=r"SoftmaxCrossEntropy: loss is nan at step 1: lower the learning rate"):
        loss.forward(z, np.array([0, 1, 2]))
    p = rng.standard_normal((2, 2))
    p[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match=r"MSE: loss is inf at step 0: lower the learning rate"):
        MSE().forward(p, np.zeros((2, 2)))


def test_check_finite():
    assert check_finite(np.asarray(np.float32(1.5)), "fit") == 1.5
    with pytest.raises(FloatingPointError, match=r"fit, epoch 2: loss is nan at step 37: lower the learning rate"):
        check_finite(np.asarray(np.nan), "fit, epoch 2", step=37)
    with pytest.raises(FloatingPointError, match=r"evaluate: loss is -inf: lower the learning rate"):
        check_finite(-np.inf, "evaluate")


# ---------------------------------------------------------------------------- the GPU path on the simulator


def _xent_sim_vs_cpu(z, y, dtype):
    value, grad = K.softmax_cross_entropy_forward(z, y)
    probs = K.softmax(z)
    with backend.cpu_path():
        value_ref, grad_ref = K.softmax_cross_entropy_forward(z, y)
        probs_ref = K.softmax(z)
    assert isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.dtype(dtype)
    assert grad.dtype == probs.dtype == np.dtype(dtype)
    assert_close(value, value_ref, dtype, "cross-entropy value")
    assert_close(grad, grad_ref, dtype, "cross-entropy gradient")
    assert_close(probs, probs_ref, dtype, "softmax")
    assert_close(K.softmax(z[0]), probs_ref[0], dtype, "softmax of one row")


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(5, 4), (1, 3)])
def test_sim_xent_matches_cpu(shape, dtype, rng):
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    _xent_sim_vs_cpu(z, rng.integers(0, shape[1], shape[0]), dtype)


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7, 40), (3, 100), (33, 5)])
def test_sim_xent_wide_rows_and_many_blocks(shape, dtype, rng):
    """Rows of 40 and 100 classes take several lanes and two column chunks each (a unit's max and sum are trees in
    shared memory); 33 rows take 17 blocks whose row losses the last block adds (gpucnn.kernels.reduce)."""
    group, _, chunks, blocks = K._row_grid(*shape)
    assert (group > 1 or blocks > 1) and chunks == 2, (group, chunks, blocks)
    z = (rng.standard_normal(shape) * 3).astype(dtype)
    _xent_sim_vs_cpu(z, rng.integers(0, shape[1], shape[0]), dtype)


def argmax_ref(z):
    """NumPy's argmax written out row by row: the first NaN of a row, else the first column holding its largest value."""
    return np.array([np.flatnonzero(np.isnan(r))[0] if np.isnan(r).any() else np.flatnonzero(r == r.max())[0]
                     for r in z])


def tally_case(rng, n, c, dtype="float64"):
    """Logits (n, c) with a tie, two NaNs and a row of -inf, each across the two halves of a row (two column chunks on
    "sim"), a row whose maximum is in its last columns, and labels (int64) with hits, misses and bad labels both
    ways; and the counts from the definition: [rows whose argmax is the label, labels outside [0, c)]."""
    z = rng.standard_normal((n, c)).astype(dtype)
    z[0, c - 1] = 9.0                       # the largest in the last chunk
    z[1, [c // 5, c - 2]] = 9.0             # a tie: the first column
    z[2, [c // 4, c - 1]] = np.nan          # NaNs: the first one
    z[3] = -np.inf                          # all equal: column 0
    top = argmax_ref(z)
    y = top.copy()
    y[4] = (y[4] + 1) % c                   # a miss
    y[5], y[6] = -1, c                      # bad labels
    y[7:] = rng.integers(0, c, n - 7)
    ok = (y >= 0) & (y < c)
    hits, bad = int((ok & (top == y)).sum()), int((~ok).sum())
    assert hits >= 4 and hits < n - 2 and bad == 2
    return z, y, [hits, bad]


DEVICES = ["cpu", pytest.param("sim", marks=pytest.mark.sim)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(9, 40), (7, 100), (33, 5)])
def test_tally_counts_against_the_definition(device, shape, dtype, rng):
    """fit's running sums: loss * N, the rows whose argmax (NumPy's: a NaN first, the first column on a tie) is the
    label, the labels outside [0, C), added to acc on every call, the same bits each time, int32 labels too. On
    "sim" each row is split into two column chunks: 40 columns take units of 2 lanes, two to a block, 100 take
    one unit of 4 lanes a block (a row in two blocks, joined by the block that finishes it last), 5 one lane."""
    z, y, (hits, bad) = tally_case(rng, *shape, dtype)
    if device == "sim":
        group, threads, chunks, _ = K._row_grid(*shape)
        assert chunks == 2 and threads // group == {40: 2, 100: 1, 5: 4}[shape[1]], (group, threads, chunks)
    value = np.asarray(np.float32(rng.uniform(0.5, 2)))
    for labels in (y, y.astype(np.int32)):
        acc = np.zeros(3)
        K.tally(value, z, labels, acc)
        once = acc.copy()
        K.tally(value, z, labels, acc)
        assert once.tolist() == [float(value) * shape[0], hits, bad]
        assert acc.tolist() == [2 * float(value) * shape[0], 2 * hits, 2 * bad]
        if device == "sim":
            assert not reduce.tickets(64, z).any()          # every ticket back at zero for the next launch


@pytest.mark.sim
@pytest.mark.parametrize("group, threads, chunks", [(1, 4, 1), (4, 4, 3), (2, 8, 3), (2, 4, 7), (8, 16, 4)])
def test_sim_tally_over_any_grid(group, threads, chunks, rng):
    """_tally_kernel on the grids "cuda" makes, run on the simulator: one chunk a row (LeNet's), a row over three
    blocks of one unit each (AlexNet's 1,000 classes at batch 128), units of 2 lanes four to a block in 3 chunks,
    7 chunks of 5 columns of 30 (the last empty), a last row block half full: the definition's counts, twice."""
    z, y, (hits, bad) = tally_case(rng, 11, 30)
    acc = np.zeros(3)
    for k in (1, 2):
        K._tally_launch(np.asarray(0.25), z, y, acc, group, threads, chunks)
        assert acc.tolist() == [k * 0.25 * 11, k * hits, k * bad]
        assert not reduce.tickets(64, z).any()


@pytest.mark.sim
@pytest.mark.parametrize("chunks, threads", [(5, 4), (3, 8), (1, 16)])
def test_sim_sum_over_any_number_of_blocks(chunks, threads, rng):
    """_sum_kernel over blocks of unequal chunks (37 values in 5 chunks of 8: the last has 5; in 3 chunks of 13)
    equals the float64 sum, and every ticket is back at zero for the next launch."""
    v = rng.standard_normal(37)
    out = np.zeros(1)
    for _ in range(2):
        reduce.launch_reduction(K._sum_kernel, (v, out), (0.5,), (1, chunks, np.float64), 1, v, threads, chunks,
                                threads * 8)
        assert_close(out[0], 0.5 * v.sum(), "float64", f"sum over {chunks} blocks")
        assert not reduce.tickets(16, v).any()


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sim_xent_extreme_logits(dtype):
    _xent_sim_vs_cpu(EXTREME.astype(dtype), EXTREME_LABELS.astype(np.int32), dtype)


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 4), (1, 2, 3, 3)])
def test_sim_mse_matches_cpu(shape, dtype, rng):
    p = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    value, grad = K.mse_forward(p, t), K.mse_backward(p, t)
    with backend.cpu_path():
        value_ref, grad_ref = K.mse_forward(p, t), K.mse_backward(p, t)
    assert value.shape == () and value.dtype == grad.dtype == np.dtype(dtype)
    assert_close(value, value_ref, dtype, "mse value")
    assert_close(grad, grad_ref, dtype, "mse gradient")


@pytest.mark.sim
def test_sim_block_sum_many_values(rng):
    # more values than threads in the block: every thread adds a strided slice before the tree
    v = rng.standard_normal(1000).astype(np.float32)
    t = np.zeros_like(v)
    assert_close(K.mse_forward(v, t), np.mean(v.astype(np.float64) ** 2), "float32", "block sum of 1000")


@pytest.mark.sim
def test_sim_bad_label_is_poisoned_and_counted_where_the_host_does_not_check(rng):
    """Inside labels_checked() (fit, evaluate) or while a graph is captured, the GPU path does not sync to
    range-check labels: the kernel marks the row NaN instead of indexing, and tally counts the bad label into
    fit's device sums (the flag fit raises on when it reads them back)."""
    z, y = rng.standard_normal((3, 4)), np.array([0, 7, 1])
    with K.labels_checked():
        value, g = K.softmax_cross_entropy_forward(z, y)
    assert np.all(np.isnan(g[1])) and np.all(np.isfinite(g[[0, 2]]))
    with pytest.raises(FloatingPointError, match=r"train: loss is nan at step 4: .*labels outside \[0, classes\)"):
        check_finite(value, "train", step=4)
    sums = np.zeros(3)
    K.tally(value, z, y, sums)
    with backend.cpu_path():
        ref = np.zeros(3)
        K.tally(value, z, y, ref)
    assert sums[2] == ref[2] == 1 and sums[1] == ref[1]
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels must be in \[0, 4\) .*got 7 at index 1"):
        K.softmax_cross_entropy_forward(z, y)           # outside labels_checked(): the same error as the CPU


@pytest.mark.parametrize("device", ["cpu", pytest.param("sim", marks=pytest.mark.sim)])
def test_train_step_with_a_bad_label_raises_the_cpu_error(device, rng):
    from gpucnn import models, optim
    model = models.lenet5(seed=0)
    opt = optim.SGD(model, lr=0.01)
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    with pytest.raises(ValueError, match=r"SoftmaxCrossEntropy: labels must be in \[0, 10\) for 10 classes, got 10 at index 1"):
        model.train_step(x, np.array([3, 10]), SoftmaxCrossEntropy(), opt)


@pytest.mark.sim
def test_sim_losses_forward_backward(rng):
    z = rng.standard_normal((4, 3)).astype(np.float32)
    y = np.array([2, 0, 1, 1])
    loss = SoftmaxCrossEntropy()
    value, g = loss.forward(z, y), loss.backward()
    with backend.cpu_path():
        ref = SoftmaxCrossEntropy()
        value_ref, g_ref = ref.forward(z, y), ref.backward()
    assert_close(value, value_ref, "float32", "loss value")
    assert_close(g, g_ref, "float32", "loss gradient")
    with pytest.raises(FloatingPointError, match=r"SoftmaxCrossEntropy: loss is nan at step 1"):
        loss.forward(np.full((4, 3), np.nan, np.float32), y)


# ---------------------------------------------------------------------------- binary cross-entropy

def _bce_inputs(rng, shape, dtype, from_logits):
    pred = rng.standard_normal(shape) * 3 if from_logits else rng.uniform(0.02, 0.98, shape)
    return pred.astype(dtype), rng.random(shape).astype(dtype)        # soft targets in [0, 1], as pixels


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 1, 6, 6)])
def test_bce_against_torch(shape, dtype, from_logits, rng):
    torch = pytest.importorskip("torch")
    p, t = _bce_inputs(rng, shape, dtype, from_logits)
    loss = BinaryCrossEntropy(from_logits=from_logits)
    value, g = loss.forward(p, t), loss.backward()
    tp = torch.tensor(p, requires_grad=True)
    F = torch.nn.functional
    tl = (F.binary_cross_entropy_with_logits if from_logits else F.binary_cross_entropy)(tp, torch.tensor(t))
    tl.backward()
    assert value.dtype == np.dtype(dtype) and g.dtype == np.dtype(dtype)
    assert_close(value, tl.detach().numpy(), dtype, "bce value")
    assert_close(g, tp.grad.numpy(), dtype, "bce gradient")


@pytest.mark.parametrize("from_logits", [True, False])
def test_bce_check_backward(from_logits, rng):
    p, t = _bce_inputs(rng, (3, 5), "float64", from_logits)
    check_backward(BinaryCrossEntropy(from_logits=from_logits), p, target=t)


def test_bce_extreme_logits_and_probabilities_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    z = np.array([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4], np.float32)
    t = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 0.0], np.float32)
    loss = BinaryCrossEntropy()
    value, g = loss.forward(z, t), loss.backward()
    tz = torch.tensor(z, requires_grad=True)
    ref = F.binary_cross_entropy_with_logits(tz, torch.tensor(t))
    ref.backward()
    assert np.isfinite(value) and np.all(np.isfinite(g))
    assert_close(value, ref.detach().numpy(), "float32", "bce at +-1e4")
    assert_close(g, tz.grad.numpy(), "float32", "bce gradient at +-1e4")
    p = np.array([0.0, 1.0, 0.0, 1.0, 0.5], np.float32)             # log(0) clamped at -100, as PyTorch
    t = np.array([1.0, 0.0, 0.0, 1.0, 0.5], np.float32)
    probs = BinaryCrossEntropy(from_logits=False)
    assert_close(probs.forward(p, t), F.binary_cross_entropy(torch.tensor(p), torch.tensor(t)).numpy(), "float32",
                 "bce of probabilities 0 and 1")


BCE_ERRORS = [
    (dict(), np.zeros(3, np.float32), np.array([0.0, 1.5, 0.2], np.float32), ValueError,
     r"BinaryCrossEntropy: targets must be in \[0, 1\], got values outside it \(min 0, max 1.5\)"),
    (dict(from_logits=False), np.array([0.2, -0.1, 0.5], np.float32), np.zeros(3, np.float32), ValueError,
     r"BinaryCrossEntropy\(from_logits=False\): predictions must be probabilities in \[0, 1\], got min -0.1"),
    (dict(), np.zeros((2, 3), np.float32), np.zeros(6, np.float32), ValueError,
     r"BinaryCrossEntropy: the prediction has shape \(2, 3\) but the target has shape \(6,\)"),
    (dict(), np.zeros(3, np.float32), np.zeros(3, np.float64), TypeError,
     r"BinaryCrossEntropy: the prediction is float32 but the target is float64"),
    (dict(), np.zeros(3, np.int64), np.zeros(3, np.int64), TypeError, r"BinaryCrossEntropy: expected a float input"),
]


@pytest.mark.parametrize("kw, p, t, err, match", BCE_ERRORS)
@pytest.mark.parametrize("device", ["cpu", pytest.param("sim", marks=pytest.mark.sim)])
def test_bce_bad_input_same_error_on_every_device(kw, p, t, err, match, device):
    with pytest.raises(err, match=match):
        BinaryCrossEntropy(**kw).forward(p, t)


@pytest.mark.sim
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sim_bce_matches_cpu(from_logits, dtype, rng):
    p, t = _bce_inputs(rng, (3, 2, 5, 5), dtype, from_logits)
    p[0, 0, 0, :2] = [80, -80] if from_logits else [0.0, 1.0]          # the saturated branches too
    loss = BinaryCrossEntropy(from_logits=from_logits)
    value, g = loss.forward(p, t), loss.backward()
    with backend.cpu_path():
        ref = BinaryCrossEntropy(from_logits=from_logits)
        value_ref, g_ref = ref.forward(p, t), ref.backward()
    assert_close(value, value_ref, dtype, "bce value (sim vs cpu)")
    assert_close(g, g_ref, dtype, "bce gradient (sim vs cpu)")
