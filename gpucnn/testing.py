"""Gradient checking, the tool that proves a backward pass: ours and any user's custom layer."""
from __future__ import annotations

import numpy as np

from . import backend


class GradCheckReport(dict):
    """name -> {"max_rel_error": float, "index": tuple} for the input ("x") and every parameter."""

    def __str__(self):
        rows = [f"{'array':<12} {'worst rel. error':>16}  at index"]
        rows += [f"{k:<12} {v['max_rel_error']:>16.3e}  {v['index']}" for k, v in self.items()]
        return "\n".join(rows)


def _int_state(obj):
    """Integer counters (e.g. a dropout step) to restore before each forward, so every forward is the same."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, (int, np.integer)) and not isinstance(v, bool)}


def check_backward(layer_or_loss, x, target=None, eps=1e-6, rtol=1e-5, atol=1e-8, training=True, seed=0):
    """Compare ``backward`` with central finite differences in float64, for ``x`` and every parameter.

    For a layer the scalar differentiated is ``sum(forward(x) * g)`` for a fixed random ``g``; for a loss
    (anything whose ``forward`` takes a target) it is the loss itself. An array passes when
    ``max|analytic - numeric| <= atol + rtol * max|numeric|`` (relative to its largest entry, the scale
    float rounding works at). Returns a :class:`GradCheckReport`; raises AssertionError naming the array
    and the index of the worst entry when one fails. Parameters and buffers are cast to float64 for the check and
    restored afterwards.
    """
    obj = layer_or_loss
    is_loss = target is not None
    xp = backend.xp(x)
    params = getattr(obj, "params", {}) or {}
    buffers = getattr(obj, "buffers", {}) or {}
    saved = {k: v for k, v in params.items()}
    saved_buffers = {k: v for k, v in buffers.items()}
    saved_dtype = getattr(obj, "dtype", None)
    counters = _int_state(obj)
    try:
        for d in (params, buffers):
            for k, v in d.items():
                d[k] = v.astype(np.float64)
        if saved_dtype is not None:
            obj.dtype = np.dtype(np.float64)
        x = xp.ascontiguousarray(x.astype(np.float64))

        def run(x_):
            for k, v in counters.items():
                setattr(obj, k, v)
            if is_loss:
                return obj.forward(x_, target)
            return obj.forward(x_, training=training)

        y = run(x)
        if is_loss:
            g = None
            gx = obj.backward()
            f = lambda x_: float(run(x_))
        else:
            rng = np.random.default_rng(seed)
            g = backend.asarray(rng.standard_normal(tuple(y.shape)), dtype=np.float64) if backend.is_cupy(y) \
                else rng.standard_normal(tuple(y.shape))
            gx = obj.backward(g)
            f = lambda x_: float((run(x_) * g).sum())
        analytic = {"x": backend.to_numpy(gx).copy()}
        for k in params:
            analytic[k] = backend.to_numpy(obj.grads[k]).copy()

        report = GradCheckReport()
        failures = []
        targets = [("x", x)] + list(params.items())
        for name, arr in targets:
            num = np.zeros(arr.shape)
            for idx in np.ndindex(*arr.shape):
                old = float(arr[idx])
                arr[idx] = old + eps
                fp = f(x)
                arr[idx] = old - eps
                fm = f(x)
                arr[idx] = old
                num[idx] = (fp - fm) / (2 * eps)
            a = analytic[name]
            if a.shape != num.shape:
                raise AssertionError(f"check_backward: gradient of {name!r} has shape {a.shape}, expected {num.shape}")
            err = np.abs(a - num)
            scale = max(float(np.abs(num).max(initial=0.0)), float(np.abs(a).max(initial=0.0)))
            worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()
            worst_err = float(err[worst]) if err.size else 0.0
            rel = worst_err / scale if scale > 0 else worst_err
            report[name] = {"max_rel_error": rel, "index": tuple(int(i) for i in worst)}
            if worst_err > atol + rtol * scale:
                failures.append(f"{type(obj).__name__}: gradient of {name!r} is wrong at index {tuple(int(i) for i in worst)}: "
                                f"backward gives {float(a[worst]):.8g}, finite differences {float(num[worst]):.8g} "
                                f"(relative error {rel:.3e} > rtol {rtol:g})")
        if failures:
            raise AssertionError("\n".join(failures) + "\n" + str(report))
        return report
    finally:
        params.update(saved)
        buffers.update(saved_buffers)
        for k, v in counters.items():
            setattr(obj, k, v)
        if saved_dtype is not None:
            obj.dtype = saved_dtype
