"""Does this checkout train exactly as another git revision does? A refactoring's proof, bit for bit.

    python bench/equal_to.py e09d93d                 # every net, on "cpu" and on "sim"
    python bench/equal_to.py HEAD~3 --devices cpu --only lenet5

The revision is checked out in a temporary ``git worktree``; each checkout then runs, in a process of its own per
device (Numba picks the simulator once per process), the same few training steps of each net below on the same
seeded batches (SGD with momentum and weight decay; Adam and gradient clipping for some), and writes every
parameter and every step's loss. The table gives, per net and device, the largest absolute and relative
difference over all of them; "identical" means every bit. A net that is not identical passes only when a change
listed in :data:`EXPLAINED` accounts for it (which commit moved which bits, and why) and it stays within
:data:`TOLERANCE` relative after the 10 steps (1e-5 in float32, 1e-12 in float64) or, for an Adam net, when every
step's gradients stay within it and the elements over it are those Adam amplified from rounding noise
(:func:`adam_amplified`: Adam divides each gradient element by its own size). Then this checkout loads the model
and the training checkpoint the revision wrote after its steps (``Sequential.load``; ``fit(resume=...)`` for one
more epoch in both checkouts, compared bit for bit): files saved by the old code must still load.

Nets (small, so that the simulator runs them in minutes): LeNet-5 (tanh/avg and relu/max), alexnet_small on 8x8
images, a mini AlexNet (11x11 stride-4 conv, LRN, overlapping max pools, dropout) and a BatchNorm net, each also
with Winograd convolutions where its 3x3 layers allow, LeNet-5 with every lowered input recomputed, and LeNet-5
and the BatchNorm net in float64. Only the public API both revisions share is used. Exit status 1 when a
difference is unexplained or over tolerance.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STEPS = 10
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}       # relative, after STEPS steps, where a difference is explained
NOISE = 1e-6    # a gradient element under this fraction of its array's largest is rounding noise (of a true zero)
AMPLIFIED = ("Adam steps each element by lr m/(sqrt(v)+eps): a gradient element that is rounding noise of a true "
             "zero (the mini AlexNet's Winograd conv: -5.8e-11 in one order of summation, -4.7e-10 in another, beside "
             "a largest 0.034) becomes a step of up to lr either way: one changed order of summation moved that "
             "weight by 4e-5 in the first step (2.5e-4 after 10) while every gradient agreed to 1e-6")

# Changes since the redesign's baseline (57385f0) that move bits on purpose: (nets whose name contains this, the
# devices it concerns, the commit and why). Anything else that differs is a regression.
EXPLAINED = [
    ("batchnorm", ("cpu", "sim", "cuda"), "30f0901: one overflow-safe sigmoid for every kernel (the CPU's "
     "1/(1+exp(-x)) became exp(x)/(1+exp(x)) for x < 0, as the Numba device function was; ~1 ulp there); the "
     "net's Sigmoid"),
    ("", ("sim", "cuda"), "1bb603c/457a14f (the fill rule): on the GPU path the bias gradients, the loss's mean and "
     "clipping's norm are summed over many blocks, partial sums then a fixed-order combine, instead of one block's "
     "loop: another order of summation (the CPU path is unchanged)"),
]


# ------------------------------------------------------------------------------------------ in each checkout

def _nets(gc):
    """name -> (make the model, batch shape, classes, optimizer kind, clip_norm, recompute_above); a name ending in
    "float64" builds its layers in float64."""
    L, models = gc.layers, gc.models

    def mini_alexnet():
        r = np.random.default_rng(3)
        return gc.Sequential([
            L.Conv2D(3, 4, 11, stride=4, padding=2, rng=r), L.ReLU(), L.LocalResponseNorm(), L.MaxPool2D(3, 2),
            L.Conv2D(4, 6, 5, padding=2, rng=r), L.ReLU(), L.LocalResponseNorm(), L.MaxPool2D(3, 2),
            L.Conv2D(6, 6, 3, padding=1, rng=r), L.ReLU(), L.Conv2D(6, 4, 3, padding=1, rng=r), L.ReLU(),
            L.MaxPool2D(3, 2), L.Flatten(), L.Dropout(0.5, seed=1), L.Dense(4, 8, rng=r), L.ReLU(),
            L.Dropout(0.5, seed=2), L.Dense(8, 5, rng=r)], input_shape=(3, 67, 67))

    def batchnorm(dtype="float32", head=None):
        r = np.random.default_rng(4)
        return gc.Sequential([
            L.Conv2D(1, 4, 3, padding=1, rng=r, dtype=dtype), L.BatchNorm2D(4, dtype=dtype), L.ReLU(),
            L.MaxPool2D(2), L.Conv2D(4, 4, 3, padding=1, rng=r, dtype=dtype), L.Tanh(), L.AvgPool2D(2), L.Flatten(),
            L.Dropout(0.3, seed=5), L.Dense(16, 6, rng=r, dtype=dtype), (head or L.Sigmoid)(),
            L.Dense(6, 3, rng=r, dtype=dtype)], input_shape=(1, 8, 8))

    wino = models.use_winograd
    return {
        "lenet5": (lambda: models.lenet5(seed=0), (2, 1, 28, 28), 10, "sgd", None, None),
        "lenet5 relu/max": (lambda: models.lenet5(activation="relu", pool="max", seed=0), (2, 1, 28, 28), 10,
                            "adam", 1.0, None),
        "lenet5, recomputed": (lambda: models.lenet5(seed=0), (2, 1, 28, 28), 10, "sgd", None, 0),
        "alexnet_small": (lambda: models.alexnet_small(input_size=8, seed=0), (2, 1, 8, 8), 10, "sgd", None, None),
        "alexnet_small, winograd": (lambda: wino(models.alexnet_small(input_size=8, seed=0)), (2, 1, 8, 8), 10,
                                    "sgd", 0.5, None),
        "mini alexnet (LRN, dropout)": (mini_alexnet, (2, 3, 67, 67), 5, "sgd", None, None),
        "mini alexnet, winograd": (lambda: wino(mini_alexnet()), (2, 3, 67, 67), 5, "adam", None, None),
        # the same with SGD: Adam's amplification of rounding noise ([A] below) must then vanish
        "mini alexnet, winograd, sgd": (lambda: wino(mini_alexnet()), (2, 3, 67, 67), 5, "sgd", None, None),
        "batchnorm": (batchnorm, (3, 1, 8, 8), 3, "sgd", None, None),
        "batchnorm, winograd": (lambda: wino(batchnorm()), (3, 1, 8, 8), 3, "sgd", None, None),
        "lenet5 float64": (lambda: models.lenet5(seed=0, dtype="float64"), (2, 1, 28, 28), 10, "adam", 1.0, None),
        "batchnorm float64": (lambda: batchnorm("float64"), (3, 1, 8, 8), 3, "sgd", None, None),
        # the same net with Tanh for its Sigmoid: what [1] below blames must then vanish
        "bn-tanh-head": (lambda: batchnorm(head=L.Tanh), (3, 1, 8, 8), 3, "sgd", None, None),
    }


def _optimizer(gc, model, kind):
    if kind == "adam":
        return gc.optim.Adam(model, lr=1e-3)
    return gc.optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)


def run(checkout, out, only, folder):
    """Train each net STEPS steps in ``checkout``'s gpucnn (on GPUCNN_DEVICE) and save its parameters and losses
    to ``out``; with ``folder``, write or resume LeNet-5's checkpoint files there instead."""
    import warnings
    sys.path.insert(0, checkout)
    import gpucnn as gc
    if not os.path.abspath(gc.__file__).startswith(os.path.abspath(checkout)):
        raise SystemExit(f"equal_to: imported {gc.__file__}, not the checkout {checkout}")
    warnings.simplefilter("ignore")         # the capture's fallback warning on "sim"
    if folder:
        return _checkpoints(gc, folder)
    from gpucnn.losses import SoftmaxCrossEntropy
    results = {}
    default = gc.layers.Conv2D.RECOMPUTE_ABOVE
    for name, (make, shape, classes, kind, clip, recompute) in _nets(gc).items():
        if only and only not in name:
            continue
        gc.layers.Conv2D.RECOMPUTE_ABOVE = default if recompute is None else recompute
        model = make()
        opt = _optimizer(gc, model, kind)
        rng = np.random.default_rng(sum(map(ord, name)))
        for t in range(STEPS):
            x = rng.standard_normal(shape).astype("float64" if name.endswith("float64") else np.float32)
            y = rng.integers(0, classes, shape[0])
            value = model.train_step(gc.asarray(x), gc.asarray(y), SoftmaxCrossEntropy(), opt, clip_norm=clip)
            # a copy: the loss lives in the step's workspace until the next step (on "sim" to_numpy is a view)
            results[f"{name}|loss {t}"] = np.array(gc.to_numpy(value), np.float64, copy=True)
            for i, layer in enumerate(model.layers if kind == "adam" else ()):   # for adam_amplified only
                for k, g in layer.grads.items():
                    if g is not None:
                        results[f"{name}|grad {t}|{i}.{k}"] = gc.to_numpy(g).copy()
        results[f"{name}|optimizer"] = np.array(kind)
        for i, layer in enumerate(model.layers):
            for k, a in [*layer.params.items(), *layer.buffers.items()]:
                results[f"{name}|{i}.{k}"] = gc.to_numpy(a).copy()
    gc.layers.Conv2D.RECOMPUTE_ABOVE = default
    np.savez(out, **results)


