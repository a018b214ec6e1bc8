"""How big is a convolution's output, and how many parameters does it have?

The lecture's formula for the output width of a convolution (or pooling) with input width W, kernel
width K, padding P and stride S is

    O = (W - K + 2P) / S + 1          (rounded down when S does not divide W - K + 2P)

This example checks it against real forward passes for a sweep of kernels, strides and paddings, then
counts parameters: the lecture's 5x5 conv from 1 to 8 channels on a 28x28 image, a 5x5 conv from 3 to 5
channels (380 parameters) beside a fully connected layer doing the same job on 128x128 images
(4,026,613,760 parameters, counted from the layer's shapes: allocating it would take 16 GB), and the
layer-by-layer tables of LeNet-5 and AlexNet.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

import gpucnn
from gpucnn import layers as L, models


def formula(W, K, S, P):
    return (W - K + 2 * P) // S + 1


def dense_param_shapes(in_features, out_features):
    """The shapes a Dense layer gives its parameters (checked below against a real, small Dense)."""
    return {"weight": (out_features, in_features), "bias": (out_features,)}


def main():
    args = _common.setup("output_size_and_parameters", __doc__)
    rng = np.random.default_rng(0)

    print("\n1. Output size O = (W - K + 2P)/S + 1, against a real Conv2D forward pass")
    sweep = [(28, K, S, P) for K in (3, 5, 7) for S in (1, 2, 3) for P in (0, 1, 2)]
    sweep += [(32, 5, 1, 0), (224, 11, 4, 2), (8, 3, 1, 0)]     # LeNet's first conv, AlexNet's, the lecture's 8x11 step
    table = {}
    for W, K, S, P in sweep:
        conv = L.Conv2D(1, 1, K, stride=S, padding=P, rng=rng)
        x = gpucnn.asarray(rng.standard_normal((1, 1, W, W)), dtype="float32")
        got = tuple(int(s) for s in conv.forward(x, training=False).shape[2:])
        exact = (W - K + 2 * P) / S + 1
        note = "" if exact == int(exact) else f" (rounded down from {exact:.3g})"
        print(f"W={W} K={K} S={S} P={P}: O = ({W} - {K} + 2*{P})/{S} + 1 = {formula(W, K, S, P)}{note}, "
              f"forward pass gives {got[0]}x{got[1]}")
        table[(W, K, S, P)] = got[0]

    print("\n2. The lecture's 5x5 convolution from 1 to 8 channels on a 1x28x28 image")
    conv = L.Conv2D(1, 8, 5, rng=rng)
    y = conv.forward(gpucnn.asarray(rng.standard_normal((1, 1, 28, 28)), dtype="float32"), training=False)
    print(f"Conv2D(1, 8, 5): weight {tuple(conv.params['weight'].shape)}, bias {tuple(conv.params['bias'].shape)}, "
          f"output {y.shape[2]}x{y.shape[3]} (8 maps), {conv.num_params()} parameters")

    print("\n3. Convolution against a fully connected layer, 128x128x3 images to 128x128x5")
    conv = L.Conv2D(3, 5, 5, padding=2, rng=rng)            # "same" padding keeps 128x128
    y = conv.forward(gpucnn.asarray(rng.standard_normal((1, 3, 128, 128)), dtype="float32"), training=False)
    print(f"Conv2D(3, 5, 5, padding=2): 5*5*3*5 + 5 = {conv.num_params()} parameters, "
          f"output {tuple(int(s) for s in y.shape[1:])}")
    small = L.Dense(12, 20, rng=rng)                        # the shapes rule, checked on a layer that fits
    assert {k: tuple(v.shape) for k, v in small.params.items()} == dense_param_shapes(12, 20)
    n_in, n_out = 128 * 128 * 3, 128 * 128 * 5
    shapes = dense_param_shapes(n_in, n_out)
    dense_params = sum(int(np.prod(s)) for s in shapes.values())
    print(f"Dense({n_in}, {n_out}): weight {shapes['weight']}, bias {shapes['bias']}: "
          f"(128*128*3)*(128*128*5) + 128*128*5 = {dense_params:,} parameters "
          f"({dense_params * 4 / 1e9:.1f} GB in float32; counted from the shapes, not allocated)")
    print(f"ratio dense / conv: {dense_params / conv.num_params():,.0f}")

    print("\n4. Layer by layer")
    lenet = models.lenet5()
    lenet.summary()
    alexnet = models.alexnet(init="zeros")                   # zeros: no random numbers, memory never touched
    alexnet.summary()

    fig = picture(table, conv.num_params(), dense_params, lenet, alexnet)
    fig.savefig(args.out / "output_size_and_parameters.png", dpi=110)
    _common.saved(args.out / "output_size_and_parameters.png")


def picture(table, conv_params, dense_params, lenet, alexnet):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 5.2), layout="constrained")
    a1, a2, a3 = fig.subplots(1, 3, width_ratios=[1.05, 0.8, 1.3])

    # (1) the sweep on a 28x28 input: rows kernel sizes, columns (stride, padding)
    Ks, SPs = (3, 5, 7), [(S, P) for S in (1, 2, 3) for P in (0, 1, 2)]
    grid = np.array([[table[(28, K, S, P)] for S, P in SPs] for K in Ks])
    a1.imshow(grid, cmap="Blues", vmin=0, vmax=grid.max() * 1.15)
    for (r, c), v in np.ndenumerate(grid):
        a1.text(c, r, str(v), ha="center", va="center", fontsize=11)
    a1.set_xticks(range(len(SPs)), [f"S={S}\nP={P}" for S, P in SPs], fontsize=8)
    a1.set_yticks(range(len(Ks)), [f"K={K}" for K in Ks])
    a1.set_title("output width O of a 28-wide input\n(every number checked by a forward pass)", fontsize=10)

    # (2) parameter counts, log scale
    names = ["Conv2D 3\u21925\n5x5", "Dense\n49152\u219281920", "LeNet-5\n(all)", "AlexNet\n(all)"]
    counts = [conv_params, dense_params, lenet.num_params(), alexnet.num_params()]
    bars = a2.bar(names, counts, color=["tab:blue", "tab:red", "tab:gray", "tab:gray"])
    a2.set_yscale("log")
    a2.set_ylim(1, dense_params * 30)
    for b, n in zip(bars, counts):
        a2.text(b.get_x() + b.get_width() / 2, n * 1.4, f"{n:,}", ha="center", fontsize=8)
    a2.set_ylabel("parameters (log scale)")
    a2.tick_params(axis="x", labelsize=8)
    a2.set_title("128x128x3 \u2192 128x128x5: shared 5x5 kernels\nagainst a fully connected layer", fontsize=10)

    # (3) LeNet-5 layer by layer: parameters and output size
    shapes, shape = [], lenet.input_shape
    for layer in lenet.layers:
        shape = layer.output_shape(shape)
        shapes.append(shape)
    labels = [f"{i} {layer.name}\n{'x'.join(map(str, s))}" for i, (layer, s) in enumerate(zip(lenet.layers, shapes))]
    params = [layer.num_params() for layer in lenet.layers]
    sizes = [int(np.prod(s)) for s in shapes]
    x = np.arange(len(labels))
    a3.bar(x - 0.2, params, 0.4, label="parameters", color="tab:red")
    a3.bar(x + 0.2, sizes, 0.4, label="output values", color="tab:blue")
    a3.set_yscale("log")
    a3.set_xticks(x, labels, fontsize=7, rotation=60, ha="right", rotation_mode="anchor")
    a3.legend(fontsize=8)
    a3.set_title(f"LeNet-5 layer by layer ({lenet.num_params():,} parameters): convolutions hold few\n"
                 "parameters and produce most values; the dense layers the reverse", fontsize=10)
    return fig


if __name__ == "__main__":
    main()
