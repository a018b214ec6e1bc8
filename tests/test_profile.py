"""gpucnn.profile(timing=True): the time of every launch, per op family and per kernel (issue: GPU speed, point 6)."""
import numpy as np
import pytest

import gpucnn
from gpucnn import backend, models, optim
from gpucnn.losses import SoftmaxCrossEntropy


@pytest.mark.sim
def test_sim_timing_covers_every_launch_of_a_step(rng):
    model = models.lenet5(seed=0)
    opt = optim.SGD(model, lr=0.01, momentum=0.9)
    loss = SoftmaxCrossEntropy()
    x, y = rng.standard_normal((2, 1, 28, 28)).astype(np.float32), np.array([3, 7])
    for _ in range(2):
        model.train_step(x, y, loss, opt, graph=False)
    with gpucnn.profile(timing=True) as p:
        model.train_step(x, y, loss, opt, graph=False)
    assert not backend._timers                                  # nothing left timing after the block
    timed = sum(len(v) for v in p.times.values())
    assert timed == p.launches > 0, (timed, p.launches)         # every Numba, CuPy and cuBLAS launch
    assert all(ms >= 0 for v in p.times.values() for ms in v) and p.milliseconds > 0
    fam = p.family_milliseconds()
    assert set(fam) == set(p.by_family()) and abs(sum(fam.values()) - p.milliseconds) < 1e-9
    assert ("conv", "gemm") in p.times and ("loss", "_softmax_kernel") in p.times
    text = str(p)
    assert "| kernel | launches | ms | share |" in text and "| conv.gemm | 5 |" in text


@pytest.mark.sim
def test_sim_counting_alone_times_nothing(rng):
    model = models.lenet5(seed=0)
    with gpucnn.profile() as p:
        model.predict(rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    assert p.launches > 0 and p.times == {} and " ms |" not in str(p)
