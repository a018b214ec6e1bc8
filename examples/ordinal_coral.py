"""Ordinal regression with CORAL: the lecture's Table 1 (Cao, Mirjalili and Raschka, 2020) in miniature.

The paper predicts a person's age from a photo. Ages are ordered labels: guessing 31 for a 30-year-old is a
small mistake, guessing 60 a large one, but softmax cross-entropy treats every wrong class alike. CORAL turns
K ordered ranks into K-1 binary tasks "is the rank above k?" that share one weight vector (a bias each), so the
predicted probabilities P(rank > k) fall as k grows (rank consistency) and the rank is the number of tasks
that say yes. Its Table 1 compares a CNN trained with cross-entropy (CE-CNN) against the same CNN with a CORAL
head (CORAL-CNN): mean absolute error and root mean squared error of the predicted rank, for three random
seeds, and their average +- standard deviation.

Here the task is offline and small: every Fashion-MNIST image is turned by one of K = 12 evenly spaced angles
under 180 degrees (0, 15, ..., 165), and the angle's rank is the label. Larger turns make items look alike
(a shirt turned by 165 degrees is nearly one turned by 180, i.e. upside down), so neighbouring ranks are easy
to confuse and far ranks should not be. The same small CNN is trained twice per seed:

    CE-CNN:    conv 8 -> pool -> conv 16 -> pool -> dense 64 -> Dense(64, 12) + SoftmaxCrossEntropy (argmax)
    CORAL-CNN: conv 8 -> pool -> conv 16 -> pool -> dense 64 -> CoralHead(64, 12) + CoralLoss (coral_predict)

with the same trunk weights at the start, the same data order and Adam. The rotation is invariance.py's
``warp`` (vectorised NumPy, bilinear, zeros outside), imported rather than copied: gpucnn.data has no
rotation (its augmentation is crops and flips) and scipy is not a dependency. The angle of each image is drawn
once (seed 0) and is the same for every seed; a seed sets the initial weights and the data order.

Prints the table, the chance level (always answering the median rank), CORAL's MAE as
``evaluate(loss=CoralLoss())`` reports it, and how often CORAL's probabilities P(rank > k) are non-increasing
in k on the test set. Writes rotations.png (three test items at each angle), curves.png (training loss, validation
MAE and accuracy per epoch) and mae_per_rank.png (MAE per true rank, and the distribution of rank errors).
The full run trains 8 epochs on 30,000 images per model (about a minute of CPU time a model); --quick trains
4 epochs on 600.

What one full run on the CPU gave (three seeds; test MAE / RMSE in ranks, AVG +- SD): CE-CNN 0.167 +- 0.005 /
0.978 +- 0.008, CORAL-CNN 0.656 +- 0.050 / 1.115 +- 0.040, chance 2.957 / 3.447. Unlike the paper's ages, here
cross-entropy wins on both: the labels are exact, and each angle is a look of its own that a classifier learns
well. The errors differ as the paper argues, though: CE-CNN's mistakes cluster 6 ranks off (a quarter turn) and
reach 11 (items that look the same upside down), which is why its RMSE is close to CORAL-CNN's; CORAL-CNN's fall
off steadily with the distance (mae_per_rank.png, right). Its one weight vector shared by every task passes the
trunk a gradient along one direction, and it learns more slowly: its validation MAE was still falling after 8
epochs. Its probabilities were rank-consistent on every test image (its biases stayed ordered).
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

import gpucnn
from gpucnn import layers as L, optim
from gpucnn.data import ArrayDataset
from gpucnn.kernels.coral import coral_probabilities
from gpucnn.losses import CoralLoss, SoftmaxCrossEntropy, coral_predict
from gpucnn.model import Sequential
from invariance import warp

K = 12
ANGLES = [15 * k for k in range(K)]          # rank k = a turn of 15 k degrees, anticlockwise
SEEDS = (0, 1, 2)
METHODS = ("CE-CNN", "CORAL-CNN")


def options(parser):
    parser.add_argument("--epochs", type=int, default=None, help="default 8 (4 with --quick)")
    parser.add_argument("--limit", type=int, default=None,
                        help="training images (default 30000; 600 with --quick); validation and test take a "
                             "sixth and a fifth of it")


def rotated(images, rng):
    """Each image turned by a random one of the K angles: (uint8 images, ranks)."""
    ranks = rng.integers(0, K, len(images))
    out = np.empty_like(images)
    for k in range(K):
        pick = ranks == k
        out[pick] = np.clip(np.rint(warp(images[pick], angle=ANGLES[k])), 0, 255).astype(np.uint8)
    return out, ranks


def make_cnn(method, seed):
    """The small CNN, its trunk drawn from ``seed`` (the same for both methods), with the method's head."""
    rng = np.random.default_rng(seed)
    trunk = [L.Conv2D(1, 8, 5, padding=2, rng=rng), L.ReLU(), L.MaxPool2D(2),
             L.Conv2D(8, 16, 5, rng=rng), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(16 * 5 * 5, 64, rng=rng),
             L.ReLU()]
    head = L.Dense(64, K, rng=rng) if method == "CE-CNN" else L.CoralHead(64, K, rng=rng)
    return Sequential(trunk + [head], input_shape=(1, 28, 28))


def ranks_of(method, logits):
    """Predicted ranks: the argmax of the K softmax logits, or how many CORAL tasks say "above"."""
    logits = gpucnn.to_numpy(logits)
    return logits.argmax(axis=1) if method == "CE-CNN" else coral_predict(logits)


def errors(pred, truth):
    """(MAE, RMSE) of predicted ranks."""
    d = (pred - truth).astype(np.float64)
    return float(np.abs(d).mean()), float(np.sqrt((d * d).mean()))


def train(method, seed, train_set, val, epochs, batch_size, lr):
    """Fit one model; returns it and its history, with "val_mae" per epoch added by a callback."""
    model = make_cnn(method, seed)
    loss = SoftmaxCrossEntropy() if method == "CE-CNN" else CoralLoss()
    val_mae = []

    def measure(epoch, history):
        val_mae.append(errors(ranks_of(method, model.predict(val.images)), val.labels)[0])

    history = model.fit(train_set, epochs=epochs, batch_size=batch_size, loss=loss, validation=val, seed=seed,
                        verbose=0, callbacks=[measure], optimizer=optim.Adam(model, lr=lr))
    history["val_mae"] = val_mae
    return model, history


def main():
    args = _common.setup("ordinal_coral", __doc__, options)
    epochs = args.epochs or (4 if args.quick else 8)
    limit = args.limit or (600 if args.quick else 30000)
    batch_size, lr = (32 if args.quick else 128), 3e-3
    fashion, fashion_test = _common.fashion_mnist()
    rng = np.random.default_rng(0)
    n_val, n_test = limit // 6, limit // 5
    images, ranks = rotated(fashion.images[:limit + n_val], rng)
    train_set = ArrayDataset(images[:limit], ranks[:limit], num_classes=K)
    val = ArrayDataset(images[limit:], ranks[limit:], num_classes=K)
    test_images, test_ranks = rotated(fashion_test.images[:n_test], rng)
    test = ArrayDataset(test_images, test_ranks, num_classes=K)
    print(f"task: the rank of the turn (K = {K}: {ANGLES[0]}, {ANGLES[1]}, ..., {ANGLES[-1]} degrees) of Fashion-MNIST "
          f"images; {len(train_set)} training, {len(val)} validation, {len(test)} test images")
    print(f"each model: {epochs} epochs of batch {batch_size}, Adam lr {lr:g}, seeds {list(SEEDS)}")

    results = {m: [] for m in METHODS}        # per seed: (MAE, RMSE)
    histories = {m: [] for m in METHODS}
    per_rank = {m: [] for m in METHODS}       # per seed: MAE for each true rank
    signed = {m: [] for m in METHODS}         # per seed: predicted - true rank, every test image
    for seed in SEEDS:
        for method in METHODS:
            model, history = train(method, seed, train_set, val, epochs, batch_size, lr)
            logits = model.predict(test.images)
            pred = ranks_of(method, logits)
            mae, rmse = errors(pred, test.labels)
            results[method].append((mae, rmse))
            histories[method].append(history)
            per_rank[method].append([np.abs(pred[test.labels == k] - k).mean() for k in range(K)])
            signed[method].append(pred - test.labels)
            print(f"seed {seed} {method:<9}: test MAE {mae:.3f}, RMSE {rmse:.3f}, "
                  f"exact rank {np.mean(pred == test.labels):.3f} ({sum(history['seconds']):.1f}s)")
            if method == "CORAL-CNN":
                report_coral(model, logits, test, mae)

    print_table(results, len(test))
    median = int(np.median(test.labels))      # a constant answer's least MAE (any rank between the middle two)
    mae, rmse = errors(np.full(len(test), median), test.labels)
    print(f"chance level (always the median rank, {median}): MAE {mae:.3f}, RMSE {rmse:.3f}")
    picture_rotations(fashion_test.images[:3], args.out / "rotations.png")
    _common.saved(args.out / "rotations.png")
    picture_curves(histories, args.out / "curves.png")
    _common.saved(args.out / "curves.png")
    picture_errors(per_rank, signed, args.out / "mae_per_rank.png")
    _common.saved(args.out / "mae_per_rank.png")


def report_coral(model, logits, test, mae):
    """evaluate(loss=CoralLoss())'s MAE beside the table's, and how often P(rank > k) is non-increasing in k."""
    got = model.evaluate(test, loss=CoralLoss())
    p = gpucnn.to_numpy(coral_probabilities(logits))
    ordered = np.all(np.diff(p, axis=1) <= 0, axis=1)
    bias = gpucnn.to_numpy(model.layers[-1].params["bias"])
    print(f"    evaluate(loss=CoralLoss()): loss {got['loss']:.4f}, accuracy {got['accuracy']:.4f}, "
          f"mae {got['mae']:.4f} (the table's {mae:.4f})")
    print(f"    rank consistency: P(rank > k) non-increasing in k for {ordered.mean():.1%} of the {len(test)} test "
          f"images; the {K - 1} biases are {'non-increasing' if np.all(np.diff(bias) <= 0) else 'NOT ordered'}")


def print_table(results, n_test):
    """The paper's layout: a row per method, MAE and RMSE per seed, then AVG +- SD (SD with n - 1)."""
    print(f"\nTable 1 in miniature: predicted rank of the turn of {n_test} test images, errors in ranks (1 rank = 15 "
          f"degrees)")
    head = f"{'Method':<11}" + "".join(f"{f'Seed {s}':<16}" for s in SEEDS) + "AVG +- SD"
    sub = f"{'':<11}" + f"{'MAE':<8}{'RMSE':<8}" * len(SEEDS) + f"{'MAE':<17}RMSE"
    print(head)
    print(sub)
    for method in METHODS:
        r = np.array(results[method])
        cells = "".join(f"{mae:<8.3f}{rmse:<8.3f}" for mae, rmse in r)
        avg = f"{r[:, 0].mean():.3f} +- {r[:, 0].std(ddof=1):.3f}".ljust(17) + \
            f"{r[:, 1].mean():.3f} +- {r[:, 1].std(ddof=1):.3f}"
        print(f"{method:<11}{cells}{avg}")
    print()


def picture_rotations(items, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(14, 3.9), layout="constrained")
    axes = fig.subplots(len(items), K)
    for r, item in enumerate(items):
        turned = [warp(item[None], angle=a)[0, 0] for a in ANGLES]
        for k, image in enumerate(turned):
            ax = axes[r, k]
            ax.imshow(image, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"rank {k}\n{ANGLES[k]}\u00b0", fontsize=9)
    fig.suptitle("the task: the label is the rank of the turn; large turns look alike (165\u00b0 is nearly "
                 "upside down), so neighbouring ranks are confused, far ones should not be", fontsize=10)
    fig.savefig(path, dpi=100)


def picture_curves(histories, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    axes = fig.subplots(1, 3)
    panels = [("loss", "training loss (CE: cross-entropy; CORAL: sum of 11 binary cross-entropies)", "log"),
              ("val_mae", "validation MAE (ranks)", "linear"), ("val_accuracy", "validation accuracy (exact rank)",
                                                               "linear")]
    for ax, (key, title, scale) in zip(axes, panels):
        for method, colour in zip(METHODS, ("tab:blue", "tab:orange")):
            runs = np.array([h[key] for h in histories[method]], np.float64)
            epochs = np.arange(1, runs.shape[1] + 1)
            for run in runs:
                ax.plot(epochs, run, color=colour, alpha=0.3, lw=1)
            ax.plot(epochs, runs.mean(axis=0), "o-", color=colour, label=f"{method} (mean of {len(runs)} seeds)",
                    markersize=4)
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle("training curves: thin lines one seed each", fontsize=10)
    fig.savefig(path, dpi=100)


def picture_errors(per_rank, signed, path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(14, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    width = 0.4
    for i, (method, colour) in enumerate(zip(METHODS, ("tab:blue", "tab:orange"))):
        r = np.array(per_rank[method])
        left.bar(np.arange(K) + (i - 0.5) * width, r.mean(axis=0), width, yerr=r.std(axis=0, ddof=1), capsize=2,
                 color=colour, label=f"{method} (mean +- SD over seeds)")
        d = np.concatenate(signed[method])
        values, counts = np.unique(d, return_counts=True)
        right.plot(values, counts / counts.sum(), "o-", color=colour, label=method, markersize=4)
    left.set_xticks(range(K), [f"{k}\n{a}\u00b0" for k, a in enumerate(ANGLES)], fontsize=8)
    left.set_xlabel("true rank (turn)")
    left.set_ylabel("mean |predicted rank - true rank|")
    left.set_title("MAE per true rank", fontsize=10)
    top = max(float(np.max(np.mean(per_rank[m], axis=0) + np.std(per_rank[m], axis=0, ddof=1))) for m in METHODS)
    left.set_ylim(0, top * 1.25)                        # room above the tallest bar for the legend
    right.set_yscale("log")
    right.set_xlabel("predicted rank - true rank")
    right.set_ylabel("fraction of test images (all seeds)")
    right.set_title("how far the mistakes go", fontsize=10)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="upper center", ncols=2)
    right.legend(fontsize=8)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
