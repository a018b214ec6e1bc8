"""Which input patterns excite a feature map? Zeiler and Fergus's deconvnet (2014), on LeNet-5.

For a chosen feature map, find the images (of a set of test images) where it answers most strongly, keep
that one activation, zero all others, and send it back down the network to pixel space: max-unpooling
puts each value where the max pooling's recorded switch says the maximum came from, ReLU rectifies the
signal, and each convolution applies its filters transposed. The result is the pattern in the image that
the unit responds to, drawn beside the image patch (the unit's receptive field) that caused it. First-layer
maps answer to edges and blobs of one polarity in a 5x5 window; second-layer maps to larger parts
(a collar, a sole, the gap between trouser legs) in a 14x14 window.

The network must use ReLU and max pooling (the switches): pass --model with such a model (train_lenet5.py
--activation relu --pool max), or a small one is trained now.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

from gpucnn import layers as L, viz


def options(parser):
    _common.add_model_option(parser)
    parser.add_argument("--maps", type=int, default=8, help="feature maps shown per layer (default 8)")


def main():
    args = _common.setup("deconvnet", __doc__, options)
    train, test = _common.fashion_mnist()
    model = _common.small_lenet5(args, train, test, activation="relu", pool="max")
    images = test.images[:300 if args.quick else 3000]
    print(f"searching {len(images)} test images for the strongest activations")

    # project from the ReLU after each convolution (the layer's feature maps)
    relus = [i + 1 for i, layer in enumerate(model.layers[:-1])
             if isinstance(layer, L.Conv2D) and isinstance(model.layers[i + 1], L.ReLU)]
    if not relus:
        raise SystemExit("error: deconvnet needs conv layers followed by ReLU "
                         "(e.g. train_lenet5.py --activation relu --pool max)")
    for depth, index in enumerate(relus, start=1):
        acts = viz.features(model, images, index + 1)                        # (N, maps, H, W)
        strength = acts.reshape(len(acts), acts.shape[1], -1).max(axis=2)   # each image's strongest unit per map
        # the maps that answer most strongly somewhere, dead ones (never positive) last
        order = np.argsort(-strength.max(axis=0), kind="stable")
        channels = sorted(order[:min(args.maps, len(order))].tolist())
        for c in channels:
            n = int(np.argmax(strength[:, c]))
            p = viz.deconv_project(model, images[n], index, c)
            h0, h1, w0, w1 = (int(v) for v in p.box)
            outside = p.pattern.copy()
            outside[:, h0:h1, w0:w1] = 0
            print(f"conv layer {depth} (model layer {index}) map {c}: strongest activation {float(p.activation):.3f} "
                  f"in test image {n} at unit {tuple(int(v) for v in p.unit)}; receptive field rows {h0}..{h1 - 1}, "
                  f"columns {w0}..{w1 - 1}; pattern nonzero only inside it: {not outside.any()}")
        name = f"deconv_conv{depth}.png"
        viz.plot_deconv(model, images, index, channels, top=4 if args.quick else 6, path=args.out / name)
        _common.saved(args.out / name)


if __name__ == "__main__":
    main()
