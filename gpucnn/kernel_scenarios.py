"""Step 1 of ``gpucnn kernels`` (gpucnn.kernel_report): record every Numba launch of real-size training.

:data:`SCENARIOS` are the runs: the shipped models' training steps, predict, evaluate and fit at real sizes (the
grouped AlexNets too), and the paths they do not take (the plain data-movement kernels, BatchNorm with MSE, a batch
of 10,000 rows, a CORAL head at LeNet-5's size, AlexNet through fit (softmax, and a CORAL head),
examples/conv_autoencoder.py's nets).
:func:`record` runs them on "sim" inside gpucnn.profile.shapes_only(cuda_shapes=True), so nothing is computed and
every grid is the one "cuda" would launch; tests/test_launch_resources.py checks those grids against the registers
of a real GPU and against the fill rule.
"""
from __future__ import annotations

import gc


def _train(model, batch, opt, steps=3, clip_norm=None, loss=None, y=None):
    """``steps`` training steps on one batch (the first records the workspace, the next run on its plan)."""
    import numpy as np
    from .losses import SoftmaxCrossEntropy
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(model.dtype)
    if y is None:
        y = rng.integers(0, model.output_shape[0], batch)
    loss = loss or SoftmaxCrossEntropy()
    for _ in range(steps):
        model.train_step(x, y, loss, opt, clip_norm=clip_norm)
    return x, y


def _full(name, batch, partial=100, algorithm=None, **kw):
    """The runs of ``gpucnn.models.get(name, **kw)`` (every Conv2D switched to ``algorithm`` when given): 3
    SGD-momentum steps at ``batch``; predict, predict_proba and evaluate on that batch; then 3 Adam steps with
    gradient clipping on a last partial batch of ``partial``."""
    def run():
        from . import layers, models, optim
        model = models.get(name, seed=0, **kw)
        if algorithm is not None:
            for layer in model.layers:
                if isinstance(layer, layers.Conv2D):
                    layer.algorithm = algorithm
        x, y = _train(model, batch, optim.SGD(model, lr=0.01, momentum=0.9, weight_decay=5e-4))
        model.predict(x, batch_size=batch)
        model.predict_proba(x[:partial], batch_size=batch)
        model.evaluate((x, y), batch_size=batch)
        _train(model, partial, optim.Adam(model), clip_norm=1.0)
    return run


def _fit_lenet5():
    """fit: an epoch of 300 images at batch 256 (a full and a partial batch) with validation (tally, evaluate)."""
    import numpy as np
    from . import models
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 1, 28, 28)).astype(np.uint8)
    y = rng.integers(0, 10, 300)
    models.lenet5(seed=0).fit((x, y), epochs=1, batch_size=256, validation=(x[:100], y[:100]), verbose=0)


def _plain_data_movement():
    """lenet5 with the untiled im2col and col2im kernels (conv.DATA_MOVEMENT = "plain")."""
    from . import models, optim
    from .kernels import conv
    old, conv.DATA_MOVEMENT = conv.DATA_MOVEMENT, "plain"
    try:
        model = models.lenet5(seed=0)
        _train(model, 256, optim.SGD(model, lr=0.01))
    finally:
        conv.DATA_MOVEMENT = old


def _batchnorm_mse():
    """Conv, BatchNorm2D, ReLU, a standalone average pooling, Dense, trained on MSE at batch 256, then predict."""
    import numpy as np
    from . import layers as L, optim
    from .losses import MSE
    from .model import Sequential
    r = np.random.default_rng(0)
    model = Sequential([L.Conv2D(3, 16, 3, padding=1, rng=r), L.BatchNorm2D(16), L.ReLU(), L.AvgPool2D(2),
                        L.Flatten(), L.Dense(16 * 16 * 16, 10, rng=r)], input_shape=(3, 32, 32))
    y = r.standard_normal((256, 10)).astype(np.float32)
    x, _ = _train(model, 256, optim.SGD(model, lr=0.01, momentum=0.9), loss=MSE(), y=y)
    model.predict(x)


