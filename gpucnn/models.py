"""The classic networks, built from gpucnn's layers: LeNet-5 and AlexNet (full size, and small for 28/32 px), and
the lecture's convolutional autoencoder.

    model = gc.models.lenet5()                   # 1x28x28 -> 10 classes, 61,706 parameters
    model = gc.models.get("alexnet_small", in_channels=3, input_size=32)

Each function returns a :class:`gpucnn.Sequential` with its input shape set, so ``summary()`` shows
every shape at once. ``seed`` makes the initial weights reproducible (None: gpucnn's default generator).
``init`` is passed to every Conv2D and Dense: "default" (PyTorch's U(+-1/sqrt(fan_in))), "he", "glorot",
a callable, or "zeros": no random numbers at all, and memory the OS maps only when first written, so
``alexnet(init="zeros").summary()`` costs nothing (such a model is for looking at, not for training).
"""
from __future__ import annotations

import numpy as np

from . import layers as L
from .model import Sequential

__all__ = ["lenet5", "alexnet", "alexnet_small", "conv_autoencoder", "conv_encoder_layers", "conv_decoder_layers",
           "get", "use_winograd", "MODELS"]


def _rng(seed):
    return np.random.default_rng(seed) if seed is not None else None


def _init(init, dtype):
    if init == "zeros":
        return lambda shape, rng: np.zeros(shape, dtype)     # already the layer's dtype: kept, not copied
    return init


def lenet5(activation: str = "tanh", pool: str = "avg", num_classes: int = 10, dtype="float32",
           seed=None, init="default") -> Sequential:
    """LeCun et al. (1998) for 1x28x28 images (the 32x32 of the paper as 28x28 padded by 2):
    conv 6@5x5 pad 2, act, pool 2, conv 16@5x5, act, pool 2, then dense 400-120-84-classes."""
    acts = {"tanh": L.Tanh, "relu": L.ReLU}
    pools = {"avg": L.AvgPool2D, "max": L.MaxPool2D}
    if activation not in acts:
        raise ValueError(f"lenet5: activation must be one of {sorted(acts)}, got {activation!r}")
    if pool not in pools:
        raise ValueError(f"lenet5: pool must be one of {sorted(pools)}, got {pool!r}")
    act, pool_ = acts[activation], pools[pool]
    rng, init = _rng(seed), _init(init, dtype)
    return Sequential([
        L.Conv2D(1, 6, 5, padding=2, dtype=dtype, rng=rng, init=init), act(), pool_(2),    # 6x28x28 -> 6x14x14
        L.Conv2D(6, 16, 5, dtype=dtype, rng=rng, init=init), act(), pool_(2),              # 16x10x10 -> 16x5x5
        L.Flatten(),
        L.Dense(16 * 5 * 5, 120, dtype=dtype, rng=rng, init=init), act(),
        L.Dense(120, 84, dtype=dtype, rng=rng, init=init), act(),
        L.Dense(84, num_classes, dtype=dtype, rng=rng, init=init),
    ], input_shape=(1, 28, 28))


