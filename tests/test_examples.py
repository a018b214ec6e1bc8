"""The lecture, runnable: every example in examples/ runs with --quick on the CPU in its own process, exits
0, writes pictures that are not blank, and prints the facts the lecture states (output sizes, parameter
counts, the weight-sharing identity, the edge detectors' response to the step image, ...), asserted here.

Each example runs once per test session (a module fixture); the tests then read what it printed and wrote.
Without Fashion-MNIST installed, the examples read a small random set in the same files instead."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpucnn import data
from test_data import write_idx_set

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = {                                     # example -> the pictures it writes
    "output_size_and_parameters": ["output_size_and_parameters.png"],
    "edge_detectors": ["edge_detectors.png"],
    "weight_sharing": ["weight_sharing.png"],
    "train_lenet5": ["curves.png"],
    "train_alexnet_small": ["curves.png"],
    "what_the_cnn_sees": ["filters.png", "feature_maps.png", "top5.png", "nearest_neighbours.png"],
    "deconvnet": ["deconv_conv1.png", "deconv_conv2.png"],
    "invariance": ["invariance.png", "invariance_features.png"],
    "custom_layer": ["custom_layer.png"],
    "ordinal_coral": ["rotations.png", "curves.png", "mae_per_rank.png"],
    "conv_autoencoder": ["autoencoder.png", "curves.png", "san_images.png", "san_metrics.png"],
    "two_towers": ["filters_towers.png", "curves.png"],
    "architectures": ["top1_vs_operations.png"],
}


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    """The environment the examples run in: Fashion-MNIST where it is installed, else a random stand-in."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCNN_DEVICE", "NUMBA_ENABLE_CUDASIM")}
    env["PYTHONPATH"] = str(REPO)
    try:
        data.locate("fashion-mnist")
    except FileNotFoundError:
        root = tmp_path_factory.mktemp("gpucnn-data")
        write_idx_set(root / "fashion-mnist", np.random.default_rng(0), n_train=2500, n_test=1200, size=(28, 28))
        env["GPUCNN_DATA"] = str(root)
    return env


_runs = {}


@pytest.fixture
def run(data_env, tmp_path_factory):
    """run(name) -> (stdout, out folder) of ``python examples/NAME.py --quick --device cpu --out DIR``,
    run once per session; a non-zero exit fails with the example's stderr."""
    def run_(name):
        if name not in _runs:
            out = tmp_path_factory.mktemp(name)
            done = subprocess.run([sys.executable, str(REPO / "examples" / f"{name}.py"), "--quick", "--device", "cpu",
                                   "--out", str(out)], cwd=REPO, env=data_env, capture_output=True, text=True,
                                  timeout=600)
            _runs[name] = (done.returncode, done.stdout, done.stderr, out)
        code, stdout, stderr, out = _runs[name]
        assert code == 0, f"examples/{name}.py --quick exited {code}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        return stdout, out
    return run_


def lines(stdout, pattern):
    found = re.findall(pattern, stdout, re.M)
    assert found, f"no line matching {pattern!r} in:\n{stdout}"
    return found


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_and_its_pictures_are_not_blank(run, name):
    import matplotlib.image
    stdout, out = run(name)
    for png in EXAMPLES[name]:
        path = out / png
        assert path.is_file(), f"{name} did not write {png}"
        assert f"saved {path}" in stdout
        pixels = matplotlib.image.imread(str(path))
        assert min(pixels.shape[:2]) > 200, f"{png} is only {pixels.shape[:2]} pixels"
        assert pixels[..., :3].var() > 2e-3, f"{png} is blank (pixel variance {pixels[..., :3].var():.2e})"


def test_output_sizes_equal_real_forward_passes(run):
    stdout, _ = run("output_size_and_parameters")
    rows = lines(stdout, r"^W=(\d+) K=(\d+) S=(\d+) P=(\d+): O = .* = (\d+)(?: \(rounded down from [\d.]+\))?, "
                         r"forward pass gives (\d+)x(\d+)$")
    assert len(rows) == 30
    for W, K, S, P, O, oh, ow in (tuple(map(int, r)) for r in rows):
        assert O == oh == ow == (W - K + 2 * P) // S + 1, (W, K, S, P)
    assert ("224", "11", "4", "2", "55", "55", "55") in rows          # AlexNet's first layer


