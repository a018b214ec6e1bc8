"""Edge detectors set by hand: what a single convolution kernel responds to.

As in the lecture, a Conv2D's weights are set to the classical vertical edge detector
[[1, 0, -1], [1, 0, -1], [1, 0, -1]] and the horizontal one [[1, 1, 1], [0, 0, 0], [-1, -1, -1]], the bias
to 0, and both are applied to the lecture's 8x11 step image (six columns of zeros, then five of ones)
and to real Fashion-MNIST images. The vertical detector answers only where the step is (the columns
whose 3x3 window straddles it); the horizontal one sees no horizontal edge there and answers 0 everywhere.
A CNN learns such kernels by itself (see what_the_cnn_sees.py).
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

import gpucnn
from gpucnn import layers as L

VERTICAL = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=np.float32)
HORIZONTAL = np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]], dtype=np.float32)


def step_image():
    """The lecture's 8x11 image: zeros in columns 0-5, ones in columns 6-10."""
    t = np.zeros((8, 11), dtype=np.float32)
    t[:, 6:] = 1
    return t


def edge_conv():
    """A Conv2D(1, 2, 3) whose two output maps are the vertical and the horizontal detector."""
    conv = L.Conv2D(1, 2, 3)
    conv.params["weight"][...] = gpucnn.asarray(np.stack([VERTICAL, HORIZONTAL])[:, None])
    conv.params["bias"][...] = 0
    return conv


def main():
    args = _common.setup("edge_detectors", __doc__)
    conv = edge_conv()

    step = step_image()
    out = gpucnn.to_numpy(conv.forward(gpucnn.asarray(step[None, None]), training=False))[0]
    print("\nthe step image (8x11):")
    print(step.astype(int))
    for k, name in enumerate(("vertical", "horizontal")):
        r = out[k]
        cols = sorted({int(c) for c in np.nonzero(r)[1]})
        values = sorted({float(v) for v in r[r != 0]})
        print(f"\n{name} detector's response ({r.shape[0]}x{r.shape[1]}):")
        print(r.astype(int))
        if cols:
            print(f"{name} detector on the step image: nonzero only in output columns {cols} "
                  f"(windows over input columns {cols[0]}..{cols[-1] + 2}, where the step is), values {values}")
        else:
            print(f"{name} detector on the step image: all zero (max |response| {np.abs(r).max():g})")

    train, test = _common.fashion_mnist()
    picks = [5, 0, 1] if args.quick else [5, 0, 1, 2, 3, 13]      # the lecture shows images[5]
    images = test.images[picks].astype(np.float32) / 255
    maps = gpucnn.to_numpy(conv.forward(gpucnn.asarray(images), training=False))
    for i, n in enumerate(picks):
        print(f"test image {n} ({test.classes[test.labels[n]]}): mean |vertical| {np.abs(maps[i, 0]).mean():.3f}, "
              f"mean |horizontal| {np.abs(maps[i, 1]).mean():.3f}")

    fig = picture(step, out, images, maps, [test.classes[test.labels[n]] for n in picks], picks)
    fig.savefig(args.out / "edge_detectors.png", dpi=110)
    _common.saved(args.out / "edge_detectors.png")


def picture(step, step_maps, images, maps, names, picks):
    from matplotlib.figure import Figure

    rows = 2 + len(images)
    fig = Figure(figsize=(9, 2.3 * rows), layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)

    def signed(ax, a, title, v, annotate=False):
        im = ax.imshow(a, cmap="RdBu_r", vmin=-v, vmax=v)
        if annotate:
            for (r, c), x in np.ndenumerate(a):
                ax.text(c, r, f"{x:g}", ha="center", va="center", fontsize=8,
                        color="white" if abs(x) > v / 2 else "black")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.8)

    # row 0: the kernels themselves
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, "the two kernels\n(Conv2D(1, 2, 3) weights,\nbias 0)", ha="center", va="center",
                    fontsize=10, transform=axes[0, 0].transAxes)
    signed(axes[0, 1], VERTICAL, "vertical edge detector", 1.0, annotate=True)
    signed(axes[0, 2], HORIZONTAL, "horizontal edge detector", 1.0, annotate=True)
    # row 1: the step image and its two 6x9 maps, every value written in
    axes[1, 0].imshow(step, cmap="gray", vmin=0, vmax=1)
    axes[1, 0].set_title("the lecture's 8x11 step image", fontsize=9)
    axes[1, 0].set_xticks(range(11))
    axes[1, 0].set_yticks([])
    axes[1, 0].tick_params(labelsize=7)
    v = float(np.abs(step_maps).max())           # one scale for both maps: 0 looks like 0
    signed(axes[1, 1], step_maps[0], "vertical: answers at the step", v, annotate=True)
    signed(axes[1, 2], step_maps[1], "horizontal: 0 everywhere", v, annotate=True)
    for ax in axes[1, 1:]:
        ax.set_xticks(range(step_maps.shape[2]))
        ax.tick_params(labelsize=7)
    # then real images
    for i in range(len(images)):
        ax = axes[2 + i, 0]
        ax.imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"test image {picks[i]}: {names[i]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        v = float(np.abs(maps[i]).max())
        signed(axes[2 + i, 1], maps[i, 0], "vertical edges", v)
        signed(axes[2 + i, 2], maps[i, 1], "horizontal edges", v)
    fig.suptitle("hand-set edge detectors on the step image and on Fashion-MNIST\n"
                 "(red: positive response, blue: negative, white: 0)")
    return fig


if __name__ == "__main__":
    main()
