"""Sequential: shapes and summary, the whole network's gradient, training, resuming bit for bit, saving,
and the ways a run ends early (Ctrl-C, NaN, a callback) without losing its checkpoint."""
import os

import numpy as np
import pytest

import gpucnn.model as model_module
from gpucnn import backend, checkpoint, layers as L, optim
from gpucnn.checkpoint import CheckpointError
from gpucnn.data import ArrayDataset, Augment
from gpucnn.layers.base import LAYER_TYPES, Layer
from gpucnn.losses import SoftmaxCrossEntropy
from gpucnn.model import Sequential
from gpucnn.testing import check_backward
from conftest import assert_close


def dense_net(rng, dtype="float32", dropout=0.25, classes=3):
    layers = [L.Flatten(), L.Dense(12, 8, dtype=dtype, rng=rng), L.Tanh()]
    layers += [L.Dropout(dropout, seed=3)] if dropout else []
    layers += [L.Dense(8, classes, dtype=dtype, rng=rng)]
    return Sequential(layers, input_shape=(3, 2, 2))


def conv_net(rng, dtype="float32", dropout=0.3, classes=3):
    layers = [L.Conv2D(1, 3, 3, padding=1, dtype=dtype, rng=rng), L.ReLU(), L.MaxPool2D(2), L.Flatten()]
    layers += [L.Dropout(dropout, seed=5)] if dropout else []
    layers += [L.Dense(3 * 4 * 4, classes, dtype=dtype, rng=rng)]
    return Sequential(layers, input_shape=(1, 8, 8))


NETS = {"dense": (dense_net, (3, 2, 2)), "conv": (conv_net, (1, 8, 8))}


def make_data(rng, shape, n=96, classes=3, uint8=True):
    """Separable images: class k adds a fixed random pattern to noise."""
    patterns = rng.standard_normal((classes,) + shape) * 1.5
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n,) + shape) * 0.5 + patterns[y]
    if uint8:
        x = np.clip(x * 40 + 128, 0, 255).astype(np.uint8)
    else:
        x = x.astype(np.float32)
    return x, y.astype(np.int64)


def params_of(model):
    return {f"{i}.{k}": backend.to_numpy(v).copy() for i, l in enumerate(model.layers) for k, v in l.params.items()}


# ---------------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("net", NETS)
def test_forward_shape(net, rng):
    make, shape = NETS[net]
    model = make(rng)
    x = rng.standard_normal((5,) + shape).astype(np.float32)
    assert model.output_shape == (3,)
    assert model.forward(x).shape == (5, 3)
    assert model.predict(x).shape == (5, 3)
    assert model.predict(x[0]).shape == (3,)       # one image


def test_summary_counts_like_the_course(capsys):
    model = Sequential([L.Conv2D(1, 8, 5), L.ReLU(), L.Conv2D(8, 5, 5), L.Flatten()], input_shape=(1, 28, 28))
    text = model.summary()
    assert capsys.readouterr().out.strip() == text.strip()
    assert model.layers[0].num_params() == 208 and model.num_params() == 208 + (5 * 8 * 25 + 5)
    assert Sequential([L.Conv2D(3, 5, 5)], input_shape=(3, 32, 32)).num_params() == 380
    lines = text.splitlines()
    assert any("Conv2D" in l and "(8, 24, 24)" in l and l.rstrip().endswith("208") for l in lines)
    assert any("Flatten" in l and "(2000,)" in l for l in lines)
    assert f"Total parameters: {208 + 1005:,}" in text
    assert model.summary(file=False) == text and capsys.readouterr().out == ""


def test_summary_without_input_shape(rng):
    model = Sequential([L.Flatten(), L.Dense(12, 3, rng=rng)])
    assert "?" in model.summary(file=False) and model.output_shape is None
    model.predict(rng.standard_normal((2, 3, 2, 2)).astype(np.float32))
    assert model.input_shape == (3, 2, 2) and model.output_shape == (3,)


