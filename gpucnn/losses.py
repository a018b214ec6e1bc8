"""Loss functions: what training minimises, and its gradient with respect to the network's output.

    loss = SoftmaxCrossEntropy()
    value = loss.forward(logits, labels)   # a 0-d array on the logits' device; float(value) reads it
    g = loss.backward()                    # dL/dlogits, handed to the last layer's backward

A loss is not a layer (it takes a target and ends the chain), but follows the same contract: it checks
its inputs, names itself in errors, calls ``gpucnn.kernels.loss`` for the array work, and refuses a
backward before a forward. On the GPU, neither forward nor backward copies to the host or waits for the
device: the value stays on the device until someone reads it.

How predictions are read: a loss of integer labels also says what its logits mean to fit and evaluate:
``num_classes(width)`` (the classes logits of that width score, to check labels against), ``tally`` (fit's
running device sums of loss, hits and bad labels, read back only every few steps) and ``scores`` (evaluate's
counts per batch). SoftmaxCrossEntropy reads the argmax and adds top-5; CoralLoss reads the rank
(``coral_predict``) and adds the absolute rank error, so ``evaluate(loss=CoralLoss())`` gives "loss",
"accuracy" and "mae" (mean |rank - y|) instead of "top5".

NaN and Inf: a diverging run (learning rate too high) turns the loss NaN. :func:`check_finite` turns that
into a FloatingPointError that says what to do. On the host (the CPU path) forward checks at once, since
reading the value is free there; a loss on the GPU is checked where it is read back (fit reads it).
"""
from __future__ import annotations

import math

from . import backend
from .kernels import coral, loss as K
from .layers.base import check_input

__all__ = ["SoftmaxCrossEntropy", "MSE", "BinaryCrossEntropy", "CoralLoss", "coral_predict", "check_finite", "LOSSES"]


def check_finite(loss_value, where: str, step: int | None = None) -> float:
    """Read the loss as a Python float; raise FloatingPointError when it is NaN or infinite.

    On the GPU the read is a sync: call it where the loss is read anyway (a progress line, an epoch's end).
    """
    v = float(loss_value)
    if not math.isfinite(v):
        at = f" at step {step}" if step is not None else ""
        raise FloatingPointError(
            f"{where}: loss is {v}{at}: lower the learning rate (training diverged), or look for NaN/Inf "
            "in the inputs and for labels outside [0, classes)")
    return v


def _check_same_device(where: str, a, b, what: str):
    if backend.is_cupy(a) != backend.is_cupy(b):
        side = lambda v: "a CuPy (GPU) array" if backend.is_cupy(v) else "a NumPy (host) array"
        raise TypeError(f"{where}: the prediction is {side(a)} but the {what} is {side(b)}; "
                        "move the data with gpucnn.asarray(...) (gpucnn never copies silently)")


class Loss:
    """Base of the losses: ``forward(pred, target) -> 0-d loss``, ``backward() -> dL/dpred``.

    ``step`` counts forward passes (0 for the first), so an error can say which batch went wrong.
    """

    def __init__(self):
        self.step = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def config(self) -> dict:
        return {}

    def __repr__(self):
        return f"{self.name}()"

    def num_classes(self, width: int) -> int:
        """How many classes logits of ``width`` columns score: only a loss of integer labels has classes."""
        raise TypeError(f"{self.name}: fit and evaluate read predictions as integer class labels, and {self.name} "
                        "compares arrays; use SoftmaxCrossEntropy or CoralLoss there, or train with train_step")

    def _need(self, attr: str):
        v = getattr(self, attr, None)
        if v is None:
            raise RuntimeError(f"{self.name}: backward called before forward (nothing cached to differentiate)")
        return v

    def _done(self, value):
        """Check a host value for NaN/Inf now (free); a GPU value is checked when it is read back, and so is
        "sim"'s while a graph is captured (a host read is refused then) or the work is skipped (no value)."""
        if not backend.is_cupy(value) and not backend.capturing() and not backend.skipping_work():
            check_finite(value, self.name, self.step)
        self.step += 1
        return value


