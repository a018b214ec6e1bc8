"""Top-1 accuracy against operations, the lecture's chart of architectures (after Canziani et al., 2016), for
gpucnn's own nets on Fashion-MNIST.

Five classifiers, each placed by its multiply-adds per image (x, log scale) and its test accuracy (y), its
blob's area proportional to its parameters:

* LeNet-5 as in the paper (tanh, average pooling) and with ReLU and max pooling;
* AlexNet-small with one tower and with two (groups=2: see two_towers.py);
* a convolutional autoencoder's encoder (gpucnn.models.conv_encoder_layers, as examples/conv_autoencoder.py) with a linear
  probe: the autoencoder is trained on reconstruction only (no labels), its encoder frozen, and a
  Flatten + Dense(392, 10) trained on the encoder's features. Its accuracy says how much of the classes an
  unsupervised code keeps; its operations are the encoder's and the probe's.

Every net gets the same training images, epochs and batches (Adam, lr 1e-3), seed 0: on a GPU the 60,000
training images for 3 epochs in batches of 128, on the CPU the first 4,000 for 2 epochs in batches of 32,
tested on 2,000 (about 3 minutes on two cores), with --quick 128 for one epoch.
The chart's caption and the printed table say how each number was obtained. --history FILE takes the
accuracies of an earlier run (accuracies.json, written by this example and by two_towers.py) instead of
training the nets found there. Writes top1_vs_operations.png and accuracies.json.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np

from gpucnn import backend, layers, losses, models, optim, viz
from gpucnn.data import ArrayDataset
from gpucnn.model import Sequential
from two_towers import plan_options, planned, shapes_in, steps_of

# key: (label, builder, where its label goes: offset in points)
NETS = {
    "lenet5_tanh_avg": ("LeNet-5 (tanh, avg pool)", lambda **kw: models.lenet5(**kw), (12, 8)),
    "lenet5_relu_max": ("LeNet-5 (ReLU, max pool)", lambda **kw: models.lenet5(activation="relu", pool="max", **kw),
                        (12, -14)),
    "alexnet_small": ("AlexNet-small", lambda **kw: models.alexnet_small(**kw), (-20, 24)),
    "alexnet_small_groups2": ("AlexNet-small, groups=2", lambda **kw: models.alexnet_small(groups=2, **kw),
                              (-40, -30)),
    "ae_probe": ("conv. autoencoder's encoder + linear probe", None, (-25, 25)),
}
LR = 1e-3                 # Adam's, for every net (AlexNet-small: loss still 2.29 after 60 SGD steps at lr 0.02)
# how much training, (on a GPU, on the CPU, with --quick); None: all
PLAN = {"epochs": (3, 2, 1), "limit": (None, 4000, 128), "test_limit": (None, 2000, 128), "batch_size": (128, 32, 32)}
PROBE_EPOCHS = 5          # the linear probe on precomputed features costs next to nothing: it gets more epochs


def options(parser):
    plan_options(parser, PLAN)
    parser.add_argument("--history", type=str, default=None,
                        help="accuracies.json of an earlier run (this example's or two_towers.py's): the nets "
                             "found there are not trained again")


def main():
    args = _common.setup("architectures", __doc__, options)
    epochs, batch, train, test = planned(args, PLAN)
    known = read_history(args.history) if args.history else {}
    if known:
        print(f"accuracies from {args.history}: {', '.join(k for k in known if k in NETS)} (not trained again)")

    rows = {}
    for key, (label, _, _) in NETS.items():
        if key in known:
            model = classifier(key, init="zeros")         # only counted: no random numbers for its weights
            accuracy, how = known[key]["accuracy"], f"from {args.history}: {known[key]['how']}"
        elif key == "ae_probe":
            model, accuracy, how = train_probe(train, test, epochs, batch)
        else:
            model = classifier(key)
            accuracy, how = train_classifier(model, label, train, test, epochs, batch)
        rows[key] = {"label": label, "params": model.num_params(), "macs": multiply_adds(model),
                     "accuracy": accuracy, "how": how}

    print(f"\n{'net':<44}{'params':>11}{'MACs':>14}{'accuracy':>10}  how obtained")
    for r in rows.values():
        print(f"{r['label']:<44}{r['params']:>11,}{r['macs']:>14,}{r['accuracy']:>10.4f}  {r['how']}")
    plot_chart(rows, args.out / "top1_vs_operations.png")
    _common.saved(args.out / "top1_vs_operations.png")
    results = {k: {"label": r["label"], "accuracy": r["accuracy"], "how": r["how"]} for k, r in rows.items()}
    (args.out / "accuracies.json").write_text(json.dumps(results, indent=1) + "\n")
    _common.saved(args.out / "accuracies.json")


def read_history(path) -> dict:
    """{net key: {"accuracy", "how"}} from an accuracies.json, or exit saying what is wrong with it."""
    try:
        known = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: --history {path}: {e}")
    for key, entry in known.items():
        if key not in NETS or not isinstance(entry, dict) or not {"accuracy", "how"} <= set(entry):
            sys.exit(f"error: --history {path}: expected entries {{net: {{'accuracy': ..., 'how': ...}}}} for nets "
                     f"among {', '.join(NETS)}; got {key!r}: {entry!r}")
    return known


def classifier(key, init="default"):
    """The net ``key`` of NETS, built with seed 0 (the probe: the encoder, Flatten and Dense(392, 10))."""
    backend.seed(0)
    if key == "ae_probe":
        rng = np.random.default_rng(0)
        return Sequential(models.conv_encoder_layers(rng) + [layers.Flatten(), layers.Dense(8 * 7 * 7, 10, rng=rng)],
                          input_shape=(1, 28, 28))
    return NETS[key][1](seed=0, init=init)


def multiply_adds(model) -> int:
    """Multiply-adds for one image: the sum of the layers' ``macs(input_shape)`` (what summary() totals)."""
    return sum(layer.macs(shape) for layer, shape in shapes_in(model) if hasattr(layer, "macs"))


