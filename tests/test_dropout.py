"""Dropout: finite differences, the hash's arithmetic, mask statistics, evaluation, sim masks bit-identical."""
import numpy as np
import pytest

from gpucnn import backend, layers as L
from gpucnn.kernels import dropout as K
from gpucnn.testing import check_backward
from conftest import assert_close


def hash_ref(x):
    """The 32-bit finaliser in plain Python ints, written out again: the reference for both array versions."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    return x ^ (x >> 16)


def mask_ref(n, p, seed, step):
    """Which of n elements are kept, one Python int at a time (slow, obviously right)."""
    k_seed = hash_ref(seed)
    k_step = hash_ref(step ^ k_seed)
    return np.array([hash_ref(hash_ref(i ^ k_seed) ^ k_step) >> 8 >= np.ceil(p * 2**24) for i in range(n)])


# ---------------------------------------------------------------------------- finite differences


@pytest.mark.parametrize("p", [0.5, 0.2, 0.0])
@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (1, 16)])
def test_check_backward(p, shape, rng):
    layer = L.Dropout(p, seed=3)
    layer.step = 5
    x = rng.standard_normal(shape)
    check_backward(layer, x)        # passes only if every forward saw the same mask (the step is restored)
    if p > 0:
        layer.step = 5
        assert np.any(layer.forward(x) == 0)    # and that mask really drops something


def test_check_backward_eval(rng):
    check_backward(L.Dropout(0.5), rng.standard_normal((2, 6)), training=False)


# ---------------------------------------------------------------------------- the hash and the mask


def test_hash_arrays_match_python_ints(rng):
    x = np.concatenate([np.array([0, 1, 2**31, 2**32 - 1], np.uint32),
                        rng.integers(0, 2**32, 200, dtype=np.uint32)])
    got = K._hash32_array(x.copy())
    assert got.dtype == np.uint32
    assert [int(v) for v in got] == [hash_ref(int(v)) for v in x]
    assert [K._hash32(int(v)) for v in x] == [hash_ref(int(v)) for v in x]


@pytest.mark.parametrize("p", [0.5, 0.1, 0.7, 0.123456789])
def test_mask_matches_reference(p):
    mask = K.dropout_mask((7, 9), p, seed=11, step=4, like=np.zeros(1, np.float32))
    assert np.array_equal(mask.reshape(-1) != 0, mask_ref(63, p, 11, 4))


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_mask_values_dtype_and_float_types_agree(p):
    m32 = K.dropout_mask((4, 50), p, 0, 1, np.zeros(1, np.float32))
    m64 = K.dropout_mask((4, 50), p, 0, 1, np.zeros(1, np.float64))
    assert m32.dtype == np.float32 and m64.dtype == np.float64 and m32.shape == (4, 50)
    assert set(np.unique(m32)) <= {0, np.float32(1 / (1 - p))}
    assert set(np.unique(m64)) <= {0, 1 / (1 - p)}
    assert np.array_equal(m32 != 0, m64 != 0)      # the keep decision is on integers, not floats


def test_mask_depends_on_seed_and_step():
    like = np.zeros(1, np.float32)
    a = K.dropout_mask((1000,), 0.5, 0, 0, like)
    assert np.array_equal(a, K.dropout_mask((1000,), 0.5, 0, 0, like))   # deterministic
    for other in (K.dropout_mask((1000,), 0.5, 0, 1, like), K.dropout_mask((1000,), 0.5, 1, 0, like)):
        both = np.mean((a != 0) & (other != 0))
        assert 0.2 < both < 0.3            # independent masks: kept in both ~ (1 - p)^2 = 0.25


# ---------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_fraction_kept_and_expectation(p, rng):
    n = 200_000
    x = rng.uniform(0.5, 1.5, n).astype(np.float32)
    layer = L.Dropout(p, seed=7)
    y = layer.forward(x)
    kept = y != 0
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 5 * sigma
    # kept values are exactly x / (1 - p) (in float32: x times the float32 scale), dropped are 0
    assert np.array_equal(y[kept], x[kept] * np.float32(1 / (1 - p)))
    # E[y] = x: the mean of y / x is 1 up to the sampling error of the kept fraction
    assert abs(np.mean(y / x) - 1) < 5 * sigma / (1 - p)
    # neighbours are independent: P(both kept) ~ (1 - p)^2
    assert abs(np.mean(kept[1:] & kept[:-1]) - (1 - p) ** 2) < 0.01
    # the backward applies the same mask and scale
    gy = rng.standard_normal(n).astype(np.float32)
    gx = layer.backward(gy)
    assert gx.dtype == np.float32
    assert np.array_equal(gx[kept], gy[kept] * np.float32(1 / (1 - p)))
    assert np.all(gx[~kept] == 0)


def test_steps_change_the_mask(rng):
    layer = L.Dropout(0.5)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    y0, y1 = layer.forward(x), layer.forward(x)
    assert layer.step == 2
    assert not np.array_equal(y0 != 0, y1 != 0)


def test_eval_is_identity(rng):
    layer = L.Dropout(0.5)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    assert layer.forward(x, training=False) is x
    assert layer.step == 0                         # evaluation does not advance the masks
    gy = rng.standard_normal((3, 4)).astype(np.float32)
    assert np.array_equal(layer.backward(gy), gy)


def test_p_zero_is_identity(rng):
    layer = L.Dropout(0.0)
    x = rng.standard_normal((3, 4))
    assert np.array_equal(layer.forward(x), x)
    assert layer.step == 1
    gy = rng.standard_normal((3, 4))
    assert np.array_equal(layer.backward(gy), gy)


def test_config_and_shape():
    layer = L.Dropout(0.25, seed=9)
    assert layer.config() == {"p": 0.25, "seed": 9}
    assert L.Dropout(**layer.config()).config() == layer.config()
    assert layer.output_shape((3, 8, 8)) == (3, 8, 8)
    assert layer.params == {} and layer.num_params() == 0


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("p, err, match", [
    (1.0, ValueError, r"Dropout: p is the probability of dropping an element and must be in \[0, 1\), got 1.0"),
    (-0.1, ValueError, r"Dropout: p is .* must be in \[0, 1\), got -0.1"),
    (float("nan"), ValueError, r"Dropout: p is .* must be in \[0, 1\), got nan"),
    ("0.5", TypeError, r"Dropout: p \(the drop probability\) must be a number, got '0.5'"),
    (True, TypeError, r"Dropout: p \(the drop probability\) must be a number, got True"),
])
def test_bad_p(p, err, match):
    with pytest.raises(err, match=match):
        L.Dropout(p)


def test_errors(rng):
    with pytest.raises(TypeError, match=r"Dropout: seed must be an int, got 1.5"):
        L.Dropout(0.5, seed=1.5)
    with pytest.raises(RuntimeError, match="Dropout: backward called before forward"):
        L.Dropout().backward(np.ones(3))
    with pytest.raises(TypeError, match="Dropout: expected a float input"):
        L.Dropout().forward(np.ones((2, 2), np.uint8))
    layer = L.Dropout()
    layer.forward(rng.standard_normal((2, 3)))
    with pytest.raises(ValueError, match=r"Dropout: backward got a gradient of shape \(3, 2\), expected the forward output's \(2, 3\)"):
        layer.backward(rng.standard_normal((3, 2)))


# ---------------------------------------------------------------------------- the GPU path on the simulator


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.5, 0.7, 0.0])
def test_sim_mask_bit_identical(p, dtype):
    like = np.zeros(1, dtype)
    for seed, step in [(0, 0), (5, 1), (2**32 - 1, 123456)]:
        mask = K.dropout_mask((3, 5, 7), p, seed, step, like)
        with backend.cpu_path():
            ref = K.dropout_mask((3, 5, 7), p, seed, step, like)
        assert mask.dtype == np.dtype(dtype) and mask.shape == (3, 5, 7)
        assert np.array_equal(mask, ref), f"seed {seed} step {step}"
    if p > 0:
        assert not np.array_equal(K.dropout_mask((3, 5, 7), p, 0, 1, like), K.dropout_mask((3, 5, 7), p, 0, 2, like))


@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sim_forward_backward_match_cpu(dtype, rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    y, mask = K.dropout_forward(x, 0.4, 3, 17)
    gx = K.dropout_backward(gy, mask)
    with backend.cpu_path():
        y_ref, mask_ref_ = K.dropout_forward(x, 0.4, 3, 17)
        gx_ref = K.dropout_backward(gy, mask_ref_)
    assert y.dtype == gx.dtype == np.dtype(dtype)
    assert np.array_equal(mask, mask_ref_)
    assert_close(y, y_ref, dtype, "dropout forward")
    assert_close(gx, gx_ref, dtype, "dropout backward")
    assert np.array_equal(mask, K.dropout_mask(x.shape, 0.4, 3, 17, x))   # fused kernel == mask kernel


@pytest.mark.sim
def test_sim_layer_matches_cpu(rng):
    x = rng.standard_normal((4, 6)).astype(np.float32)
    gy = rng.standard_normal((4, 6)).astype(np.float32)
    layer, ref = L.Dropout(0.3, seed=1), L.Dropout(0.3, seed=1)
    for _ in range(2):
        y, gx = layer.forward(x), layer.backward(gy)
        with backend.cpu_path():
            y_ref, gx_ref = ref.forward(x), ref.backward(gy)
        assert np.array_equal(y, y_ref) and np.array_equal(gx, gx_ref)
    assert layer.step == 2