def test_parameter_counts_of_the_lecture(run):
    stdout, _ = run("output_size_and_parameters")
    lines(stdout, r"^Conv2D\(1, 8, 5\): weight \(8, 1, 5, 5\), bias \(8,\), output 24x24 \(8 maps\), 208 parameters$")
    lines(stdout, r"^Conv2D\(3, 5, 5, padding=2\): 5\*5\*3\*5 \+ 5 = 380 parameters, output \(5, 128, 128\)$")
    lines(stdout, r"^Dense\(49152, 81920\): weight \(81920, 49152\), bias \(81920,\): .* = 4,026,613,760 parameters")
    assert lines(stdout, r"^Total parameters: ([\d,]+)") == ["61,706", "62,378,344"]      # LeNet-5, AlexNet


def test_edge_detectors_on_the_step_image(run):
    stdout, _ = run("edge_detectors")
    lines(stdout, r"^vertical detector on the step image: nonzero only in output columns \[4, 5\] "
                  r"\(windows over input columns 4\.\.7, where the step is\), values \[-3\.0\]$")
    lines(stdout, r"^horizontal detector on the step image: all zero \(max \|response\| 0\)$")
    # the printed 6x9 vertical response: -3 in columns 4 and 5 of every row, 0 elsewhere
    block = stdout.split("vertical detector's response (6x9):\n")[1].split("\n")[:6]
    expected = np.zeros((6, 9), int)
    expected[:, 4:6] = -3
    assert np.array([[int(v) for v in re.findall(r"-?\d+", row)] for row in block]).tolist() == expected.tolist()


def test_weight_sharing_identity(run):
    stdout, _ = run("weight_sharing")
    y_diff = float(lines(stdout, r"computes the same y: max \|difference\| (\S+)$")[0])
    identity = float(lines(stdout, r"^weight-sharing identity: max \|conv gradient - sum over positions of the "
                                   r"locally connected gradients\| = (\S+) ")[0])
    fd = float(lines(stdout, r"^finite differences: max \|conv gradient - finite differences\| = (\S+)$")[0])
    assert y_diff < 1e-12 and identity < 1e-12 and fd < 1e-6
    lines(stdout, r"^gpucnn\.testing\.check_backward\(Conv2D\): worst relative error")
    pattern = (r"^(upper path|lower path|sum of both paths|gpucnn Conv2D\(1, 1, 1\) gradient|"
               r"finite difference of l\(w\)) .*= ([-+\d.]+)")
    paths = {name: float(v) for name, v in lines(stdout, pattern)}
    assert paths["upper path"] * paths["lower path"] != 0
    assert paths["sum of both paths"] == pytest.approx(paths["upper path"] + paths["lower path"], abs=2e-6)
    assert paths["gpucnn Conv2D(1, 1, 1) gradient"] == pytest.approx(paths["sum of both paths"], abs=2e-6)
    assert paths["finite difference of l(w)"] == pytest.approx(paths["sum of both paths"], abs=2e-6)
    plain, averaged = map(float, lines(stdout, r"plain sum \(gpucnn, PyTorch\) w := ([\d.]+); .* = ([\d.]+) ")[0])
    assert 0.6 - averaged == pytest.approx((0.6 - plain) / 2, abs=2e-6)