def test_shape_error_at_construction_names_the_layer():
    with pytest.raises(ValueError, match=r"Sequential: layer 3 \(Dense\) does not fit its input of shape \(144,\), "
                                         r"the output of layer 2 \(Flatten\): Dense: expected 99 input features"):
        Sequential([L.Conv2D(1, 4, 3), L.ReLU(), L.Flatten(), L.Dense(99, 2)], input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2D\) does not fit its input of shape \(1, 3, 3\), "
                                         r"the output of the model's input"):
        Sequential([L.Conv2D(1, 2, 5)], input_shape=(1, 3, 3))


def test_construction_errors(rng):
    with pytest.raises(TypeError, match="Sequential: item 1 is a function, not a gpucnn Layer"):
        Sequential([L.ReLU(), lambda x: x])
    with pytest.raises(ValueError, match="Sequential: expected a list of layers, got an empty one"):
        Sequential([])
    with pytest.raises(TypeError, match=r"Sequential: the layers mix dtypes \['float32', 'float64'\]"):
        Sequential([L.Dense(2, 2, dtype="float64"), L.Dense(2, 2)])


# ---------------------------------------------------------------------------------------------- gradients

class NetWithLoss:
    """A Sequential and its loss as one function of (x, labels) that check_backward can differentiate;
    the parameters of all layers are exposed as "<layer>.<name>"."""

    def __init__(self, model, loss):
        self.model, self.loss = model, loss
        self.params = {f"{i}.{k}": v for i, l in enumerate(model.layers) for k, v in l.params.items()}
        self.grads = {}

    def forward(self, x, target):
        for key, v in self.params.items():        # check_backward swaps and perturbs the arrays in self.params
            i, k = key.split(".", 1)
            self.model.layers[int(i)].params[k] = v
        return self.loss.forward(self.model.forward(x, training=True), target)

    def backward(self):
        gx = self.model.backward(self.loss.backward())
        self.grads = {f"{i}.{k}": l.grads[k] for i, l in enumerate(self.model.layers) for k in l.params}
        return gx


@pytest.mark.parametrize("net", NETS)
def test_whole_network_gradient(net, rng):
    make, shape = NETS[net]
    model = make(rng, dtype="float64", dropout=0)
    x = rng.standard_normal((3,) + shape)
    y = rng.integers(0, 3, 3)
    report = check_backward(NetWithLoss(model, SoftmaxCrossEntropy()), x, y)
    assert set(report) == {"x"} | set(params_of(model))


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.parametrize("net", NETS)
def test_training_learns_a_separable_problem(net, rng):
    make, shape = NETS[net]
    model = make(rng)
    x, y = make_data(rng, shape, n=120)
    before = model.evaluate((x, y))          # no statistics yet: raw pixels, so just a reference point
    hist = model.fit((x, y), epochs=8, batch_size=16, optimizer=optim.Adam(model, lr=0.02), verbose=0)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    assert hist["accuracy"][-1] > 0.9 and hist["accuracy"][-1] > before["accuracy"] + 0.2
    after = model.evaluate((x, y))
    assert after["accuracy"] > 0.9 and after["loss"] < 0.4
    assert set(hist) == {"loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr"}
    assert hist["val_loss"] == [None] * 8 and len(hist["seconds"]) == 8


RESUME_CASES = [
    ("sgd+augment", lambda m: optim.SGD(m, lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True), None,
     Augment(crop_padding=1, flip=True)),
    ("adam+clip", lambda m: optim.Adam(m, lr=0.01), 0.5, None),
]


