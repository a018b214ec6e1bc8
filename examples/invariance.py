"""CNNs are not invariant to translation, rotation or scale; pooling helps, locally.

Test images are shifted, rotated and scaled, and we watch the prediction (accuracy and the probability of
the true class, over many images) and the feature maps change. A convolution is *equivariant* to shifts:
the maps of a shifted image are the shifted maps (up to the border). They are not *invariant*: compared
in place, the maps of a shifted image differ. Each max pooling makes the maps coarser, so a shift of a
pixel or two changes pooled maps less, and the last hidden layer least; large shifts, rotations and
scalings change everything, and the prediction with it. Hence data augmentation and preprocessing.

Pass --model PATH (e.g. runs/examples/train_lenet5/model.npz); otherwise a small LeNet-5 is trained now.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

import gpucnn
from gpucnn import layers as L, viz

SHIFTS = list(range(-8, 9))
ANGLES = list(range(-90, 91, 15))
SCALES = [round(s, 2) for s in np.arange(0.5, 1.51, 0.1)]


def options(parser):
    _common.add_model_option(parser)


def warp(images, angle=0.0, scale=1.0, shift=(0.0, 0.0)):
    """Images (N, C, H, W) rotated by ``angle`` degrees (anticlockwise) and scaled by ``scale`` about their
    centre, then shifted by ``shift`` = (down, right) pixels; bilinear, zeros outside. float32."""
    N, C, H, W = images.shape
    cy, cx = (H - 1) / 2, (W - 1) / 2
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    # each output pixel samples the input where the inverse transform sends it
    y, x = (yy - shift[0] - cy) / scale, (xx - shift[1] - cx) / scale
    t = np.deg2rad(angle)
    ys = np.cos(t) * y - np.sin(t) * x + cy
    xs = np.sin(t) * y + np.cos(t) * x + cx
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    src = images.astype(np.float32)
    out = np.zeros((N, C, H, W), np.float32)
    for dy, dx, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        r, c = y0 + dy, x0 + dx
        inside = (r >= 0) & (r < H) & (c >= 0) & (c < W)
        out += np.where(inside, src[:, :, np.clip(r, 0, H - 1), np.clip(c, 0, W - 1)] * weight.astype(np.float32), 0)
    return out


def representations(model):
    """(name, number of layers to run) for each conv layer's maps (after its activation), each pooling's
    output and the last hidden layer."""
    points, convs, pools = [], 0, 0
    layers = model.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, L.Conv2D):
            convs += 1
            follows = i + 1 < len(layers) and isinstance(layers[i + 1], (L.ReLU, L.Tanh, L.LeakyReLU, L.Sigmoid))
            points.append((f"conv{convs}", i + 2 if follows else i + 1))
        elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
            pools += 1
            points.append((f"pool{pools}", i + 1))
    dense = [i for i, layer in enumerate(layers) if isinstance(layer, L.Dense)]
    if dense:
        points.append(("last hidden", dense[-1]))
    return points


def cosine(a, b):
    """Mean over images of the cosine similarity of their flattened features."""
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def main():
    args = _common.setup("invariance", __doc__, options)
    train, test = _common.fashion_mnist()
    model = _common.small_lenet5(args, train, test)
    n = 200 if args.quick else 2000
    images, labels = test.images[:n].astype(np.float32), test.labels[:n]
    classes = test.classes

    def score(batch):
        p = gpucnn.to_numpy(model.predict_proba(batch))
        return float(np.mean(p.argmax(1) == labels)), float(np.mean(p[np.arange(len(p)), labels]))

    curves = {}
    for kind, values, make in (("shift", SHIFTS, lambda v: dict(shift=(0, v))),
                               ("rotation", ANGLES, lambda v: dict(angle=v)),
                               ("scale", SCALES, lambda v: dict(scale=v))):
        curves[kind] = [score(warp(images, **make(v))) for v in values]
        row = ", ".join(f"{v}: {acc:.2f}" for v, (acc, _) in zip(values, curves[kind]))
        print(f"accuracy under {kind} ({n} test images): {row}")

    print("\nfeature maps of images shifted right by d pixels, compared with the original's (cosine similarity):")
    points = representations(model)
    base = {name: viz.features(model, images, upto) for name, upto in points}
    shifts = list(range(0, 9))
    similarity = {name: [] for name, _ in points}
    for d in shifts:
        moved = warp(images, shift=(0, d))
        for name, upto in points:
            similarity[name].append(cosine(base[name], viz.features(model, moved, upto)))
    for name, _ in points:
        print(f"{name:>12}: " + ", ".join(f"d={d} {s:.3f}" for d, s in zip(shifts, similarity[name])))
    conv1 = next(upto for name, upto in points if name == "conv1")
    first_conv = next(layer for layer in model.layers if isinstance(layer, L.Conv2D))
    equivariance = []
    for d in shifts:
        moved_maps = viz.features(model, warp(images, shift=(0, d)), conv1)
        W, b = moved_maps.shape[-1], first_conv.padding[1]    # b: the columns whose window reaches the padding
        equivariance.append(cosine(moved_maps[..., d + b:W - b], base["conv1"][..., b:W - d - b]))
    print("conv1 maps of the shifted image against the original's maps shifted the same way (equivariance, "
          "borders left out): " + ", ".join(f"d={d} {s:.3f}" for d, s in zip(shifts, equivariance)))

    fig = picture_predictions(model, images, labels, classes, curves, n)
    fig.savefig(args.out / "invariance.png", dpi=110)
    _common.saved(args.out / "invariance.png")
    fig = picture_features(model, images, points, shifts, similarity, equivariance)
    fig.savefig(args.out / "invariance_features.png", dpi=110)
    _common.saved(args.out / "invariance_features.png")


def picture_predictions(model, images, labels, classes, curves, n):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 7), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.15, 1])
    k = 0
    demos = [("shift", [-6, -3, 0, 3, 6], lambda v: dict(shift=(0, v)), "{:+d} px"),
             ("rotation", [-60, -30, 0, 30, 60], lambda v: dict(angle=v), "{:+d}\u00b0"),
             ("scale", [0.6, 0.8, 1.0, 1.2, 1.4], lambda v: dict(scale=v), "x{:.1f}")]
    axes = left.subplots(3, 5)
    for r, (kind, values, make, fmt) in enumerate(demos):
        batch = np.concatenate([warp(images[k:k + 1], **make(v)) for v in values])
        p = gpucnn.to_numpy(model.predict_proba(batch))
        for c, v in enumerate(values):
            ax = axes[r, c]
            ax.imshow(batch[c, 0], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            guess = int(p[c].argmax())
            ax.set_title(f"{kind} {fmt.format(v)}\n{classes[guess]} ({p[c, guess]:.2f})", fontsize=8,
                         color="tab:green" if guess == labels[k] else "tab:red")
    left.suptitle(f"test image {k} ({classes[labels[k]]}) transformed, with the prediction\n"
                  "(green: right, red: wrong; its probability in brackets)", fontsize=10)

    axes = right.subplots(3, 1)
    for ax, (kind, values, label) in zip(axes, (("shift", SHIFTS, "horizontal shift (pixels)"),
                                                 ("rotation", ANGLES, "rotation (degrees)"),
                                                 ("scale", SCALES, "scale factor"))):
        acc = [a for a, _ in curves[kind]]
        ptrue = [p for _, p in curves[kind]]
        ax.plot(values, acc, "o-", label="accuracy", markersize=4)
        ax.plot(values, ptrue, "s--", label="mean probability of the true class", markersize=3)
        ax.axvline(1.0 if kind == "scale" else 0.0, color="0.6", lw=0.8)
        ax.set_ylim(0, 1)
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    right.suptitle(f"over {n} test images: only the untransformed images are recognised well", fontsize=10)
    return fig


def picture_features(model, images, points, shifts, similarity, equivariance):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 6.5), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1.3, 1])
    k, show = 0, [0, 2, 4]
    maps = [(name, upto) for name, upto in points if name != "last hidden"]
    axes = left.subplots(len(show), 1 + len(maps), squeeze=False)
    base = {name: viz.features(model, images[k], upto) for name, upto in maps}
    # for each representation, the map that answers most to this image
    pick = {name: int(np.argmax(base[name].reshape(base[name].shape[0], -1).max(1))) for name, _ in maps}
    for r, d in enumerate(show):
        moved = warp(images[k:k + 1], shift=(0, d))
        axes[r, 0].imshow(moved[0, 0], cmap="gray", vmin=0, vmax=255)
        axes[r, 0].set_ylabel(f"shift {d} px", fontsize=9)
        axes[r, 0].set_title("input" if r == 0 else "", fontsize=9)
        for c, (name, upto) in enumerate(maps, start=1):
            m = viz.features(model, moved[0], upto)[pick[name]]
            vmax = float(base[name][pick[name]].max()) or 1.0
            signed = float(m.min()) < 0
            axes[r, c].imshow(m, cmap="RdBu_r" if signed else "gray", vmin=-vmax if signed else 0, vmax=vmax)
            if r == 0:
                axes[r, c].set_title(f"{name}, map {pick[name]}\n{m.shape[0]}x{m.shape[1]}", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    left.suptitle("one feature map per layer as the input moves right: the maps move with it\n"
                  "(equivariance); after pooling a 2-pixel move is a 1-cell move, then half a cell", fontsize=10)

    ax = right.subplots(1, 1)
    for name, _ in points:
        ax.plot(shifts, similarity[name], "o-", label=name, markersize=4)
    ax.plot(shifts, equivariance, "k--", label="conv1, compared after shifting\nthe original's maps too")
    ax.set_xlabel("shift to the right (pixels)")
    ax.set_ylabel("cosine similarity to the unshifted image's features")
    ax.set_ylim(min(0.0, min(min(v) for v in similarity.values())), 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    right.suptitle("features compared in place: no layer is invariant;\n"
                   "small shifts (1-2 px) change each pooling's output less than the conv maps\n"
                   f"before it, and the last hidden layer least (mean over {len(images)} test images)", fontsize=10)
    return fig


if __name__ == "__main__":
    main()
