"""A convolutional autoencoder on Fashion-MNIST, then a semi-adversarial network in miniature.

Part 1, the autoencoder. An encoder of three convolutions (two of stride 2) squeezes a 1x28x28 image into
8x7x7 = 392 numbers, half the 784 pixels; a decoder of three transposed convolutions (ConvTranspose2D, two of
stride 2) brings them back to 1x28x28 logits. It learns to reproduce its input: the loss is the binary
cross-entropy (BinaryCrossEntropy(from_logits=True)) between the logits and the image scaled to [0, 1], with
Adam. Sequential.fit cannot train it (fit is for classification: it checks integer labels against a
(classes,) output and counts accuracy), so the loop here calls Sequential.train_step with the images as
their own targets.

Part 2, the semi-adversarial network (Mirjalili, Raschka, Namboodiri and Ross, ICB 2018) in miniature. The
paper perturbs face images so that a gender classifier fails while a face matcher still recognises each
face: a convolutional autoencoder (subnetwork I) trained through an auxiliary gender classifier (II) and
an auxiliary matcher (III), both fixed. Here the attribute is "upper-body garment or not" (T-shirt/top,
Pullover, Coat, Shirt against the rest), the classifier a LeNet-5 trained on it, the identity is which
image it is, and the matcher is the nearest neighbour in the features of a LeNet-5 trained on the ten
classes (its convolution part's output, 16x5x5: see matcher_depth). The perturber, a copy of the trained
autoencoder, is trained on

    w_rec   * BCE(perturbed logits, image)                          stay close to the image
  + w_adv   * cross-entropy(classifier(perturbed), 1 - attribute)   the classifier's loss, reversed
  + w_match * MSE(matcher(perturbed), matcher(image))               the same image to the matcher

with w_rec, w_adv, w_match = 1, 1, 20 (--weights; the terms are means over pixels, images and features).
The gradients of the last two flow back through the fixed networks' own backward passes (Sequential.backward
returns dL/d(input)), through their input standardisation and a Sigmoid layer, into the autoencoder's
logits, where they join the first term's; then the autoencoder's backward and one Adam step.

The table compares the original test images, the plain autoencoder's reconstructions and the perturbed
images: the fixed classifier's attribute accuracy, the accuracy of a classifier trained anew on images of
that kind (only this one shows whether the attribute is really hidden: a new classifier may learn the
perturbed images as well as the originals), the matcher's top-1 (the nearest clean test image is the
image's own original) and the reconstruction loss. Writes autoencoder.png (reconstructions beside the
originals), curves.png (training), san_images.png and san_metrics.png.

--quick: 3,000 training images, 2 epochs per network, 500 test images; the full run 20,000, 6 epochs for
the autoencoder and 3 for the rest, 2,000 test images (a few minutes on a CPU).
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

import gpucnn
from gpucnn import backend, data, layers as L, losses, models, optim, viz
from gpucnn.model import Sequential

UPPER_BODY = (0, 2, 4, 6)                # T-shirt/top, Pullover, Coat, Shirt: the attribute to hide
ATTRIBUTE = ["other", "upper-body"]
ROWS = ("fixed attribute classifier accuracy", "attribute classifier trained anew", "matcher top-1",
        "reconstruction loss (BCE)")
COLUMNS = ("original", "reconstructed", "perturbed")


def options(parser):
    parser.add_argument("--limit", type=int, default=None,
                        help="training images for every network (default 20000; 3000 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="autoencoder epochs (default 6; 2 with --quick)")
    parser.add_argument("--san-epochs", type=int, default=None,
                        help="epochs of the perturber and of each LeNet-5 (default 3; 2 with --quick)")
    parser.add_argument("--weights", type=float, nargs=3, default=(1.0, 1.0, 20.0), metavar=("REC", "ADV", "MATCH"),
                        help="w_rec, w_adv, w_match of the perturber's loss (default: %(default)s)")
    parser.add_argument("--test", type=int, default=None,
                        help="test images measured and searched by the matcher (default 2000; 500 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)


def unit(ds):
    """The dataset with its images as float32 in [0, 1]: what the autoencoder reads and reproduces."""
    images = ds.images.astype(np.float32) / np.float32(255)
    return data.ArrayDataset(images, ds.labels, ds.num_classes, ds.classes, ds.name)


def upper_body(labels):
    """The attribute: 1 for an upper-body garment, else 0 (host or device labels)."""
    table = np.isin(np.arange(10), UPPER_BODY).astype(np.int64)
    return table[labels] if isinstance(labels, np.ndarray) else backend.asarray(table)[labels]


def reconstruct(ae, images):
    """(sigmoid of the autoencoder's logits on the host, their BCE against ``images``) for host images in [0, 1]."""
    z = ae.predict(images)
    bce = float(losses.BinaryCrossEntropy().forward(z, gpucnn.asarray(images)))
    return gpucnn.to_numpy(L.Sigmoid().forward(z)), bce


def train_autoencoder(args, train, test_images, epochs):
    """Part 1: the autoencoder trained by train_step (images as their own targets); per-step losses, the test
    BCE before training and after each epoch."""
    ae = models.conv_autoencoder(seed=0)              # encoder (its first 6 layers), then decoder
    encoder = Sequential(ae.layers[:6], input_shape=train.shape)
    ae.summary()
    code = encoder.output_shape
    print(f"bottleneck: {code[0]}x{code[1]}x{code[2]} = {int(np.prod(code))} numbers of "
          f"{int(np.prod(train.shape))} pixels")
    bce, opt = losses.BinaryCrossEntropy(from_logits=True), optim.Adam(ae, lr=2e-3)
    curve = {"steps": [], "test": [reconstruct(ae, test_images)[1]]}
    print(f"autoencoder epoch 0/{epochs}: test BCE {curve['test'][0]:.4f} (untrained)")
    for epoch in range(epochs):
        n0 = len(curve["steps"])
        for xb, _ in train.batches(args.batch_size, shuffle=True, seed=0, epoch=epoch):
            curve["steps"].append(float(ae.train_step(xb, xb, bce, opt)))      # the image is its own target
        curve["test"].append(reconstruct(ae, test_images)[1])
        print(f"autoencoder epoch {epoch + 1}/{epochs}: train BCE {np.mean(curve['steps'][n0:]):.4f}, "
              f"test BCE {curve['test'][-1]:.4f}")
    return ae, curve


def lenet(train, epochs, seed, what):
    """A LeNet-5 (tanh, average pooling) trained on ``train`` with SGD; says its training accuracy."""
    model = models.lenet5(num_classes=train.num_classes, seed=seed)
    history = model.fit(train, epochs=epochs, batch_size=64, verbose=0,
                        optimizer=optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4))
    print(f"{what}: LeNet-5 trained on {len(train)} images for {epochs} epoch{'s' if epochs > 1 else ''}, "
          f"training accuracy {history['accuracy'][-1]:.3f}")
    return model


