"""Whole networks on the GPU code path ("sim") against the CPU path, with the same parameters.

Each op's own tests compare it alone; here the ops are chained as in a real network, so that what one
GPU kernel hands the next (layouts, dtypes, contiguity, caches kept for backward) is checked too. The
layers are driven directly (forward, loss, backward), not through Sequential, so that only the layers
are under test.

Cost: the simulator runs every CUDA thread in Python. LeNet-5 at batch 1 launches about 50,000 threads
in about 17 s: the two im2col launches (35,000 threads, ~0.2 ms each) take 7.5 s, and the two conv
bias-gradient block reductions (3,600 threads whose syncthreads make each cost ~1.8 ms) take 6.5 s.
So LeNet-5 runs in float32 only; the small AlexNet-like stack (a few seconds) runs in both dtypes.
"""
import numpy as np
import pytest

from gpucnn import backend, layers as L, losses
from gpucnn.profile import profile
from conftest import assert_close

pytestmark = pytest.mark.sim


def lenet5(dtype, rng):
    """LeNet-5 as in the examples: 1x28x28 -> 10 logits, tanh and average pooling."""
    return [L.Conv2D(1, 6, 5, padding=2, dtype=dtype, rng=rng), L.Tanh(), L.AvgPool2D(2),
            L.Conv2D(6, 16, 5, dtype=dtype, rng=rng), L.Tanh(), L.AvgPool2D(2),
            L.Flatten(),
            L.Dense(400, 120, dtype=dtype, rng=rng), L.Tanh(),
            L.Dense(120, 84, dtype=dtype, rng=rng), L.Tanh(),
            L.Dense(84, 10, dtype=dtype, rng=rng)]


def small_alexnet(dtype, rng):
    """AlexNet's ingredients at a toy size: 3x11x11 -> strided padded conv 8x6x6 -> LRN -> max pool
    3x3/2 (overlapping windows) 8x2x2 -> BatchNorm -> Dropout -> 10 logits. Weights from the test's own
    generator: drawn from gpucnn's default one, they depended on which tests ran before."""
    return [L.Conv2D(3, 8, 3, stride=2, padding=1, dtype=dtype, rng=rng), L.ReLU(),
            L.LocalResponseNorm(size=5, alpha=1e-2, beta=0.75, k=2.0),
            L.MaxPool2D(3, stride=2),
            L.BatchNorm2D(8, dtype=dtype),
            L.Dropout(0.5, seed=7),
            L.Flatten(),
            L.Dense(32, 10, dtype=dtype, rng=rng)]


def _state(layers):
    """Copies of what a training pass changes besides the gradients: buffers and integer counters."""
    return [({k: backend.to_numpy(v).copy() for k, v in layer.buffers.items()},
             {k: v for k, v in vars(layer).items() if isinstance(v, int) and not isinstance(v, bool)})
            for layer in layers]


def _set_state(layers, state):
    for layer, (buffers, counters) in zip(layers, state):
        layer.buffers.update({k: v.copy() for k, v in buffers.items()})
        for k, v in counters.items():
            setattr(layer, k, v)


def train_pass(layers, loss, x, labels):
    """Forward through the layers and the loss, then backward: everything a training step computes."""
    h = x
    for layer in layers:
        h = layer.forward(h, training=True)
    value = loss.forward(h, labels)
    g = loss.backward()
    for layer in reversed(layers):
        g = layer.backward(g)
    return {"loss": backend.to_numpy(value).copy(), "logits": backend.to_numpy(h).copy(),
            "dL/dx": backend.to_numpy(g).copy(),
            **{f"{i}.{layer.name}.grad.{k}": backend.to_numpy(v).copy()
               for i, layer in enumerate(layers) for k, v in layer.grads.items()},
            **{f"{i}.{layer.name}.{k}": backend.to_numpy(v).copy()
               for i, layer in enumerate(layers) for k, v in layer.buffers.items()}}


def sim_vs_cpu(layers, x, labels):
    """Run one training pass on the GPU path, then on the CPU path from the same state; return both."""
    start = _state(layers)
    with profile() as p:
        gpu = train_pass(layers, losses.SoftmaxCrossEntropy(), x, labels)
    _set_state(layers, start)
    with backend.cpu_path():
        cpu = train_pass(layers, losses.SoftmaxCrossEntropy(), x, labels)
    return gpu, cpu, p


def assert_same(gpu, cpu, dtype, n_grads):
    assert gpu.keys() == cpu.keys()
    assert sum(".grad." in k for k in cpu) == n_grads, sorted(cpu)
    for name in cpu:
        assert gpu[name].dtype == np.dtype(dtype), f"{name} is {gpu[name].dtype} on the GPU path"
        assert_close(gpu[name], cpu[name], dtype, name)


@pytest.mark.parametrize("dtype", ["float32"])
def test_lenet5_training_pass(dtype, rng):
    layers = lenet5(dtype, rng)
    x = rng.standard_normal((1, 1, 28, 28)).astype(dtype)
    labels = np.array([3])
    gpu, cpu, p = sim_vs_cpu(layers, x, labels)
    # the GPU path really ran our kernels for every family in the network
    launched = {f for f, c in p.by_family().items() if c["numba"] + c["cupy"]}
    assert {"conv", "pool", "dense", "activation", "loss"} <= launched, p.by_family()
    assert_same(gpu, cpu, dtype, n_grads=10)     # weight and bias of 2 convs and 3 dense layers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_alexnet_training_pass(dtype, rng):
    layers = small_alexnet(dtype, rng)
    x = rng.standard_normal((2, 3, 11, 11)).astype(dtype)
    labels = np.array([1, 8])
    gpu, cpu, p = sim_vs_cpu(layers, x, labels)
    launched = {f for f, c in p.by_family().items() if c["numba"] + c["cupy"]}
    assert {"conv", "activation", "norm", "pool", "dropout", "dense", "loss"} <= launched, p.by_family()
    dropout = layers[5]
    assert dropout.step == 1 and (backend.to_numpy(dropout._mask) == 0).any(), "Dropout dropped nothing"
    assert_same(gpu, cpu, dtype, n_grads=6)      # conv, BatchNorm gamma/beta, dense
    # the running statistics moved away from their initial (0, 1) on both paths
    assert not np.allclose(gpu["4.BatchNorm2D.running_mean"], 0)
