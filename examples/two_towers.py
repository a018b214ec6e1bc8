"""AlexNet's two towers (Krizhevsky et al., 2012, figure 3): AlexNet-small with and without groups=2, trained
side by side on Fashion-MNIST.

AlexNet ran on two GPUs: conv2, conv4 and conv5 each saw only their own GPU's half of the channels (a grouped
convolution, groups=2); conv3 and the dense layers saw both. The paper's figure 3 shows the first layer's
kernels tower by tower: the towers had specialised (one colour-agnostic, one colour-specific). conv1 itself
is not grouped, but its maps 0-31 feed only conv2's first group (tower 1) and maps 32-63 only its second
(tower 2), so conv1's kernels fall into two towers all the same. (Fashion-MNIST is grey, so there is no
colour to specialise on: the picture shows what each tower learned, without a claim that they differ.) Both
nets start from the same conv1 kernels (seed 0), so what differs between them at the end, the grouping did.

Prints both nets' layer tables (with multiply-adds), the parameters and multiply-adds the groups save per
layer and in total, a check that the towers are apart (changing conv1's tower-1 maps changes only conv2's
tower-1 maps), each tower's mean DC share (how much of a kernel's energy is its mean: 1 for a flat blob,
0 for an edge detector), and both nets' test accuracy. Writes filters_towers.png (conv1's kernels tower by
tower, both nets), curves.png (loss and test accuracy per epoch, both nets) and accuracies.json, which
architectures.py takes as --history.

Both nets train with Adam (lr 1e-3; with SGD at lr 0.02 AlexNet-small's loss is still 2.29 after 60 steps of
32), seed 0. Full run: the 60,000 training images for 10 epochs on a GPU; on the CPU (AlexNet-small trains
some 110 to 150 images a second on two idle cores) the first 4,000 for 3 epochs in batches of 32, tested on
2,000 (about 4 minutes). --quick: 64 images, 2 epochs.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import json
import math

import numpy as np

from gpucnn import backend, layers, models, optim, viz

NETS = {"alexnet_small": ("AlexNet-small", 1), "alexnet_small_groups2": ("AlexNet-small, groups=2", 2)}
# how much training, (on a GPU, on the CPU, with --quick); None: all
PLAN = {"epochs": (10, 3, 2), "limit": (None, 4000, 64), "test_limit": (None, 2000, 64), "batch_size": (128, 32, 32)}


def options(parser):
    plan_options(parser, PLAN)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default %(default)s)")


def plan_options(parser, plan):
    """--epochs, --limit, --test-limit and --batch-size, saying their defaults from ``plan``."""
    def default(key):
        gpu, cpu, quick = (f"{v}" if v else "all" for v in plan[key])
        return f"(default {gpu} on a GPU, {cpu} on the CPU, {quick} with --quick)"
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs {default('epochs')}")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"train on the first N training images {default('limit')}")
    parser.add_argument("--test-limit", type=int, default=None, help=f"test on the first N test images "
                                                                     f"{default('test_limit')}")
    parser.add_argument("--batch-size", type=int, default=None, help=f"batch size {default('batch_size')}")


def planned(args, plan):
    """(epochs, batch size, training set, test set): the command line's, else ``plan``'s for this device or
    for --quick; the sets are the first images of Fashion-MNIST's."""
    column = 2 if args.quick else 0 if args.device == "cuda" else 1
    value = {key: getattr(args, key) or plan[key][column] for key in plan}
    train, test = _common.fashion_mnist()
    return (value["epochs"], value["batch_size"], train.limit(value["limit"] or len(train)),
            test.limit(value["test_limit"] or len(test)))


def main():
    args = _common.setup("two_towers", __doc__, options)
    epochs, batch, train, test = planned(args, PLAN)

    nets = {}
    for key, (label, groups) in NETS.items():
        backend.seed(0)
        nets[key] = models.alexnet_small(num_classes=train.num_classes, seed=0, groups=groups)
        print(f"\n{label}:")
        nets[key].summary()
    print()
    print_savings(nets["alexnet_small"], nets["alexnet_small_groups2"])

    how = (f"{steps_of(len(train), epochs, batch)} (the first training images), Adam lr {args.lr}, seed 0; "
           f"tested on the first {len(test):,} test images")
    print(f"\ntraining both nets: {how}")
    histories, results = {}, {}
    for key, model in nets.items():
        label = NETS[key][0]
        print(f"{label}:")
        histories[key] = model.fit(train, epochs=epochs, batch_size=batch, validation=test, verbose=2,
                                   optimizer=optim.Adam(model, lr=args.lr))
        results[key] = {"label": label, "accuracy": histories[key]["val_accuracy"][-1], "how": how}
    for key, r in results.items():
        print(f"test accuracy, {r['label']}: {r['accuracy']:.4f} ({len(test):,} test images)")

    for key, model in nets.items():
        changed, total = towers_apart(model, test.images[:8])
        print(f"{NETS[key][0]}: changing conv1's maps 0-31 (tower 1) changes conv2's maps "
              f"{changed.min()}-{changed.max()}, {len(changed)} of {total}")
        w = backend.to_numpy(model.layers[0].params["weight"])
        share = dc_share(w)
        print(f"{NETS[key][0]}: conv1 kernels {tuple(w.shape)}, mean DC share maps 0-31 {share[:32].mean():.3f}, "
              f"maps 32-63 {share[32:].mean():.3f}")

    plot_towers(nets, args.out / "filters_towers.png")
    _common.saved(args.out / "filters_towers.png")
    plot_curves(histories, args.out / "curves.png", how)
    _common.saved(args.out / "curves.png")
    (args.out / "accuracies.json").write_text(json.dumps(results, indent=1) + "\n")
    _common.saved(args.out / "accuracies.json")