def matcher_depth(matcher) -> int:
    """How many of the matcher's layers make its features: all before Flatten, LeNet-5's feature extractor
    (16x5x5 = 400 numbers). Its penultimate layer, trained to tell ten classes apart, keeps less of what tells
    one shirt from another: the nearest neighbours of reconstructions are their originals less often there."""
    return next(i for i, layer in enumerate(matcher.layers) if isinstance(layer, L.Flatten))


def nearest_original(matcher, queries, originals):
    """The matcher's answer: for each query, the index of the original nearest to it (Euclidean) in the
    matcher's features."""
    upto = matcher_depth(matcher)
    f, g = (viz.features(matcher, x, upto).reshape(len(x), -1).astype(np.float64) for x in (queries, originals))
    return np.argmin((g * g).sum(1)[None, :] - 2.0 * (f @ g.T), axis=1)     # |f - g|^2 less |f|^2, the same per row


def input_grad(model, net, g):
    """dL/d(raw input) of ``model``, whose first layers ``net`` ran last on ``model.prepare(input)``: ``net``'s
    backward gives dL/d(prepared input), and prepare's (x - mean) / std contributes 1/std."""
    return net.backward(g) * np.float32(1.0 / float(model.input_std[0]))


def san_step(perturber, opt, xb, attr, classifier, matcher, head, weights):
    """One step of the perturber on a batch: the three losses, their gradient (through the fixed networks into
    the autoencoder's logits), backward, Adam. Returns the three loss values and the fixed classifier's hits."""
    w_rec, w_adv, w_match = weights
    z = perturber.forward(xb, training=True)
    rec = losses.BinaryCrossEntropy(from_logits=True)
    l_rec = float(rec.forward(z, xb))
    g_z = rec.backward() * np.float32(w_rec)
    sigmoid = L.Sigmoid()
    p = sigmoid.forward(z)                                      # the perturbed images, in [0, 1]
    target = head.forward(matcher.prepare(xb), training=False).copy()      # the original's features first
    match = losses.MSE()
    l_match = float(match.forward(head.forward(matcher.prepare(p), training=False), target))
    g_p = input_grad(matcher, head, match.backward()) * np.float32(w_match)
    logits = classifier.forward(classifier.prepare(p), training=False)
    adv = losses.SoftmaxCrossEntropy()
    l_adv = float(adv.forward(logits, 1 - attr))                # the wrong side of the attribute is the target
    g_p += input_grad(classifier, classifier, adv.backward()) * np.float32(w_adv)
    g_z += sigmoid.backward(g_p)
    perturber.backward(g_z)
    opt.step()
    hits = int((logits.argmax(axis=1) == attr).sum())
    return l_rec, l_adv, l_match, hits


