"""The command line, end to end: train a tiny LeNet-5, then evaluate, summarise, and every user mistake."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpucnn
import gpucnn.model
from gpucnn import cli, data
from conftest import GPU_PROBLEM
from test_data import write_cifar_set, write_idx, write_idx_set

REPO = Path(__file__).resolve().parents[1]
TINY = ["--limit", "256", "--epochs", "1", "--batch-size", "64", "--quiet", "--device", "cpu"]


def run_cli(args):
    """(exit status, stdout, stderr) of ``gpucnn ARGS`` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_process(args, cwd=REPO):
    """``python -m gpucnn ARGS`` in a fresh process."""
    env = {**os.environ, "GPUCNN_DEVICE": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "gpucnn", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    """Fashion-MNIST where it is installed; otherwise a small synthetic set in the same files."""
    try:
        data.locate("fashion-mnist")
        return []
    except FileNotFoundError:
        folder = tmp_path_factory.mktemp("fake-fashion-mnist")
        write_idx_set(folder, np.random.default_rng(0), n_train=300, n_test=120, size=(28, 28))
        return ["--data", str(folder)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_args):
    """One tiny training run shared by the tests that read what it wrote: (status, stdout, stderr, out dir)."""
    out = tmp_path_factory.mktemp("run")
    return (*run_cli(["train", "lenet5", *TINY, "--out", out, *data_args]), out)


def printed_accuracy(stdout):
    found = re.findall(r"^test accuracy: ([01]\.\d{4})$", stdout, re.M)
    assert len(found) == 1, f"no 'test accuracy: 0.XXXX' line in {stdout!r}"
    return float(found[0])


# ------------------------------------------------------------------------------------------------
# train, evaluate, summary, info


def test_train_writes_everything(trained):
    code, stdout, stderr, out = trained
    assert code == 0, stderr
    assert 0 <= printed_accuracy(stdout) <= 1
    for name in ("model.npz", "last.npz", "best.npz", "history.json", "curves.png"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    history = json.loads((out / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds"):
        assert len(history[key]) == 1, key
    assert history["val_accuracy"][0] == pytest.approx(printed_accuracy(stdout), abs=1e-4)


def test_curves_png_is_a_picture(trained):
    import matplotlib.image
    png = trained[3] / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)[..., :3]
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    drawn = np.any(pixels < 0.9, axis=-1)  # anything but the white background
    assert 0.01 < drawn.mean() < 0.5


def test_plot_history_lines_and_missing_validation(tmp_path):
    from gpucnn.viz import plot_history
    full = {"loss": [1.0, 0.6, 0.4], "accuracy": [0.5, 0.7, 0.8], "val_loss": [0.9, 0.7, 0.5],
            "val_accuracy": [0.6, 0.7, 0.75]}
    fig = plot_history(full, tmp_path / "full.png")
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train", "validation"]
    assert list(acc_ax.lines[1].get_xdata()) == [1, 2, 3] and list(acc_ax.lines[1].get_ydata()) == [0.6, 0.7, 0.75]
    no_val = plot_history({"loss": [1.0, 0.5], "accuracy": [0.5, 0.6], "val_loss": [None, None],
                           "val_accuracy": [None, None]})
    assert [len(ax.lines) for ax in no_val.axes] == [1, 1]
    assert (tmp_path / "full.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_prints_loss_accuracy_top5(trained, data_args):
    model = trained[3] / "model.npz"
    code, stdout, stderr = run_cli(["evaluate", model, "--limit", 100, "--device", "cpu", *data_args])
    assert code == 0, stderr
    values = dict(re.findall(r"^(loss|accuracy|top-5 accuracy): (\d+\.\d{4})$", stdout, re.M))
    assert set(values) == {"loss", "accuracy", "top-5 accuracy"}, stdout
    # the same model on the same first 100 test images that train evaluated
    assert float(values["accuracy"]) == printed_accuracy(trained[1])
    assert float(values["accuracy"]) <= float(values["top-5 accuracy"]) <= 1
    assert float(values["loss"]) > 0


def test_summary_of_a_file_and_of_a_name(trained):
    code, from_file, stderr = run_cli(["summary", trained[3] / "model.npz", "--device", "cpu"])
    assert code == 0, stderr
    code, from_name, stderr = run_cli(["summary", "lenet5", "--device", "cpu"])
    assert code == 0, stderr
    for text in (from_file, from_name):
        assert "Conv2D" in text and "Dense" in text
    count = lambda text: re.findall(r"[\d,]{5,}", text)[-1]  # the last big number: the total
    assert count(from_file) == count(from_name)


def test_info():
    code, stdout, stderr = run_cli(["info", "--device", "cpu"])
    assert code == 0, stderr
    assert re.search(r"^device: cpu", stdout, re.M)
    for line in (f"gpucnn: {gpucnn.__version__}", f"numpy: {np.__version__}", "numba: ", "numba-cuda: ",
                 "cupy: ", "fashion-mnist: ", "mnist: ", "cifar10: "):
        assert line in stdout, line
    if GPU_PROBLEM:
        assert "gpu: none" in stdout


def test_train_in_a_fresh_process(tmp_path, data_args):
    result = run_process(["train", "lenet5", *TINY, "--out", tmp_path / "run", *data_args])
    assert result.returncode == 0, result.stderr
    assert 0 <= printed_accuracy(result.stdout) <= 1
    assert (tmp_path / "run" / "model.npz").is_file() and (tmp_path / "run" / "curves.png").is_file()


def test_train_winograd_and_precision(tmp_path, data_args):
    """--winograd switches alexnet_small's 3x3 convolutions (the saved model keeps the switch); --precision
    sets the GEMMs' precision (on the CPU BLAS has no TF32, so training still runs in full float32)."""
    try:
        code, stdout, stderr = run_cli(["train", "alexnet_small", *TINY, "--limit", "64", "--winograd",
                                        "--precision", "tf32", "--out", tmp_path / "run", *data_args])
        assert gpucnn.precision() == "tf32"
    finally:
        gpucnn.set_precision("fp32")
    assert code == 0, stderr
    model = gpucnn.Sequential.load(str(tmp_path / "run" / "model.npz"))
    algos = [layer.algorithm for layer in model.layers if isinstance(layer, gpucnn.layers.Conv2D)]
    assert algos and all(a == "winograd" for a in algos), algos


def test_default_out_folder_and_resume(tmp_path, data_args, trained, monkeypatch):
    monkeypatch.chdir(tmp_path)
    last = trained[3] / "last.npz"
    code, stdout, stderr = run_cli(["train", "lenet5", *TINY, "--epochs", 2, "--resume", last, *data_args])
    assert code == 0, stderr
    run = tmp_path / "runs" / "lenet5-fashion-mnist"
    history = json.loads((run / "history.json").read_text())
    assert len(history["loss"]) == 2  # epoch 1 from the checkpoint, epoch 2 trained now
    assert history["loss"][0] == pytest.approx(json.loads((trained[3] / "history.json").read_text())["loss"][0])


def test_ctrl_c_exits_130_and_names_the_checkpoint(tmp_path, data_args, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(gpucnn.model.Sequential, "fit", interrupted)
    out = tmp_path / "run"
    code, _, stderr = run_cli(["train", "lenet5", *TINY, "--out", out, *data_args])
    assert code == 130 and "stopped before the first checkpoint was written: nothing saved" in stderr
    (out / "last.npz").write_bytes(b"")
    code, _, stderr = run_cli(["train", "lenet5", *TINY, "--out", out, "--resume", out / "last.npz", *data_args])
    assert code == 130
    assert f"the last checkpoint is {out / 'last.npz'} (continue with --resume {out / 'last.npz'})" in stderr
    code, _, stderr = run_cli(["train", "lenet5", *TINY, "--out", tmp_path / "new", "--resume", out / "last.npz",
                               *data_args])
    assert code == 130 and f"no epoch finished, so the last checkpoint is still {out / 'last.npz'}" in stderr


# ------------------------------------------------------------------------------------------------
# mistakes: one line on stderr, exit status 2, no traceback


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "garbage.npz").write_bytes(b"this is not a zip file")
    corrupt = folder / "corrupt-data"
    write_idx_set(corrupt, np.random.default_rng(0), size=(28, 28))
    raw = (corrupt / "t10k-images-idx3-ubyte.gz")
    raw.unlink()
    write_idx(corrupt / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28)), 2051)
    (corrupt / "t10k-images-idx3-ubyte").write_bytes((corrupt / "t10k-images-idx3-ubyte").read_bytes()[:-3])
    write_cifar_set(folder / "cifar", np.random.default_rng(0), per_batch=2)
    (folder / "old-run").mkdir()
    (folder / "old-run" / "last.npz").write_bytes(b"")
    return folder


MISTAKES = [
    (["train", "lenet5", "--dataset", "cifar10", "--data", "{bad}/cifar"], "train",
     r"lenet5 takes 1x28x28 images but cifar10 has 3x32x32; use alexnet_small for other image sizes"),
    (["evaluate", "{model}", "--dataset", "cifar10", "--data", "{bad}/cifar"], "evaluate",
     r"{model_name} takes 1x28x28 images but cifar10 has 3x32x32"),
    (["train", "lenet5", "--out", "{bad}/old-run"], "train",
     r"old-run already holds a run \(last.npz\): continue it with --resume .*old-run/last.npz, or give another --out"),
    (["train", "lenet5", "--dataset", "mnist", "--data", "{bad}/nowhere"], "train", r"mnist data not found; looked in"),
    (["train", "resnet"], "train", r"argument model: invalid choice: 'resnet'"),
    (["train", "lenet5", "--optimizer", "adam", "--momentum", "0.9"], "train", r"--momentum applies to --optimizer sgd only"),
    (["train", "lenet5", "--resume", "{bad}/nothing.npz"], "train", r"--resume: no such file .*nothing.npz"),
    (["train", "alexnet_small", "--pool", "max"], "train", r"--activation and --pool apply to lenet5 only"),
    (["train", "lenet5", "--winograd"], "train", r"--winograd: lenet5 has no 3x3 stride-1 convolution"),
    (["train", "lenet5", "--precision", "fp16"], "train", r"argument --precision: invalid choice: 'fp16'"),
    (["train", "lenet5", "--momentum", "1.5"], "train", r"argument --momentum: must be in \[0, 1\), got 1.5"),
    (["evaluate", "{bad}/garbage.npz"], "evaluate", r"garbage.npz"),
    (["evaluate", "{bad}/missing.npz"], "evaluate", r"no such model file: .*missing.npz"),
    (["summary", "{bad}/garbage.npz"], "summary", r"garbage.npz"),
    (["summary", "resnet"], "summary", r"unknown model 'resnet': expected a .npz file or one of lenet5, alexnet"),
    (["evaluate", "{model}", "--data", "{bad}/corrupt-data"], "evaluate",
     r"t10k-images-idx3-ubyte: truncated: the header says 4 x 28 x 28"),
]


@pytest.mark.parametrize("args, command, message", MISTAKES)
def test_user_mistakes_are_one_line(args, command, message, bad_files, trained):
    model = trained[3] / "model.npz"
    args = [a.format(bad=bad_files, model=model) for a in args]
    message = message.replace("{model_name}", re.escape(str(model)))
    code, stdout, stderr = run_cli(args + ["--device", "cpu"])
    assert code == 2
    assert stderr.count("\n") == 1 and stderr.startswith(f"gpucnn {command}: error: "), stderr
    assert re.search(message, stderr), stderr
    assert "Traceback" not in stderr + stdout


@pytest.mark.skipif(GPU_PROBLEM is None, reason="a usable GPU is here, so --device cuda is not a mistake")
def test_unusable_device_is_one_line():
    code, _, stderr = run_cli(["info", "--device", "cuda"])
    assert code == 2 and stderr.count("\n") == 1
    assert stderr.startswith("gpucnn info: error: use_device('cuda'): ")


def test_mistake_in_a_fresh_process(tmp_path):
    result = run_process(["evaluate", tmp_path / "missing.npz"])
    assert result.returncode == 2
    assert result.stderr == f"gpucnn evaluate: error: no such model file: {tmp_path / 'missing.npz'}\n"


def test_no_command_prints_help():
    code, stdout, stderr = run_cli([])
    assert code == 2 and "usage: gpucnn" in stderr and "train" in stderr
