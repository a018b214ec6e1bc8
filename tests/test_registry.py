"""Every CuPy ElementwiseKernel gpucnn registers must have run through the host build in the sim suite."""
import pytest

from gpucnn import elementwise


@pytest.mark.sim
def test_every_registered_kernel_was_exercised():
    # conftest moves this test to the end of the sim run, after every other sim test has run.
    import gpucnn.kernels.activation, gpucnn.kernels.conv, gpucnn.kernels.dense, gpucnn.kernels.dropout  # noqa: F401,E401
    import gpucnn.kernels.loss, gpucnn.kernels.norm, gpucnn.kernels.optim, gpucnn.kernels.pool  # noqa: F401,E401
    assert elementwise.KERNELS, "no ElementwiseKernel is registered"
    missing = sorted(set(elementwise.KERNELS) - elementwise.HOST_RUNS)
    assert not missing, f"registered but never run through the host build by a sim test: {missing}"


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
