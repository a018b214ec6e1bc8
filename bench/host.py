"""Host cost per Numba launch, with launch arguments bound (gpucnn.launch.BIND) and without, in one run.

    python bench/host.py                    # "sim": LeNet-5 eager training steps at batch 256
    python bench/host.py --device cuda      # on a GPU: the same steps, the launches real
    python bench/host.py --batch 64 --repeats 5 --out /tmp/results

Per eager step (graph=False, as predict, a first step and users' own loops run) it counts, with gpucnn.profile's
``p.host``: configured launches made, argument wrappers made, array arguments converted at launch; and it times
the host's part of every Numba launch: the time spent in gpucnn.launch.launch, which returns once the kernel is
queued. Two models train side by side, one per setting, the order alternating step by step; each is warmed up
first (its workspace planned, its wrappers made), so the timed steps are steady ones. Python's garbage collector
is off inside a timed step (collected before it), as in timeit.

On "sim" every simulated CUDA thread is a Python thread: running them would bury the host's part of a launch
under the simulation. So the simulator's blocks are not run here (its BlockManager.run does nothing; GEMMs and
ElementwiseKernels still run, on values that mean nothing). What remains of a launch is gpucnn's caches and the
simulator's own handling of the arguments: an unbound array is copied into a fake device array and back at
every launch, where a GPU exports it by DLPack. The "sim" ratio is what binding removes there, not a GPU's
figure: ``--device cuda`` takes that.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402

import _common as C  # noqa: E402


def _options(argv=None):
    p = argparse.ArgumentParser(description="Host time and host work per Numba launch, bound and not, one run.")
    p.add_argument("--device", choices=("sim", "cuda"), default="sim")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3, help="eager steps per setting before timing (at least 3)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per setting (median reported)")
    p.add_argument("--out", default=C.RESULTS, help="folder of the results JSON (default bench/results)")
    args = p.parse_args(argv)
    os.environ["GPUCNN_DEVICE"] = args.device           # before gpucnn (and numba.cuda) are imported
    if C.ROOT not in sys.path:
        sys.path.insert(0, C.ROOT)
    return args


class LaunchClock:
    """Times every call of gpucnn.launch.launch: each module that imported the function gets a timed one."""

    def __init__(self, gpucnn):
        self.real, self.seconds, self.calls = gpucnn.launch.launch, 0.0, 0
        self.modules = [m for name, m in list(sys.modules.items())
                        if name.startswith("gpucnn") and getattr(m, "launch", None) is self.real]

        def timed_launch(*args, **kwargs):
            t = time.perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1
        self.timed = timed_launch

    def __enter__(self):
        self.seconds, self.calls = 0.0, 0
        for m in self.modules:
            m.launch = self.timed
        gc.collect()            # as timeit does: no collection of the other side's garbage inside this step
        gc.disable()
        return self

    def __exit__(self, *exc):
        gc.enable()
        for m in self.modules:
            m.launch = self.real


def skip_simulated_threads():
    """The simulator runs no block from now on (see the module docstring)."""
    from numba.cuda.simulator import kernel as sim_kernel
    sim_kernel.BlockManager.run = lambda self, grid_point, *args: None


def main(argv=None):
    args = _options(argv)
    import numpy as np
    import gpucnn
    from gpucnn import backend, launch, models, optim
    from gpucnn.losses import SoftmaxCrossEntropy
    import gpucnn.kernels.activation, gpucnn.kernels.conv, gpucnn.kernels.dense  # noqa: F401,E401 (they import launch)
    import gpucnn.kernels.loss, gpucnn.kernels.optim, gpucnn.kernels.pool, gpucnn.kernels.reduce  # noqa: F401,E401

    gpucnn.device()                 # selects it: numba.cuda is the simulator from here on "sim"
    m = C.machine(args)
    C.print_machine(m)
    if args.device == "sim":
        skip_simulated_threads()
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32))
    y = backend.asarray(rng.integers(0, 10, args.batch))
    loss = SoftmaxCrossEntropy()
    sides = {}
    for bind in (False, True):
        model = models.lenet5(seed=0)
        sides[bind] = {"model": model, "opt": optim.SGD(model, lr=0.01, momentum=0.9), "counts": [], "us": []}

    def step(bind, count=False):
        s = sides[bind]
        launch.BIND = bind
        clock = LaunchClock(gpucnn)
        with clock, (gpucnn.profile() if count else contextlib.nullcontext()) as p:
            start = time.perf_counter()
            s["model"].train_step(x, y, loss, s["opt"], graph=False)
            backend.synchronize()
            wall = time.perf_counter() - start
        if p is not None:
            s["counts"].append(dict(p.host, launches=sum(c["numba"] for c in p.counts.values())))
        return clock, wall

    for t in range(max(args.warmup, 3)):            # counted: the first, second and steady steps
        for bind in (False, True):
            step(bind, count=True)
    walls = {False: [], True: []}
    for r in range(args.repeats):                     # timed, not profiled; the first side alternates
        for bind in ((False, True) if r % 2 == 0 else (True, False)):
            clock, wall = step(bind)
            sides[bind]["us"].append(clock.seconds / clock.calls * 1e6)
            walls[bind].append(wall * 1e3)
    launch.BIND = True

    rows = []
    for bind in (False, True):
        s = sides[bind]
        rows.append({"bound": bind, "counts_per_step": s["counts"], "host_us_per_launch": s["us"],
                     "median_host_us_per_launch": statistics.median(s["us"]),
                     "median_step_ms": statistics.median(walls[bind])})
    before, after = rows
    ratio = after["median_host_us_per_launch"] / before["median_host_us_per_launch"]
    what = "threads not simulated" if args.device == "sim" else "real launches"
    print(f"LeNet-5 eager training step, batch {args.batch}, on {args.device!r} ({what})\n")
    print("| launch arguments | step | Numba launches | configured | wrappers made | converted |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for t, c in enumerate(r["counts_per_step"]):
            print(f"| {'bound' if r['bound'] else 'converted (before)'} | {t + 1} | {c['launches']} | "
                  f"{c['configured']} | {c['wrapped']} | {c['converted']} |")
    print("\n| launch arguments | host us per launch (median of steps) | step ms (median) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {'bound' if r['bound'] else 'converted (before)'} | {r['median_host_us_per_launch']:.1f} | "
              f"{r['median_step_ms']:.1f} |")
    print(f"\nhost time per launch, bound / before: {ratio:.3f} (same run, {args.repeats} steps each)")
    path = C.save_results(args, "host", {"machine": m, "batch": args.batch, "what": what, "rows": rows,
                                         "ratio_host_per_launch": ratio})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