def test_custom_layer_checks_pass(run):
    stdout, out = run("custom_layer")
    lines(stdout, r"^check_backward\(PReLU\): passed")
    sim = lines(stdout, r"^  \| GPU kernels on sim against the CPU twin, (float32|float64): .*forward (\S+), "
                        r"input gradient (\S+), slope gradient (\S+)$")
    assert [r[0] for r in sim] == ["float32", "float64"]
    for dtype, *errors in sim:
        assert max(map(float, errors)) <= (2e-4 if dtype == "float32" else 1e-7)
    lines(stdout, r"^  \| GPU path agrees with the CPU path: True$")
    loaded = lines(stdout, r"^loaded prelu_cnn\.npz: layer classes (.*); max \|logits difference\| .* (\S+)$")[0]
    assert "'PReLU'" in loaded[0] and float(loaded[1]) <= 1e-6
    assert len(lines(stdout, r"^layer \d PReLU\(\d+\) learned slopes")) == 2


@pytest.mark.parametrize("name, params", [("train_lenet5", 61706), ("train_alexnet_small", 5670602)])
def test_training_examples_save_a_model_that_loads(run, name, params):
    from gpucnn.model import Sequential
    stdout, out = run(name)
    accuracy = float(lines(stdout, r"^test accuracy: ([01]\.\d{4}),")[0])
    assert 0 <= accuracy <= 1
    model = Sequential.load(str(out / "model.npz"))
    assert model.num_params() == params
    assert (out / "history.json").is_file()


def test_what_the_cnn_sees_prints_what_it_draws(run):
    stdout, _ = run("what_the_cnn_sees")
    lines(stdout, r"^first conv layer's kernels: \(6, 1, 5, 5\)$")
    lines(stdout, r"^feature maps of test image 0 \(.*\) at the conv layers: \[\(6, 28, 28\), \(16, 10, 10\)\]$")
    top5 = lines(stdout, r"^test image \d+ \(.*\): top-5 (.*)$")
    assert len(top5) == 8
    for row in top5:
        probs = [float(p) for p in re.findall(r" (\d\.\d\d)(?:,|$)", row)]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True)
    neighbours = lines(stdout, r"^test image \d+ \(.*\): nearest training images \[([\d, ]+)\]")
    assert len(neighbours) == 5 and all(len(n.split(",")) == 6 for n in neighbours)


def test_deconvnet_patterns_stay_in_their_receptive_fields(run):
    stdout, _ = run("deconvnet")
    found = lines(stdout, r"^conv layer (\d) \(model layer \d\) map \d+: .*pattern nonzero only inside it: (\w+)$")
    assert {layer for layer, _ in found} == {"1", "2"}
    assert all(inside == "True" for _, inside in found)


def test_invariance_conv_maps_are_equivariant_not_invariant(run):
    stdout, _ = run("invariance")
    for kind in ("shift", "rotation", "scale"):
        lines(stdout, rf"^accuracy under {kind} \(200 test images\): ")
    equi = lines(stdout, r"^conv1 maps of the shifted image against the original's maps shifted the same way"
                         r".*: (.*)$")[0]
    values = [float(v) for v in re.findall(r"d=\d+ ([\d.]+)", equi)]
    assert len(values) == 9 and min(values) >= 0.999            # shifted maps are the maps shifted
    in_place = lines(stdout, r"^ +conv1: (.*)$")[0]
    values = [float(v) for v in re.findall(r"d=\d+ ([\d.]+)", in_place)]
    assert values[0] == pytest.approx(1.0) and max(values[4:]) < 0.99     # compared in place they differ