@pytest.mark.parametrize("name,make_opt,clip,augment", RESUME_CASES)
def test_resumed_run_is_bit_identical(name, make_opt, clip, augment, rng, tmp_path):
    x, y = make_data(rng, (1, 8, 8), n=40)
    vx, vy = make_data(rng, (1, 8, 8), n=16)
    sched = optim.CosineSchedule(4, min_lr=1e-3)
    kw = dict(batch_size=16, validation=(vx, vy), scheduler=sched, clip_norm=clip, seed=7, verbose=0,
              augment=augment)

    straight = conv_net(np.random.default_rng(0))
    h_straight = straight.fit((x, y), epochs=4, optimizer=make_opt(straight), checkpoint_dir=tmp_path / "a", **kw)

    first = conv_net(np.random.default_rng(0))
    first.fit((x, y), epochs=4, optimizer=make_opt(first), checkpoint_dir=tmp_path / "b",
              callbacks=[lambda e, h: "stop" if e == 1 else None], **kw)
    resumed = conv_net(np.random.default_rng(99))      # other initial weights: resume must replace them
    h_resumed = resumed.fit((x, y), epochs=4, optimizer=make_opt(resumed), checkpoint_dir=tmp_path / "b",
                            resume=tmp_path / "b" / "last.npz", **kw)

    a, b = params_of(straight), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{name}: {k} differs after resuming"
    assert straight.layers[4].step == resumed.layers[4].step == 4 * 3       # dropout's counter came back
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        assert h_resumed[key] == h_straight[key], key
    assert np.array_equal(straight.input_mean, resumed.input_mean)
    assert checkpoint.load(tmp_path / "b" / "last.npz")["training"]["epoch"] == 4


def test_resume_when_already_done_trains_nothing(rng, tmp_path):
    x, y = make_data(rng, (3, 2, 2), n=20)
    model = dense_net(rng)
    model.fit((x, y), epochs=2, batch_size=8, checkpoint_dir=tmp_path, verbose=0)
    w = params_of(model)
    hist = model.fit((x, y), epochs=2, batch_size=8, checkpoint_dir=tmp_path, resume=tmp_path / "last.npz", verbose=0)
    assert len(hist["loss"]) == 2
    assert all(np.array_equal(w[k], v) for k, v in params_of(model).items())


def test_best_checkpoint_follows_validation_accuracy(rng, tmp_path):
    x, y = make_data(rng, (3, 2, 2), n=60)
    model = dense_net(rng)
    hist = model.fit((x, y), epochs=5, batch_size=8, validation=(x[:30], y[:30]), checkpoint_dir=tmp_path,
                     optimizer=optim.SGD(model, lr=0.05), verbose=0)
    best = checkpoint.load(tmp_path / "best.npz")["training"]
    va = hist["val_accuracy"]
    assert best["best"] == max(va)
    assert best["epoch"] == va.index(max(va)) + 1            # the first epoch that reached it
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "last.npz"]


def test_callback_stop_and_arguments(rng):
    x, y = make_data(rng, (3, 2, 2), n=20)
    seen = []

    def cb(epoch, history):
        seen.append((epoch, len(history["loss"])))
        return "stop" if epoch == 2 else None
    hist = dense_net(rng).fit((x, y), epochs=10, batch_size=8, callbacks=[cb, lambda e, h: None], verbose=0)
    assert seen == [(0, 1), (1, 2), (2, 3)] and len(hist["loss"]) == 3


def test_ctrl_c_keeps_the_last_checkpoint(rng, tmp_path, capsys):
    x, y = make_data(rng, (3, 2, 2), n=20)
    model = dense_net(rng)

    def interrupt(epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt) as info:
        model.fit((x, y), epochs=5, batch_size=8, checkpoint_dir=tmp_path, callbacks=[interrupt], verbose=2)
    last = str(tmp_path / "last.npz")
    assert f"the last good checkpoint is {last} (after epoch 2)" in capsys.readouterr().err
    assert any(f"resume={last!r}" in n for n in info.value.__notes__)
    loaded = Sequential.load(last)
    assert np.array_equal(loaded.predict(x), model.predict(x))     # the epoch-2 weights, intact