def steps_of(n, epochs, batch) -> str:
    """How much training: "2 epochs of 2,000 images = 126 steps of 32"."""
    steps = epochs * math.ceil(n / batch)
    return f"{epochs} epoch{'s' if epochs > 1 else ''} of {n:,} images = {steps} steps of {batch}"


def shapes_in(model):
    """(layer, its input shape) for every layer of a model with its input shape set."""
    shape = model.input_shape
    for layer in model.layers:
        yield layer, shape
        shape = layer.output_shape(shape)


def print_savings(one, two):
    """Per layer with weights: parameters and multiply-adds per image of one tower and of two, and what the
    groups save; then the totals."""
    print(f"{'layer':<24}{'params, 1 tower':>16}{'2 towers':>12}{'saved':>12}{'MACs, 1 tower':>16}"
          f"{'2 towers':>14}{'saved':>14}")
    rows = []
    for i, ((a, shape), b) in enumerate(zip(shapes_in(one), two.layers)):
        if a.num_params():
            rows.append((a.num_params(), b.num_params(), a.macs(shape), b.macs(shape)))
            name = f"{i} {b.describe() if hasattr(b, 'describe') else b.name}"
            print(f"{name:<24}{rows[-1][0]:>16,}{rows[-1][1]:>12,}{rows[-1][0] - rows[-1][1]:>12,}"
                  f"{rows[-1][2]:>16,}{rows[-1][3]:>14,}{rows[-1][2] - rows[-1][3]:>14,}")
    p1, p2, m1, m2 = (sum(col) for col in zip(*rows))
    print(f"{'total':<24}{p1:>16,}{p2:>12,}{p1 - p2:>12,}{m1:>16,}{m2:>14,}{m1 - m2:>14,}")
    print(f"groups=2 saves {p1 - p2:,} parameters ({(p1 - p2) / p1:.1%}) and {m1 - m2:,} multiply-adds per image "
          f"({(m1 - m2) / m1:.1%})")


def towers_apart(model, images):
    """(indices of conv2's output maps that change when conv1's first half of maps (tower 1) changes, conv2's
    number of maps): a grouped conv2 keeps the towers apart, so its second half must not change."""
    convs = [i for i, layer in enumerate(model.layers) if isinstance(layer, layers.Conv2D)]
    conv1, conv2 = model.layers[convs[0]], model.layers[convs[1]]
    h = viz.features(model, images, upto=convs[1])              # conv1's maps after ReLU and pooling
    bumped = h.copy()
    half = conv1.out_channels // 2
    bumped[:, :half] += np.random.default_rng(2).standard_normal(bumped[:, :half].shape).astype(h.dtype)
    out = [backend.to_numpy(conv2.forward(backend.asarray(a), training=False)) for a in (h, bumped)]
    change = np.abs(out[1] - out[0]).max(axis=(0, 2, 3))
    return np.flatnonzero(change > 1e-6 * np.abs(out[0]).max()), conv2.out_channels


def dc_share(w):
    """Per kernel (O, 1, KH, KW): the share of its energy in its mean, (sum w)^2 / (KH*KW * sum w^2)."""
    w = w.reshape(len(w), -1)
    return w.sum(axis=1) ** 2 / (w.shape[1] * (w ** 2).sum(axis=1))


def plot_towers(nets, path):
    """conv1's kernels of each net, tower by tower: a row of panels per tower, one colour scale per net."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    panels = fig.subfigures(2 * len(nets), 1)
    k = 0
    for key, model in reversed(nets.items()):          # the towers first, the one-tower net below
        label, groups = NETS[key]
        w = backend.to_numpy(model.layers[0].params["weight"])
        half = len(w) // 2
        vmax = float(np.abs(w).max())
        for tower, part in enumerate((w[:half], w[half:])):
            first = tower * half
            role = (f"tower {tower + 1}: conv1 kernels {first}-{first + half - 1}, seen only by conv2's group "
                    f"{tower + 1}" if groups == 2 else
                    f"conv1 kernels {first}-{first + half - 1} (no towers: conv2 sees all 64 maps)")
            panel = panels[k]
            panel.suptitle(f"{label} - {role}; mean DC share {dc_share(part).mean():.2f}", fontsize=10)
            axes = panel.subplots(2, math.ceil(half / 2), squeeze=False)
            for ax, kernel in zip(axes.flat, part[:, 0]):
                im = ax.imshow(kernel, cmap=viz.SIGNED_CMAP, vmin=-vmax, vmax=vmax)
                ax.set_xticks([])
                ax.set_yticks([])
            panel.colorbar(im, ax=axes, shrink=0.9, label="weight")
            k += 1
    fig.savefig(path, dpi=100)


def plot_curves(histories, path, how):
    """Training loss and test accuracy per epoch of both nets."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, h in histories.items():
        epochs = range(1, len(h["loss"]) + 1)
        ax_loss.plot(epochs, h["loss"], "o-", label=f"{NETS[key][0]}, training")
        ax_loss.plot(epochs, h["val_loss"], "s--", label=f"{NETS[key][0]}, test")
        ax_acc.plot(epochs, h["val_accuracy"], "o-", label=NETS[key][0])
    for ax, what in ((ax_loss, "loss"), (ax_acc, "test accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(f"AlexNet-small with one tower and with two (groups=2) on Fashion-MNIST\n{how}", fontsize=10)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
