"""What a trained CNN sees: its kernels, its feature maps, its top-5 guesses and its nearest neighbours.

The pictures of the AlexNet paper (Krizhevsky et al., 2012), for a LeNet-5 on Fashion-MNIST:

* filters.png            the first layer's learned kernels as a grid (the paper's figure 3);
* feature_maps.png       one test image's feature maps at every conv layer;
* top5.png               test images with their five most probable classes, a probability bar each, the
                         true class's bar in red (the paper's figure 4, left);
* nearest_neighbours.png for a few test images, the training images nearest to them in the last hidden
                         layer's feature space (figure 4, right): neighbours there look alike and mostly
                         share the class, although their pixels may differ a lot.

Pass --model PATH (e.g. runs/examples/train_lenet5/model.npz); otherwise a small LeNet-5 is trained now.
"""
import _common  # noqa: I001  (first: finds gpucnn in a checkout)

import numpy as np

import gpucnn
from gpucnn import viz


def options(parser):
    _common.add_model_option(parser)


def main():
    args = _common.setup("what_the_cnn_sees", __doc__, options)
    train, test = _common.fashion_mnist()
    model = _common.small_lenet5(args, train, test)
    classes = test.classes

    viz.plot_filters(model, args.out / "filters.png")
    first = next(layer for layer in model.layers if isinstance(layer, gpucnn.layers.Conv2D))
    print(f"first conv layer's kernels: {tuple(first.params['weight'].shape)}")
    _common.saved(args.out / "filters.png")

    image = test.images[0]
    viz.plot_feature_maps(model, image, args.out / "feature_maps.png")
    shapes = [tuple(layer.output_shape(s)) for layer, s in _shapes_in(model) if isinstance(layer, gpucnn.layers.Conv2D)]
    print(f"feature maps of test image 0 ({classes[test.labels[0]]}) at the conv layers: {shapes}")
    _common.saved(args.out / "feature_maps.png")

    picks = np.arange(8)
    probs = gpucnn.to_numpy(model.predict_proba(test.images[picks]))
    for n, p in zip(picks, probs):
        top = np.argsort(-p, kind="stable")[:5]
        guesses = ", ".join(f"{classes[k]} {p[k]:.2f}" for k in top)
        print(f"test image {n} ({classes[test.labels[n]]}): top-5 {guesses}")
    viz.plot_top5(model, test.images[picks], test.labels[picks], classes, args.out / "top5.png")
    _common.saved(args.out / "top5.png")

    searched = train.limit(2000 if args.quick else 20000)
    queries = np.array([0, 1, 2, 3, 6]) if args.quick else np.array([0, 1, 2, 3, 6, 8, 11, 12])
    idx, dist = viz.nearest_neighbours(model, test.images[queries], searched.images, k=6)
    same = np.mean(searched.labels[idx] == test.labels[queries][:, None])
    for q, row, d in zip(queries, idx, dist):
        print(f"test image {q} ({classes[test.labels[q]]}): nearest training images {row.tolist()} "
              f"({', '.join(classes[searched.labels[t]] for t in row)}), distances {np.round(d, 2).tolist()}")
    print(f"neighbours of the same class as their query: {same:.0%} (of {idx.size})")
    viz.plot_nearest_neighbours(model, test.images[queries], searched.images, k=6,
                                path=args.out / "nearest_neighbours.png", train_labels=searched.labels,
                                query_labels=test.labels[queries], classes=classes)
    _common.saved(args.out / "nearest_neighbours.png")


def _shapes_in(model):
    """(layer, its input shape) for every layer."""
    shape = model.input_shape
    for layer in model.layers:
        yield layer, shape
        shape = layer.output_shape(shape)


if __name__ == "__main__":
    main()