class _LabelLoss(Loss):
    """A loss of logits (N, columns) and integer labels (N,): the shared checks (a 2-d float array with rows and
    columns, integer labels, one per row, on the logits' device), then the subclass's ``_loss_and_grad``, whose
    gradient is kept for backward."""

    COLUMNS, COLUMN = "classes", "class"      # what a column of the logits is, in errors

    def __init__(self):
        super().__init__()
        self._grad = None

    def forward(self, logits, labels):
        check_input(self.name, logits, 2, f"of logits (batch, {self.COLUMNS})")
        if logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ValueError(f"{self.name}: expected at least one row and one {self.COLUMN}, got logits of shape "
                             f"{tuple(logits.shape)}")
        K.check_label_format(labels, self.name, logits.shape[0])
        _check_same_device(self.name, logits, labels, "labels")
        value, self._grad = self._loss_and_grad(logits, labels)
        return self._done(value)

    def backward(self):
        return self._need("_grad")

    def num_classes(self, width: int) -> int:
        return width


class SoftmaxCrossEntropy(_LabelLoss):
    """Softmax then cross-entropy with integer labels, averaged over the batch (PyTorch's cross_entropy).

    Fused: the gradient (softmax - onehot) / N is computed in the forward pass and kept for backward.
    Stable for any finite logits (the row max is subtracted before exp). A label outside [0, classes) is the
    same ValueError on every device; on the GPU that check costs one reduction and a sync, which fit and
    evaluate skip (they check the whole data set once: see ``gpucnn.kernels.loss``).
    """

    def _loss_and_grad(self, logits, labels):
        return K.softmax_cross_entropy_forward(logits, labels, where=self.name)

    def probs(self, logits):
        """The class probabilities softmax(logits), row-wise (what predict_proba returns)."""
        check_input(self.name, logits, 2, "of logits (batch, classes)")
        return K.softmax(logits)

    def tally(self, value, logits, labels, sums):
        """Add a training step to fit's device sums: loss * N, rows whose argmax is the label, bad labels."""
        return K.tally(value, logits, labels, sums)

    def scores(self, logits, labels) -> dict:
        """evaluate's counts for a batch, 0-d arrays on the logits' device: "accuracy" (the argmax is the label)
        and "top5" (fewer than min(5, classes) logits exceed the label's)."""
        k = min(5, logits.shape[1])
        truth = logits[backend.xp(logits).arange(logits.shape[0]), labels]
        return {"accuracy": (logits.argmax(axis=1) == labels).sum(),
                "top5": ((logits > truth[:, None]).sum(axis=1) < k).sum()}


class MSE(Loss):
    """Mean squared error over all elements: mean((pred - target)^2) (PyTorch's mse_loss)."""

    def __init__(self):
        super().__init__()
        self._pred = self._target = None

    def forward(self, pred, target):
        _check_pair(self.name, pred, target)
        self._pred, self._target = pred, target
        return self._done(K.mse_forward(pred, target))

    def backward(self):
        return K.mse_backward(self._need("_pred"), self._target)


