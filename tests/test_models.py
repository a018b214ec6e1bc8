"""The classic networks: parameter counts and shapes as in the papers and the course, lookup by name."""
import time

import numpy as np
import pytest

from gpucnn import models


def _shapes(model):
    """(class name, output shape, parameter count) per layer, from summary's own computation."""
    return [(l.name, s, l.num_params()) for l, s in zip(model.layers, model._trace(model.input_shape))]


def test_lenet5_summary():
    model = models.lenet5()
    assert model.num_params() == 61_706 and model.input_shape == (1, 28, 28)
    rows = _shapes(model)
    assert [r[1] for r in rows] == [(6, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 10, 10), (16, 5, 5),
                                    (400,), (120,), (120,), (84,), (84,), (10,)]
    assert [r[2] for r in rows if r[2]] == [156, 2_416, 48_120, 10_164, 850]
    assert [r[0] for r in rows][:3] == ["Conv2D", "Tanh", "AvgPool2D"]
    assert "Total parameters: 61,706" in model.summary(file=False)


def test_lenet5_variants(rng):
    model = models.lenet5(activation="relu", pool="max", num_classes=5, dtype="float64", seed=1)
    names = [l.name for l in model.layers]
    assert names.count("ReLU") == 4 and names.count("MaxPool2D") == 2 and "Tanh" not in names
    assert model.num_params() == 61_706 - 5 * 85 and model.dtype == np.dtype("float64")
    x = rng.integers(0, 255, (2, 1, 28, 28)).astype(np.float64)
    assert model.predict(x).shape == (2, 5)
    same = models.lenet5(activation="relu", pool="max", num_classes=5, dtype="float64", seed=1)
    assert np.array_equal(same.layers[0].params["weight"], model.layers[0].params["weight"])   # seed: same init
    with pytest.raises(ValueError, match=r"lenet5: activation must be one of \['relu', 'tanh'\], got 'gelu'"):
        models.lenet5(activation="gelu")
    with pytest.raises(ValueError, match=r"lenet5: pool must be one of \['avg', 'max'\], got 'min'"):
        models.lenet5(pool="min")


def test_alexnet_summary_is_cheap():
    t0 = time.perf_counter()
    model = models.alexnet(init="zeros")                # no random numbers for 62M weights
    assert time.perf_counter() - t0 < 1.0
    assert model.num_params() == 62_378_344
    rows = _shapes(model)
    convs = [(s, p) for name, s, p in rows if name == "Conv2D"]
    assert convs == [((96, 55, 55), 34_944), ((256, 27, 27), 614_656), ((384, 13, 13), 885_120),
                     ((384, 13, 13), 1_327_488), ((256, 13, 13), 884_992)]
    pools = [s for name, s, _ in rows if name == "MaxPool2D"]
    assert pools == [(96, 27, 27), (256, 13, 13), (256, 6, 6)]
    dense = [(s, p) for name, s, p in rows if name == "Dense"]
    assert dense == [((4096,), 37_752_832), ((4096,), 16_781_312), ((1000,), 4_097_000)]
    assert [name for name, _, _ in rows].count("LocalResponseNorm") == 2
    assert [name for name, _, _ in rows].count("Dropout") == 2
    assert "Total parameters: 62,378,344" in model.summary(file=False)


def test_alexnet_without_lrn():
    model = models.alexnet(num_classes=10, lrn=False, init="zeros")
    assert "LocalResponseNorm" not in [l.name for l in model.layers]
    assert model.num_params() == 62_378_344 - 4_097_000 + 4096 * 10 + 10


@pytest.mark.parametrize("size,channels,flat", [(28, 1, 256 * 3 * 3), (32, 3, 256 * 4 * 4)])
def test_alexnet_small(size, channels, flat, rng):
    model = models.alexnet_small(in_channels=channels, num_classes=10, input_size=size)
    rows = _shapes(model)
    assert model.input_shape == (channels, size, size)
    assert [s for name, s, _ in rows if name == "Flatten"] == [(flat,)]
    convs = [s[0] for name, s, _ in rows if name == "Conv2D"]
    assert convs == [64, 192, 384, 256, 256]
    conv_params = (64 * channels * 9 + 64) + (192 * 64 * 9 + 192) + (384 * 192 * 9 + 384) + (256 * 384 * 9 + 256) \
        + (256 * 256 * 9 + 256)
    dense_params = (flat * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 10 + 10)
    assert model.num_params() == conv_params + dense_params
    x = rng.integers(0, 255, (2, channels, size, size)).astype(np.uint8)
    assert model.predict(x).shape == (2, 10)


def test_conv_autoencoder(rng):
    """Encoder 1x28x28 -> 8x7x7 (its first 6 layers), decoder back to 1x28x28 logits; the parameters by hand; one
    generator draws both halves in order, so a seed gives the weights the separate layer lists give."""
    model = models.conv_autoencoder(seed=3)
    enc = (16 * 9 + 16) + (32 * 16 * 9 + 32) + (8 * 32 * 9 + 8)
    dec = (8 * 32 * 9 + 32) + (32 * 16 * 9 + 16) + (16 * 9 + 1)
    assert model.num_params() == enc + dec == 14_217
    assert [s for _, s, _ in _shapes(model)][5] == (8, 7, 7) and model.output_shape == (1, 28, 28)
    g = np.random.default_rng(3)
    apart = models.conv_encoder_layers(g) + models.conv_decoder_layers(g)
    for a, b in zip(model.layers, apart):
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k])
    x = rng.uniform(0, 1, (2, 1, 28, 28)).astype(np.float32)
    assert model.predict(x).shape == (2, 1, 28, 28)


def test_get_by_name():
    assert models.get("lenet5").num_params() == 61_706
    assert models.get("alexnet-small", input_size=32, in_channels=3, init="zeros").input_shape == (3, 32, 32)
    assert set(models.MODELS) == {"lenet5", "alexnet", "alexnet_small"}
    with pytest.raises(ValueError,
                       match="models.get: unknown model 'vgg16'; choose one of lenet5, alexnet, alexnet_small"):
        models.get("vgg16")
    with pytest.raises(ValueError, match="alexnet_small: input_size must be an int >= 8"):
        models.alexnet_small(input_size=4)
