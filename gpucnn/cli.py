"""The command line: ``gpucnn train | evaluate | summary | info`` (also ``python -m gpucnn``).

    gpucnn train lenet5 --dataset fashion-mnist --epochs 10        # writes runs/lenet5-fashion-mnist/
    gpucnn evaluate runs/lenet5-fashion-mnist/model.npz --dataset fashion-mnist
    gpucnn summary lenet5
    gpucnn info

A mistake the user can fix (missing data, a bad model file, an unknown name, an unusable device) is one
line on stderr and exit status 2, never a traceback; Ctrl-C is exit status 130.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path

from . import backend, data

TRAIN_MODELS = ("lenet5", "alexnet_small")
SUMMARY_MODELS = ("lenet5", "alexnet", "alexnet_small")


class UsageError(Exception):
    """A mistake in the command line; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other user error of the command line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _momentum(text):
    v = _non_negative_float(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _non_negative_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpucnn", description="Train and inspect CNNs written as readable GPU kernels.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"gpucnn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    device = dict(choices=backend.DEVICES, default=None,
                  help="cpu, cuda or sim (default: $GPUCNN_DEVICE, else cuda where CuPy finds a GPU, else cpu)")
    dataset = dict(choices=data.DATASETS, default="fashion-mnist", help="default: fashion-mnist")
    datapath = dict(metavar="PATH", default=None,
                    help="folder of the dataset's files (default: searched in $GPUCNN_DATA/<name>, "
                         "~/.gpucnn/data/<name>, and Debian's /usr/share/datasets)")

    t = sub.add_parser("train", help="train a model and save it with its checkpoints and learning curves",
                       description="Train a model; writes model.npz, last.npz, best.npz, history.json and "
                                   "curves.png into --out, and prints the test accuracy.")
    t.add_argument("model", choices=TRAIN_MODELS)
    t.add_argument("--dataset", **dataset)
    t.add_argument("--data", **datapath)
    t.add_argument("--epochs", type=_positive(int), default=10)
    t.add_argument("--batch-size", type=_positive(int), default=128)
    t.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    t.add_argument("--lr", type=_positive(float), default=None, help="default: 0.05 for sgd, 0.001 for adam")
    t.add_argument("--momentum", type=_momentum, default=None, help="sgd only (default 0.9)")
    t.add_argument("--weight-decay", type=_non_negative_float, default=None, help="L2 penalty (default 5e-4 for sgd, 0 for adam)")
    t.add_argument("--schedule", choices=("none", "cosine", "step"), default="none",
                   help="learning rate per epoch: cosine to 0, or x0.1 every third of the epochs")
    t.add_argument("--device", **device)
    t.add_argument("--seed", type=int, default=0, help="initialisation, order and augmentation (default 0)")
    t.add_argument("--limit", type=_positive(int), default=None, metavar="N",
                   help="train on the first N images and test on the first max(N//5, 100)")
    t.add_argument("--resume", metavar="PATH", default=None, help="continue from a checkpoint (last.npz)")
    t.add_argument("--out", metavar="DIR", default=None, help="default: runs/<model>-<dataset>")
    t.add_argument("--activation", choices=("tanh", "relu"), default=None, help="lenet5 only")
    t.add_argument("--pool", choices=("avg", "max"), default=None, help="lenet5 only")
    t.add_argument("--winograd", action="store_true",
                   help="3x3 stride-1 convolutions by Winograd F(2x2, 3x3) instead of im2col + GEMM "
                        "(alexnet, alexnet_small)")
    t.add_argument("--precision", choices=backend.PRECISIONS, default="fp32",
                   help="float32 GEMMs in full fp32 (default) or TF32 on the GPU's tensor cores (cuda only)")
    t.add_argument("--augment", action="store_true",
                   help="random crops (zero padding 4 for 32x32 images, 2 for 28x28) and, except for MNIST's "
                        "digits, horizontal flips")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="loss, accuracy and top-5 accuracy of a saved model on a test set")
    e.add_argument("model", metavar="MODEL.npz")
    e.add_argument("--dataset", **dataset)
    e.add_argument("--data", **datapath)
    e.add_argument("--limit", type=_positive(int), default=None, metavar="N", help="the first N test images")
    e.add_argument("--device", **device)

    s = sub.add_parser("summary", help="the layers, output shapes and parameter counts of a model")
    s.add_argument("model", metavar="MODEL.npz|NAME", help=f"a saved model or one of {', '.join(SUMMARY_MODELS)}")
    s.add_argument("--device", **device)

    i = sub.add_parser("info", help="the device, the versions of gpucnn and its dependencies, the data found")
    i.add_argument("--device", **device)

    from . import selftest
    selftest.add_arguments(sub.add_parser(
        "selftest", help="check gpucnn on this GPU: every op against the CPU path, training steps, bad inputs, "
                         "compile and step times (exit 1 on a failure, 2 without a GPU)"))
    k = sub.add_parser("kernels", add_help=False,
                       help="each Numba kernel's registers, shared memory, spills, largest legal block and occupancy "
                            "(from ptxas, no GPU needed); `gpucnn kernels --help` for its options")
    k.set_defaults(options=[])     # main() hands `gpucnn kernels ...` to kernel_report.main whole
    return parser


