"""gpucnn.viz: every plot returns a Figure and writes a picture that is not blank; the arrays behind them
(features, nearest neighbours, deconvnet projections, receptive fields) are checked against independent
NumPy computations; bad arguments are clear errors; the GPU path (sim) gives what the CPU path gives."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import gpucnn
from gpucnn import backend, viz
from gpucnn import layers as L
from gpucnn.model import Sequential
from conftest import assert_close

REPO = Path(__file__).resolve().parents[1]


def tiny_cnn(rng, dtype="float32", act=L.ReLU, size=12):
    """size x size -> conv 3x3 pad 1 -> act -> pool 2 -> conv 3x3 -> act -> pool 2 -> dense 8 -> act -> dense 7."""
    s = (size // 2 - 2) // 2
    return Sequential([
        L.Conv2D(1, 4, 3, padding=1, dtype=dtype, rng=rng), act(), L.MaxPool2D(2),
        L.Conv2D(4, 6, 3, dtype=dtype, rng=rng), act(), L.MaxPool2D(2),
        L.Flatten(), L.Dense(6 * s * s, 8, dtype=dtype, rng=rng), act(), L.Dense(8, 7, dtype=dtype, rng=rng),
    ], input_shape=(1, size, size))


def raw_images(rng, n, size=12):
    return rng.integers(0, 256, (n, 1, size, size)).astype(np.uint8)


def standardised(model, rng, n=40):
    model.set_standardization(raw_images(rng, n))
    return model


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_visible()]


def assert_png(path):
    import matplotlib.image
    assert Path(path).is_file(), f"{path} was not written"
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape
    assert pixels[..., :3].var() > 1e-3, f"{path} is blank"


# ---------------------------------------------------------------------------------------------- features

@pytest.mark.parametrize("upto", [0, 1, 3, 6, 9, 10])
def test_features_equal_the_layers_run_by_hand(rng, upto):
    model = standardised(tiny_cnn(rng), rng)
    x = raw_images(rng, 7)
    expected = model.prepare(x)
    for layer in model.layers[:upto]:
        expected = layer.forward(expected, training=False)
    got = viz.features(model, x, upto, batch_size=3)      # three batches: 3 + 3 + 1
    assert isinstance(got, np.ndarray)
    assert_close(got, expected, "float32", f"features upto {upto}")
    one = viz.features(model, x[2], upto)                  # one image (C, H, W): no batch axis back
    assert_close(one, expected[2], "float32", "one image")


@pytest.mark.parametrize("upto", [-1, 11, 2.0, True])
def test_features_rejects_a_bad_depth(rng, upto):
    with pytest.raises(ValueError, match=rf"features: upto must be an int from 0 to 10 \(the number of layers\), "
                                         rf"got {upto!r}"):
        viz.features(tiny_cnn(rng), raw_images(rng, 2), upto)


# ---------------------------------------------------------------------------------------------- filters, maps

@pytest.mark.parametrize("source", ["model", "layer", "array"])
def test_plot_filters_draws_every_kernel(rng, tmp_path, source):
    model = tiny_cnn(rng)
    conv = model.layers[0]
    arg = {"model": model, "layer": conv, "array": conv.params["weight"]}[source]
    fig = viz.plot_filters(arg, path=tmp_path / "filters.png")
    assert isinstance(fig, Figure)
    tiles = image_axes(fig)
    assert len(tiles) == 4
    w = conv.params["weight"]
    for k, ax in enumerate(tiles):
        assert_close(ax.images[0].get_array(), w[k, 0], "float32", f"kernel {k}")
    lo, hi = tiles[0].images[0].get_clim()
    assert lo == -hi and hi > 0                            # diverging map, centred on 0
    assert_png(tmp_path / "filters.png")


@pytest.mark.parametrize("in_channels, tiles", [(3, 5), (7, 5 * 7)])
def test_plot_filters_rgb_and_many_channels(rng, tmp_path, in_channels, tiles):
    w = rng.standard_normal((5, in_channels, 3, 3)).astype(np.float32)
    fig = viz.plot_filters(w, path=tmp_path / "f.png")
    assert len(image_axes(fig)) == tiles
    if in_channels == 3:
        rgb = image_axes(fig)[0].images[0].get_array()
        assert rgb.shape == (3, 3, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert_png(tmp_path / "f.png")


def test_plot_filters_errors(rng):
    with pytest.raises(ValueError, match="plot_filters: the model has no Conv2D layer"):
        viz.plot_filters(Sequential([L.Flatten(), L.Dense(4, 2, rng=rng)], input_shape=(1, 2, 2)))
    with pytest.raises(ValueError, match=r"plot_filters: expected a model, a Conv2D or weights \(out, in, KH, KW\), "
                                         r"got shape \(3, 3\)"):
        viz.plot_filters(np.zeros((3, 3)))


def test_plot_feature_maps_shows_every_conv_layer(rng, tmp_path):
    model = standardised(tiny_cnn(rng), rng)
    image = raw_images(rng, 1)[0]
    fig = viz.plot_feature_maps(model, image, path=tmp_path / "maps.png")
    assert isinstance(fig, Figure)
    axes = image_axes(fig)
    assert len(axes) == 1 + 4 + 6                           # the input, 4 maps of conv 1, 6 of conv 2
    assert axes[0].images[0].get_array().shape == (12, 12)
    shapes = [ax.images[0].get_array().shape for ax in axes[1:]]
    assert shapes == [(12, 12)] * 4 + [(4, 4)] * 6
    # the maps are those after the ReLU that follows each conv
    after_relu = viz.features(model, image, 2)
    for k in range(4):
        assert_close(axes[1 + k].images[0].get_array(), after_relu[k], "float32", f"map {k}")
    assert_png(tmp_path / "maps.png")


def test_plot_feature_maps_signed_maps_and_errors(rng, tmp_path):
    model = standardised(tiny_cnn(rng, act=L.Tanh), rng)
    fig = viz.plot_feature_maps(model, raw_images(rng, 1), path=tmp_path / "maps.png")   # (1, C, H, W) is one image
    lo, hi = image_axes(fig)[1].images[0].get_clim()
    assert lo == -hi and image_axes(fig)[1].images[0].get_cmap().name == viz.SIGNED_CMAP
    with pytest.raises(ValueError, match="plot_feature_maps: expected one image"):
        viz.plot_feature_maps(model, raw_images(rng, 2))
    with pytest.raises(ValueError, match="plot_feature_maps: the model has no Conv2D layer"):
        viz.plot_feature_maps(Sequential([L.Flatten(), L.Dense(144, 2, rng=rng)], input_shape=(1, 12, 12)),
                              raw_images(rng, 1)[0])


# ---------------------------------------------------------------------------------------------- top-5

def test_plot_top5_bars_are_the_five_largest_probabilities(rng, tmp_path):
    model = standardised(tiny_cnn(rng), rng)
    images = raw_images(rng, 6)
    probs = gpucnn.to_numpy(model.predict_proba(images))
    labels = np.argsort(-probs, axis=1)[:, 2]               # the third guess: a red bar in third place
    labels[5] = np.argsort(-probs[5])[-1]                   # the least probable: no red bar
    classes = [f"class {k}" for k in range(7)]
    fig = viz.plot_top5(model, images, labels, classes, path=tmp_path / "top5.png")
    bar_axes = [ax for ax in fig.axes if ax.patches]
    assert len(bar_axes) == 6 and len(image_axes(fig)) == 6
    red = np.array([1.0, 0, 0])
    for i, ax in enumerate(bar_axes):
        widths = [p.get_width() for p in ax.patches]
        np.testing.assert_allclose(widths, np.sort(probs[i])[::-1][:5], rtol=1e-6)
        names = [t.get_text() for t in ax.get_yticklabels()]
        assert names == [classes[k] for k in np.argsort(-probs[i], kind="stable")[:5]]
        reds = [k for k, p in enumerate(ax.patches) if np.linalg.norm(np.array(p.get_facecolor()[:3]) - red) < 0.4]
        assert reds == ([] if i == 5 else [2])
    assert image_axes(fig)[0].get_title() == classes[labels[0]]
    assert_png(tmp_path / "top5.png")


def test_plot_top5_without_labels_and_label_count_error(rng):
    model = tiny_cnn(rng)
    fig = viz.plot_top5(model, raw_images(rng, 3))
    assert len([ax for ax in fig.axes if ax.patches]) == 3
    with pytest.raises(ValueError, match="plot_top5: 3 images but 2 labels"):
        viz.plot_top5(model, raw_images(rng, 3), labels=np.array([0, 1]))


# ---------------------------------------------------------------------------------------------- nearest neighbours

def test_nearest_neighbours_in_the_last_hidden_layer(rng):
    model = standardised(tiny_cnn(rng), rng)
    train = raw_images(rng, 30)
    queries = np.concatenate([train[[4, 17]], raw_images(rng, 2)])
    idx, dist = viz.nearest_neighbours(model, queries, train, k=4)
    assert idx.shape == dist.shape == (4, 4)
    assert idx[0, 0] == 4 and idx[1, 0] == 17 and dist[0, 0] < 1e-3 and dist[1, 0] < 1e-3  # itself first
    # brute force in the features before the last Dense (layer 9): the output of layer 8, a ReLU
    fq = viz.features(model, queries, 9).astype(np.float64)
    ft = viz.features(model, train, 9).astype(np.float64)
    d = np.linalg.norm(fq[:, None] - ft[None], axis=2)
    np.testing.assert_allclose(dist, np.sort(d, axis=1)[:, :4], rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(dist, axis=1) >= 0)
    with pytest.raises(ValueError, match="nearest_neighbours: k must be from 1 to the 30 training images, got 31"):
        viz.nearest_neighbours(model, queries, train, k=31)


def test_plot_nearest_neighbours(rng, tmp_path):
    model = standardised(tiny_cnn(rng), rng)
    train, labels = raw_images(rng, 20), rng.integers(0, 7, 20)
    fig = viz.plot_nearest_neighbours(model, train[:3], train, k=3, path=tmp_path / "nn.png", train_labels=labels,
                                      query_labels=labels[:3], classes=list("abcdefg"))
    axes = image_axes(fig)
    assert len(axes) == 3 * 4
    assert axes[1].get_title().startswith(f"{'abcdefg'[labels[0]]}\nd=0.00")   # the query itself, distance 0
    assert_png(tmp_path / "nn.png")


# ---------------------------------------------------------------------------------------------- deconvnet

def reference_deconv(model, image, layer_index, channel):
    """Zeiler & Fergus's projection, written with loops over units, for tiny_cnn's first five layers."""
    layers = model.layers
    acts = [model.prepare(image[None])]                      # the model is float64
    for layer in layers[:layer_index + 1]:
        acts.append(layer.forward(acts[-1], training=False))
    a = acts[-1][0, channel]
    h, w = np.unravel_index(np.argmax(a), a.shape)
    g = np.zeros_like(acts[-1][0])
    g[channel, h, w] = a[h, w]
    for i in range(layer_index, -1, -1):
        layer, below = layers[i], acts[i][0]
        if isinstance(layer, L.ReLU):
            g = np.maximum(g, 0)
        elif isinstance(layer, L.MaxPool2D):                 # 2x2 windows, stride 2: put each value at its max
            up = np.zeros_like(below)
            for c, oh, ow in np.ndindex(*g.shape):
                win = below[c, 2 * oh:2 * oh + 2, 2 * ow:2 * ow + 2]
                dh, dw = np.unravel_index(np.argmax(win), win.shape)
                up[c, 2 * oh + dh, 2 * ow + dw] += g[c, oh, ow]
            g = up
        elif isinstance(layer, L.Conv2D):                    # transposed filters: scatter each unit's kernel
            wt = gpucnn.to_numpy(layer.params["weight"]).astype(np.float64)
            p, K = layer.padding[0], layer.kernel_size[0]
            up = np.zeros((below.shape[0], below.shape[1] + 2 * p, below.shape[2] + 2 * p))
            for o, oh, ow in np.ndindex(*g.shape):
                up[:, oh:oh + K, ow:ow + K] += g[o, oh, ow] * wt[o]
            g = up[:, p:p + below.shape[1], p:p + below.shape[2]]
    return g, (h, w), a[h, w]


@pytest.mark.parametrize("layer_index, channel", [(1, 0), (1, 3), (2, 1), (4, 0), (4, 5), (5, 2)])
def test_deconv_project_against_a_loop_reference(rng, layer_index, channel):
    model = standardised(tiny_cnn(rng, dtype="float64"), rng)
    image = raw_images(rng, 1)[0]
    p = viz.deconv_project(model, image, layer_index, channel)
    expected, unit, act = reference_deconv(model, image, layer_index, channel)
    assert p.pattern.shape == image.shape
    assert tuple(p.unit) == unit and float(p.activation) == pytest.approx(act)
    assert_close(p.pattern, expected, "float64", "deconvnet projection")
    assert np.abs(p.pattern).max() > 0


def test_first_layer_projection_is_the_kernel_times_the_activation(rng):
    model = standardised(tiny_cnn(rng), rng)
    image = raw_images(rng, 1)[0]
    p = viz.deconv_project(model, image, 1, 2)               # conv 1 (3x3, padding 1), then ReLU
    h0, h1, w0, w1 = p.box
    h, w = p.unit
    kernel = gpucnn.to_numpy(model.layers[0].params["weight"])[2, 0]
    window = kernel[h0 - (h - 1):h1 - (h - 1), w0 - (w - 1):w1 - (w - 1)]     # clipped at the border
    assert_close(p.pattern[0, h0:h1, w0:w1], float(p.activation) * window, "float32", "pattern")


@pytest.mark.parametrize("layer_index", [1, 2, 4, 5])
def test_deconv_pattern_lies_inside_the_receptive_field(rng, layer_index):
    model = standardised(tiny_cnn(rng), rng)
    images = raw_images(rng, 5)
    for channel in range(4 if layer_index < 3 else 6):
        p = viz.deconv_project(model, images, layer_index, channel)
        assert p.pattern.shape == images.shape and p.box.shape == (5, 4) and p.unit.shape == (5, 2)
        for n in range(5):
            h, w = p.unit[n]
            h0, h1, w0, w1 = p.box[n]
            # the receptive field by hand: conv1 3x3 pad 1; pool 2; conv2 3x3; pool 2
            if layer_index == 1:
                rows, cols = (h - 1, h + 1), (w - 1, w + 1)
            elif layer_index == 2:
                rows, cols = (2 * h - 1, 2 * h + 2), (2 * w - 1, 2 * w + 2)
            elif layer_index == 4:
                rows, cols = (2 * h - 1, 2 * h + 6), (2 * w - 1, 2 * w + 6)
            else:
                rows, cols = (4 * h - 1, 4 * h + 8), (4 * w - 1, 4 * w + 8)
            assert (h0, h1, w0, w1) == (max(rows[0], 0), min(rows[1] + 1, 12), max(cols[0], 0), min(cols[1] + 1, 12))
            outside = p.pattern[n].copy()
            outside[:, h0:h1, w0:w1] = 0
            assert not outside.any(), f"layer {layer_index} map {channel} image {n}: pattern outside its field"
            if p.activation[n] > 0:
                assert np.abs(p.pattern[n]).max() > 0


def test_receptive_field_of_lenet5(rng):
    from gpucnn import models
    model = models.lenet5(init="zeros")                     # conv 5x5 pad 2, pool 2, conv 5x5, pool 2
    assert viz.receptive_field(model, 0, 0, 0).tolist() == [0, 3, 0, 3]
    assert viz.receptive_field(model, 0, 10, 10).tolist() == [8, 13, 8, 13]
    assert viz.receptive_field(model, 3, 5, 5).tolist() == [8, 22, 8, 22]      # 14x14
    assert viz.receptive_field(model, 5, 2, 2).tolist() == [6, 22, 6, 22]      # 16x16
    boxes = viz.receptive_field(model, 3, np.array([0, 9]), np.array([0, 9]))
    assert boxes.tolist() == [[0, 12, 0, 12], [16, 28, 16, 28]]


def test_deconv_project_errors(rng):
    model = tiny_cnn(rng)
    image = raw_images(rng, 1)[0]
    with pytest.raises(ValueError, match=r"deconv_project: channel must be from 0 to 3 \(layer 1 has 4 maps\), got 4"):
        viz.deconv_project(model, image, 1, 4)
    with pytest.raises(ValueError, match=r"deconv_project: layer 6 \(Flatten\) cannot be inverted"):
        viz.deconv_project(model, image, 7, 0)
    with pytest.raises(ValueError, match="deconv_project: layer_index must be from 0 to 9, got 10"):
        viz.deconv_project(model, image, 10, 0)
    with pytest.raises(ValueError, match="deconv_project: layer 1 is Tanh; the deconvnet rectifies with ReLU"):
        viz.deconv_project(tiny_cnn(rng, act=L.Tanh), image, 2, 0)


def test_plot_deconv(rng, tmp_path):
    model = standardised(tiny_cnn(rng), rng)
    images = raw_images(rng, 10)
    fig = viz.plot_deconv(model, images, 4, [0, 3, 5], top=3, path=tmp_path / "deconv.png")
    axes = image_axes(fig)
    assert len(axes) == 3 * 2 * 3
    acts = viz.features(model, images, 5)
    strongest = int(np.argmax(acts[:, 3].reshape(10, -1).max(1)))
    assert axes[6 + 1].get_title() == f"image {strongest}"    # row of map 3: its strongest image first
    p = viz.deconv_project(model, images[strongest], 4, 3)
    h0, h1, w0, w1 = p.box
    assert axes[6].images[0].get_array().shape == (h1 - h0, w1 - w0)
    assert_png(tmp_path / "deconv.png")


# ---------------------------------------------------------------------------------------------- history, headless

def test_plot_history_with_title(tmp_path):
    history = {"loss": [2.0, 1.0, 0.5], "accuracy": [0.3, 0.6, 0.8], "val_loss": [None] * 3, "val_accuracy": [None] * 3}
    fig = viz.plot_history(history, tmp_path / "curves.png", title="a run")
    assert fig.get_suptitle() == "a run"
    assert [len(ax.lines) for ax in fig.axes] == [1, 1]
    assert_png(tmp_path / "curves.png")


def test_viz_never_needs_a_display(tmp_path):
    code = (
        "import sys, numpy as np\n"
        "import gpucnn; gpucnn.use_device('cpu')\n"
        "from gpucnn import viz, models\n"
        "m = models.lenet5(seed=0)\n"
        "x = np.random.default_rng(0).integers(0, 256, (4, 1, 28, 28)).astype(np.uint8)\n"
        f"viz.plot_filters(m, r'{tmp_path}/a.png'); viz.plot_feature_maps(m, x[0], r'{tmp_path}/b.png')\n"
        f"viz.plot_top5(m, x, path=r'{tmp_path}/c.png')\n"
        f"viz.plot_nearest_neighbours(m, x[:1], x, 2, r'{tmp_path}/d.png')\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'viz imported pyplot'\n"
    )
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}    # no DISPLAY, no MPLBACKEND
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in "abcd":
        assert_png(tmp_path / f"{name}.png")


# ---------------------------------------------------------------------------------------------- the GPU path

@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deconv_project_and_features_on_sim_match_the_cpu(rng, dtype):
    model = standardised(tiny_cnn(rng, dtype=dtype, size=8), rng, n=4)   # 8x8: a few hundred threads a launch
    images = rng.integers(0, 256, (2, 1, 8, 8)).astype(np.uint8)
    with backend.cpu_path():
        feats_cpu = viz.features(model, images, 6)
        channel = int(np.argmax(viz.features(model, images, 5).max(axis=(0, 2, 3))))   # a map that answers
        cpu = viz.deconv_project(model, images, 4, channel)
    gpu = viz.deconv_project(model, images, 4, channel)
    feats = viz.features(model, images, 6)
    assert_close(gpu.pattern, cpu.pattern, dtype, "deconvnet pattern")
    assert_close(feats, feats_cpu, dtype, "features")
    assert np.array_equal(gpu.unit, cpu.unit) and np.array_equal(gpu.box, cpu.box)
    assert np.abs(cpu.pattern).max() > 0