def test_ordinal_coral_prints_table_1_in_miniature(run, data_env):
    stdout, _ = run("ordinal_coral")
    # random stand-in images (no Fashion-MNIST installed) have no upright to turn from: the MAEs are then only
    # checked to be numbers, not to beat the chance level
    real_images = "GPUCNN_DATA" not in data_env
    header = lines(stdout, r"^Method +Seed 0 +Seed 1 +Seed 2 +AVG \+- SD$")
    assert len(header) == 1
    lines(stdout, r"^ +MAE +RMSE +MAE +RMSE +MAE +RMSE +MAE +RMSE$")
    number = r"(\S+)"
    seeds = " +".join([number] * 6)                        # MAE and RMSE for each of the three seeds
    rows = lines(stdout, rf"^(CE-CNN|CORAL-CNN) +{seeds} +{number} \+- {number} +{number} \+- {number}$")
    assert [r[0] for r in rows] == ["CE-CNN", "CORAL-CNN"]
    chance = float(lines(stdout, r"^chance level \(always the median rank, \d+\): MAE (\S+), RMSE \S+$")[0])
    assert 2 < chance < 4                                  # 12 ranks, drawn uniformly: about 3
    for method, *cells in rows:
        v = np.array([float(c) for c in cells])
        assert np.isfinite(v).all() and (v >= 0).all(), (method, v)
        mae, rmse = v[0:6:2], v[1:6:2]
        assert not real_images or (mae < chance).all(), f"{method}: MAE {mae} not below the chance level {chance}"
        assert (rmse >= mae - 1e-3).all()                  # RMSE >= MAE for any errors (printed to 3 places)
        assert v[6] == pytest.approx(mae.mean(), abs=1.5e-3) and v[8] == pytest.approx(rmse.mean(), abs=1.5e-3)
        assert v[7] == pytest.approx(mae.std(ddof=1), abs=1.5e-3)
    # evaluate(loss=CoralLoss()) counts the same MAE as the table, and rank consistency is reported per seed
    for got, table in lines(stdout, r"^ +evaluate\(loss=CoralLoss\(\)\): .*, mae (\S+) \(the table's (\S+)\)$"):
        assert got == table
    consistent = lines(stdout, r"^ +rank consistency: P\(rank > k\) non-increasing in k for ([\d.]+)% of the \d+ test")
    assert len(consistent) == 3 and all(0 <= float(c) <= 100 for c in consistent)


def _example_module(name):
    """examples/NAME.py imported (not run), as another example imports it."""
    import importlib
    sys.path.insert(0, str(REPO / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "examples"))


def test_conv_autoencoder_shapes_and_saved_model(run):
    from gpucnn import models
    from gpucnn.model import Sequential
    encoder = Sequential(models.conv_encoder_layers(5), input_shape=(1, 28, 28))
    assert encoder.output_shape == (8, 7, 7)
    assert Sequential(models.conv_decoder_layers(), input_shape=(8, 7, 7)).output_shape == (1, 28, 28)
    stdout, out = run("conv_autoencoder")
    lines(stdout, r"^bottleneck: 8x7x7 = 392 numbers of 784 pixels$")
    model = Sequential.load(str(out / "autoencoder.npz"))
    made = models.conv_autoencoder(seed=0).layers
    assert [type(l).__name__ for l in model.layers] == [type(l).__name__ for l in made]
    assert model.num_params() == 14217


def _have_fashion_mnist() -> bool:
    try:
        data.locate("fashion-mnist")
        return True
    except FileNotFoundError:
        return False


def test_conv_autoencoder_learns_and_the_perturbation_fools_the_fixed_classifier(run):
    stdout, _ = run("conv_autoencoder")
    test_bce = [float(v) for v in lines(stdout, r"^autoencoder epoch \d+/\d+: .*test BCE (\S+)")]
    assert len(test_bce) >= 3 and np.isfinite(test_bce).all()
    assert test_bce[-1] < test_bce[0]                           # the reconstruction loss falls
    floor = float(lines(stdout, r"^BCE of the test images against themselves .*: (\S+)$")[0])
    rows = lines(stdout, r"^(fixed attribute classifier accuracy|attribute classifier trained anew|matcher top-1|"
                         r"reconstruction loss \(BCE\)) +(\S+) +(\S+) +(\S+)$")
    table = {row: [float(v) for v in values] for row, *values in rows}
    assert len(table) == 4 and all(np.isfinite(v).all() for v in table.values())
    for row in ("fixed attribute classifier accuracy", "attribute classifier trained anew", "matcher top-1"):
        assert all(0 <= v <= 1 for v in table[row]), (row, table[row])
    original, reconstructed, perturbed = table["fixed attribute classifier accuracy"]
    assert reconstructed >= original - 0.05                     # the plain autoencoder keeps the attribute
    if _have_fashion_mnist():
        assert perturbed < original                             # the perturbation fools the fixed classifier
    else:   # the random stand-in has no attribute to hide: its classifier answers the majority class throughout
        assert perturbed <= original
    assert table["matcher top-1"][0] >= 0.95                    # a clean image finds itself
    bce = table["reconstruction loss (BCE)"]
    assert bce[0] == floor and min(bce[1:]) >= floor            # no image is nearer itself than it is


