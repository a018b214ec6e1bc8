"""The self-test's op rows: every op family (conv with each algorithm, grouped and transposed, dense, activations, pooling, normalisation,
dropout, losses, CORAL, optimizers, clipping) forward and backward on the GPU path against the CPU path, in
float32 and float64, at the shapes ``sizes`` gives (gpucnn/selftest/__init__.py)."""
from __future__ import annotations

import functools

import numpy as np

from gpucnn import layers as L, losses, optim
from gpucnn.model import Sequential

from .compare import Comparison, _host


def _int_state(layer):
    return {k: v for k, v in vars(layer).items() if isinstance(v, int) and not isinstance(v, bool)}


def check_layer(paths, rng, make, x, training=True):
    """One layer's forward and backward on the CPU path, then on the GPU path from the same parameters,
    buffers and counters: every output, gradient and updated buffer must agree."""
    dtype = x.dtype
    with paths.cpu():
        layer = make()
        buffers = {k: _host(v) for k, v in layer.buffers.items()}
        counters = _int_state(layer)
        y = layer.forward(x, training=training)
        gy = rng.standard_normal(y.shape).astype(dtype)
        gx = layer.backward(gy)
        ref = {"forward": y, "dL/dx": gx, **{f"grad {k}": v for k, v in layer.grads.items()},
               **{f"buffer {k}": v for k, v in layer.buffers.items()}}
        ref = {k: _host(v) for k, v in ref.items()}
    layer.buffers.update(buffers)
    for k, v in counters.items():
        setattr(layer, k, v)
    layer.to(paths.device)
    y = layer.forward(paths.put(x), training=training)
    gx = layer.backward(paths.put(gy))
    got = {"forward": y, "dL/dx": gx, **{f"grad {k}": v for k, v in layer.grads.items()},
           **{f"buffer {k}": v for k, v in layer.buffers.items()}}
    cmp = Comparison(paths)
    for k in ref:
        cmp.add(k, got.get(k), ref[k], dtype)
    return cmp.result()


def check_softmax_cross_entropy(paths, rng, shape, dtype):
    logits = (rng.standard_normal(shape) * 5).astype(dtype)
    labels = rng.integers(0, shape[1], size=shape[0])
    with paths.cpu():
        loss = losses.SoftmaxCrossEntropy()
        ref = [_host(loss.forward(logits, labels)), _host(loss.backward()), _host(loss.probs(logits))]
    loss = losses.SoftmaxCrossEntropy()
    got = [loss.forward(paths.put(logits), paths.put(labels)), loss.backward(), loss.probs(paths.put(logits))]
    cmp = Comparison(paths)
    for name, g, r in zip(("loss", "dL/dlogits", "softmax"), got, ref):
        cmp.add(name, g, r, dtype)
    return cmp.result()


def check_mse(paths, rng, shape, dtype):
    pred, target = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    with paths.cpu():
        loss = losses.MSE()
        ref = [_host(loss.forward(pred, target)), _host(loss.backward())]
    loss = losses.MSE()
    got = [loss.forward(paths.put(pred), paths.put(target)), loss.backward()]
    cmp = Comparison(paths)
    for name, g, r in zip(("loss", "dL/dpred"), got, ref):
        cmp.add(name, g, r, dtype)
    return cmp.result()


def check_bce(paths, rng, shape, dtype, from_logits):
    pred = (rng.standard_normal(shape) * 3 if from_logits else rng.uniform(0.02, 0.98, shape)).astype(dtype)
    target = rng.random(shape).astype(dtype)
    with paths.cpu():
        loss = losses.BinaryCrossEntropy(from_logits)
        ref = [_host(loss.forward(pred, target)), _host(loss.backward())]
    loss = losses.BinaryCrossEntropy(from_logits)
    got = [loss.forward(paths.put(pred), paths.put(target)), loss.backward()]
    cmp = Comparison(paths)
    for name, g, r in zip(("loss", "dL/dpred"), got, ref):
        cmp.add(name, g, r, dtype)
    return cmp.result()