def _checkpoints(gc, folder):
    """Write (``--write``) or resume (``--resume``) LeNet-5's files: fit one epoch with checkpoint_dir, save the
    model; or load that model and fit one more epoch from the training checkpoint."""
    data = _data()
    mode, folder = folder.split(":", 1)
    if mode == "write":
        model = gc.models.lenet5(seed=0)
        model.fit(data, epochs=1, batch_size=8, checkpoint_dir=os.path.join(folder, "run"), verbose=0)
        model.save(os.path.join(folder, "model.npz"))
        return
    loaded = gc.Sequential.load(os.path.join(folder, "model.npz"))
    model = gc.models.lenet5(seed=1)
    model.fit(data, epochs=2, batch_size=8, resume=os.path.join(folder, "run", "last.npz"), verbose=0)
    arrays = {f"loaded {i}.{k}": gc.to_numpy(a) for i, l in enumerate(loaded.layers) for k, a in l.params.items()}
    arrays.update({f"resumed {i}.{k}": gc.to_numpy(a) for i, l in enumerate(model.layers)
                   for k, a in l.params.items()})
    np.savez(os.path.join(folder, f"resumed-{mode}.npz"), **arrays)


def _data():
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, (20, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20)


# ------------------------------------------------------------------------------------------ the comparison