# --------------------------------------------------------------------- two_towers.py and architectures.py
# The expected parameters and multiply-adds are written out from the layer shapes, not taken from gpucnn:
# a convolution has out * in/groups * KH*KW weights (+ out biases) and uses each once per output position.

def _conv(cin, cout, k, size, groups=1):
    """(parameters, multiply-adds per image) of a k x k convolution whose output is size x size."""
    weights = cout * cin // groups * k * k
    return weights + cout, weights * size * size


def _dense(n_in, n_out):
    return n_in * n_out + n_out, n_in * n_out


def _alexnet_small(groups):
    """AlexNet-small at 28x28: its layers with weights, as (index, name, parameters, multiply-adds)."""
    g = "Conv2D(groups=2)" if groups == 2 else "Conv2D"
    return [(0, "Conv2D", *_conv(1, 64, 3, 28)), (3, g, *_conv(64, 192, 3, 14, groups)),
            (6, "Conv2D", *_conv(192, 384, 3, 7)), (8, g, *_conv(384, 256, 3, 7, groups)),
            (10, g, *_conv(256, 256, 3, 7, groups)), (15, "Dense", *_dense(2304, 1024)),
            (18, "Dense", *_dense(1024, 1024)), (20, "Dense", *_dense(1024, 10))]


def _number(s):
    return int(s.replace(",", ""))


