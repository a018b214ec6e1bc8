"""The benchmarks (bench/): their --dry runs and the helpers that check results before timing.

``--dry`` runs every code path of bench/layers.py and bench/train.py on the simulator, on tiny named
shapes, checked against the CPU path (and PyTorch where installed). Each runs in a subprocess: Numba picks
simulator or GPU once per process, and the scripts select "sim" before importing gpucnn. These are CPU-suite
tests (the subprocess is the sim process); each takes about 10-25 s on 2 cores.
"""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_common():
    spec = importlib.util.spec_from_file_location("bench_common", os.path.join(ROOT, "bench", "_common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _load_common()


def run_dry(script, out_dir, *extra):
    """Run ``bench/<script> --dry`` in a fresh process; returns (stdout, the results JSON)."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", script), "--dry", "--out", str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, \
        f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    files = glob.glob(os.path.join(str(out_dir), "sim-*.json"))
    assert len(files) == 1, f"expected one results file sim-<date>.json in {out_dir}, found {files}"
    with open(files[0]) as f:
        return proc.stdout, json.load(f)


# ------------------------------------------------------------------------------------------ the dry runs

@pytest.mark.parametrize("torch_side", [True, False], ids=["with-torch", "no-torch"])
def test_layers_dry_run(tmp_path, torch_side):
    extra = () if torch_side else ("--no-torch",)
    out, results = run_dry("layers.py", tmp_path, *extra)
    assert "| shape | pass | algo | launches | err vs CPU path | err vs torch | check |" in out
    (run,) = results["layers"]
    rows = run["rows"]
    # every named dry shape, every pass of each op family
    for label in ("dry.pad", "dry.stride", "dry.big", "dry.odd", "dry.max3s2", "dry.avg2", "dry.dense",
                  "dry.loss"):
        assert any(r["shape"].startswith(label) for r in rows), f"{label} missing from {[r['shape'] for r in rows]}"
    passes = {"forward", "grad-input", "grad-weight", "backward"}
    conv_labels = ("dry.pad", "dry.stride", "dry.big", "dry.odd")
    for label in conv_labels:
        conv = [r for r in rows if r["shape"].split()[0] == label]
        assert {r["pass"] for r in conv if r.get("algo") == "gemm"} == passes
        # Winograd beside im2col + GEMM exactly where it computes the shape: 3x3 kernels with stride 1; the direct
        # convolution at every dry shape (kernels and strides up to 16)
        winograd = {r["pass"] for r in conv if r.get("algo") == "winograd"}
        assert winograd == (passes if label in ("dry.pad", "dry.odd") else set()), (label, winograd)
        assert {r["pass"] for r in conv if r.get("algo") == "direct"} == passes, label
        # the data movement alone, by both kernels (the GPU path: sim here)
        moves = {(r["pass"], r["data_movement"]) for r in conv if "data_movement" in r}
        assert moves == {(p, m) for p in ("im2col", "col2im") for m in ("tiled", "plain")}, (label, moves)
    for r in rows:
        if r["shape"].split()[0] not in conv_labels:
            assert "algo" not in r and "data_movement" not in r, r
        assert r["check"] == "ok", r
        assert r["err_cpu_path"] <= C.TOLERANCE["sim"]
        assert r["launches"] >= 1, f"{r['shape']} {r['pass']}: the GPU path launched nothing"
        assert "gpucnn_ms" not in r, "--dry must not time the simulator"
        has_torch = torch_side and importlib.util.find_spec("torch") is not None and "data_movement" not in r
        assert ("err_torch" in r) == has_torch, r
    # the machine is described
    assert run["machine"]["device"] == "sim"
    assert run["machine"]["blas_threads"] >= 1


def test_train_dry_run(tmp_path):
    out, results = run_dry("train.py", tmp_path)
    assert "| net | batch | gpucnn kernels/step | gpucnn bytes alloc/step |" in out
    assert "| lenet5 | 1 |" in out
    (train,) = results["train"]
    (row,) = train["steps"]
    assert row["check"] == "ok", row
    assert row["err_cpu_path"] <= C.TOLERANCE["sim"]
    # a LeNet-5 step launches kernels of the families it is made of (pooling and activations may be fused
    # into other kernels), the update included; the second step is counted, the first's bytes too
    counts = row["counts"]
    families = {f for f, n in counts["by_family"].items() if n > 0}
    assert {"conv", "dense", "loss", "optim"} <= families, counts["by_family"]
    assert counts["launches"] == sum(counts["by_family"].values())
    assert row["counts_first_step"]["bytes"] > 0, "the first step allocates at least its outputs"
    if importlib.util.find_spec("torch") is not None:
        assert row["err_torch_fwd32"] <= C.TOLERANCE["fp32"]
        assert row["err_torch_step64"] <= C.TOLERANCE["fp64"]
    # the CPU epoch comparison's code path ran and trained: both sides start from the same weights
    run = train["epoch"]["runs"][0]
    assert math.isfinite(run["gpucnn"]["train_loss"])
    if "torch" in run:
        assert run["torch"]["train_loss"] == pytest.approx(run["gpucnn"]["train_loss"], rel=1e-3)


def test_memory_prediction(tmp_path):
    """bench/memory.py predicts a step's device memory by running the GPU path on "sim" with the kernels
    skipped; --check runs three small nets for real and must find the same plan, buffer for buffer."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "memory.py"), "--check", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    checks = [line for line in proc.stdout.splitlines() if line.strip().startswith("check ")]
    assert len(checks) == 3 and all(line.endswith(": same") for line in checks), checks
    (path,) = glob.glob(os.path.join(str(tmp_path), "sim-*.json"))
    with open(path) as f:
        (run,) = json.load(f)["memory"]
    rows = {(r["net"], r["batch"]): r for r in run["rows"]}
    assert set(rows) >= {("lenet5", 256), ("alexnet", 128)}
    for r in rows.values():
        assert r["planned"] and r["bytes_allocated_per_step"] == 0, r
        assert 0 < r["workspace_bytes"] < r["workspace_separate_bytes"], r
        assert r["total_bytes"] > r["workspace_bytes"] + 3 * r["param_bytes"] - 1, r
    # the parts that do not depend on the run: LeNet-5's 61,706 float32 parameters (each view 64-aligned)
    assert rows[("lenet5", 256)]["params"] == 61_706
    assert 61_706 * 4 <= rows[("lenet5", 256)]["param_bytes"] < 61_706 * 4 + 10 * 64 * 4
    assert rows[("lenet5", 256)]["launches"] == 29
    # a larger batch needs a larger workspace, at most in proportion (every buffer scales with the batch, and
    # at 1024 conv1's lowered input, 78 MiB, is over Conv2D.RECOMPUTE_ABOVE: made again in backward, one launch)
    ratio = rows[("lenet5", 1024)]["workspace_bytes"] / rows[("lenet5", 256)]["workspace_bytes"]
    assert 1.5 < ratio <= 4.0, ratio
    assert rows[("lenet5", 1024)]["launches"] == 30


def test_host_cost_per_launch_counts(tmp_path):
    """bench/host.py on "sim" (threads not simulated): LeNet-5's eager steps count their host work per launch with
    launch arguments converted (the path before binding) and bound. Times are printed, never asserted."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "host.py"), "--batch", "4", "--repeats", "2", "--out",
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (path,) = glob.glob(os.path.join(str(tmp_path), "sim-*.json"))
    with open(path) as f:
        (run,) = json.load(f)["host"]
    before, after = run["rows"]
    assert not before["bound"] and after["bound"]
    launches = before["counts_per_step"][0]["launches"]
    assert launches == 11       # LeNet-5's Numba launches (its other 18 are GEMMs and ElementwiseKernels)
    for c in before["counts_per_step"]:     # every launch configured, every array argument converted
        assert c["launches"] == c["configured"] == launches and c["wrapped"] == 0, c
        assert c["converted"] == before["counts_per_step"][0]["converted"] > launches, c
    first, second, steady = after["counts_per_step"]
    assert first["configured"] > 0 and second["configured"] == 0 and second["wrapped"] > 0, after
    assert steady == {"launches": launches, "configured": 0, "wrapped": 0, "converted": 2}, steady  # batch, labels
    assert len(after["host_us_per_launch"]) == 2 and run["ratio_host_per_launch"] > 0


# ------------------------------------------------------------------------------------------ the check helpers

def test_rel_error_is_relative_to_the_largest_reference_magnitude():
    ref = np.array([100.0, 1.0, -2.0])
    assert C.rel_error(ref + np.array([0.0, 0.5, 0.0]), ref) == pytest.approx(0.005)
    assert C.rel_error(ref, ref) == 0.0


def test_rel_error_integer_arrays_must_match_exactly():
    a = np.array([3, 7, 1], np.int32)
    assert C.rel_error(a, a.astype(np.int64)) == 0.0
    assert C.rel_error(a, np.array([3, 8, 1], np.int64)) == float("inf")


def test_check_names_the_array_that_is_off():
    good = np.ones(4)
    bad = good.copy()
    bad[2] = 1.01
    assert C.check([("y", good, good)], 1e-3, "case") == 0.0
    with pytest.raises(AssertionError, match=r"case: gw differs from the reference by 1\.000e-02"):
        C.check([("y", good, good), ("gw", bad, good)], 1e-3, "case")
    with pytest.raises(AssertionError, match="shape"):
        C.check([("y", np.ones(3), good)], 1e-3, "case")


def test_check_fails_on_nan():
    nan = np.array([1.0, np.nan])
    with pytest.raises(AssertionError, match="gx differs"):
        C.check([("gx", nan, np.ones(2))], 1e-3, "case")


def test_markdown_table_formats_cells():
    text = C.markdown_table([("shape", "s"), ("pass", "p"), ("ms", "t")],
                            [{"s": "lenet.c1", "p": "forward", "t": 0.123456}, {"s": "x", "p": "y", "t": None}])
    lines = text.splitlines()
    assert lines[0] == "| shape | pass | ms |"
    assert lines[1] == "|---|---|---:|"
    assert lines[2] == "| lenet.c1 | forward | 0.123 |"
    assert lines[3] == "| x | y | - |"


def test_blas_threads_is_a_positive_count_with_its_source():
    n, how = C.blas_threads()
    assert isinstance(n, int) and n >= 1
    assert how


def test_save_results_keeps_every_run_of_the_day(tmp_path):
    import types
    args = types.SimpleNamespace(out=str(tmp_path), device="cpu")
    path = C.save_results(args, "train", {"n": 1})
    with open(path, "w") as f:              # a file in the older form: one run per section
        json.dump({"train": {"n": 1}, "layers": {"n": 0}}, f)
    C.save_results(args, "train", {"n": 2})
    assert C.save_results(args, "layers", {"n": 3}) == path
    with open(path) as f:
        data = json.load(f)
    assert data == {"train": [{"n": 1}, {"n": 2}], "layers": [{"n": 0}, {"n": 3}]}
    with open(path, "w") as f:
        f.write("{not json")
    C.save_results(args, "train", {"n": 4})
    with open(path) as f:
        assert json.load(f) == {"train": [{"n": 4}]}
    assert os.path.exists(path + ".unreadable")


def test_a_disagreement_with_pytorch_is_settled_against_float64(rng):
    """The H200 run failed AlexNet c2's grad-weight (1.37e-2 from cuDNN) without knowing which side was off:
    now both go against a float64 reference, and only gpucnn's own error fails the row."""
    ref = rng.standard_normal((64, 25))
    ours = ref + 1e-6 * rng.standard_normal(ref.shape)
    theirs = ref + 2e-2 * np.abs(ref).max() * rng.standard_normal(ref.shape)
    with pytest.raises(AssertionError, match="vs PyTorch"):
        C.check([("gw", ours, theirs)], 1e-3, "case (vs PyTorch)")
    err_ours, err_theirs = C.arbitrate(["gw"], [ours], [theirs], [ref], 1e-3, "case")
    assert err_ours < 1e-5 and err_theirs > 1e-2
    with pytest.raises(AssertionError, match=r"case \(vs float64\): gw differs"):
        C.arbitrate(["gw"], [theirs], [ours], [ref], 1e-3, "case")
