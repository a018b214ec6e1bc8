"""bench/equal_to.py's verdict: when a difference from an older revision counts as Adam's amplification of
rounding noise. Synthetic runs (no training), so it is a fast CPU test of the rule itself."""
import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_equal_to", os.path.join(ROOT, "bench", "equal_to.py"))
EQ = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(EQ)
TOL = EQ.TOLERANCE["float32"]


def _runs(rng, optimizer="adam"):
    """Two runs of net "n" that agree on everything: two steps' gradients, a weight, a loss."""
    theirs = {"n|optimizer": np.array(optimizer), "n|loss 0": np.array(1.25)}
    for t in range(2):
        theirs[f"n|grad {t}|0.weight"] = rng.standard_normal((4, 5)).astype(np.float32)
    theirs["n|0.weight"] = rng.standard_normal((4, 5)).astype(np.float32)
    return {k: v.copy() for k, v in theirs.items()}, theirs


def _noise_at(mine, theirs, t, where):
    """Make element ``where`` of step t's gradient rounding noise of a zero, different in the two runs."""
    theirs[f"n|grad {t}|0.weight"][where] = -4.7e-10
    mine[f"n|grad {t}|0.weight"][where] = -5.8e-11


def test_a_weight_moved_by_a_noise_gradient_is_amplification(rng):
    mine, theirs = _runs(rng)
    _noise_at(mine, theirs, 1, (2, 3))
    mine["n|0.weight"][2, 3] += 1e-3
    assert EQ.adam_amplified(mine, theirs, TOL) == 1
    n, abs_d, rel_d, same = EQ.differences(mine, theirs)
    assert not same and abs_d == pytest.approx(1e-3, rel=1e-3) and rel_d > TOL


def test_a_weight_moved_where_the_gradient_was_not_noise_is_not(rng):
    mine, theirs = _runs(rng)
    _noise_at(mine, theirs, 1, (2, 3))
    mine["n|0.weight"][1, 1] += 1e-3          # a real gradient there: something else moved it
    assert EQ.adam_amplified(mine, theirs, TOL) is None


def test_gradients_over_tolerance_are_not_amplification(rng):
    mine, theirs = _runs(rng)
    _noise_at(mine, theirs, 0, (0, 0))
    mine["n|0.weight"][0, 0] += 1e-3
    mine["n|grad 1|0.weight"][3, 4] *= 1 + 1e-3
    assert EQ.adam_amplified(mine, theirs, TOL) is None


def test_sgd_runs_never_count_as_amplification(rng):
    mine, theirs = _runs(rng, "sgd")
    _noise_at(mine, theirs, 1, (2, 3))
    mine["n|0.weight"][2, 3] += 1e-3
    assert EQ.adam_amplified(mine, theirs, TOL) is None


def test_differences_ignore_gradients_and_see_every_bit_of_the_rest(rng):
    mine, theirs = _runs(rng)
    mine["n|grad 0|0.weight"][0, 0] += 1.0
    assert EQ.differences(mine, theirs)[3]
    mine["n|loss 0"] = np.nextafter(mine["n|loss 0"], 2.0)
    n, abs_d, rel_d, same = EQ.differences(mine, theirs)
    assert not same and 0 < rel_d < 1e-15
