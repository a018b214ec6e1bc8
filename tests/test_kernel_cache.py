"""Compiled kernels are cached on disk (cache=True), keyed on every kernel source file, not only their own."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = textwrap.dedent("""
    import types
    from gpucnn import launch
    from gpucnn.kernels import loss
    jitted = loss._sum_kernel.compiled()              # the real numba.cuda (no simulator), not compiled yet
    cache = jitted._cache
    assert type(cache).__name__ == "CUDACache", type(cache)   # cache=True
    codegen = types.SimpleNamespace(magic_tuple=lambda: ("nvptx64", "sm_90", ""))
    key = cache._index_key((), codegen)
    assert key[1] == launch._kernel_sources_digest(), key
    print("ok", key[1])
""")


def test_the_disk_cache_key_covers_every_kernel_source():
    """_sum_kernel calls grid_total from reduce.py: Numba alone would key its cache on loss.py's bytecode and
    timestamp and load stale machine code after reduce.py changed; the digest of all kernel sources joins the key."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUCNN_DEVICE")}
    env["GPUCNN_DEVICE"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr
