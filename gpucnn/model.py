"""Sequential: a stack of layers that trains, evaluates, predicts, saves and resumes.

    model = gc.Sequential([L.Conv2D(1, 6, 5, padding=2), L.Tanh(), L.AvgPool2D(2), ...], input_shape=(1, 28, 28))
    model.summary()
    hist = model.fit((x_train, y_train), epochs=10, optimizer=gc.optim.SGD(model, lr=0.05, momentum=0.9),
                     validation=(x_test, y_test), checkpoint_dir="runs/lenet5")
    model.evaluate((x_test, y_test))        # {"loss": ..., "accuracy": ..., "top5": ...}
    model.save("lenet5.npz"); model = gc.Sequential.load("lenet5.npz")

One training step is ``forward -> loss -> backward -> (clip) -> optimizer.step``: each layer's forward and
backward call the kernels of its family, so a reader follows ``fit -> layer -> gpucnn.kernels.<family>``.

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

import json
import math
import os
import sys
import time
import warnings

import numpy as np

from . import backend, checkpoint
from .checkpoint import CheckpointError
from .data import ArrayDataset
from .kernels.loss import check_labels, softmax
from .layers.base import LAYER_TYPES, Layer
from .losses import SoftmaxCrossEntropy, check_finite
from .optim import SGD, clip_grad_norm

__all__ = ["Sequential"]

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr")
_GPU_READ_EVERY = 20        # steps between loss read-backs on a real GPU (each read waits for the GPU)


class Sequential:
    """Layers applied in order. ``input_shape`` (C, H, W) lets every shape be checked at construction;
    without it the shapes are checked when the first data arrive."""

    def __init__(self, layers, input_shape=None):
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
        layer's output shape and parameter count, with the total."""
        shapes = self._trace(self.input_shape) if self.input_shape is not None else [None] * len(self.layers)
        rows = [f"{'#':>3}  {'layer':<20}{'output shape':<22}{'params':>12}", "-" * 57]
        if self.input_shape is not None:
            rows.append(f"{'':>3}  {'(input)':<20}{str(self.input_shape):<22}{'':>12}")
        for i, (layer, shape) in enumerate(zip(self.layers, shapes)):
            rows.append(f"{i:>3}  {layer.name:<20}{str(shape if shape is not None else '?'):<22}"
                        f"{layer.num_params():>12,}")
        rows += ["-" * 57, f"Total parameters: {self.num_params():,} ({self.dtype.name})"]
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

    def forward(self, x, training: bool = True):
        """Run the layers on a float batch already in the model's dtype (no standardisation)."""
        for layer in self.layers:
            x = layer.forward(x, training=training)
        return x

    def backward(self, gy):
        """Back-propagate dL/d(output) through every layer (filling their grads); returns dL/d(input)."""
        for layer in reversed(self.layers):
            gy = layer.backward(gy)
        return gy

    def to(self, device: str) -> "Sequential":
        """Move parameters, buffers and layer state to ``device`` ("cpu", "cuda", "sim")."""
        for layer in self.layers:
            layer.to(device)
        self._norm = None
        return self

    def prepare(self, xb):
        """A raw batch as the first layer takes it: the model's dtype, standardised when fit computed
        statistics. Always a new array when standardising, so the caller's batch is never modified."""
        if self.input_mean is None:
            return xb.astype(self.dtype, copy=False)
        mean, inv_std = self._norm_arrays(xb)
        x = xb.astype(self.dtype)
        x -= mean
        x *= inv_std
        return x

    def _norm_arrays(self, xb):
        """mean and 1/std shaped (1, C, 1, 1) in the model's dtype on xb's device, made once and cached
        (the cache keeps the statistics it was made from, so replacing them is noticed)."""
        made_for = (backend.is_cupy(xb), xb.ndim)
        c = self._norm
        if c is None or c[0] != made_for or c[1] is not self.input_mean or c[2] is not self.input_std:
            shape = (1, -1) + (1,) * (xb.ndim - 2)
            put = backend.asarray if backend.is_cupy(xb) else np.asarray
            mean = put(np.asarray(self.input_mean, np.float64).astype(self.dtype).reshape(shape))
            inv = put((1.0 / np.asarray(self.input_std, np.float64)).astype(self.dtype).reshape(shape))
            self._norm = c = (made_for, self.input_mean, self.input_std, mean, inv)
        return c[3], c[4]

    def set_standardization(self, images):
        """Compute ``input_mean``/``input_std`` per channel (axis 1) from host ``images``, in float64, in
        chunks (no float64 copy of the whole set); a constant channel gets std 1."""
        images = backend.to_numpy(images)
        axes = (0,) + tuple(range(2, images.ndim))
        per_channel = images.size // max(images.shape[1], 1)
        rows = max(1, (1 << 22) // max(1, images[0].size))
        bshape = (1, -1) + (1,) * (images.ndim - 2)
        total = np.zeros(images.shape[1])
        for i in range(0, len(images), rows):
            total += images[i:i + rows].sum(axis=axes, dtype=np.float64)
        mean = total / per_channel
        sq = np.zeros(images.shape[1])
        for i in range(0, len(images), rows):
            d = images[i:i + rows].astype(np.float64) - mean.reshape(bshape)
            d *= d
            sq += d.sum(axis=axes)
        std = np.sqrt(sq / per_channel)
        std[std == 0] = 1.0
        self.input_mean, self.input_std = mean, std
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

    def _check_labels(self, ds, where):
        check_labels(ds.labels, self._num_classes(where), f"Sequential.{where}")

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
            outs.append(self.forward(self.prepare(xb), training=False))
        if not outs:
            raise ValueError("Sequential.predict: got no images")
        out = outs[0] if len(outs) == 1 else backend.xp(outs[0]).concatenate(outs)
        return out[0] if single else out

    def predict_proba(self, x, batch_size: int = 256):
        """Class probabilities: the softmax of :meth:`predict`."""
        return softmax(self.predict(x, batch_size))

    def evaluate(self, data, batch_size: int = 256, loss=None) -> dict:
        """Mean loss, accuracy and top-5 accuracy on a dataset (raw images), with training=False."""
        ds = self._dataset(data, "evaluate")
        self._check_labels(ds, "evaluate")
        return self._evaluate(ds, batch_size, loss)

    def _evaluate(self, ds, batch_size, loss):
        if loss is None:
            loss = SoftmaxCrossEntropy()
        k = min(5, self.output_shape[0])
        total, correct, top5, n = 0.0, 0, 0, 0
        for xb, yb in ds.batches(batch_size, shuffle=False):
            pred = self.forward(self.prepare(xb), training=False)
            b = len(yb)
            total = total + loss.forward(pred, yb).astype(np.float64) * b
            correct = correct + _correct(pred, yb)
            xp = backend.xp(pred)
            truth = pred[xp.arange(b), yb]
            top5 = top5 + ((pred > truth[:, None]).sum(axis=1) < k).sum()   # rank of the true class < k
            n += b
        if n == 0:
            raise ValueError("Sequential.evaluate: the dataset is empty")
        return {"loss": float(total) / n, "accuracy": int(correct) / n, "top5": int(top5) / n}

    # ------------------------------------------------------------------------------------------ training

    def fit(self, data, epochs: int = 1, batch_size: int = 128, optimizer=None, loss=None, validation=None,
            scheduler=None, callbacks=(), clip_norm=None, checkpoint_dir=None, resume=None, seed: int = 0,
            verbose: int = 1, standardize: bool = True, augment=None) -> dict:
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
        A NaN/Inf loss raises FloatingPointError; Ctrl-C re-raises KeyboardInterrupt; both keep the
        last checkpoint written and say where it is.
        """
        if not (isinstance(epochs, int) and epochs >= 0):
            raise ValueError(f"Sequential.fit: epochs must be an int >= 0, got {epochs!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"Sequential.fit: batch_size must be an int >= 1, got {batch_size!r}")
        ds = self._dataset(data, "fit")
        self._check_labels(ds, "fit")
        val = None
        if validation is not None:
            val = self._dataset(validation, "fit (validation)")
            self._check_labels(val, "fit (validation)")
        optimizer = optimizer if optimizer is not None else SGD(self, lr=0.01, momentum=0.9)
        if getattr(optimizer, "model", self) is not self:
            raise ValueError("Sequential.fit: the optimizer was made for another model; "
                             "create it with this one, e.g. gc.optim.SGD(model, lr=...)")
        loss = loss if loss is not None else SoftmaxCrossEntropy()
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
                                                       augment, verbose, steps, epochs)
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
                     epochs):
        """One pass over the shuffled training set; returns (mean loss, accuracy, images)."""
        bar = None
        if verbose == 1:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, unit="batch",
                       dynamic_ncols=True)
        total, correct, n, step = 0.0, 0, 0, 0
        read_every = 1
        t0 = time.perf_counter()
        try:
            for xb, yb in ds.batches(batch_size, shuffle=True, seed=seed, epoch=epoch, augment=augment):
                pred = self.forward(self.prepare(xb), training=True)
                value = loss.forward(pred, yb)
                self.backward(loss.backward())
                if clip_norm is not None:
                    clip_grad_norm(self, clip_norm)
                optimizer.step()
                b = len(yb)
                # sums stay on the device; reading one back waits for the GPU, so a GPU reads every 20 steps
                total = total + value.astype(np.float64) * b
                correct = correct + _correct(pred, yb)
                n += b
                step += 1
                if step == 1 and backend.on_gpu(pred):
                    read_every = _GPU_READ_EVERY
                if step % read_every == 0 or step == steps:
                    seen = float(total)
                    check_finite(seen, f"Sequential.fit: the training loss (epoch {epoch + 1}, step {step})")
                    if bar is not None and (step % _GPU_READ_EVERY == 0 or step == steps):
                        rate = n / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix(loss=f"{seen / n:.4f}", acc=f"{int(correct) / n:.4f}",
                                        img_s=f"{rate:,.0f}", refresh=False)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if n == 0:
            raise ValueError("Sequential.fit: the training set gave no batches")
        seen = float(total)
        check_finite(seen, f"Sequential.fit: the training loss (epoch {epoch + 1})")
        return seen / n, int(correct) / n, n

    # ------------------------------------------------------------------------------------------ saving

    def state(self) -> dict:
        """The model as a checkpoint tree: architecture (class names + config), arrays, counters, statistics."""
        return {
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "dtype": self.dtype.name,
            "input_mean": self.input_mean,
            "input_std": self.input_std,
            "layers": [{"class": type(l).__name__, "config": l.config(), "params": dict(l.params),
                        "buffers": dict(l.buffers), "state": _int_state(l)} for l in self.layers],
        }

    def save(self, path) -> str:
        """Write the model to one verified .npz (atomically); :meth:`load` rebuilds it."""
        return checkpoint.save(path, {"kind": "model", "model": self.state()})

    @classmethod
    def load(cls, path, device=None) -> "Sequential":
        """Rebuild a model saved by :meth:`save` (or a checkpoint written by fit) on ``device`` (default:
        the current one). Custom layer classes must be defined or imported before loading."""
        tree = checkpoint.load(path)
        spec = _model_spec(tree, path)
        layers = []
        for i, ls in enumerate(spec["layers"]):
            name = ls.get("class")
            klass = LAYER_TYPES.get(name)
            if klass is None:
                raise CheckpointError(
                    f"{path}: layer {i} is of class {name!r}, which is not a known layer in this program. "
                    f"If it is your own layer, define or import your Layer subclass named {name} (subclassing "
                    "gpucnn.layers.Layer registers it by class name) before loading")
            try:
                layers.append(klass(**ls.get("config", {})))
            except Exception as e:
                raise CheckpointError(f"{path}: layer {i} ({name}) cannot be rebuilt from its saved config "
                                      f"{ls.get('config')}: {type(e).__name__}: {e}") from None
        try:
            model = cls(layers, input_shape=spec.get("input_shape"))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: the saved layers do not form a valid model: {e}") from None
        model._set_state(spec, path)
        if device is not None and device != backend.device():
            model.to(device)
        return model

    def _set_state(self, spec, where):
        """Copy saved arrays, counters and statistics into this model's own arrays (keeping their devices)."""
        if len(spec["layers"]) != len(self.layers):
            raise CheckpointError(f"{where}: holds {len(spec['layers'])} layers, the model has {len(self.layers)}")
        for i, (layer, ls) in enumerate(zip(self.layers, spec["layers"])):
            for kind in ("params", "buffers"):
                mine, saved = getattr(layer, kind), ls.get(kind, {})
                if set(mine) != set(saved):
                    raise CheckpointError(f"{where}: layer {i} ({layer.name}) has {kind} {sorted(mine)}, "
                                          f"the file holds {sorted(saved)}")
                for k, a in saved.items():
                    p = mine[k]
                    if not hasattr(a, "dtype") or tuple(a.shape) != tuple(p.shape) or a.dtype != p.dtype:
                        got = f"{a.dtype}{tuple(a.shape)}" if hasattr(a, "dtype") else type(a).__name__
                        raise CheckpointError(f"{where}: layer {i} ({layer.name}) {k} is {got} in the file, "
                                              f"{p.dtype}{tuple(p.shape)} in the model")
                    p[...] = backend.asarray(a) if backend.is_cupy(p) else a
            for k, v in (ls.get("state") or {}).items():
                setattr(layer, k, int(v))
            layer.grads = {k: None for k in layer.params}
        mean, std = spec.get("input_mean"), spec.get("input_std")
        self.input_mean = None if mean is None else np.asarray(mean, np.float64)
        self.input_std = None if std is None else np.asarray(std, np.float64)
        self._norm = None

    def _training_tree(self, optimizer, epochs_done, history, seed, best):
        return {"kind": "training", "model": self.state(),
                "training": {"epoch": epochs_done, "seed": seed, "history": history, "best": best,
                             "optimizer": optimizer.state_dict()}}

    def _resume(self, path, optimizer) -> dict:
        """Load a training checkpoint into this model and ``optimizer``; returns its "training" part."""
        tree = checkpoint.load(path)
        spec = _model_spec(tree, path)
        if tree.get("kind") != "training" or "training" not in tree:
            raise CheckpointError(f"{path}: is a saved model, not a training checkpoint; resume takes the "
                                  "last.npz or best.npz that fit(checkpoint_dir=...) writes")
        mine = [(type(l).__name__, _json(l.config())) for l in self.layers]
        theirs = [(ls.get("class"), ls.get("config")) for ls in spec["layers"]]
        if mine != theirs:
            diff = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            show = lambda lst: f"{lst[diff][0]}({lst[diff][1]})" if diff < len(lst) else "nothing"
            raise CheckpointError(f"{path}: was written for a different model: layer {diff} is {show(theirs)} "
                                  f"there and {show(mine)} here")
        self._set_state(spec, path)
        t = tree["training"]
        try:
            optimizer.load_state_dict(t["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit: {e}") from None
        return t


def _correct(pred, yb):
    """How many rows of ``pred`` have their largest entry at the label (a 0-d array on the device)."""
    return (pred.argmax(axis=1) == yb).sum()


def _int_state(layer) -> dict:
    """A layer's public integer attributes beyond its config (Dropout's ``step``): saved so a resumed run
    draws the same random numbers."""
    cfg = layer.config()
    return {k: int(v) for k, v in vars(layer).items()
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and not k.startswith("_") and k not in cfg}


def _json(value):
    """``value`` as it comes back from JSON (tuples become lists), for comparing configs."""
    return json.loads(json.dumps(value))


def _model_spec(tree, path) -> dict:
    spec = tree.get("model")
    if tree.get("kind") not in ("model", "training") or not isinstance(spec, dict) \
            or not isinstance(spec.get("layers"), list):
        raise CheckpointError(f"{path}: is a gpucnn file but holds no model (kind {tree.get('kind')!r})")
    return spec
