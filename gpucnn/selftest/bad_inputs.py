"""The self-test's error rows: bad inputs must raise the same error on the GPU path as on the CPU path."""
from __future__ import annotations

import numpy as np

from gpucnn import layers as L, losses, models, optim

from .compare import FAIL, PASS, Result


def _raised(fn):
    try:
        fn()
    except Exception as e:      # noqa: BLE001 - the error is what is compared
        return type(e), str(e)
    return None, "nothing raised"


def error_checks():
    """Bad inputs must raise the same error on the GPU as on the CPU: on a GPU an out-of-range label would
    otherwise be an out-of-bounds read, silently."""

    def same_error(paths, gpu_fn, cpu_fn, kind, expect):
        got = _raised(gpu_fn)
        with paths.cpu():
            want = _raised(cpu_fn)
        if want[0] is not kind or expect not in want[1]:
            return Result(FAIL, "", f"the CPU path raised {getattr(want[0], '__name__', None)}: {want[1]} "
                                    f"(expected {kind.__name__} with {expect!r})")
        if got != want:
            return Result(FAIL, "", f"GPU: {getattr(got[0], '__name__', None)}: {got[1]}")
        return Result(PASS, "", f"same {kind.__name__}: {want[1][:80]}")

    def labels_to_loss(paths, rng):
        logits = rng.standard_normal((4, 10)).astype(np.float32)
        labels = np.array([0, 3, 10, -1])
        return same_error(paths, lambda: losses.SoftmaxCrossEntropy().forward(paths.put(logits), paths.put(labels)),
                          lambda: losses.SoftmaxCrossEntropy().forward(logits, labels),
                          ValueError, "labels must be in [0, 10)")

    def labels_to_train_step(paths, rng):
        x = rng.standard_normal((1, 1, 28, 28)).astype(np.float32)
        y = np.array([12])

        def step(put, dev):
            model = models.lenet5(seed=0)
            model.to(dev)
            model.train_step(put(x), put(y), losses.SoftmaxCrossEntropy(), optim.SGD(model, lr=0.1))
        return same_error(paths, lambda: step(paths.put, paths.device), lambda: step(np.asarray, "cpu"),
                          ValueError, "labels must be in [0, 10)")

    def conv_shape(paths, rng):
        def fwd(x, put, dev):
            layer = L.Conv2D(3, 4, 3)
            layer.to(dev)
            layer.forward(put(x))
        for shape, expect in (((2, 1, 8, 8), "Conv2D: expected 3 input channels"),
                              ((3, 8, 8), "Conv2D: expected a 4-d input")):
            x = rng.standard_normal(shape).astype(np.float32)
            r = same_error(paths, lambda: fwd(x, paths.put, paths.device), lambda: fwd(x, np.asarray, "cpu"),
                           ValueError, expect)
            if r.status != PASS:
                return r
        return r

    def float_labels(paths, rng):
        logits = rng.standard_normal((2, 10)).astype(np.float32)
        labels = np.array([1.0, 2.0], np.float32)
        return same_error(paths, lambda: losses.SoftmaxCrossEntropy().forward(paths.put(logits), paths.put(labels)),
                          lambda: losses.SoftmaxCrossEntropy().forward(logits, labels),
                          TypeError, "labels must be integer class indices")

    return [("error: SoftmaxCrossEntropy labels outside [0, C)", labels_to_loss),
            ("error: train_step labels outside [0, C)", labels_to_train_step),
            ("error: Conv2D wrong input shape", conv_shape),
            ("error: float labels", float_labels)]