def train_perturber(args, ae_path, train, classifier, matcher, epochs):
    """Part 2: a copy of the trained autoencoder trained as the semi-adversarial network's subnetwork I."""
    perturber = Sequential.load(str(ae_path))
    perturber.layers[0].needs_input_grad = False                # nobody needs dL/d(image)
    upto = matcher_depth(matcher)
    head = Sequential(matcher.layers[:upto], matcher.input_shape)      # the matcher's feature extractor
    opt = optim.Adam(perturber, lr=1e-3)
    curve = {k: [] for k in ("rec", "adv", "match", "acc")}
    print(f"perturber: weights w_rec {args.weights[0]:g}, w_adv {args.weights[1]:g}, w_match {args.weights[2]:g}; "
          f"matcher features: the output of layer {upto - 1} ({matcher.layers[upto - 1].name}), "
          f"{int(np.prod(head.output_shape))} numbers")
    for epoch in range(epochs):
        n0, hits, n = len(curve["rec"]), 0, 0
        for xb, yb in train.batches(args.batch_size, shuffle=True, seed=1, epoch=epoch):
            attr = upper_body(yb)
            *values, h = san_step(perturber, opt, xb, attr, classifier, matcher, head, args.weights)
            for k, v in zip(("rec", "adv", "match"), values):
                curve[k].append(v)
            curve["acc"].append(h / len(yb))
            hits, n = hits + h, n + len(yb)
        print(f"perturber epoch {epoch + 1}/{epochs}: BCE {np.mean(curve['rec'][n0:]):.4f}, reversed "
              f"cross-entropy {np.mean(curve['adv'][n0:]):.4f}, matcher MSE {np.mean(curve['match'][n0:]):.5f}, "
              f"fixed classifier accuracy on the batches {hits / n:.3f}")
    return perturber, curve