def check_coral(paths, rng, shape, dtype):
    """CoralHead forward and backward with CoralLoss between them (one shared weight, a bias per task)."""
    n, features, classes = shape
    x = rng.standard_normal((n, features)).astype(dtype)
    y = rng.integers(0, classes, n)
    with paths.cpu():
        head, loss = L.CoralHead(features, classes, dtype=dtype, rng=np.random.default_rng(1)), losses.CoralLoss()
        z = head.forward(x)
        ref = [_host(z), _host(loss.forward(z, y)), _host(head.backward(loss.backward())),
               _host(head.grads["weight"]), _host(head.grads["bias"])]
    head.to(paths.device)
    loss = losses.CoralLoss()
    z = head.forward(paths.put(x))
    got = [z, loss.forward(z, paths.put(y)), head.backward(loss.backward()), head.grads["weight"], head.grads["bias"]]
    cmp = Comparison(paths)
    for name, g, r in zip(("logits", "loss", "dL/dx", "grad weight", "grad bias"), got, ref):
        cmp.add(name, g, r, dtype)
    return cmp.result()


def check_optimizer(paths, rng, make_layers, make_opt, dtype, steps=3):
    """``steps`` updates with changing gradients: parameters and optimizer state agree with the CPU's."""
    with paths.cpu():
        layers = make_layers(dtype)
        start = [{k: _host(v) for k, v in layer.params.items()} for layer in layers]
        grads = [[{k: rng.standard_normal(v.shape).astype(dtype) for k, v in layer.params.items()}
                  for layer in layers] for _ in range(steps)]
        opt = make_opt(layers)
        for step_grads in grads:
            for layer, g in zip(layers, step_grads):
                layer.grads = {k: v.copy() for k, v in g.items()}
            opt.step()
        ref = [{k: _host(v) for k, v in layer.params.items()} for layer in layers]
        ref_state = opt.state_dict()["state"]
    for layer, params in zip(layers, start):
        layer.params.update({k: v.copy() for k, v in params.items()})
        layer.to(paths.device)
    opt = make_opt(layers)
    for step_grads in grads:
        for layer, g in zip(layers, step_grads):
            layer.grads = {k: paths.put(v) for k, v in g.items()}
        opt.step()
    cmp = Comparison(paths)
    for i, (layer, r) in enumerate(zip(layers, ref)):
        for k in r:
            cmp.add(f"{i}.{layer.name}.{k}", layer.params[k], r[k], dtype)
    state = opt.state_dict()["state"]
    for key, slots in ref_state.items():
        for s, v in slots.items():
            if isinstance(v, int):
                if state.get(key, {}).get(s) != v:
                    cmp.problems.append(f"state {key}.{s}: {state.get(key, {}).get(s)} != {v}")
            else:
                cmp.add(f"state {key}.{s}", state.get(key, {}).get(s), v, dtype, on_device=False)
    return cmp.result()


def check_clip(paths, rng, make_layers, dtype):
    """clip_grad_norm over a Sequential's flat gradient (what train_step's clip_norm runs), clipping. Clipping
    reads only the gradients, so each path has a model of its own."""
    with paths.cpu():
        model = Sequential(make_layers(dtype))
        grads = [{k: rng.standard_normal(v.shape).astype(dtype) for k, v in layer.params.items()}
                 for layer in model.layers]
        for layer, g in zip(model.layers, grads):
            layer.grads = {k: v.copy() for k, v in g.items()}
        ref_norm = _host(optim.clip_grad_norm(model, 1.0))
        ref = [{k: _host(v) for k, v in layer.grads.items()} for layer in model.layers]
    model = Sequential(make_layers(dtype)).to(paths.device)
    for layer, g in zip(model.layers, grads):
        layer.grads = {k: paths.put(v) for k, v in g.items()}
    norm = optim.clip_grad_norm(model, 1.0)
    cmp = Comparison(paths)
    cmp.add("norm", norm, ref_norm, dtype)
    for i, (layer, r) in enumerate(zip(model.layers, ref)):
        for k in r:
            cmp.add(f"clipped {i}.{layer.name}.{k}", layer.grads[k], r[k], dtype)
    return cmp.result(note=f"norm {float(ref_norm):.3g} clipped to 1")


def _batchnorm(channels, dtype):
    """A BatchNorm2D with trained-looking parameters and statistics, not the initial 1s and 0s."""
    r = np.random.default_rng(channels)
    bn = L.BatchNorm2D(channels, dtype=dtype)
    bn.params["gamma"] = r.uniform(0.5, 1.5, channels).astype(dtype)
    bn.params["beta"] = r.standard_normal(channels).astype(dtype)
    bn.buffers["running_mean"] = r.standard_normal(channels).astype(dtype)
    bn.buffers["running_var"] = r.uniform(0.5, 2.0, channels).astype(dtype)
    return bn


def _shape(s):
    return "(" + ",".join(str(d) for d in s) + ")"


_SHORT = {"float32": "f32", "float64": "f64"}


