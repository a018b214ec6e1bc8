"""Sequential: a stack of layers that trains, evaluates, predicts, saves and resumes.

    model = gc.Sequential([L.Conv2D(1, 6, 5, padding=2), L.Tanh(), L.AvgPool2D(2), ...], input_shape=(1, 28, 28))
    model.summary()
    hist = model.fit((x_train, y_train), epochs=10, optimizer=gc.optim.SGD(model, lr=0.05, momentum=0.9),
                     validation=(x_test, y_test), checkpoint_dir="runs/lenet5")
    model.evaluate((x_test, y_test))        # {"loss": ..., "accuracy": ..., "top5": ...}
    model.save("lenet5.npz"); model = gc.Sequential.load("lenet5.npz")

One training step is ``forward -> loss -> backward -> (clip) -> optimizer.step``: each layer's forward and
backward call the kernels of its family, so a reader follows ``fit -> train_step -> layer ->
gpucnn.kernels.<family>``. How a step runs (fused stages, the workspace and each buffer's end of life, the CUDA
graph) is :mod:`gpucnn.step`'s business.

Inputs are raw images (uint8 or float, N x C x H x W) as the dataset holds them: the model converts a
batch to its dtype and standardises it per channel, ``(x - input_mean) / input_std``, with the statistics
of the training set computed once by ``fit`` (in float64) and saved with the model, so ``predict`` and
``evaluate`` take raw images too.

Reproducibility and resuming: the order of the training data in epoch ``e`` is the permutation drawn
from ``np.random.default_rng([seed, e])``, dropout masks are a hash of (seed, step, index) with the step
saved, and schedules are functions of the epoch. A training checkpoint therefore needs no RNG state: the
weights, buffers, layer counters, optimizer state, epoch, history and seed are enough for a resumed run
to end with the same weights, bit for bit on the CPU, as one that was never interrupted.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings

import numpy as np

from . import backend, checkpoint, inputs, step
from .data import ArrayDataset
from .kernels import loss as loss_kernels
from .kernels.loss import check_labels, softmax
from .layers.base import Layer
from .losses import SoftmaxCrossEntropy, check_finite
from .optim import SGD, FlatParameters

__all__ = ["Sequential"]

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr")
_GPU_READ_EVERY = 20        # steps between loss read-backs on a real GPU (each read waits for the GPU)


class Sequential:
    """Layers applied in order. ``input_shape`` (C, H, W) lets every shape be checked at construction;
    without it the shapes are checked when the first data arrive.

    ``fuse`` (default True): run a Conv2D or Dense and the activation after it (and after a Conv2D the
    pooling after that) as one stage with fused kernels; results equal the unfused model's within float
    rounding. ``graph`` (default True; used on "cuda" and "sim"): capture each batch shape's training step as a
    CUDA graph and replay it (see gpucnn.step)."""

    def __init__(self, layers, input_shape=None, fuse: bool = True, graph: bool = True):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential: expected a list of layers, got an empty one")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a gpucnn Layer "
                                "(write your own as a subclass of gpucnn.layers.Layer)")
        self.layers = layers
        dtypes = {np.dtype(l.dtype) for l in layers if getattr(l, "dtype", None) is not None}
        if len(dtypes) > 1:
            raise TypeError(f"Sequential: the layers mix dtypes {sorted(d.name for d in dtypes)}; "
                            "build every layer with the same dtype")
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self.input_shape = None
        self.input_mean = None      # per-channel float64 statistics of the training images, or None
        self.input_std = None
        self._norm = None           # mean and 1/std cached on the batch's device, in the model's dtype
        self.fuse, self.graph = bool(fuse), bool(graph)
        self._stages_for = None     # (layer ids, stages): the fusion plan, remade if the layer list changes
        self._flat = None           # FlatParameters, made at first use
        self._steps = {}            # batch signature -> step._StepCache, for the loss and optimizer below
        self._steps_owner = None    # (loss type and config, optimizer, clip_norm) the cached steps run
        self._last_output = None    # the logits of the last train_step (a workspace array)
        self._graph_warned = False  # a failed capture warns once per model
        if input_shape is not None:
            self.build(input_shape)

    # ------------------------------------------------------------------------------------------ shapes

    def build(self, input_shape):
        """Fix the input shape (without the batch axis) and check that every layer fits its input."""
        shape = tuple(int(s) for s in input_shape)
        self._trace(shape)
        self.input_shape = shape
        return self

    def _trace(self, shape):
        """Every layer's output shape for an input of ``shape``; the first layer that does not fit is an
        error naming its index, its class and the shapes involved."""
        shapes = []
        for i, layer in enumerate(self.layers):
            came_from = "the model's input" if i == 0 else f"layer {i - 1} ({self.layers[i - 1].name})"
            try:
                out = tuple(layer.output_shape(shape))
            except (ValueError, TypeError) as e:
                raise type(e)(f"Sequential: layer {i} ({layer.name}) does not fit its input of shape {shape}, "
                              f"the output of {came_from}: {e}") from None
            shapes.append(out)
            shape = out
        return shapes

    @property
    def output_shape(self):
        return self._trace(self.input_shape)[-1] if self.input_shape is not None else None

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers)

    def summary(self, file=None) -> str:
        """Print (to ``file``, default stdout; ``file=False`` does not print) and return a table of every
        layer (its ``describe()`` where it has one, e.g. a grouped Conv2D's groups), output shape, multiply-adds
        for one image (``layer.macs(input_shape)`` of the layers that have weights) and parameter count, with
        the totals."""
        known = self.input_shape is not None
        shapes = self._trace(self.input_shape) if known else [None] * len(self.layers)
        ins = [self.input_shape] + shapes[:-1]
        macs = [layer.macs(s) if known and hasattr(layer, "macs") else None for layer, s in zip(self.layers, ins)]
        rows = [f"{'#':>3}  {'layer':<26}{'output shape':<20}{'MACs':>15}{'params':>13}", "-" * 79]
        if known:
            rows.append(f"{'':>3}  {'(input)':<26}{str(self.input_shape):<20}")
        for i, (layer, shape, m) in enumerate(zip(self.layers, shapes, macs)):
            name = layer.describe() if hasattr(layer, "describe") else layer.name
            rows.append(f"{i:>3}  {name:<26}{str(shape if shape is not None else '?'):<20}"
                        f"{'' if m is None else f'{m:,}':>15}{layer.num_params():>13,}")
        rows.append("-" * 79)
        if known:
            rows.append(f"Total multiply-adds: {sum(m for m in macs if m is not None):,} per image")
        rows.append(f"Total parameters: {self.num_params():,} ({self.dtype.name})")
        text = "\n".join(rows)
        if file is not False:
            print(text, file=file)
        return text

    def __repr__(self):
        inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
        return f"Sequential([\n{inner}\n], input_shape={self.input_shape})"

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    # ------------------------------------------------------------------------------------------ passes

    @property
    def stages(self) -> list:
        """The fusion plan: the layers grouped into the stages forward and backward run (see ``fuse``)."""
        ids = (self.fuse, *map(id, self.layers))
        if self._stages_for is None or self._stages_for[0] != ids:
            self._stages_for = (ids, step.plan(self.layers, self.fuse))
        return self._stages_for[1]

    def forward(self, x, training: bool = True):
        """Run the layers on a float batch already in the model's dtype (no standardisation)."""
        for stage in self.stages:
            x = stage.forward(x, training)
        return x

    def backward(self, gy):
        """Back-propagate dL/d(output) through every layer (filling their grads); returns dL/d(input)."""
        for stage in reversed(self.stages):
            gy = stage.head.backward(gy)
        return gy

    @property
    def flat(self) -> FlatParameters:
        """Every parameter in one flat array and every gradient in another (made at first use; made anew,
        with the values of the arrays found, when a layer's parameter array was replaced, e.g. by to())."""
        if self._flat is None or not self._flat.intact():
            self._flat = FlatParameters(self.layers)
            self._steps = {}        # captured graphs and workspaces point at the old arrays
        return self._flat

    def to(self, device: str) -> "Sequential":
        """Move parameters, buffers and layer state to ``device`` ("cpu", "cuda", "sim")."""
        for layer in self.layers:
            layer.to(device)
        self._norm = None
        self._steps = {}
        self._flat = None       # the layers' gradient views are gone: pack again (even where the arrays stayed)
        return self

    # ------------------------------------------------------------------------------------------ one step

    train_step = step.train_step        # gpucnn.step: the step runner (forward, backward, lifetimes, graphs)

    def _step_name(self, what, x):
        """How an error names a step: the call, the batch's shape and dtype, and the model."""
        return (f"Sequential.{what} on a batch of shape {tuple(x.shape)} ({x.dtype}; a model of {len(self.layers)} "
                f"layers, {self.num_params():,} parameters)")

    @property
    def last_output(self):
        """The logits of the last train_step (valid until the next step of the same batch shape)."""
        return self._last_output

    def prepare(self, xb):
        """A raw batch as the first layer takes it: the model's dtype, standardised when fit computed
        statistics (gpucnn.inputs). Always a new array when standardising, so the caller's batch is never modified."""
        if self.input_mean is None:
            return xb.astype(self.dtype, copy=False)
        x, self._norm = inputs.standardize(xb, self.dtype, self.input_mean, self.input_std, self._norm)
        return x

    def set_standardization(self, images):
        """Compute ``input_mean``/``input_std`` per channel (axis 1) from host ``images``, in float64
        (gpucnn.inputs.channel_statistics); a constant channel gets std 1."""
        self.input_mean, self.input_std = inputs.channel_statistics(images)
        self._norm = None

    # ------------------------------------------------------------------------------------------ data

    def _dataset(self, data, where):
        """An ArrayDataset from a dataset or an (images, labels) pair, with its image shape checked."""
        if not hasattr(data, "batches"):
            if isinstance(data, (tuple, list)) and len(data) == 2:
                data = ArrayDataset(*data)
            else:
                raise TypeError(f"Sequential.{where}: expected a gpucnn.data.ArrayDataset or an (images, labels) "
                                f"pair, got {type(data).__name__}")
        shape = tuple(data.shape)
        if self.input_shape is None:
            self.build(shape)
        elif shape != self.input_shape:
            raise ValueError(f"Sequential.{where}: the model takes inputs of shape {self.input_shape} "
                             f"(without the batch axis), the data are {shape}")
        return data

    def _num_classes(self, where):
        out = self.output_shape
        if len(out) != 1:
            raise ValueError(f"Sequential.{where}: classification needs an output of shape (classes,), the model "
                             f"gives {out}; end it with Flatten/Dense")
        return out[0]

    def _check_labels(self, ds, where, loss):
        """Labels in [0, classes), the classes the loss reads from the output's width (CORAL: width + 1)."""
        check_labels(ds.labels, loss.num_classes(self._num_classes(where)), f"Sequential.{where}")

    # ------------------------------------------------------------------------------------------ inference

    def predict(self, x, batch_size: int = 256):
        """Logits for raw images ``x`` (N, C, H, W) or one image (C, H, W), computed ``batch_size`` at a
        time with training=False; returned on the model's device (gc.to_numpy brings them back)."""
        if not hasattr(x, "ndim"):
            x = np.asarray(x)
        single = self.input_shape is not None and x.ndim == len(self.input_shape)
        if single:
            x = x[None]
        if self.input_shape is None:
            self.build(x.shape[1:])
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"Sequential.predict: the model takes inputs of shape {self.input_shape} "
                             f"(without the batch axis), got {tuple(x.shape[1:])}")
        outs = []
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            if not backend.is_cupy(xb):
                xb = backend.asarray(xb)
            with backend.device_memory_errors(lambda: self._step_name("predict", xb),
                                              f"Pass a smaller batch_size (now {batch_size})."):
                outs.append(self.forward(self.prepare(xb), training=False))
        if not outs:
            raise ValueError("Sequential.predict: got no images")
        out = outs[0] if len(outs) == 1 else backend.xp(outs[0]).concatenate(outs)
        return out[0] if single else out

    def predict_proba(self, x, batch_size: int = 256):
        """Class probabilities: the softmax of :meth:`predict`."""
        return softmax(self.predict(x, batch_size))

    def evaluate(self, data, batch_size: int = 256, loss=None) -> dict:
        """Mean loss, accuracy and top-5 accuracy on a dataset (raw images), with training=False; with
        ``loss=CoralLoss()`` loss, accuracy and "mae", the mean |rank - label| (the loss's ``scores`` say)."""
        ds = self._dataset(data, "evaluate")
        loss = loss if loss is not None else SoftmaxCrossEntropy()
        self._check_labels(ds, "evaluate", loss)
        return self._evaluate(ds, batch_size, loss)

    def _evaluate(self, ds, batch_size, loss):
        total, counts, n = 0.0, {}, 0
        for xb, yb in ds.batches(batch_size, shuffle=False):
            pred = self.forward(self.prepare(xb), training=False)
            b = len(yb)
            with loss_kernels.labels_checked():         # evaluate checked the data set's labels on the host
                total = total + loss.forward(pred, yb).astype(np.float64) * b
            for name, count in loss.scores(pred, yb).items():     # on the device: read once, below
                counts[name] = counts.get(name, 0) + count
            n += b
        if n == 0:
            raise ValueError("Sequential.evaluate: the dataset is empty")
        return {"loss": float(total) / n, **{name: float(count) / n for name, count in counts.items()}}

    # ------------------------------------------------------------------------------------------ training

    def fit(self, data, epochs: int = 1, batch_size: int = 128, optimizer=None, loss=None, validation=None,
            scheduler=None, callbacks=(), clip_norm=None, checkpoint_dir=None, resume=None, seed: int = 0,
            verbose: int = 1, standardize: bool = True, augment=None, graph=None) -> dict:
        """Train for ``epochs`` epochs (in total: a resumed run continues up to it) and return the history,
        per-epoch lists "loss", "accuracy" (on the training batches, as trained), "val_loss",
        "val_accuracy" (None without ``validation``), "seconds" and "lr".

        data, validation: an ArrayDataset or an (images, labels) pair; images raw (uint8 or float).
        optimizer: default SGD(lr=0.01, momentum=0.9); loss: default SoftmaxCrossEntropy().
        scheduler: an object with ``lr(epoch, base_lr)``, applied at the start of each epoch.
        callbacks: ``cb(epoch, history)`` after each epoch (epoch counted from 0); returning "stop" ends
            training after that epoch's checkpoint.
        clip_norm: clip the gradients' global L2 norm to this value before each step.
        checkpoint_dir: write ``last.npz`` after every epoch and ``best.npz`` whenever validation accuracy
            (training accuracy without validation) improves; it refuses a folder that already holds a
            ``last.npz`` unless that file is the one resumed, so a run is never overwritten.
        resume: a ``last.npz``/``best.npz`` written by fit: restores weights, buffers, layer counters,
            input statistics, optimizer state, epoch, history and seed (the checkpoint's seed wins).
        seed: the data order of epoch e is a permutation drawn from default_rng([seed, e]).
        verbose: 0 silent, 1 a progress bar per epoch and a line per epoch, 2 only the lines.
        standardize: compute per-channel input statistics from the training images (default) or feed
            the images converted to the model's dtype as they are.
        augment: passed to ``data.batches`` (see gpucnn.data).
        graph: on "cuda" (and "sim"), replay each batch shape's step from a CUDA graph (default: the model's
            ``graph``, True); False runs every step eagerly. Each step is :meth:`train_step`.
        A NaN/Inf loss raises FloatingPointError; Ctrl-C re-raises KeyboardInterrupt; both keep the
        last checkpoint written and say where it is.
        """
        if not (isinstance(epochs, int) and epochs >= 0):
            raise ValueError(f"Sequential.fit: epochs must be an int >= 0, got {epochs!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"Sequential.fit: batch_size must be an int >= 1, got {batch_size!r}")
        ds = self._dataset(data, "fit")
        loss = loss if loss is not None else SoftmaxCrossEntropy()
        self._check_labels(ds, "fit", loss)
        val = None
        if validation is not None:
            val = self._dataset(validation, "fit (validation)")
            self._check_labels(val, "fit (validation)", loss)
        optimizer = optimizer if optimizer is not None else SGD(self, lr=0.01, momentum=0.9)
        if getattr(optimizer, "model", self) is not self:
            raise ValueError("Sequential.fit: the optimizer was made for another model; "
                             "create it with this one, e.g. gc.optim.SGD(model, lr=...)")
        callbacks = [callbacks] if callable(callbacks) else list(callbacks or ())

        history = {k: [] for k in HISTORY_KEYS}
        start, best = 0, None
        if resume is not None:
            t = self._resume(resume, optimizer)
            start, best, history = t["epoch"], t["best"], t["history"]
            if t["seed"] != seed and verbose:
                warnings.warn(f"Sequential.fit: resuming {resume} with its seed {t['seed']} (not {seed}), "
                              "so the data order continues as it began", stacklevel=2)
            seed = t["seed"]
        elif standardize:
            self.set_standardization(ds.images)
        else:
            self.input_mean = self.input_std = None
            self._norm = None

        last = best_path = None
        if checkpoint_dir is not None:
            last = os.path.join(os.fspath(checkpoint_dir), "last.npz")
            best_path = os.path.join(os.fspath(checkpoint_dir), "best.npz")
            if os.path.exists(last) and (resume is None or not os.path.samefile(last, resume)):
                raise FileExistsError(f"Sequential.fit: {checkpoint_dir} already holds the checkpoint of an earlier "
                                      f"run (last.npz); continue it with resume={last!r}, or use another "
                                      "checkpoint_dir (or delete that one) to start afresh")
        saved = (resume, start) if resume is not None else None     # (path, epochs done) of the last good file

        steps = math.ceil(len(ds) / batch_size)
        epoch = start
        try:
            for epoch in range(start, epochs):
                t0 = time.perf_counter()
                if scheduler is not None:
                    optimizer.lr = float(scheduler.lr(epoch, optimizer.base_lr))
                tr_loss, tr_acc, n = self._train_epoch(ds, batch_size, optimizer, loss, clip_norm, seed, epoch,
                                                       augment, verbose, steps, epochs, graph)
                train_s = time.perf_counter() - t0
                v = self._evaluate(val, batch_size, loss) if val is not None else None
                history["loss"].append(tr_loss)
                history["accuracy"].append(tr_acc)
                history["val_loss"].append(v["loss"] if v else None)
                history["val_accuracy"].append(v["accuracy"] if v else None)
                history["seconds"].append(time.perf_counter() - t0)
                history["lr"].append(optimizer.lr)
                score = v["accuracy"] if v else tr_acc
                improved = best is None or score > best
                best = score if improved else best
                if last is not None:
                    checkpoint.save(last, self._training_tree(optimizer, epoch + 1, history, seed, best))
                    saved = (last, epoch + 1)
                    if improved:
                        checkpoint.copy(last, best_path)
                if verbose:
                    line = (f"epoch {epoch + 1}/{epochs}: loss {tr_loss:.4f}, accuracy {tr_acc:.4f}"
                            + (f", val_loss {v['loss']:.4f}, val_accuracy {v['accuracy']:.4f}" if v else "")
                            + f", {train_s:.1f}s ({n / max(train_s, 1e-9):,.0f} images/s), lr {optimizer.lr:.3g}")
                    print(line, flush=True)
                answers = [cb(epoch, history) for cb in callbacks]     # every callback runs, then "stop" is obeyed
                if any(isinstance(a, str) and a == "stop" for a in answers):
                    break
        except (KeyboardInterrupt, FloatingPointError) as e:
            what = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped: the loss is not finite"
            if saved is None:
                note = f"Sequential.fit {what} in epoch {epoch + 1}; no checkpoint was written" + (
                    "" if checkpoint_dir else " (pass checkpoint_dir= to keep one every epoch)")
            else:
                note = (f"Sequential.fit {what} in epoch {epoch + 1}; the last good checkpoint is {saved[0]} "
                        f"(after epoch {saved[1]}); continue with fit(..., resume={saved[0]!r})")
            e.add_note(note)
            if verbose:
                print(note, file=sys.stderr, flush=True)
            raise
        return history

    def _train_epoch(self, ds, batch_size, optimizer, loss, clip_norm, seed, epoch, augment, verbose, steps,
                     epochs, graph=None):
        """One pass over the shuffled training set; returns (mean loss, accuracy, images)."""
        bar = None
        if verbose == 1:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch",
                       dynamic_ncols=True)
        sums = None            # [sum of loss * batch, correct predictions], on the device (float64)
        n, step = 0, 0
        read_every = 1
        t0 = time.perf_counter()
        try:
            # the labels were checked on the host once (fit), so the GPU path skips its per-batch check (a sync)
            with loss_kernels.labels_checked():
                for xb, yb in ds.batches(batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment):
                    value = self.train_step(self.prepare(xb), yb, loss, optimizer, clip_norm=clip_norm, graph=graph)
                    pred = self.last_output
                    if sums is None:
                        sums = backend.xp(pred).zeros(3, dtype=np.float64)
                    # sums stay on the device (the loss's tally adds this step's); reading them back waits for the
                    # GPU, so a GPU reads every 20 steps
                    loss.tally(value, pred, yb, sums)
                    n += len(yb)
                    step += 1
                    if step == 1 and backend.on_gpu(pred):
                        read_every = _GPU_READ_EVERY
                    if step % read_every == 0 or step == steps:
                        seen, hits = _read_sums(sums, loss.num_classes(pred.shape[1]),
                                                f"epoch {epoch + 1}, step {step}")
                        if bar is not None and (step % _GPU_READ_EVERY == 0 or step == steps):
                            rate = n / max(time.perf_counter() - t0, 1e-9)
                            bar.set_postfix(loss=f"{seen / n:.4f}", acc=f"{hits / n:.4f}",
                                            img_s=f"{rate:,.0f}", refresh=False)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if n == 0:
            raise ValueError("Sequential.fit: the training set gave no batches")
        seen, hits = _read_sums(sums, loss.num_classes(self.last_output.shape[1]), f"epoch {epoch + 1}")
        return seen / n, hits / n, n

    # ------------------------------------------------------------------------------------------ saving
    # (what a model's tree holds, and rebuilding it: gpucnn.checkpoint)

    def state(self) -> dict:
        """The model as a checkpoint tree: architecture (class names + config), arrays, counters, statistics."""
        return checkpoint.model_state(self)

    def save(self, path) -> str:
        """Write the model to one verified .npz (atomically); :meth:`load` rebuilds it."""
        return checkpoint.save(path, {"kind": "model", "model": self.state()})

    @classmethod
    def load(cls, path, device=None) -> "Sequential":
        """Rebuild a model saved by :meth:`save` (or a checkpoint written by fit) on ``device`` (default:
        the current one). Custom layer classes must be defined or imported before loading."""
        return checkpoint.load_model(cls, path, device)

    def _training_tree(self, optimizer, epochs_done, history, seed, best):
        return checkpoint.training_tree(self, optimizer, epochs_done, history, seed, best)

    def _resume(self, path, optimizer) -> dict:
        """Load a training checkpoint into this model and ``optimizer``; returns its "training" part."""
        return checkpoint.resume(self, path, optimizer)


def _read_sums(sums, classes, when):
    """fit's device sums read back (one copy): (loss sum, hits); raises on a bad label or a NaN/Inf loss."""
    host = backend.to_numpy(sums)
    if host[2]:
        raise ValueError(f"Sequential.fit: labels must be in [0, {classes}) for {classes} classes; "
                         f"{int(host[2])} label(s) outside it reached the GPU kernels ({when})")
    check_finite(float(host[0]), f"Sequential.fit: the training loss ({when})")
    return float(host[0]), int(host[1])