def test_two_towers_prints_what_the_groups_save(run):
    stdout, out = run("two_towers")
    rows = lines(stdout, r"^(\d+) (Conv2D\(groups=2\)|Conv2D|Dense)" + r" +([\d,]+)" * 6 + "$")
    one, two = _alexnet_small(1), _alexnet_small(2)
    assert [(int(r[0]), r[1]) for r in rows] == [(i, name) for i, name, _, _ in two]
    for r, (_, _, p1, m1), (_, _, p2, m2) in zip(rows, one, two):
        assert [_number(v) for v in r[2:]] == [p1, p2, p1 - p2, m1, m2, m1 - m2]
    P1, M1 = (sum(c) for c in list(zip(*one))[2:])
    P2, M2 = (sum(c) for c in list(zip(*two))[2:])
    assert (P1, P2) == (5_670_602, 5_670_602 - (64 * 192 + 384 * 256 + 256 * 256) * 9 // 2)
    total = lines(stdout, r"^total" + r" +([\d,]+)" * 6 + "$")[0]
    assert [_number(v) for v in total] == [P1, P2, P1 - P2, M1, M2, M1 - M2]
    lines(stdout, rf"^groups=2 saves {P1 - P2:,} parameters \({(P1 - P2) / P1:.1%}\) and {M1 - M2:,} multiply-adds")
    # the towers are apart: only the grouped conv2's first half sees conv1's first half
    assert lines(stdout, r"^(AlexNet-small(?:, groups=2)?): changing conv1's maps 0-31 \(tower 1\) changes conv2's "
                         r"maps (.*)$") == [("AlexNet-small", "0-191, 192 of 192"),
                                            ("AlexNet-small, groups=2", "0-95, 96 of 192")]
    shares = lines(stdout, r"^AlexNet-small.*: conv1 kernels \(64, 1, 3, 3\), mean DC share maps 0-31 ([\d.]+), "
                           r"maps 32-63 ([\d.]+)$")
    assert len(shares) == 2 and all(0 < float(v) < 1 for row in shares for v in row)
    accuracy = dict(lines(stdout, r"^test accuracy, (AlexNet-small(?:, groups=2)?): ([01]\.\d{4}) "
                                  r"\(64 test images\)$"))
    assert set(accuracy) == {"AlexNet-small", "AlexNet-small, groups=2"}
    saved = json.loads((out / "accuracies.json").read_text())
    assert {v["label"]: f"{v['accuracy']:.4f}" for v in saved.values()} == accuracy
    assert set(saved) == {"alexnet_small", "alexnet_small_groups2"}
    assert all("2 epochs of 64 images = 4 steps of 32" in v["how"] and "seed 0" in v["how"] for v in saved.values())


ARCHITECTURES = {           # label: (parameters, multiply-adds per image)
    "LeNet-5 (tanh, avg pool)": (61_706, 416_520),
    "LeNet-5 (ReLU, max pool)": (61_706, 416_520),
    "AlexNet-small": tuple(map(sum, list(zip(*_alexnet_small(1)))[2:])),
    "AlexNet-small, groups=2": tuple(map(sum, list(zip(*_alexnet_small(2)))[2:])),
    "conv. autoencoder's encoder + linear probe": tuple(map(sum, zip(
        _conv(1, 16, 3, 14), _conv(16, 32, 3, 7), _conv(32, 8, 3, 7), _dense(8 * 7 * 7, 10)))),
}
_TABLE_ROW = (r"^(LeNet-5 \(.*?\)|AlexNet-small(?:, groups=2)?|conv\. autoencoder's encoder \+ linear probe)"
              r" +([\d,]+) +([\d,]+) +([01]\.\d{4})  (.*)$")


def _table(stdout):
    return {label: (_number(p), _number(m), float(a), how) for label, p, m, a, how in lines(stdout, _TABLE_ROW)}


def test_architectures_table(run):
    stdout, out = run("architectures")
    table = _table(stdout)
    assert {label: row[:2] for label, row in table.items()} == ARCHITECTURES
    assert (ARCHITECTURES["AlexNet-small"][1], ARCHITECTURES["AlexNet-small, groups=2"][1]) == (130_313_216, 83_348_480)
    for label, (_, _, accuracy, how) in table.items():
        assert 0 <= accuracy <= 1 and "seed 0" in how and how.endswith("128 test images"), (label, how)
        assert "1 epoch of 128 images = 4 steps of 32" in how, (label, how)
    assert "probe 5 epochs = 20 steps of 32" in table["conv. autoencoder's encoder + linear probe"][3]
    saved = json.loads((out / "accuracies.json").read_text())
    assert sorted(round(v["accuracy"], 4) for v in saved.values()) == sorted(row[2] for row in table.values())


def _architectures(env, out, history):
    return subprocess.run([sys.executable, str(REPO / "examples" / "architectures.py"), "--quick", "--device", "cpu",
                           "--out", str(out), "--history", str(history)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_architectures_takes_accuracies_from_a_history(data_env, tmp_path):
    """--history with every net: nothing is trained, the table and the chart show the file's numbers."""
    rng = np.random.default_rng()
    keys = ["lenet5_tanh_avg", "lenet5_relu_max", "alexnet_small", "alexnet_small_groups2", "ae_probe"]
    history = {k: {"accuracy": float(rng.uniform(0.5, 0.95)), "how": f"run {k} {rng.integers(1000)}"} for k in keys}
    path = tmp_path / "accuracies.json"
    path.write_text(json.dumps(history))
    done = _architectures(data_env, tmp_path / "out", path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 1/" not in done.stdout                                     # nothing trained
    table = _table(done.stdout)
    assert {label: row[:2] for label, row in table.items()} == ARCHITECTURES
    saved = json.loads((tmp_path / "out" / "accuracies.json").read_text())
    for k in keys:
        label = saved[k]["label"]
        assert table[label][2] == round(history[k]["accuracy"], 4)
        assert table[label][3] == f"from {path}: {history[k]['how']}"
    assert (tmp_path / "out" / "top1_vs_operations.png").is_file()
    path.write_text(json.dumps({"vgg16": {"accuracy": 0.9, "how": "?"}}))
    done = _architectures(data_env, tmp_path / "out", path)
    assert done.returncode != 0 and "for nets among lenet5_tanh_avg" in done.stderr and "'vgg16'" in done.stderr
