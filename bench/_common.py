"""What bench/layers.py and bench/train.py share: device choice, timers, the check against a reference,
the markdown table, the machine's description and the results file.

Import this module first: ``--dry`` must select the "sim" device before gpucnn (and numba.cuda) are
imported, because Numba picks the simulator or the real GPU once per process.
"""
import argparse
import contextlib
import ctypes
import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")

# Tolerances of the check before timing, relative to the largest magnitude of the reference (the rule of
# tests/conftest.assert_close). The unit tests use 2e-4 on small shapes; here sums run over up to 10^5
# terms and cuDNN may pick Winograd or FFT, which round differently, hence 1e-3. TF32 keeps 10 mantissa
# bits (unit roundoff 5e-4), hence 2e-2. The simulator is checked against the CPU path as the tests do.
# Whole float64 training steps (bench/train.py) are held to 1e-6.
TOLERANCE = {"fp32": 1e-3, "tf32": 2e-2, "sim": 2e-4, "fp64": 1e-6}


def parse_args(description: str, extra=None, argv=None):
    """The options both scripts take; "--dry" selects "sim" here, before gpucnn is imported."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda", "sim"),
                   help="where gpucnn runs (default: gpucnn's choice, 'cuda' where CuPy finds a GPU)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats (and smaller batches on the CPU): under a minute on a GPU")
    p.add_argument("--dry", action="store_true",
                   help="run every code path on 'sim' on tiny named shapes, checked against the CPU path; "
                        "no timings")
    p.add_argument("--repeats", type=int, help="timed runs per measurement (median reported)")
    p.add_argument("--out", default=RESULTS, help="folder of the results JSON (default bench/results)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even where it is installed")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.dry:
        if args.device not in (None, "sim"):
            p.error(f"--dry runs on 'sim'; it cannot be combined with --device {args.device}")
        args.device = "sim"
    if args.device:
        os.environ["GPUCNN_DEVICE"] = args.device
    if ROOT not in sys.path:        # benchmark the checkout this script lives in
        sys.path.insert(0, ROOT)
    import gpucnn
    args.device = gpucnn.device()
    if args.device == "sim" and not args.dry:
        p.error("'sim' times nothing meaningful (every CUDA thread runs in Python); use --dry")
    return args


def load_torch(args):
    """PyTorch, or None (not installed, or --no-torch): both scripts then print gpucnn's numbers alone."""
    if args.no_torch:
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: gpucnn's numbers only.\n")
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        print("PyTorch here has no CUDA: gpucnn's numbers only.\n")
        return None
    return torch


# ---------------------------------------------------------------------------------------------- threads

def blas_threads():
    """(threads, what told us) for the BLAS behind NumPy: asked of OpenBLAS itself where it can be."""
    try:
        from threadpoolctl import threadpool_info
        for info in threadpool_info():
            if info.get("user_api") == "blas":
                return int(info["num_threads"]), f"{info.get('internal_api')} {info.get('version')} (threadpoolctl)"
    except ImportError:
        pass
    import numpy as np
    here = os.path.dirname(np.__file__)
    for lib in sorted(glob.glob(os.path.join(here, os.pardir, "numpy.libs", "*openblas*"))
                      + glob.glob(os.path.join(here, ".libs", "*openblas*"))
                      + glob.glob(os.path.join(here, os.pardir, "scipy_openblas*", "lib", "*openblas*"))):
        try:
            cdll = ctypes.CDLL(lib)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                fn = getattr(cdll, f"{prefix}openblas_get_num_threads{suffix}", None)
                if fn is not None:
                    return int(fn()), f"OpenBLAS ({os.path.basename(lib)}: {prefix}openblas_get_num_threads{suffix})"
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]), f"${var}"
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return n, "the CPUs this process may use (the BLAS could not be asked)"


def match_torch_threads(torch):
    """Give PyTorch's CPU ops as many threads as NumPy's BLAS has; returns (threads, how known)."""
    n, how = blas_threads()
    if torch is not None:
        torch.set_num_threads(n)
    return n, how


# ---------------------------------------------------------------------------------------------- timing

def median_ms(times_s):
    return 1e3 * statistics.median(times_s)