def _layer_row(name, make, shape, dtype, scale=1.0, shift=0.0, training=True):
    """The check of a layer ``make()`` on an input of ``shape`` drawn from N(shift, scale^2)."""
    def check(paths, rng):
        x = (rng.standard_normal(shape) * scale + shift).astype(dtype)
        return check_layer(paths, rng, make, x, training)
    return f"{name} {_shape(shape)} {_SHORT[dtype]}", check


def op_checks(sz):
    """(name, check(paths, rng) -> Result) for every op family, in float32 and float64."""
    rows = []
    for dt in ("float32", "float64"):
        for what, (cin, cout, k, s, p, *g), shape, algos in sz["conv"]:
            for algo in algos:
                rows.append(_layer_row(f"conv: {what} {algo}", functools.partial(
                    L.Conv2D, cin, cout, k, stride=s, padding=p, dtype=dt, algorithm=algo, groups=(g or [1])[0]),
                    shape, dt))
        for what, (cin, cout, k, s, p, op, g), shape, algos in sz["conv_transpose"]:
            for algo in algos:
                rows.append(_layer_row(f"convT: {what} {algo}", functools.partial(
                    L.ConvTranspose2D, cin, cout, k, stride=s, padding=p, output_padding=op, groups=g, dtype=dt,
                    algorithm=algo), shape, dt))
        for what, (fin, fout), shape in sz["dense"]:
            rows.append(_layer_row(f"dense: {what}", functools.partial(L.Dense, fin, fout, dtype=dt), shape, dt))
        for what, make in (("ReLU", L.ReLU), ("Tanh", L.Tanh), ("Sigmoid", L.Sigmoid),
                           ("LeakyReLU(0.1)", functools.partial(L.LeakyReLU, 0.1))):
            rows.append(_layer_row(f"activation: {what}", make, sz["act"], dt, scale=2))
        rows.append(_layer_row("pool: MaxPool2D(2)", functools.partial(L.MaxPool2D, 2), sz["pool"], dt))
        rows.append(_layer_row("pool: AvgPool2D(2)", functools.partial(L.AvgPool2D, 2), sz["pool"], dt))
        rows.append(_layer_row("pool: MaxPool2D(3, stride=2)", functools.partial(L.MaxPool2D, 3, stride=2),
                               sz["pool_overlap"], dt))
        rows.append(_layer_row("norm: LocalResponseNorm(5)", functools.partial(
            L.LocalResponseNorm, size=5, alpha=1e-4, beta=0.75, k=2.0), sz["lrn"], dt, scale=10))
        for training in (True, False):
            rows.append(_layer_row(f"norm: BatchNorm2D {'training' if training else 'eval'}",
                                   functools.partial(_batchnorm, sz["bn"][1], dt), sz["bn"], dt, scale=3, shift=1,
                                   training=training))
        rows.append(_layer_row("dropout: Dropout(0.5)", functools.partial(L.Dropout, 0.5, seed=42), sz["dropout"], dt))
        rows.append((f"loss: SoftmaxCrossEntropy {_shape(sz['loss'])} {_SHORT[dt]}",
                     functools.partial(check_softmax_cross_entropy, shape=sz["loss"], dtype=dt)))
        rows.append((f"loss: MSE {_shape(sz['loss'])} {_SHORT[dt]}",
                     functools.partial(check_mse, shape=sz["loss"], dtype=dt)))
        rows.append((f"coral: CoralHead + CoralLoss ({sz['loss'][0]},{sz['loss'][0] * 4}->10) {_SHORT[dt]}",
                     functools.partial(check_coral, shape=(sz["loss"][0], sz["loss"][0] * 4, 10), dtype=dt)))
        for logits in (True, False):
            rows.append((f"loss: BCE({'logits' if logits else 'probabilities'}) "
                         f"{_shape(sz['act'])} {_SHORT[dt]}",
                         functools.partial(check_bce, shape=sz["act"], dtype=dt, from_logits=logits)))
        sgd = functools.partial(optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)
        adam = functools.partial(optim.Adam, lr=1e-3, weight_decay=1e-4)
        for what, make_opt in (("SGD momentum, weight decay", sgd), ("Adam", adam)):
            rows.append((f"optim: {what}, 3 steps {_SHORT[dt]}", functools.partial(
                check_optimizer, make_layers=sz["optim_layers"], make_opt=make_opt, dtype=dt)))
        rows.append((f"optim: clip_grad_norm {_SHORT[dt]}",
                     functools.partial(check_clip, make_layers=sz["clip_layers"], dtype=dt)))
    return rows