def test_ctrl_c_while_writing_a_checkpoint(rng, tmp_path, monkeypatch):
    x, y = make_data(rng, (3, 2, 2), n=20)
    model = dense_net(rng)
    real_savez, calls = np.savez, []

    def savez(f, **kw):
        calls.append(1)
        if len(calls) == 2:                      # the second epoch's checkpoint, half written
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        return real_savez(f, **kw)
    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(KeyboardInterrupt):
        model.fit((x, y), epochs=3, batch_size=8, checkpoint_dir=tmp_path, verbose=0)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best.npz", "last.npz"]      # no temporary file left
    assert checkpoint.load(tmp_path / "last.npz")["training"]["epoch"] == 1


def test_nan_loss_stops_and_keeps_the_checkpoint(rng, tmp_path):
    x, y = make_data(rng, (3, 2, 2), n=20)
    model = dense_net(rng)

    def poison(epoch, history):
        model.layers[1].params["weight"][0, 0] = np.nan
    with pytest.raises(FloatingPointError) as info:
        model.fit((x, y), epochs=3, batch_size=8, checkpoint_dir=tmp_path, callbacks=[poison], verbose=0)
    assert any("after epoch 1" in n for n in info.value.__notes__)
    saved = Sequential.load(tmp_path / "last.npz")
    assert all(np.isfinite(v).all() for v in params_of(saved).values())


def test_checkpoint_dir_never_overwrites_an_earlier_run(rng, tmp_path):
    x, y = make_data(rng, (3, 2, 2), n=20)
    dense_net(rng).fit((x, y), epochs=1, batch_size=8, checkpoint_dir=tmp_path, verbose=0)
    with pytest.raises(FileExistsError, match="already holds the checkpoint of an earlier run"):
        dense_net(rng).fit((x, y), epochs=1, batch_size=8, checkpoint_dir=tmp_path, verbose=0)


def test_fit_errors(rng, tmp_path):
    x, y = make_data(rng, (3, 2, 2), n=20)
    model = dense_net(rng)
    with pytest.raises(ValueError, match=r"Sequential.fit: labels must be in \[0, 3\) for 3 classes, got 5"):
        model.fit((x, np.where(y == 0, 5, y)), verbose=0)
    with pytest.raises(ValueError, match=r"Sequential.fit: the model takes inputs of shape \(3, 2, 2\) .* the data "
                                         r"are \(1, 8, 8\)"):
        model.fit(make_data(rng, (1, 8, 8), n=4), verbose=0)
    with pytest.raises(TypeError, match="Sequential.fit: expected a gpucnn.data.ArrayDataset or an"):
        model.fit(x, verbose=0)
    with pytest.raises(ValueError, match="Sequential.fit: epochs must be an int >= 0"):
        model.fit((x, y), epochs=1.5, verbose=0)
    with pytest.raises(ValueError, match="Sequential.fit: the optimizer was made for another model"):
        model.fit((x, y), optimizer=optim.SGD(dense_net(rng), lr=0.1), verbose=0)
    model.save(tmp_path / "model.npz")
    with pytest.raises(CheckpointError, match="is a saved model, not a training checkpoint"):
        model.fit((x, y), resume=tmp_path / "model.npz", verbose=0)
    model.fit((x, y), epochs=1, batch_size=8, checkpoint_dir=tmp_path / "run", verbose=0)
    other = Sequential([L.Flatten(), L.Dense(12, 5), L.Tanh(), L.Dense(5, 3)], input_shape=(3, 2, 2))
    with pytest.raises(CheckpointError,
                       match=r"was written for a different model: layer 1 is Dense\(.*'out_features': 8"):
        other.fit((x, y), resume=tmp_path / "run" / "last.npz", verbose=0)