def wall_time(fn) -> float:
    """Seconds one call of fn takes by the wall clock (the CPU's measure)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cupy_time(fn) -> float:
    """Seconds one call of fn takes on the GPU, between two CUDA events on CuPy's current stream (gpucnn's
    Numba kernels and cuBLAS calls queue there too)."""
    import cupy
    stream = cupy.cuda.get_current_stream()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3


def torch_cuda_time(torch):
    """A measure like :func:`cupy_time` for PyTorch: CUDA events on PyTorch's current stream."""
    def measure(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return measure


def time_each(runs, repeats: int, warmup: int, rounds: int = 1):
    """``runs``: a list of (fn, measure). In each of ``rounds`` rounds, for each run in turn: ``warmup``
    calls, then its share of the ``repeats`` timed calls. Returns the seconds of each timed call, per run.

    Not alternating call by call: PyTorch's OpenMP threads keep spinning for a while after each op (and
    OpenBLAS's after each GEMM), so alternating made each side pay for the other's spinning threads.
    Measured on 2 cores with one other busy process: gpucnn's LeNet c3 forward 4.3 ms alone, 12.4 ms
    alternating; PyTorch's 1.0 ms and 23.5 ms. Several rounds of blocks instead, so that on a shared
    machine a burst of someone else's work does not fall on one side only; the warm-up calls of each
    block absorb the hand-over.
    """
    per_round = -(-repeats // rounds)
    out = [[] for _ in runs]
    for _ in range(rounds):
        for i, (fn, measure) in enumerate(runs):
            for _ in range(warmup):
                fn()
            out[i] += [measure(fn) for _ in range(per_round)]
    return out


def precisions(args) -> list:
    """The precisions a run covers: "fp32", and on cuda also "tf32" unless --precision names one."""
    if args.device != "cuda":
        return ["fp32"]
    return ["fp32", "tf32"] if args.precision == "both" else [args.precision]


def select_precision(precision: str, args, torch, gpucnn, notes: list):
    """Select ``precision`` for the rows that follow (on cuda: in both libraries); what gpucnn could not follow
    is printed and added to ``notes``, for the results file."""
    note = set_precision(precision, torch, gpucnn) if args.device == "cuda" else ""
    if note:
        notes.append(f"{precision}: {note}")
        print(f"note ({precision}): {note}")


def set_precision(precision: str, torch, gpucnn):
    """Select "fp32" (TF32 off everywhere, cuDNN's too) or "tf32" for both libraries; returns a note on
    what gpucnn could not follow (empty when it followed)."""
    tf32 = precision == "tf32"
    if torch is not None:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    if hasattr(gpucnn, "set_precision"):
        gpucnn.set_precision(precision)
        return ""
    if tf32:
        return "gpucnn has no set_precision yet: its rows are fp32"
    if os.environ.get("CUPY_TF32") == "1":
        return "CUPY_TF32=1 is set: CuPy's matmul may use TF32 in the fp32 rows"
    return ""


# ---------------------------------------------------------------------------------------------- checking

def rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (the conftest.assert_close measure), in float64."""
    import numpy as np
    a, e = np.asarray(actual), np.asarray(expected)
    if a.shape != e.shape:
        raise AssertionError(f"shape {a.shape} != expected {e.shape}")
    if a.size == 0:
        return 0.0
    if a.dtype.kind in "iu" and e.dtype.kind in "iu":     # indices (max pooling's switches): exact or wrong
        return 0.0 if np.array_equal(a, e) else float("inf")
    a, e = a.astype(np.float64), e.astype(np.float64)
    scale = max(float(np.abs(e).max()), 1e-30)
    return float(np.abs(a - e).max()) / scale


def arbitrate(names, ours, theirs, ref64, tol: float, what: str):
    """When gpucnn and PyTorch disagree: both against a float64 reference computed on the host. Returns
    (gpucnn's worst error, PyTorch's worst error) against it; AssertionError (naming the array) only when
    gpucnn's is over ``tol``, so a row fails for gpucnn's error, never for the reference's (the H200 run:
    AlexNet c2's grad-weight was 1.37e-2 from cuDNN's under benchmark mode, which side was off unknown)."""
    ours_err = check(zip(names, ours, ref64), tol, f"{what} (vs float64)")
    theirs_err = max((rel_error(t, r) for t, r in zip(theirs, ref64)), default=0.0)
    return ours_err, theirs_err


def check(named_pairs, tol: float, what: str) -> float:
    """Compare each (name, ours, reference) as host arrays; the worst relative error, or AssertionError
    naming the array that is off."""
    worst = 0.0
    for name, ours, ref in named_pairs:
        err = rel_error(ours, ref)
        if not err <= tol:     # a NaN fails too
            raise AssertionError(f"{what}: {name} differs from the reference by {err:.3e} of its largest "
                                 f"magnitude (tolerance {tol:g})")
        worst = max(worst, err)
    return worst


# ---------------------------------------------------------------------------------------------- output

def fmt(v, digits=3):
    """A table cell: "-" for None, numbers with ``digits`` significant digits, text as it is."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 10 ** digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def keep_row(rows: list, row: dict, line: str):
    """Add a finished row to ``rows`` and print it: on stderr a failed check (the row was not timed) or a note,
    then ``line``, the row as the script shows it while it runs."""
    rows.append(row)
    if "error" in row:
        print(f"CHECK FAILED, not timed: {row['error']}", file=sys.stderr)
    elif "note" in row:
        print(f"note: {row['note']}", file=sys.stderr)
    print(line, flush=True)


def check_status(row) -> str:
    """A row's "check" cell: FAILED (its check before timing failed), ok (checked), unchecked (no reference)."""
    checked = any(k.startswith("err_") for k in row)
    return "FAILED" if "error" in row else "ok" if checked else "unchecked"


def markdown_table(columns, rows) -> str:
    """``columns`` a list of (header, key); ``rows`` a list of dicts."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(columns))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def code_version() -> dict:
    """Which gpucnn was measured: the git commit, whether gpucnn/ differs from it, and a hash of gpucnn/'s
    sources (the library changes while it is being tuned; the hash tells two states apart)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "gpucnn", "**", "*.py"), recursive=True)):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    out = {"commit": None, "gpucnn_modified": None, "gpucnn_sources_sha256": h.hexdigest()[:16]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", ROOT]
        commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["commit"] = commit.stdout.strip()
            status = subprocess.run(git + ["status", "--porcelain", "--", "gpucnn"], capture_output=True, text=True,
                                    timeout=10)
            out["gpucnn_modified"] = bool(status.stdout.strip())
    return out


def machine(args, torch=None) -> dict:
    """The machine and software a result was measured on."""
    import numpy as np
    import gpucnn
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    threads, how = blas_threads()
    d = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": args.device,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "blas_threads": threads,
        "blas_threads_from": how,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "versions": {"python": platform.python_version(), "gpucnn": gpucnn.__version__, "numpy": np.__version__},
        "code": code_version(),
    }
    for pkg in ("numba", "numba-cuda", "cupy", "cupy-cuda12x", "cupy-cuda13x", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            d["versions"][pkg] = importlib.metadata.version(pkg)
    if args.device == "cuda":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        d["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        d["gpu_memory_bytes"] = int(props["totalGlobalMem"])
        d["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        d["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        if torch is not None:
            d["cudnn"] = torch.backends.cudnn.version()
    return d


def save_results(args, section: str, payload: dict) -> str:
    """Append ``payload`` to the list of runs under ``section`` ("layers" or "train") in
    <out>/<device>-<date>.json: both scripts of one day share one file, and every run of the day is kept
    (each names its machine, load and gpucnn code version), so a later run never erases an earlier one.
    Written atomically. Returns the path."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.device}-{datetime.date.today().isoformat()}.json")
    data = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (ValueError, OSError) as e:      # keep the unreadable file for a person to look at
            os.replace(path, path + ".unreadable")
            print(f"warning: {path} could not be read ({e}); moved to {path}.unreadable")
    runs = data.get(section, [])
    if isinstance(runs, dict):      # a file written before sections held lists: its one run comes first
        runs = [runs]
    data[section] = runs + [payload]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)
    return path


def print_machine(m: dict):
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    v = m["versions"]
    print(f"device {m['device']}: CPU {m['cpu']} ({m['cpus_usable']} usable){gpu}; load {m['load_average']}; "
          f"NumPy {v['numpy']} with {m['blas_threads']} BLAS threads ({m['blas_threads_from']})"
          + (f"; PyTorch {v.get('torch')} with {m['torch_threads']} threads" if m.get("torch_threads") else ""))
    c = m["code"]
    print(f"gpucnn {v['gpucnn']} at commit {c['commit']}" + (" with gpucnn/ modified" if c["gpucnn_modified"] else "")
          + f" (sources {c['gpucnn_sources_sha256']})\n")


def report_and_exit_code(path, failed, what: str) -> int:
    """Say where the results went and which entries disagreed with the reference; 1 if any did."""
    print(f"\nwrote {path}")
    if failed:
        print(f"{len(failed)} {what} disagree with the reference:", file=sys.stderr)
        for r in failed:
            print(f"  {r['error']}", file=sys.stderr)
        return 1
    return 0