def _big_batch():
    """Cross-entropy and a dense bias gradient over a batch of 10,000 rows (hundreds of blocks)."""
    from . import layers as L, optim
    from .model import Sequential
    model = Sequential([L.Flatten(), L.Dense(64, 10)], input_shape=(1, 8, 8))
    _train(model, 10000, optim.SGD(model, lr=0.01))


def _coral():
    """LeNet-5's layers ending in a CoralHead (10 ordered classes), trained on CoralLoss at batch 256, then predict."""
    import numpy as np
    from . import layers as L, optim
    from .losses import CoralLoss
    from .model import Sequential
    r = np.random.default_rng(0)
    model = Sequential([L.Conv2D(1, 6, 5, padding=2, rng=r), L.Tanh(), L.AvgPool2D(2), L.Flatten(),
                        L.Dense(6 * 14 * 14, 84, rng=r), L.Tanh(), L.CoralHead(84, 10, rng=r)], input_shape=(1, 28, 28))
    x, _ = _train(model, 256, optim.SGD(model, lr=0.01, momentum=0.9), loss=CoralLoss(), y=r.integers(0, 10, 256))
    model.predict(x)


def _conv_autoencoder():
    """examples/conv_autoencoder.py's autoencoder at its batch of 64 (Conv2D down, ConvTranspose2D up, binary
    cross-entropy on logits, Adam): its part-1 loop (train_step with the images as targets), its reconstructions
    (predict on 300 images: a batch of 256 and one of 44, BCE, sigmoid), then a step of its part-2 loop: forward,
    BCE, sigmoid, a LeNet-5 matcher's features (MSE) and classifier (cross-entropy) each back to their input, the
    autoencoder's backward, Adam."""
    import numpy as np
    from . import layers as L, models, optim
    from .losses import MSE, BinaryCrossEntropy, SoftmaxCrossEntropy
    from .model import Sequential
    r = np.random.default_rng(0)
    ae = models.conv_autoencoder(seed=r)
    images = r.uniform(0, 1, (300, 1, 28, 28)).astype(np.float32)
    bce, opt = BinaryCrossEntropy(from_logits=True), optim.Adam(ae, lr=2e-3)
    xb = images[:64]
    for _ in range(3):
        ae.train_step(xb, xb, bce, opt)
    z = ae.predict(images)
    bce.forward(z, images)
    L.Sigmoid().forward(z)
    classifier, matcher = models.lenet5(num_classes=2, seed=0), models.lenet5(seed=1)
    features = Sequential(matcher.layers[:6], matcher.input_shape)         # up to Flatten: 16x5x5
    ae.layers[0].needs_input_grad = False
    z = ae.forward(xb, training=True)
    bce.forward(z, xb)
    sigmoid, match, adv = L.Sigmoid(), MSE(), SoftmaxCrossEntropy()
    p = sigmoid.forward(z)
    target = features.forward(matcher.prepare(xb), training=False).copy()
    match.forward(features.forward(matcher.prepare(p), training=False), target)
    with np.errstate(all="ignore"):         # "sim" adds on the host, and nothing computed the values
        g = features.backward(match.backward())
        adv.forward(classifier.forward(classifier.prepare(p), training=False), r.integers(0, 2, 64))
        ae.backward(bce.backward() + sigmoid.backward(g + classifier.backward(adv.backward())))
    opt.step()


def _fit_alexnet(coral: bool):
    """AlexNet trained by fit at batch 128 on 256 images (two steps, each tallied) and validated by evaluate on 100
    (the loss, the scores): on SoftmaxCrossEntropy over its 1,000 classes, or (``coral``) with its 1,000 outputs read
    as ordered ranks (a CoralHead(4096, 1000): 999 tasks) on CoralLoss."""
    def run():
        import numpy as np
        from . import layers as L, models
        from .losses import CoralLoss, SoftmaxCrossEntropy
        from .model import Sequential
        r = np.random.default_rng(0)
        model = models.alexnet(seed=0, init="zeros")
        if coral:
            model = Sequential(model.layers[:-1] + [L.CoralHead(4096, 1000, rng=r)], input_shape=model.input_shape)
        x = r.integers(0, 256, (256, 3, 224, 224), dtype=np.uint8)
        y = r.integers(0, 1000, 256)
        model.fit((x, y), epochs=1, batch_size=128, loss=CoralLoss() if coral else SoftmaxCrossEntropy(),
                  validation=(x[:100], y[:100]), verbose=0)
    return run