def test_verbose_levels(rng, capsys):
    x, y = make_data(rng, (3, 2, 2), n=20)
    dense_net(rng).fit((x, y), epochs=2, batch_size=8, validation=(x, y), verbose=0)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    dense_net(rng).fit((x, y), epochs=2, batch_size=8, validation=(x, y), verbose=2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2: loss ") and "val_accuracy" in lines[1]
    assert "images/s" in lines[0]


# ---------------------------------------------------------------------------------------------- inference

def test_standardization(rng):
    x, y = make_data(rng, (1, 8, 8), n=50)
    model = conv_net(rng, dropout=0)
    model.fit((x, y), epochs=1, batch_size=16, verbose=0)
    assert np.allclose(model.input_mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    assert np.allclose(model.input_std, x.astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-12)
    norm = ((x - model.input_mean[None, :, None, None]) / model.input_std[None, :, None, None]).astype(np.float32)
    assert_close(model.predict(x), model.forward(norm, training=False), "float32", "standardised predict")
    model.fit((x, y), epochs=1, batch_size=16, standardize=False, verbose=0)
    assert model.input_mean is None
    assert np.array_equal(model.predict(x), model.forward(x.astype(np.float32), training=False))


def test_prepare_does_not_touch_the_batch(rng):
    model = dense_net(rng)
    model.set_standardization(rng.standard_normal((10, 3, 2, 2)))
    xb = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    keep = xb.copy()
    out = model.prepare(xb)
    assert np.array_equal(xb, keep) and out.dtype == np.float32


def test_evaluate_metrics(rng):
    model = dense_net(rng, classes=7, dropout=0)
    x, y = make_data(rng, (3, 2, 2), n=37, classes=7, uint8=False)
    result = model.evaluate(ArrayDataset(x, y, num_classes=7), batch_size=10)
    logits = model.predict(x).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    nll = -(shifted[np.arange(37), y] - np.log(np.exp(shifted).sum(axis=1)))
    assert result["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert result["top5"] == pytest.approx(np.mean([y[i] in top5[i] for i in range(37)]))
    assert result["top5"] >= result["accuracy"]


def test_predict_batches_and_probabilities(rng):
    model = dense_net(rng)
    x = rng.standard_normal((23, 3, 2, 2)).astype(np.float32)
    whole = model.predict(x, batch_size=1000)
    # equal within float32 rounding, not to the bit: OpenBLAS picks its GEMM kernel by the number of rows, so
    # a row's sum order may differ between a batch of 4 and one of 23 (it does on this 2-core EPYC)
    assert_close(model.predict(x, batch_size=4), whole, "float32", "predict in batches of 4 vs all at once")
    p = model.predict_proba(x)
    assert p.shape == (23, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-6)
    assert np.array_equal(p.argmax(1), whole.argmax(1))
    with pytest.raises(ValueError, match=r"Sequential.predict: the model takes inputs of shape \(3, 2, 2\)"):
        model.predict(x[:, :2])


# ---------------------------------------------------------------------------------------------- saving

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip(dtype, rng, tmp_path):
    x, y = make_data(rng, (1, 8, 8), n=30)
    model = Sequential([L.Conv2D(1, 2, 3, dtype=dtype, rng=rng), L.BatchNorm2D(2, dtype=dtype), L.LeakyReLU(0.2),
                        L.AvgPool2D(2), L.Flatten(), L.Dropout(0.2, seed=4), L.Dense(18, 3, dtype=dtype, rng=rng)],
                       input_shape=(1, 8, 8))
    model.fit((x, y), epochs=1, batch_size=10, optimizer=optim.SGD(model, lr=0.01), verbose=0)
    path = model.save(tmp_path / "m.npz")
    loaded = Sequential.load(path, device="cpu")
    assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
    assert loaded.input_shape == (1, 8, 8) and loaded.dtype == np.dtype(dtype)
    assert np.array_equal(loaded.predict(x), model.predict(x))
    assert np.array_equal(loaded.input_std, model.input_std)
    assert loaded.layers[5].step == model.layers[5].step == 3
    assert loaded.layers[2].slope == 0.2
    for k, v in model.layers[1].buffers.items():
        assert np.array_equal(loaded.layers[1].buffers[k], v)
    assert loaded.summary(file=False) == model.summary(file=False)


class Doubler(Layer):
    """A user's own layer: y = factor * x."""

    def __init__(self, factor=2.0):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x, training=True):
        return x * x.dtype.type(self.factor)

    def backward(self, gy):
        return gy * gy.dtype.type(self.factor)

    def config(self):
        return {"factor": self.factor}


def test_custom_and_unknown_layer_classes(rng, tmp_path, monkeypatch):
    model = Sequential([L.Flatten(), Doubler(3.0), L.Dense(12, 2, rng=rng)], input_shape=(3, 2, 2))
    path = model.save(tmp_path / "custom.npz")
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    assert np.array_equal(Sequential.load(path).predict(x), model.predict(x))
    monkeypatch.delitem(LAYER_TYPES, "Doubler")
    with pytest.raises(CheckpointError, match=r"custom\.npz: layer 1 is of class 'Doubler', which is not a known layer"
                                              r".*define or import your Layer subclass named Doubler"):
        Sequential.load(path)


def test_load_refuses_bad_files(rng, tmp_path):
    model = dense_net(rng)
    path = model.save(tmp_path / "m.npz")
    data = open(path, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.npz"):
        Sequential.load(tmp_path / "cut.npz")
    checkpoint.save(tmp_path / "other.npz", {"kind": "notes", "text": "hi"})
    with pytest.raises(CheckpointError, match=r"other\.npz: is a gpucnn file but holds no model"):
        Sequential.load(tmp_path / "other.npz")


def test_to_cpu_keeps_predictions(rng):
    model = dense_net(rng)
    x = rng.standard_normal((3, 3, 2, 2)).astype(np.float32)
    before = model.predict(x)
    assert np.array_equal(model.to("cpu").predict(x), before)


# ---------------------------------------------------------------------------------------------- sim

@pytest.mark.sim
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sim_fit_matches_cpu(dtype, rng, monkeypatch):
    """A short run through the GPU code path (loss read back every few steps, device-scalar clipping)
    against the same run on the CPU path."""
    monkeypatch.setattr(model_module, "_GPU_READ_EVERY", 2)     # 3 steps an epoch: read at steps 2 and 3
    x, y = make_data(rng, (3, 2, 2), n=24)
    gpu, cpu = dense_net(np.random.default_rng(1), dtype), dense_net(np.random.default_rng(1), dtype)
    kw = dict(epochs=2, batch_size=8, validation=(x[:8], y[:8]), clip_norm=1.0, verbose=0)
    h_gpu = gpu.fit((x, y), optimizer=optim.SGD(gpu, lr=0.1, momentum=0.9), **kw)
    with backend.cpu_path():
        h_cpu = cpu.fit((x, y), optimizer=optim.SGD(cpu, lr=0.1, momentum=0.9), **kw)
        ref = cpu.predict_proba(x)
    for k, v in params_of(cpu).items():
        assert_close(params_of(gpu)[k], v, dtype, k)
    assert h_gpu["accuracy"] == h_cpu["accuracy"]
    assert h_gpu["loss"] == pytest.approx(h_cpu["loss"], rel=1e-4 if dtype == "float32" else 1e-10)
    assert_close(gpu.predict_proba(x), ref, dtype, "predict_proba")


def test_a_step_after_to_repacks_the_flat_buffers(rng):
    """Sequential.to() drops the layers' gradient views; the next step (with clipping) packs the flat buffers
    again, even where the arrays stayed the same objects (it raised KeyError: 'weight')."""
    model = dense_net(rng)
    opt = optim.SGD(model, lr=0.1)
    x, y = rng.standard_normal((5, 3, 2, 2)).astype(np.float32), rng.integers(0, 3, 5)
    model.train_step(x, y, SoftmaxCrossEntropy(), opt)
    before = {k: v.copy() for k, v in model.layers[1].params.items()}
    model.to("cpu")
    model.train_step(x, y, SoftmaxCrossEntropy(), opt, clip_norm=1.0)
    assert all(not np.array_equal(model.layers[1].params[k], v) for k, v in before.items())