def alexnet(num_classes: int = 1000, lrn: bool = True, dtype="float32", seed=None, init="default",
            winograd: bool = False, groups: int = 1) -> Sequential:
    """Krizhevsky et al. (2012) for 3x224x224 images: five convolutions (96@11x11/4, 256@5x5, 384, 384, 256
    @3x3) with ReLU, local response normalisation after the first two, 3x3/2 max pooling, then dropout and
    dense 9216-4096-4096-classes. One GPU ("single tower") by default: 62,378,344 parameters for 1000 classes,
    250 MB in float32. ``groups=2``: the paper's two towers, conv2, conv4 and conv5 each seeing only its own
    tower's half of the channels (60,965,224 parameters). ``winograd``: the three 3x3 convolutions by Winograd
    F(2x2, 3x3)."""
    rng, init = _rng(seed), _init(init, dtype)
    norm = (lambda: [L.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)]) if lrn else (lambda: [])
    model = Sequential([
        L.Conv2D(3, 96, 11, stride=4, padding=2, dtype=dtype, rng=rng, init=init), L.ReLU(), *norm(),    # 96 x 55 x 55
        L.MaxPool2D(3, stride=2),                                                            # 96 x 27 x 27
        L.Conv2D(96, 256, 5, padding=2, dtype=dtype, rng=rng, init=init, groups=groups), L.ReLU(), *norm(),
        L.MaxPool2D(3, stride=2),                                                            # 256 x 13 x 13
        L.Conv2D(256, 384, 3, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU(),      # the towers meet
        L.Conv2D(384, 384, 3, padding=1, dtype=dtype, rng=rng, init=init, groups=groups), L.ReLU(),
        L.Conv2D(384, 256, 3, padding=1, dtype=dtype, rng=rng, init=init, groups=groups), L.ReLU(),
        L.MaxPool2D(3, stride=2),                                                            # 256 x 6 x 6
        L.Flatten(),
        L.Dropout(0.5, seed=1), L.Dense(256 * 6 * 6, 4096, dtype=dtype, rng=rng, init=init), L.ReLU(),
        L.Dropout(0.5, seed=2), L.Dense(4096, 4096, dtype=dtype, rng=rng, init=init), L.ReLU(),
        L.Dense(4096, num_classes, dtype=dtype, rng=rng, init=init),
    ], input_shape=(3, 224, 224))
    return use_winograd(model) if winograd else model


def alexnet_small(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, dtype="float32",
                  seed=None, init="default", winograd: bool = False, groups: int = 1) -> Sequential:
    """AlexNet's shape scaled to 28x28 (MNIST) or 32x32 (CIFAR-10) images: five 3x3 convolutions
    (64, 192, 384, 256, 256) with ReLU and three 2x2 max pools, then dropout and dense
    (256*s*s)-1024-1024-classes, s = input_size // 8 (3 for 28, 4 for 32). ``winograd``: every convolution
    by Winograd F(2x2, 3x3). ``groups``: every convolution but the first and the third in that many groups
    (AlexNet's towers, as ``alexnet(groups=2)``)."""
    if not isinstance(input_size, int) or input_size < 8:
        raise ValueError(f"alexnet_small: input_size must be an int >= 8 (three 2x2 poolings), got {input_size!r}")
    rng, init = _rng(seed), _init(init, dtype)
    s = input_size // 2 // 2 // 2
    model = Sequential([
        L.Conv2D(in_channels, 64, 3, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(64, 192, 3, padding=1, dtype=dtype, rng=rng, init=init, groups=groups), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(192, 384, 3, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU(),
        L.Conv2D(384, 256, 3, padding=1, dtype=dtype, rng=rng, init=init, groups=groups), L.ReLU(),
        L.Conv2D(256, 256, 3, padding=1, dtype=dtype, rng=rng, init=init, groups=groups), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(),
        L.Dropout(0.5, seed=1), L.Dense(256 * s * s, 1024, dtype=dtype, rng=rng, init=init), L.ReLU(),
        L.Dropout(0.5, seed=2), L.Dense(1024, 1024, dtype=dtype, rng=rng, init=init), L.ReLU(),
        L.Dense(1024, num_classes, dtype=dtype, rng=rng, init=init),
    ], input_shape=(in_channels, input_size, input_size))
    return use_winograd(model) if winograd else model


def conv_encoder_layers(seed=None, dtype="float32", init="default") -> list:
    """The autoencoder's encoder as layers: 1x28x28 -> 16x14x14 -> 32x7x7 -> 8x7x7, a code of 392 numbers (half the
    784 pixels); three Conv2D (3x3; stride 2, 2, 1) each with ReLU. ``seed`` may be a Generator, drawn in order."""
    rng, init = _rng(seed), _init(init, dtype)
    return [L.Conv2D(1, 16, 3, stride=2, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU(),
            L.Conv2D(16, 32, 3, stride=2, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU(),
            L.Conv2D(32, 8, 3, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU()]


def conv_decoder_layers(seed=None, dtype="float32", init="default") -> list:
    """The autoencoder's decoder as layers: 8x7x7 -> 32x7x7 -> 16x14x14 -> 1x28x28 logits, the encoder's shapes
    backwards by three ConvTranspose2D (stride 2 with output_padding 1 to double a side), ReLU between them."""
    rng, init = _rng(seed), _init(init, dtype)
    return [L.ConvTranspose2D(8, 32, 3, padding=1, dtype=dtype, rng=rng, init=init), L.ReLU(),
            L.ConvTranspose2D(32, 16, 3, stride=2, padding=1, output_padding=1, dtype=dtype, rng=rng, init=init),
            L.ReLU(),
            L.ConvTranspose2D(16, 1, 3, stride=2, padding=1, output_padding=1, dtype=dtype, rng=rng, init=init)]


def conv_autoencoder(dtype="float32", seed=None, init="default") -> Sequential:
    """The convolutional autoencoder of the lecture's semi-adversarial network, for 1x28x28 images in [0, 1]: the
    encoder (:func:`conv_encoder_layers`, its first 6 layers) then the decoder; 14,217 parameters. It outputs
    logits: train it with ``losses.BinaryCrossEntropy()`` against the images themselves (examples/conv_autoencoder.py)."""
    rng = _rng(seed)                # one generator for both halves (None: gpucnn's default)
    return Sequential(conv_encoder_layers(rng, dtype, init) + conv_decoder_layers(rng, dtype, init),
                      input_shape=(1, 28, 28))


def use_winograd(model: Sequential, on: bool = True) -> Sequential:
    """Every Conv2D and ConvTranspose2D of ``model`` that Winograd F(2x2, 3x3) can compute (3x3, stride 1)
    switched to it (or back to im2col + GEMM with ``on=False``); other convolutions keep "gemm". Returns the model."""
    for layer in model.layers:
        if isinstance(layer, (L.Conv2D, L.ConvTranspose2D)) and layer.kernel_size == (3, 3) and layer.stride == (1, 1):
            layer.algorithm = "winograd" if on else "gemm"
    return model


# the classifiers, by name (``gpucnn train --model``); conv_autoencoder, trained on images not labels, is not one
MODELS = {"lenet5": lenet5, "alexnet": alexnet, "alexnet_small": alexnet_small}


def get(name: str, **kw) -> Sequential:
    """Build a model by name (``"lenet5"``, ``"alexnet"``, ``"alexnet_small"``; "-" may stand for "_")."""
    key = name.lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"models.get: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[key](**kw)