def train_classifier(model, label, train, test, epochs, batch):
    """Train with Adam, data order seed 0; (test accuracy, how obtained)."""
    print(f"\n{label}: {model.num_params():,} parameters, training {steps_of(len(train), epochs, batch)}, Adam lr {LR}")
    model.fit(train, epochs=epochs, batch_size=batch, verbose=2, seed=0, optimizer=optim.Adam(model, lr=LR))
    accuracy = model.evaluate(test)["accuracy"]
    print(f"{label}: test accuracy {accuracy:.4f}")
    return accuracy, (f"{steps_of(len(train), epochs, batch)}, Adam lr {LR}, seed 0; "
                      f"{len(test):,} test images")


def unit_images(ds):
    """The images of ``ds`` as float32 in [0, 1], the autoencoder's inputs and targets."""
    return ds.images.astype(np.float32) / 255


def train_probe(train, test, epochs, batch):
    """Train the autoencoder on reconstruction (binary cross-entropy of the logits against the pixels in [0, 1],
    Adam), freeze its encoder (its features are computed once: gpucnn has no frozen layers), train
    Flatten + Dense(392, 10) on them, standardised per channel (an affine map: the probe stays linear; on the
    raw codes, mean 4.6 and sd 3, the full CPU run's probe ended at 0.66 test accuracy instead of 0.78);
    (the classifier: encoder + probe, test accuracy, how obtained)."""
    backend.seed(0)
    rng = np.random.default_rng(0)
    ae = models.conv_autoencoder(seed=rng)            # its first 6 layers are the encoder
    encoder = ae.layers[:6]
    print(f"\nautoencoder: {ae.num_params():,} parameters, training {steps_of(len(train), epochs, batch)} on "
          f"reconstruction (binary cross-entropy from logits), Adam lr {LR}, no labels")
    pixels = ArrayDataset(unit_images(train), train.labels, train.num_classes)
    loss, opt = losses.BinaryCrossEntropy(from_logits=True), optim.Adam(ae, lr=LR)
    for epoch in range(epochs):
        total = 0.0
        for xb, _ in pixels.batches(batch, seed=0, epoch=epoch):
            x = xb.copy()                     # the batch buffer is reused by the next batch
            total += float(ae.train_step(x, x, loss, opt)) * len(x)
        print(f"autoencoder epoch {epoch + 1}/{epochs}: reconstruction loss {total / len(pixels):.4f}")

    def features(ds):                         # the frozen encoder's codes (N, 8, 7, 7)
        return ArrayDataset(viz.features(ae, unit_images(ds), upto=len(encoder)), ds.labels, ds.num_classes)
    codes = features(train)
    probe = Sequential([layers.Flatten(), layers.Dense(int(np.prod(codes.shape)), train.num_classes, rng=rng)],
                       input_shape=codes.shape)
    print(f"linear probe: {probe.num_params():,} parameters on the encoder's {codes.shape} codes, training "
          f"{steps_of(len(codes), PROBE_EPOCHS, batch)}, Adam lr {LR}")
    probe.fit(codes, epochs=PROBE_EPOCHS, batch_size=batch, verbose=2, seed=0, optimizer=optim.Adam(probe, lr=LR))
    accuracy = probe.evaluate(features(test))["accuracy"]
    model = Sequential(encoder + probe.layers, input_shape=(1, 28, 28))      # what is counted: encoder + probe
    print(f"encoder + linear probe: test accuracy {accuracy:.4f}")
    how = (f"autoencoder {steps_of(len(train), epochs, batch)}; probe {PROBE_EPOCHS} epochs "
           f"= {PROBE_EPOCHS * math.ceil(len(train) / batch)} steps of {batch}; Adam lr {LR}, seed 0; "
           f"{len(test):,} test images")
    return model, accuracy, how


