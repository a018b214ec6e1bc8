"""Pictures of what a CNN computes, sees and learns, and of how it trained.

    viz.plot_filters(model)                         # the first layer's kernels, as in the AlexNet paper
    viz.plot_feature_maps(model, image)             # every conv layer's maps for one image
    viz.plot_top5(model, images, labels, classes)   # each image beside its five most probable classes
    viz.plot_nearest_neighbours(model, queries, train_images)   # neighbours in the last hidden layer
    viz.plot_deconv(model, images, layer_index, channels)       # Zeiler & Fergus's deconvnet
    viz.plot_history(history)                       # learning curves from Sequential.fit

Each ``plot_*`` takes a model (a :class:`gpucnn.Sequential`) or arrays on any device and returns a
``matplotlib.figure.Figure``, written to ``path`` when one is given. Figures are built with
``matplotlib.figure.Figure`` directly, not pyplot: nothing needs a display, no window ever opens, and no
figure lingers in pyplot's global list. A returned Figure still shows inline in Jupyter.

Images are drawn in grey (RGB for three channels); signed quantities (weights, tanh feature maps,
deconvnet patterns) with a diverging map centred on zero, so that white means 0, red positive, blue
negative. Models take raw images (uint8 or float), as ``Sequential.predict`` does.

The package: common.py holds what every picture shares (drawing helpers, :func:`features`); plots.py the
AlexNet paper's pictures (filters, feature maps, top-5, nearest neighbours) and the learning curves;
deconv.py the deconvnet (projections, receptive fields, their picture).
"""
from .common import SIGNED_CMAP, features  # noqa: F401 (SIGNED_CMAP: the colour map of signed pictures)
from .deconv import DeconvProjection, deconv_project, plot_deconv, receptive_field
from .plots import ACTIVATIONS  # noqa: F401 (the layers plot_feature_maps shows a conv's maps after)
from .plots import (nearest_neighbours, plot_feature_maps, plot_filters, plot_history, plot_nearest_neighbours,
                    plot_top5)

__all__ = ["plot_history", "plot_filters", "plot_feature_maps", "plot_top5", "plot_nearest_neighbours",
           "plot_deconv", "features", "nearest_neighbours", "deconv_project", "receptive_field",
           "DeconvProjection"]