# label -> a function that runs it (on "sim", inside shapes_only(cuda_shapes=True) and record_launches()).
# Every kernel in gpucnn.kernels must be launched by one of them (tests/test_launch_resources.py checks).
# init="zeros": AlexNet's 62 million weights are not drawn (nothing is computed here anyway).
SCENARIOS = {
    "lenet5 tanh/avg float32, batch 256": _full("lenet5", 256),
    "lenet5 tanh/avg float32, batch 1024": _full("lenet5", 1024),
    "lenet5 relu/max float32, batch 256": _full("lenet5", 256, activation="relu", pool="max"),
    "lenet5 relu/max float32, batch 1024": _full("lenet5", 1024, activation="relu", pool="max"),
    "lenet5 tanh/avg float64, batch 256": _full("lenet5", 256, dtype="float64"),
    "lenet5 relu/max float64, batch 1024": _full("lenet5", 1024, activation="relu", pool="max", dtype="float64"),
    "alexnet_small, batch 256": _full("alexnet_small", 256, init="zeros"),
    "alexnet, batch 128": _full("alexnet", 128, init="zeros"),
    "alexnet winograd, batch 128": _full("alexnet", 128, init="zeros", winograd=True),
    "alexnet_small groups=2, batch 256": _full("alexnet_small", 256, init="zeros", groups=2),
    "alexnet groups=2, batch 128": _full("alexnet", 128, init="zeros", groups=2),
    "lenet5 direct convolutions, batch 256": _full("lenet5", 256, algorithm="direct"),
    "lenet5 direct convolutions float64, batch 1024": _full("lenet5", 1024, algorithm="direct", dtype="float64"),
    "lenet5 fit": _fit_lenet5,
    "lenet5 plain im2col/col2im": _plain_data_movement,
    "batchnorm, avg pool, MSE, batch 256": _batchnorm_mse,
    "dense, batch 10000": _big_batch,
    "coral head and loss, batch 256": _coral,
    "conv autoencoder, batch 64": _conv_autoencoder,
    "alexnet coral head fit and evaluate, batch 128": _fit_alexnet(coral=True),
    "alexnet fit and evaluate, batch 128": _fit_alexnet(coral=False),
}


def record(scenarios=None) -> list:
    """Run the scenarios on "sim" with nothing computed and launches sized as "cuda" sizes them; returns one
    dict per distinct launch (kernel, blocks, threads, shared_bytes, signature, largest, count, scenario:
    the first scenario that made it). Needs this process on "sim" (GPUCNN_DEVICE=sim)."""
    from . import backend
    from .profile import record_launches, shapes_only
    if backend.device() != "sim":
        raise backend.DeviceError("kernel_scenarios.record: runs on 'sim' (GPUCNN_DEVICE=sim), "
                                  f"this process uses {backend.device()!r}")
    seen = {}
    for label, run in (scenarios or SCENARIOS).items():
        with shapes_only(cuda_shapes=True), record_launches() as log:
            run()
        gc.collect()        # a model and its workspace are cycles: freed before the next run (peak 1.1 GB, not 2.7)
        for r in log:
            key = (r.kernel, r.blocks, r.threads, r.shared_bytes, r.signature)
            if key in seen:
                seen[key]["count"] += 1
                seen[key]["largest"] = max(seen[key]["largest"], r.largest)
            else:
                seen[key] = dict(r._asdict(), signature=[list(s) for s in r.signature], count=1, scenario=label)
    return list(seen.values())