def main():
    args = _common.setup("conv_autoencoder", __doc__, options)
    limit = args.limit or (3000 if args.quick else 20000)
    ae_epochs = args.epochs or (2 if args.quick else 6)
    epochs = args.san_epochs or (2 if args.quick else 3)
    n_eval = args.test or (500 if args.quick else 2000)
    train_raw, test_raw = _common.fashion_mnist()
    train, test = unit(train_raw.limit(limit)), unit(test_raw.limit(n_eval))
    classes = train.classes or [str(k) for k in range(train.num_classes)]
    backend.seed(0)

    # ---------------------------------------------------------------- part 1: the autoencoder
    ae, ae_curve = train_autoencoder(args, train, test.images, ae_epochs)
    floor = float(losses.BinaryCrossEntropy(from_logits=False).forward(*[gpucnn.asarray(test.images)] * 2))
    print(f"BCE of the test images against themselves (the floor no reconstruction can beat): {floor:.4f}")
    ae.save(str(args.out / "autoencoder.npz"))
    _common.saved(args.out / "autoencoder.npz")
    recon = reconstruct(ae, test.images)[0]
    show = [int(np.flatnonzero(test.labels == k)[0]) for k in range(10) if (test.labels == k).any()]
    picture_reconstructions(test.images[show], recon[show], [classes[test.labels[i]] for i in show],
                            ae_curve["test"][-1]).savefig(args.out / "autoencoder.png", dpi=110)
    _common.saved(args.out / "autoencoder.png")

    # ---------------------------------------------------------------- part 2: the semi-adversarial network
    matcher = lenet(train, epochs, 1, "matcher (ten classes)")
    attr_train = data.ArrayDataset(train.images, upper_body(train.labels), 2, ATTRIBUTE)
    classifier = lenet(attr_train, epochs, 2, "attribute classifier (upper-body garment or not)")
    perturber, san_curve = train_perturber(args, args.out / "autoencoder.npz", train, classifier, matcher, epochs)

    attr_test = upper_body(test.labels)
    nets = {"original": None, "reconstructed": ae, "perturbed": perturber}
    table, seen = {row: {} for row in ROWS}, {}
    for col, net in nets.items():
        images, bce = (test.images, floor) if net is None else reconstruct(net, test.images)
        seen[col] = images
        table[ROWS[0]][col] = classifier.evaluate((images, attr_test))["accuracy"]
        anew = classifier if net is None else lenet(
            data.ArrayDataset(reconstruct(net, train.images)[0], attr_train.labels, 2, ATTRIBUTE), epochs, 2,
            f"attribute classifier trained anew on {col} images")
        table[ROWS[1]][col] = anew.evaluate((images, attr_test))["accuracy"]
        table[ROWS[2]][col] = float(np.mean(nearest_original(matcher, images, test.images) == np.arange(len(images))))
        table[ROWS[3]][col] = bce
    recon, perturbed = seen["reconstructed"], seen["perturbed"]
    print(f"\nsemi-adversarial network on {len(test)} test images ({int(attr_test.sum())} upper-body garments):")
    print(f"{'':<38}" + "".join(f"{c:>15}" for c in COLUMNS))
    for row in ROWS:
        print(f"{row:<38}" + "".join(f"{table[row][c]:>15.4f}" for c in COLUMNS))
    print("(the original column: the classifier trained anew is the fixed one, which was trained on originals; "
          "the matcher finds each original itself; the BCE is the floor)")
    change = np.abs(perturbed - recon).mean()
    print(f"mean |perturbed - reconstructed| per pixel: {change:.4f} (pixels in [0, 1])")

    p_upper = gpucnn.to_numpy(classifier.predict_proba(np.concatenate([test.images[show], recon[show],
                                                                        perturbed[show]])))[:, 1]
    found = nearest_original(matcher, perturbed[show], test.images) == show
    picture_san(test.images[show], recon[show], perturbed[show], p_upper.reshape(3, -1), found,
                attr_test[show]).savefig(args.out / "san_images.png", dpi=110)
    _common.saved(args.out / "san_images.png")
    picture_metrics(table, args.weights).savefig(args.out / "san_metrics.png", dpi=110)
    _common.saved(args.out / "san_metrics.png")
    picture_curves(ae_curve, san_curve, floor, len(train), args.batch_size).savefig(args.out / "curves.png", dpi=110)
    _common.saved(args.out / "curves.png")


# ---------------------------------------------------------------------------------------------- pictures

def _image(ax, img, title=None, color="black"):
    """One (1, H, W) image in [0, 1], grey, without ticks."""
    ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, color=color)