def _child(checkout, device, out, only, folder=""):
    env = dict(os.environ, GPUCNN_DEVICE=device, PYTHONPATH=checkout)
    cmd = [sys.executable, os.path.abspath(__file__), "--run", checkout, out, "--only", only, "--folder", folder]
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"equal_to: the run in {checkout} on {device} failed:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")


def _diff(a, b):
    """(max |a - b|, max |a - b| / max |b|), in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    d = float(np.max(np.abs(a - b), initial=0.0))
    return d, d / max(float(np.max(np.abs(b), initial=0.0)), 1e-30)


def differences(mine, theirs):
    """(arrays, max |a - b|, max |a - b| / max |b|, identical) over the parameters and losses both files hold (the
    gradients are for :func:`adam_amplified`)."""
    mine, theirs = ({k: v for k, v in d.items() if "|grad " not in k} for d in (mine, theirs))
    keys = sorted(set(mine) | set(theirs))
    if set(mine) != set(theirs):
        return len(keys), float("inf"), float("inf"), False
    abs_d = rel_d = 0.0
    same = True
    for k in keys:
        a, b = mine[k], theirs[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            return len(keys), float("inf"), float("inf"), False
        same = same and a.tobytes() == b.tobytes()
        if a.dtype.kind == "f":
            d, r = _diff(a, b)
            abs_d, rel_d = max(abs_d, d), max(rel_d, r)
    return len(keys), abs_d, rel_d, same


def adam_amplified(mine, theirs, tol):
    """How many parameter elements are over ``tol`` only because Adam amplified rounding noise (:data:`AMPLIFIED`),
    or None when that does not account for the difference: every step's gradients must agree within ``tol``, and
    every parameter element over it must have had, at some step, a gradient under NOISE of its array's largest that
    differed."""
    if not any(k.endswith("|optimizer") and str(v) == "adam" for k, v in theirs.items()):
        return None
    noisy = {}
    for k, g in theirs.items():
        if "|grad " not in k:
            continue
        mine_g = mine[k].astype(np.float64)
        if _diff(mine_g, g)[1] > tol:
            return None
        g = g.astype(np.float64)
        small = np.maximum(np.abs(mine_g), np.abs(g)) <= NOISE * np.max(np.abs(g), initial=0.0)
        param = k.split("|")[0] + "|" + k.split("|")[2]
        noisy[param] = noisy.get(param, False) | (small & (mine_g != g))
    count = 0
    for k, b in theirs.items():
        if "|grad " in k or b.dtype.kind != "f":
            continue
        over = np.abs(mine[k].astype(np.float64) - b) > tol * max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
        if np.any(over & ~noisy.get(k, np.zeros_like(over))):
            return None
        count += int(np.sum(over))
    return count


def compare(rev, devices, only):
    """Run both checkouts on every device; print the table; return the rows that differ."""
    rows, failed = [], []
    with tempfile.TemporaryDirectory(prefix="equal_to-") as tmp:
        other = os.path.join(tmp, "rev")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", other, rev], check=True,
                       capture_output=True, text=True)
        try:
            for device in devices:
                files = {}
                for who, checkout in (("this", ROOT), ("rev", other)):
                    files[who] = os.path.join(tmp, f"{who}-{device}.npz")
                    _child(checkout, device, files[who], only)
                mine, theirs = dict(np.load(files["this"])), dict(np.load(files["rev"]))
                for net in dict.fromkeys(k.split("|")[0] for k in theirs):
                    pick = lambda d: {k: v for k, v in d.items() if k.split("|")[0] == net}  # noqa: E731
                    n, abs_d, rel_d, same = differences(pick(mine), pick(theirs))
                    tol = TOLERANCE["float64" if net.endswith("float64") else "float32"]
                    adam = adam_amplified(pick(mine), pick(theirs), tol) if rel_d > tol else None
                    rows.append((net, device, n, abs_d, rel_d, same, tol, adam))
            folder = os.path.join(tmp, "checkpoints")
            os.makedirs(folder)
            _child(other, devices[0], "", "", "write:" + folder)
            for who, checkout in (("this", ROOT), ("rev", other)):
                _child(checkout, devices[0], "", "", f"{who}:{folder}")
            mine = dict(np.load(os.path.join(folder, "resumed-this.npz")))
            theirs = dict(np.load(os.path.join(folder, "resumed-rev.npz")))
            n, abs_d, rel_d, same = differences(mine, theirs)
            rows.append((f"{rev}'s checkpoints loaded and resumed", devices[0], n, abs_d, rel_d, same,
                         TOLERANCE["float32"], None))
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other], capture_output=True)
    print(f"| net | device | arrays | max abs difference | max rel difference | identical to {rev} |")
    print("|---|---|---:|---:|---:|---|")
    reasons = {}
    for net, device, n, abs_d, rel_d, same, tol, adam in rows:
        verdict = "yes"
        if not same:
            why = [(i, text) for i, (key, devices, text) in enumerate(EXPLAINED) if key in net and device in devices]
            if why and rel_d <= tol:
                verdict = f"no, explained ({', '.join(f'[{i + 1}]' for i, _ in why)}; rel <= {tol:g})"
                reasons.update(why)
            elif why and adam is not None:
                verdict = (f"no, explained ({', '.join(f'[{i + 1}]' for i, _ in why)}; gradients rel <= {tol:g} "
                           f"at every step; over it: {adam} element(s) whose gradient was rounding noise, "
                           "amplified by Adam [A])")
                reasons.update(why)
                reasons["A"] = AMPLIFIED
            else:
                verdict = "NO: " + ("over tolerance" if why else "unexplained")
                failed.append((net, device))
        print(f"| {net} | {device} | {n} | {abs_d:.3g} | {rel_d:.3g} | {verdict} |")
    for i, text in sorted(reasons.items(), key=lambda kv: str(kv[0])):
        print(f"\n[{i if isinstance(i, str) else i + 1}] {text}")
    return failed


def main(argv=None):
    p = argparse.ArgumentParser(description="Train a few steps here and at a git revision; compare bit for bit.")
    p.add_argument("rev", nargs="?", help="the git revision to compare with (e.g. e09d93d, HEAD~1)")
    p.add_argument("--devices", default="cpu,sim", help="comma-separated: cpu, sim, cuda (default cpu,sim)")
    p.add_argument("--only", default="", help="only the nets whose name contains this text")
    p.add_argument("--run", nargs=2, metavar=("CHECKOUT", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        run(args.run[0], args.run[1], args.only, args.folder)
        return 0
    if not args.rev:
        p.error("give a git revision to compare with")
    failed = compare(args.rev, [d.strip() for d in args.devices.split(",") if d.strip()], args.only)
    if failed:
        print(f"\nDIFFERENT from {args.rev}: " + ", ".join(f"{n} on {d}" for n, d in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
