"""Every CuPy ElementwiseKernel gpucnn registers must have run through the host build in the sim suite."""
import pytest

from gpucnn import elementwise


@pytest.mark.sim
def test_every_registered_kernel_was_exercised():
    # conftest moves this test to the end of the sim run, after every other sim test has run (tests/run_all.sh:
    # to a last process, with what the shards recorded in GPUCNN_SIM_RECORDS).
    import gpucnn.kernels.activation, gpucnn.kernels.conv, gpucnn.kernels.dense, gpucnn.kernels.dropout  # noqa: F401,E401
    import gpucnn.kernels.loss, gpucnn.kernels.norm, gpucnn.kernels.optim, gpucnn.kernels.pool  # noqa: F401,E401
    from conftest import recorded_sim_runs
    assert elementwise.KERNELS, "no ElementwiseKernel is registered"
    missing = sorted(set(elementwise.KERNELS) - recorded_sim_runs()[0])
    assert not missing, f"registered but never run through the host build by a sim test: {missing}"


@pytest.mark.sim
def test_every_cupy_call_passes_cupys_argument_checks():
    """Every distinct ElementwiseKernel call the sim suite made goes through real CuPy's
    ``ElementwiseKernel.__call__`` with the positional arguments and keywords "cuda" would pass (cupy_call).
    Without a driver the only error allowed is CuPy's missing-driver CUDARuntimeError: argument counts and
    keywords are checked before the driver is reached, so CuPy 14's TypeError for ``size=None`` (the first
    H200 run: 52 of 53 failures) fails here. Types and shapes are checked after the driver: not covered."""
    import numpy as np
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed here: its argument checks cannot run")
    from cupy_backends.cuda.api.runtime import CUDARuntimeError
    from conftest import GPU_PROBLEM, recorded_sim_runs
    runs, calls = recorded_sim_runs()
    calls = sorted(calls, key=repr)
    assert calls and runs <= {name for name, _, _ in calls}, "a host run was not recorded"
    made = {}
    failures = []
    for name, specs, kwargs in calls:
        k = elementwise.KERNELS.get(name)
        if k is None:
            continue
        ck = made.get(name) or made.setdefault(name, cupy.ElementwiseKernel(
            k.in_params, k.out_params, k.operation, k.name, preamble=k.preamble))
        make = cupy.zeros if GPU_PROBLEM is None else np.zeros
        args = [make(s[1], dtype=s[2]) if s[0] == "array" else s[1] for s in specs]
        try:
            ck(*args, **dict(kwargs))
        except CUDARuntimeError:
            if GPU_PROBLEM is None:
                raise
        except Exception as e:      # noqa: BLE001 - every other error is a call "cuda" would fail
            failures.append(f"{name}({', '.join(map(str, specs))}, **{dict(kwargs)}): {type(e).__name__}: {e}")
    assert not failures, "CuPy refuses calls the 'cuda' path makes:\n" + "\n".join(failures)


@pytest.mark.sim
def test_host_build_reports_compile_errors():
    k = elementwise.ElementwiseKernel("T x", "T y", "y = undefined_function(x)", "registry_broken_example")
    del elementwise.KERNELS["registry_broken_example"]   # an example of a bad kernel, not one of ours
    import numpy as np
    with pytest.raises(RuntimeError, match="host build failed"):
        k(np.ones(3, np.float32))


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(elementwise.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler was found.*apt-get install g\\+\\+"):
        elementwise._compiler()