def picture_reconstructions(originals, recon, names, test_bce):
    """autoencoder.png: test images (one per class) above their reconstructions."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.3 * len(originals) + 0.8, 3.4), layout="constrained")
    axes = fig.subplots(2, len(originals), squeeze=False)
    for j in range(len(originals)):
        _image(axes[0, j], originals[j], names[j])
        _image(axes[1, j], recon[j])
    axes[0, 0].set_ylabel("original", fontsize=9)
    axes[1, 0].set_ylabel("reconstructed", fontsize=9)
    fig.suptitle(f"the autoencoder's reconstructions from 8x7x7 = 392 numbers (test BCE {test_bce:.4f})", fontsize=10)
    return fig


def picture_san(originals, recon, perturbed, p_upper, matched, attr):
    """san_images.png: originals, reconstructions, perturbed images and the perturbation, with what the fixed
    classifier and the matcher make of them."""
    from matplotlib.figure import Figure

    n = len(originals)
    fig = Figure(figsize=(1.3 * n + 0.8, 6.2), layout="constrained")
    axes = fig.subplots(4, n, squeeze=False)
    for j in range(n):
        for r, imgs in enumerate((originals, recon, perturbed)):
            right = (p_upper[r, j] > 0.5) == bool(attr[j])
            note = "\nmatched" if r == 2 and matched[j] else ("\nNOT matched" if r == 2 else "")
            _image(axes[r, j], imgs[j], f"P(upper) {p_upper[r, j]:.2f}{note}",
                   "tab:green" if right else "tab:red")
        d = perturbed[j, 0] - recon[j, 0]
        axes[3, j].imshow(d, cmap="RdBu_r", vmin=-0.5, vmax=0.5)
        axes[3, j].set_xticks([])
        axes[3, j].set_yticks([])
    for r, name in enumerate(("original", "reconstructed", "perturbed", "perturbed -\nreconstructed")):
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle("semi-adversarial perturbation: the fixed classifier's P(upper-body garment) (green: right, red: "
                 "wrong) and whether the matcher\nfinds the original; last row: what the perturbation changed "
                 "(red brighter, blue darker, range +-0.5)", fontsize=10)
    return fig


def picture_metrics(table, weights):
    """san_metrics.png: the table's four rows as bars."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2), layout="constrained")
    axes = fig.subplots(1, len(ROWS))
    for ax, row in zip(axes, ROWS):
        values = [table[row][c] for c in COLUMNS]
        ax.bar(COLUMNS, values, color=["0.55", "tab:blue", "tab:red"])
        for k, v in enumerate(values):
            ax.text(k, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(row, fontsize=9)
        ax.set_ylim(0, 1.05 if "BCE" not in row else max(values) * 1.25)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"test images: original, autoencoded, perturbed (weights rec {weights[0]:g}, adv {weights[1]:g}, "
                 f"match {weights[2]:g})", fontsize=10)
    return fig


def picture_curves(ae_curve, san_curve, floor, n_train, batch_size):
    """curves.png: the autoencoder's loss per batch and per epoch, then the perturber's three terms per batch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    per_epoch = -(-n_train // batch_size)
    ax1.plot(np.arange(1, len(ae_curve["steps"]) + 1) / per_epoch, ae_curve["steps"], lw=0.6, label="train (batches)")
    ax1.plot(np.arange(len(ae_curve["test"])), ae_curve["test"], "o-", label="test")
    ax1.axhline(floor, color="0.4", ls="--", lw=0.8, label="floor (BCE of the images with themselves)")
    ax1.set_ylim(floor - 0.02, max(ae_curve["test"][1:] + [floor + 0.1]) + 0.05)
    ax1.set_title("autoencoder: reconstruction BCE", fontsize=10)
    steps = np.arange(1, len(san_curve["rec"]) + 1) / per_epoch
    ax2.plot(steps, san_curve["adv"], lw=0.6, color="tab:red", label="reversed cross-entropy")
    ax2.plot(steps, san_curve["acc"], lw=0.6, color="tab:purple", label="fixed classifier's accuracy")
    ax2.set_title("perturber: the attribute classifier", fontsize=10)
    ax3.plot(steps, san_curve["rec"], lw=0.6, label="BCE to the original")
    ax3.plot(steps, np.array(san_curve["match"]) * 10, lw=0.6, color="tab:green", label="matcher MSE x 10")
    ax3.set_title("perturber: reconstruction and matcher", fontsize=10)
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