def plot_chart(rows, path):
    """Accuracy against multiply-adds (log scale), blob area proportional to parameters, each net labelled,
    the caption saying how each accuracy was obtained."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    area = 4000 / max(r["params"] for r in rows.values())          # points^2 per parameter
    for i, (key, r) in enumerate(rows.items()):
        x, y = r["macs"], 100 * r["accuracy"]
        ax.scatter([x], [y], s=r["params"] * area, alpha=0.45, color=f"C{i}", edgecolor="k", linewidth=0.5)
        ax.plot([x], [y], "k.", markersize=3)
        dx, dy = NETS[key][2]
        ax.annotate(f"{textwrap.fill(r['label'], 28)}\n{r['params']:,} params", (x, y), xytext=(dx, dy), textcoords="offset points",
                    ha="left" if dx >= 0 else "right", va="bottom" if dy >= 0 else "top", fontsize=8,
                    arrowprops={"arrowstyle": "-", "linewidth": 0.5})
    for n in (10_000, 100_000, 1_000_000):
        ax.scatter([], [], s=n * area, color="0.7", edgecolor="k", linewidth=0.5, label=f"{n:,} parameters")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), labelspacing=2.5, borderpad=1.5, handletextpad=2.0, fontsize=8,
              title="blob area")
    ax.set_xscale("log")
    macs = [r["macs"] for r in rows.values()]
    ax.set_xlim(min(macs) / 10, max(macs) * 4)          # room on the left for the labels written there
    accs = [100 * r["accuracy"] for r in rows.values()]
    ax.set_ylim(max(0.0, min(accs) - 8), min(100.0, max(accs) + 6))
    ax.set_xlabel("multiply-adds per image (log scale)")
    ax.set_ylabel("top-1 test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Top-1 accuracy vs operations on Fashion-MNIST, blob area proportional to parameters")
    caption = "\n".join(f"{r['label']}: {r['how']}" for r in rows.values())
    fig.text(0.01, 0.0, caption, fontsize=7, va="bottom", ha="left", wrap=True)
    fig.get_layout_engine().set(rect=(0, 0.12, 1, 0.88))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