# ----------------------------------------------------------------------------------------------
# the commands


def _use_device(name):
    if name is not None:
        backend.use_device(name)
    return backend.device()


def _load_data(args):
    train, test = data.load(args.dataset, args.data)
    if getattr(args, "limit", None):
        train, test = train.limit(args.limit), test.limit(max(args.limit // 5, 100))
    return train, test


def _build_model(name, train, activation=None, pool=None):
    from . import models
    c, h, _w = train.shape
    if name == "lenet5":
        kw = {"num_classes": train.num_classes}
        if activation is not None:
            kw["activation"] = activation
        if pool is not None:
            kw["pool"] = pool
    else:
        kw = {"in_channels": c, "num_classes": train.num_classes, "input_size": h}
    return models.get(name, **kw)


def cmd_train(args) -> int:
    from . import losses, models, optim
    from .viz import plot_history

    if args.optimizer == "adam" and args.momentum is not None:
        raise UsageError("--momentum applies to --optimizer sgd only (adam has its own moments)")
    if args.model != "lenet5" and (args.activation is not None or args.pool is not None):
        raise UsageError(f"--activation and --pool apply to lenet5 only, not {args.model}")
    if args.resume is not None and not Path(args.resume).is_file():
        raise UsageError(f"--resume: no such file {args.resume}")
    if args.winograd and args.model == "lenet5":
        raise UsageError("--winograd: lenet5 has no 3x3 stride-1 convolution (its kernels are 5x5); "
                         "use it with alexnet or alexnet_small")
    out = Path(args.out or f"runs/{args.model}-{args.dataset}")
    last = out / "last.npz"
    if last.is_file() and (args.resume is None or not last.samefile(args.resume)):
        raise UsageError(f"{out} already holds a run (last.npz): continue it with --resume {last}, "
                         "or give another --out")
    dev = _use_device(args.device)
    train, test = _load_data(args)
    backend.seed(args.seed)
    model = _build_model(args.model, train, args.activation, args.pool)
    _check_fits(model, args.model, train, args.dataset)
    if args.winograd:
        models.use_winograd(model)
    backend.set_precision(args.precision)
    if args.optimizer == "sgd":
        lr = args.lr or 0.05
        momentum = 0.9 if args.momentum is None else args.momentum
        decay = 5e-4 if args.weight_decay is None else args.weight_decay
        optimizer = optim.SGD(model, lr=lr, momentum=momentum, weight_decay=decay)
        recipe = f"sgd lr {lr:g} momentum {momentum:g} weight decay {decay:g}"
    else:
        lr = args.lr or 1e-3
        decay = args.weight_decay or 0.0
        optimizer = optim.Adam(model, lr=lr, weight_decay=decay)
        recipe = f"adam lr {lr:g} weight decay {decay:g}"
    scheduler = {"none": None,
                 "cosine": lambda: optim.CosineSchedule(args.epochs),
                 "step": lambda: optim.StepSchedule(max(1, args.epochs // 3), 0.1)}[args.schedule]
    scheduler = scheduler() if scheduler else None
    augment = None
    if args.augment:
        augment = data.Augment(crop_padding=4 if train.shape[1] >= 32 else 2, flip=args.dataset != "mnist")
    out.mkdir(parents=True, exist_ok=True)
    if not args.quiet:
        c, h, w = train.shape
        print(f"training {args.model} on {args.dataset} ({len(train)} images of {c}x{h}x{w}, "
              f"testing on {len(test)}) on {dev}: {args.epochs} epochs of batch {args.batch_size}, {recipe}"
              f"{', ' + args.schedule + ' schedule' if scheduler else ''}{', augmented' if augment else ''}"
              f"{', Winograd 3x3 convolutions' if args.winograd else ''}"
              f"{', TF32 GEMMs' if args.precision == 'tf32' and dev == 'cuda' else ''}")
    try:
        history = model.fit(train, epochs=args.epochs, batch_size=args.batch_size, optimizer=optimizer,
                            loss=losses.SoftmaxCrossEntropy(), validation=test, scheduler=scheduler,
                            checkpoint_dir=str(out), resume=args.resume, seed=args.seed,
                            verbose=0 if args.quiet else 1, augment=augment)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {_last_checkpoint(out, args.resume)}", file=sys.stderr)
        return 130
    except FloatingPointError as e:  # the loss became NaN/Inf: a learning rate too high, most often
        raise UsageError(f"{e}; {_last_checkpoint(out, args.resume)}") from None
    model.save(str(out / "model.npz"))
    (out / "history.json").write_text(json.dumps(history, indent=1, default=float) + "\n")
    plot_history(history, out / "curves.png")
    result = model.evaluate(test)
    print(f"test accuracy: {result['accuracy']:.4f}")
    if not args.quiet:
        print(f"saved in {out}/: model.npz, last.npz, best.npz (checkpoints), history.json, curves.png")
    return 0


def _last_checkpoint(out, resume):
    """Where a stopped run can continue from, as a sentence."""
    last = out / "last.npz"
    if last.is_file():
        return f"the last checkpoint is {last} (continue with --resume {last})"
    if resume is not None:
        return f"no epoch finished, so the last checkpoint is still {resume}"
    return "stopped before the first checkpoint was written: nothing saved"


def _check_fits(model, name, ds, dataset):
    """A model built for other images or fewer classes than the dataset's is the user's mix-up: say so."""
    if model.input_shape is None:  # a model saved before it saw data: fit/evaluate will check
        return
    want = "x".join(map(str, model.input_shape))
    have = "x".join(map(str, ds.shape))
    if tuple(model.input_shape) != tuple(ds.shape):
        raise UsageError(f"{name} takes {want} images but {dataset} has {have}"
                         + ("; use alexnet_small for other image sizes" if name == "lenet5" else ""))
    classes = model.output_shape[0]
    if classes < ds.num_classes:
        raise UsageError(f"{name} predicts {classes} classes but {dataset} has {ds.num_classes}")


def _load_model(path):
    from .model import Sequential
    if not Path(path).is_file():
        raise UsageError(f"no such model file: {path}")
    return Sequential.load(str(path))


def cmd_evaluate(args) -> int:
    _use_device(args.device)
    model = _load_model(args.model)
    _train, test = data.load(args.dataset, args.data)
    if args.limit:
        test = test.limit(args.limit)
    _check_fits(model, args.model, test, args.dataset)
    result = model.evaluate(test)
    print(f"{args.dataset} test set, {len(test)} images")
    print(f"loss: {result['loss']:.4f}")
    print(f"accuracy: {result['accuracy']:.4f}")
    print(f"top-5 accuracy: {result['top5']:.4f}")
    return 0


def cmd_summary(args) -> int:
    _use_device(args.device)
    arg = args.model
    if arg.endswith(".npz") or Path(arg).is_file():
        model = _load_model(arg)
    elif arg in SUMMARY_MODELS:
        from . import models
        model = models.get(arg)
    else:
        raise UsageError(f"unknown model {arg!r}: expected a .npz file or one of {', '.join(SUMMARY_MODELS)}")
    model.summary()
    return 0


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    from . import __version__
    dev = _use_device(args.device)
    why_not_cuda = backend._cuda_problem()
    print(f"device: {dev}" + (f" (cuda unavailable: {why_not_cuda})" if dev != "cuda" and why_not_cuda else ""))
    gpu = "none"
    if why_not_cuda is None:
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        gpu = name.decode() if isinstance(name, bytes) else str(name)
    print(f"gpu: {gpu}")
    if importlib.util.find_spec("cupy") is None:
        cupy_version = "not installed"
    else:
        try:
            import cupy
            cupy_version = cupy.__version__
        except Exception as e:  # installed for another CUDA version, missing libraries, ...
            cupy_version = f"installed but does not import ({type(e).__name__}: {e})"
    versions = {"gpucnn": __version__, "python": platform.python_version(), "numpy": _version("numpy"),
                "numba": _version("numba"), "numba-cuda": _version("numba-cuda"), "cupy": cupy_version,
                "nvmath-python": _version("nvmath-python")}
    for name, v in versions.items():
        print(f"{name}: {v}")
    from . import blas
    print(f"gemm: {blas.describe()}")
    print("data:")
    for name in data.DATASETS:
        try:
            where = str(data.locate(name))
        except FileNotFoundError:
            where = "not found" + (" (gpucnn train ... --data PATH gives its folder)" if name == "cifar10" else "")
        print(f"  {name}: {where}")
    return 0


def cmd_kernels(args) -> int:
    from . import kernel_report
    return kernel_report.main(args.options)


def cmd_selftest(args) -> int:
    from . import selftest
    return selftest.run(args)


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "summary": cmd_summary, "info": cmd_info,
            "selftest": cmd_selftest, "kernels": cmd_kernels}


def _user_errors():
    """The exceptions that mean the user has something to fix, not that gpucnn has a bug."""
    from .checkpoint import CheckpointError
    return (UsageError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
            CheckpointError, backend.DeviceError, data.DataError)


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:                 # its own options (--arch, --json): its own parser
        from . import kernel_report
        return kernel_report.main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a mistake argparse has already printed
        return e.code
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    device_before = backend._device
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        message = " ".join(str(e).split("\n"))
        print(f"gpucnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        # main() called from Python (a test, a notebook) leaves the caller's device as it was
        if device_before is not None and backend._device != device_before:
            try:
                backend.use_device(device_before)
            except backend.DeviceError:  # "sim" and "cuda" cannot share a process: nothing to restore
                pass