class BinaryCrossEntropy(Loss):
    """Binary cross-entropy between a prediction and a target in [0, 1] of the same shape, averaged over every
    element: an autoencoder's reconstruction loss (targets: pixel intensities), or independent yes/no tasks.

    ``from_logits=True`` (default) takes raw scores z and is stable for any finite z (PyTorch's
    binary_cross_entropy_with_logits); ``from_logits=False`` takes probabilities in [0, 1], logs clamped at
    -100 as PyTorch's binary_cross_entropy does. The gradient comes out of the forward pass (one elementwise
    launch on the GPU). A target outside [0, 1], or with from_logits=False a probability outside it, is a
    ValueError on every device (on the GPU one reduction and a sync; not checked while a graph is captured)."""

    def __init__(self, from_logits: bool = True):
        super().__init__()
        self.from_logits = bool(from_logits)
        self._grad = None

    def config(self) -> dict:
        return {"from_logits": self.from_logits}

    def __repr__(self):
        return f"{self.name}(from_logits={self.from_logits})"

    def forward(self, pred, target):
        _check_pair(self.name, pred, target)
        if K.outside_unit_interval(target):
            raise ValueError(f"{self.name}: targets must be in [0, 1], got values outside it (min "
                             f"{float(target.min()):g}, max {float(target.max()):g})")
        if not self.from_logits and K.outside_unit_interval(pred):
            raise ValueError(f"{self.name}(from_logits=False): predictions must be probabilities in [0, 1], got "
                             f"min {float(pred.min()):g}, max {float(pred.max()):g}; pass raw scores with "
                             "from_logits=True (stable for any value)")
        value, self._grad = K.binary_cross_entropy(pred, target, self.from_logits)
        return self._done(value)

    def backward(self):
        return self._need("_grad")


class CoralLoss(_LabelLoss):
    """CORAL's loss for integer ranks y in [0, K) and a CoralHead's logits (N, K-1): for each task k the binary
    cross-entropy of "y > k", summed over the tasks, averaged over the batch (coral-pytorch's coral_loss). A rank
    outside [0, K) is the same ValueError as SoftmaxCrossEntropy's on every device."""

    COLUMNS, COLUMN = "classes - 1", "task"

    def _loss_and_grad(self, logits, labels):
        return coral.coral_loss(logits, labels, self.name, check=K._check_on_device())

    def num_classes(self, width: int) -> int:
        return width + 1                        # K-1 tasks score K ranks

    def tally(self, value, logits, labels, sums):
        """Add a training step to fit's device sums: loss * N, rows whose rank is the label, bad labels."""
        return coral.tally(value, logits, labels, sums)

    def scores(self, logits, labels) -> dict:
        """evaluate's counts for a batch, 0-d arrays on the logits' device: "accuracy" (the rank is the label) and
        "mae" (the sum of |rank - label|, which evaluate divides by N: the mean absolute error in ranks)."""
        s = coral.scores(logits, labels)
        return {"accuracy": s[0], "mae": s[2]}


def coral_predict(logits):
    """Ranks from CORAL logits (N, K-1): how many of the K-1 tasks say "above" (sigmoid(z) > 0.5), int64."""
    check_input("coral_predict", logits, 2, "of logits (batch, classes - 1)")
    return coral.coral_predict(logits)


def _check_pair(name, pred, target):
    """A prediction and a target of one shape and dtype, on one device (no broadcasting, no casting)."""
    check_input(name, pred, None, "of predictions")
    if not hasattr(target, "shape") or not hasattr(target, "dtype"):
        raise TypeError(f"{name}: expected the target as an array, got {type(target).__name__}")
    if tuple(target.shape) != tuple(pred.shape):
        raise ValueError(f"{name}: the prediction has shape {tuple(pred.shape)} but the target has "
                         f"shape {tuple(target.shape)}; they must be equal (no broadcasting)")
    if target.dtype != pred.dtype:
        raise TypeError(f"{name}: the prediction is {pred.dtype} but the target is {target.dtype}; "
                        "gpucnn does not cast silently (convert the target, e.g. y.astype('float32'))")
    if pred.size == 0:
        raise ValueError(f"{name}: the prediction is empty (shape {tuple(pred.shape)})")
    _check_same_device(name, pred, target, "target")


LOSSES = {"SoftmaxCrossEntropy": SoftmaxCrossEntropy, "MSE": MSE, "BinaryCrossEntropy": BinaryCrossEntropy,
          "CoralLoss": CoralLoss}   # name -> class, to rebuild a saved model
