"""What every example shares: its command line, the device, the output folder, the data, a small model, and
the training examples' fit-and-save (curves.png, model.npz, history.json).

    import _common                                   # first: it also finds gpucnn in a checkout
    args = _common.setup("edge_detectors", __doc__)  # --quick, --device, --out, and the example's own options
    train, test = _common.fashion_mnist()

Every example runs as ``python examples/NAME.py [--quick] [--device cpu|cuda|sim] [--out DIR]``, writes
its pictures into DIR (default runs/examples/NAME/) and prints what can be checked.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import gpucnn
except ModuleNotFoundError:          # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
    import gpucnn

from gpucnn import backend, data, models, optim, viz
from gpucnn.model import Sequential


def setup(name: str, doc: str, options=None, argv=None) -> argparse.Namespace:
    """Parse the command line shared by every example (plus ``options(parser)``'s own), select the
    device, create the output folder and say where the pictures go."""
    parser = argparse.ArgumentParser(prog=f"examples/{name}.py", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a small run (under half a minute on two CPU cores), as CI runs it")
    parser.add_argument("--device", choices=backend.DEVICES, default=None,
                        help="where to run (default: cuda where CuPy finds a GPU, else cpu; $GPUCNN_DEVICE overrides)")
    parser.add_argument("--out", type=Path, default=Path("runs") / "examples" / name,
                        help="folder for the pictures and files (default: %(default)s)")
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    if args.device is not None:
        gpucnn.use_device(args.device)
    args.device = gpucnn.device()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{name}: device {args.device}{', quick run' if args.quick else ''}; pictures go to {args.out}/")
    return args


def saved(path) -> Path:
    """Say that a file was written (the tests look for these lines) and return its path."""
    print(f"saved {path}")
    return Path(path)


def fashion_mnist():
    """Fashion-MNIST (train, test), or exit with the message that says how to get it."""
    try:
        return data.fashion_mnist()
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


def add_model_option(parser):
    parser.add_argument("--model", type=Path, default=None,
                        help="a model saved by Sequential.save (e.g. by train_lenet5.py); "
                             "default: train a small LeNet-5 now")


def small_lenet5(args, train, test, activation: str = "relu", pool: str = "max") -> Sequential:
    """``args.model`` when given, else a LeNet-5 (ReLU, max pooling: a deconvnet needs the switches)
    trained now on the first training images: 2,000 for two epochs with --quick, 12,000 for three otherwise."""
    if getattr(args, "model", None) is not None:
        model = Sequential.load(str(args.model))
        print(f"loaded {args.model}: {len(model.layers)} layers, {model.num_params():,} parameters")
        return model
    n, epochs = (2000, 2) if args.quick else (12000, 3)
    backend.seed(0)
    model = models.lenet5(activation=activation, pool=pool, num_classes=train.num_classes, seed=0)
    print(f"training LeNet-5 ({activation}, {pool} pooling) on the first {n} training images for {epochs} "
          f"epoch{'s' if epochs > 1 else ''} (pass --model to use a trained one)")
    t0 = time.perf_counter()
    model.fit(train.limit(n), epochs=epochs, batch_size=64, verbose=0,
              optimizer=optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4))
    acc = model.evaluate(test.limit(1000))
    print(f"trained in {time.perf_counter() - t0:.1f}s: accuracy {acc['accuracy']:.3f}, top-5 {acc['top5']:.3f} "
          f"on the first 1000 test images")
    return model


def fit_and_save(args, model, train, test, epochs: int, batch_size: int, title: str) -> dict:
    """What both training examples do with their model: print its summary, train it with SGD (``args.lr``,
    momentum 0.9, weight decay 5e-4) validating on ``test``, print the test accuracy, and write curves.png
    (titled ``title``: training images, test accuracy), model.npz and history.json into ``args.out``."""
    model.summary()
    print(f"training on {len(train)} images, validating on {len(test)}, {epochs} epoch{'s' if epochs > 1 else ''} "
          f"of batch {batch_size}, SGD lr {args.lr} momentum 0.9 weight decay 5e-4")
    history = model.fit(train, epochs=epochs, batch_size=batch_size, validation=test, verbose=2,
                        optimizer=optim.SGD(model, lr=args.lr, momentum=0.9, weight_decay=5e-4))
    result = model.evaluate(test)
    print(f"test accuracy: {result['accuracy']:.4f}, top-5 accuracy: {result['top5']:.4f}, "
          f"loss {result['loss']:.4f} ({len(test)} test images)")
    viz.plot_history(history, args.out / "curves.png",
                     title=f"{title}: {len(train):,} training images, test accuracy {result['accuracy']:.3f}")
    saved(args.out / "curves.png")
    model.save(str(args.out / "model.npz"))
    saved(args.out / "model.npz")
    (args.out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return history
