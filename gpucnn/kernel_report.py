"""``gpucnn kernels``: what each Numba kernel gpucnn launches asks of a real GPU, found without one.

    gpucnn kernels                    # sm_75, sm_80, sm_89 and sm_90; exit status 1 if a launch breaks a limit
    gpucnn kernels --arch sm_90       # one architecture (H100/H200)
    python -m gpucnn.kernel_report    # the same

The simulator runs the kernels' logic but knows nothing of the hardware: a kernel that ptxas gives 80
registers per thread cannot launch with 1,024 threads (80 x 1,024 > 65,536 registers per block), and on an
H200 that was a CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES that no CPU or sim test had seen. So, in three steps:

1. record (a subprocess with GPUCNN_DEVICE=sim): the shipped models' training steps, predict, evaluate and
   fit at real sizes, under :func:`gpucnn.profile.shapes_only` with ``cuda_shapes=True`` (nothing computed,
   every grid sized as "cuda" sizes it); :func:`gpucnn.profile.record_launches` keeps every Numba launch:
   kernel, block, dynamic shared memory, argument types. See gpucnn.kernel_scenarios.
2. compile (a subprocess without the simulator: Numba picks one per process): each (kernel, argument types)
   lowered by Numba and NVVM to PTX as ``cuda.jit`` lowers it, then ``ptxas -v`` for each architecture:
   registers per thread, static shared memory, spills. One PTX per (kernel, types), made for the lowest
   architecture (sm_75) and assembled for every other: when this was written, for each of the 37 kernel
   variants, the counts equalled those of a PTX made for each architecture (sm_80, sm_89, sm_90, and sm_90a,
   which Numba targets on an H100/H200), and the H200 profiler's (80, 80 and 124 registers on sm_90 for
   _pool_act_bias_grad_kernel, _im2col_tiled_kernel and _col2im_tiled_kernel). Compiling takes most of
   the time (about a second a kernel), so the kernels are shared among one process per CPU.
3. check (here, plain Python): each recorded launch against the per-block limits of each architecture
   (:func:`launch_problems`), and the theoretical occupancy of the blocks gpucnn uses (:func:`occupancy`,
   the arithmetic of CUDA's ``cuda_occupancy.h``).

What it cannot see: the driver on the user's machine JIT-assembles the PTX with its own ptxas, which may
give a register or two more or fewer than the ptxas found here; a block close to a limit is close.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from .kernel_scenarios import SCENARIOS, record  # noqa: F401 - step 1, kernel_report.record as before

KiB = 1024


# ------------------------------------------------------------------------------------------------ the limits

class Arch(NamedTuple):
    """Per-SM and per-block limits of one GPU architecture (CUDA C Programming Guide, "Compute Capabilities";
    cuda_occupancy.h for the allocation rules)."""
    name: str               # ptxas -arch
    cc: tuple               # compute capability
    gpus: str               # examples, for the report
    threads_per_sm: int
    blocks_per_sm: int
    shared_per_sm: int      # bytes, the largest carveout
    reserved_shared: int    # bytes the driver reserves per block (Ampere on)
    shared_unit: int        # shared memory is allocated per block in multiples of this


# Common to all four: 65,536 registers per SM and per block, at most 255 per thread, allocated per warp in
# units of 256 (per-thread count rounded up to a multiple of 8), to the SM's 4 sub-partitions at once (a
# block's warps rounded up to a multiple of 4); at most 1,024 threads per block; 48 KiB of static + dynamic
# shared memory per block unless the kernel opts in to more (none of gpucnn's does).
ARCHS = {a.name: a for a in (
    #     arch     cc      GPUs                    threads/SM blocks/SM shared/SM   reserved/block unit
    Arch("sm_75", (7, 5), "T4, RTX 20xx",          1024,      16,       64 * KiB,   0,             256),
    Arch("sm_80", (8, 0), "A100, A30",             2048,      32,       164 * KiB,  1 * KiB,       128),
    Arch("sm_89", (8, 9), "L4, L40S, RTX 40xx",    1536,      24,       100 * KiB,  1 * KiB,       128),
    Arch("sm_90", (9, 0), "H100, H200, GH200",     2048,      32,       228 * KiB,  1 * KiB,       128),
)}
REGISTERS_PER_SM = 65536
REGISTERS_PER_BLOCK = 65536
MAX_REGISTERS_PER_THREAD = 255
REGISTER_UNIT = 256             # registers per warp are allocated in multiples of this
SUB_PARTITIONS = 4
MAX_THREADS_PER_BLOCK = 1024
MAX_BLOCKS_PER_GRID = 2 ** 31 - 1
SHARED_PER_BLOCK = 48 * KiB     # static + dynamic, without an opt-in
WARP = 32


class Resources(NamedTuple):
    """What ptxas gives one kernel for one architecture (``ptxas -v``)."""
    registers: int          # per thread
    shared: int             # static shared memory, bytes
    spill_stores: int       # bytes
    spill_loads: int        # bytes
    stack: int              # stack frame, bytes


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def block_registers(threads: int, registers: int) -> int:
    """Registers a block of ``threads`` takes as the hardware counts them: per warp, the per-thread count
    times 32 rounded up to 256; warps rounded up to the 4 sub-partitions."""
    warps = -(-threads // WARP)
    return _round_up(registers * WARP, REGISTER_UNIT) * _round_up(warps, SUB_PARTITIONS)


def launch_problems(threads: int, dynamic_shared: int, res: Resources, arch: Arch, blocks: int = 1) -> list:
    """Why a launch of ``blocks`` blocks of ``threads`` threads with ``dynamic_shared`` bytes of dynamic shared
    memory, of a kernel that uses ``res``, cannot run on ``arch`` (sentences); empty when it can."""
    problems = []
    if threads > MAX_THREADS_PER_BLOCK:
        problems.append(f"{threads} threads per block > {MAX_THREADS_PER_BLOCK}")
    if res.registers > MAX_REGISTERS_PER_THREAD:
        problems.append(f"{res.registers} registers per thread > {MAX_REGISTERS_PER_THREAD}")
    regs = block_registers(threads, res.registers)
    if regs > REGISTERS_PER_BLOCK:
        problems.append(f"{res.registers} registers x {threads} threads = {regs:,} registers per block (as "
                        f"allocated) > {REGISTERS_PER_BLOCK:,}: at most {max_block(res)} threads")
    shared = res.shared + dynamic_shared
    if shared > SHARED_PER_BLOCK:
        problems.append(f"{shared:,} bytes of shared memory per block > {SHARED_PER_BLOCK:,}")
    if blocks > MAX_BLOCKS_PER_GRID:
        problems.append(f"{blocks:,} blocks > {MAX_BLOCKS_PER_GRID:,}")
    return problems


def max_block(res: Resources) -> int:
    """The largest block (a multiple of 32 threads, at most 1,024) the kernel's registers allow; 0 if none."""
    if res.registers > MAX_REGISTERS_PER_THREAD:
        return 0
    t = MAX_THREADS_PER_BLOCK
    while t > 0 and block_registers(t, res.registers) > REGISTERS_PER_BLOCK:
        t -= WARP
    return t


class Occupancy(NamedTuple):
    blocks_per_sm: int      # resident blocks per SM
    fraction: float         # resident warps / the SM's warp slots
    limiter: str            # what stops one more block: "threads", "registers", "shared", "blocks"


def occupancy(threads: int, dynamic_shared: int, res: Resources, arch: Arch) -> Occupancy:
    """Theoretical occupancy of blocks of ``threads`` on ``arch`` (cuda_occupancy.h's arithmetic, the default
    shared-memory carveout); blocks_per_sm 0 when the block cannot launch at all."""
    warps = -(-threads // WARP)
    slots = arch.threads_per_sm // WARP
    if launch_problems(threads, dynamic_shared, res, arch):
        return Occupancy(0, 0.0, "illegal")
    limits = {"threads": slots // warps, "blocks": arch.blocks_per_sm}
    per_warp = _round_up(res.registers * WARP, REGISTER_UNIT)
    if per_warp:
        limits["registers"] = (REGISTERS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS // warps
    shared = _round_up(res.shared + dynamic_shared + arch.reserved_shared, arch.shared_unit)
    if shared:
        limits["shared"] = arch.shared_per_sm // shared
    limiter = min(limits, key=lambda k: (limits[k], k != "threads"))
    n = limits[limiter]
    return Occupancy(n, n * warps / slots, limiter)


# ------------------------------------------------------------------------------------------------ 2. compile
# (1. record: gpucnn.kernel_scenarios)

class ToolMissing(RuntimeError):
    """ptxas, libNVVM or NVRTC is not installed: the report cannot be made here (the message says which)."""


def ptxas_path():
    """ptxas on PATH, or in $CUDA_HOME/bin (or $CUDA_PATH/bin); None if neither has it."""
    found = shutil.which("ptxas")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if not found and os.environ.get(var):
            found = shutil.which("ptxas", path=os.path.join(os.environ[var], "bin"))
    return found


def _numba_types(signature):
    """Numba's argument types for a recorded signature (arrays are C-contiguous, as gpucnn passes them)."""
    from numba import types

    def scalar(name):                   # numba names its types as NumPy names dtypes, but for bool
        return getattr(types, "boolean" if name == "bool" else name)

    return tuple(types.Array(scalar(s[1]), int(s[2]), "C") if s[0] == "array" else scalar(s[1]) for s in signature)


def kernel_object(name: str):
    """The GPUKernel named "family.name" (gpucnn.kernels.<family>.<name>)."""
    family, fn = name.split(".", 1)
    return getattr(importlib.import_module(f"gpucnn.kernels.{family}"), fn)


def all_kernels() -> list:
    """ "family.name" of every Numba kernel declared in gpucnn.kernels (with @gpu_kernel)."""
    from . import kernels
    from .backend import GPUKernel
    names = []
    for m in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"gpucnn.kernels.{m.name}")
        names += [f"{m.name}.{k}" for k, v in vars(mod).items()
                  if isinstance(v, GPUKernel) and v.fn.__module__ == mod.__name__]
    return sorted(names)


_PTXAS_LINES = {
    "registers": re.compile(r"Used (\d+) registers"),
    "shared": re.compile(r"(\d+) bytes smem"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def parse_ptxas(text: str) -> Resources:
    """The Resources in ``ptxas -v``'s report on a PTX holding one kernel."""
    found = {}
    for field, pattern in _PTXAS_LINES.items():
        m = pattern.search(text)
        if m is None and field == "registers":
            raise ValueError(f"ptxas -v reported no register count:\n{text}")
        found[field] = int(m.group(1)) if m else 0
    return Resources(**found)


def _ptxas(ptxas, ptx_path, arch):
    r = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx_path, "-o", os.devnull], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ptxas -arch={arch} {ptx_path} failed:\n{r.stderr}")
    return parse_ptxas(r.stderr + r.stdout)


def compile_kernels(pairs, archs, ptx_cc=(7, 5), workers=None) -> list:
    """For each (kernel name, recorded signature): its PTX as cuda.jit lowers it (for compute capability
    ``ptx_cc``, e.g. (9, 0, "a") as Numba targets an H100), assembled by ``ptxas -v`` for each of ``archs``.
    Returns dicts (kernel, signature, compile_s, ptxas_s, resources: arch -> Resources as a dict). Needs the
    real numba.cuda (not the simulator), libNVVM and NVRTC; no GPU or driver. Numba holds the GIL while it
    compiles, so the kernels are shared among ``workers`` processes (default: one per CPU)."""
    from concurrent.futures import ProcessPoolExecutor
    ptxas = ptxas_path()
    if ptxas is None:
        raise ToolMissing("ptxas was not found on PATH (nor in $CUDA_HOME/bin): install the CUDA toolkit's "
                          "compiler (the nvidia-cuda-nvcc wheel, or the toolkit)")
    _prepare_compiler(ptx_cc)           # here first: a missing libNVVM is said once, and forked workers start ready
    with tempfile.TemporaryDirectory(prefix="gpucnn-ptx-") as tmp, \
            ProcessPoolExecutor(workers or os.cpu_count() or 2, initializer=_prepare_compiler,
                                initargs=(ptx_cc,)) as pool:
        jobs = [(name, signature, archs, ptx_cc, ptxas, os.path.join(tmp, f"{i}.ptx"))
                for i, (name, signature) in enumerate(pairs)]
        return list(pool.map(_compile_one, jobs))


def _prepare_compiler(ptx_cc):
    """Make this process able to lower gpucnn's kernels for a GPU it does not have."""
    import types as pytypes
    from . import backend
    if backend.numba_cuda_sim_active():
        raise backend.DeviceError("kernel_report.compile_kernels: this process runs Numba's CUDA simulator; "
                                  "compile in a process without it (python -m gpucnn.kernel_report --compile)")
    backend.use_device("cpu")           # no "cuda" device wanted: this only compiles
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import nvrtc, nvvm
    if not nvvm.is_available():
        raise ToolMissing("libNVVM was not found: Numba cannot lower kernels to PTX without it (install the CUDA "
                          "toolkit, or the nvidia-cuda-nvcc wheel)")
    try:                                # Numba asks NVRTC which architectures the toolkit supports
        nvrtc.get_supported_ccs()
    except Exception as e:              # noqa: BLE001 - a missing or unloadable library, said as such
        raise ToolMissing(f"NVRTC could not be loaded ({type(e).__name__}: {e}): install the nvidia-cuda-nvrtc "
                          "wheel or the CUDA toolkit") from e
    # A kernel calling a device function has that function compiled for "the current device", which needs a
    # driver: name the target instead (tests/conftest.py does the same)
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=tuple(ptx_cc[:2]))


def _compile_one(job):
    """One (kernel, signature): PTX into ``path``, then ptxas for each architecture."""
    from numba import cuda
    from . import backend
    name, signature, archs, ptx_cc, ptxas, path = job
    k = kernel_object(name)
    backend.bind_globals(k.fn.__globals__, cuda)
    t = time.perf_counter()
    ptx, _ = cuda.compile_ptx(k.fn, _numba_types(signature), cc=ptx_cc)
    compile_s = time.perf_counter() - t
    with open(path, "w") as f:
        f.write(ptx)
    t = time.perf_counter()
    resources = {a: _ptxas(ptxas, path, a)._asdict() for a in archs}
    return {"kernel": name, "signature": [list(s) for s in signature], "compile_s": round(compile_s, 3),
            "ptxas_s": round(time.perf_counter() - t, 3), "resources": resources}


# ------------------------------------------------------------------------------------------------ subprocesses

def _run_here(args, env_device):
    """Run ``python -m gpucnn.kernel_report ARGS`` with GPUCNN_DEVICE=env_device (None: unset, and no
    simulator), this checkout first on the path; returns the exit status and its stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPUCNN_DEVICE")}
    if env_device:
        env["GPUCNN_DEVICE"] = env_device
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, "-m", "gpucnn.kernel_report", *args], env=env, capture_output=True,
                       text=True)
    return r.returncode, r.stderr


_TOOL_MISSING = 3       # exit status of --compile when ptxas, libNVVM or NVRTC is missing


class Report(NamedTuple):
    launches: list          # record()'s dicts
    compiled: list          # compile_kernels()'s dicts
    archs: list             # names
    record_s: float
    compile_s: float


def record_elsewhere() -> list:
    """:func:`record` in a subprocess on "sim" (this process may use another device, or none); RuntimeError when
    it fails."""
    with tempfile.TemporaryDirectory(prefix="gpucnn-kernels-") as tmp:
        path = os.path.join(tmp, "launches.json")
        rc, err = _run_here(["--record", path], "sim")
        if rc:
            raise RuntimeError(f"recording the launches on 'sim' failed:\n{err}")
        with open(path) as f:
            return json.load(f)


def collect(archs=tuple(ARCHS), launches=None) -> Report:
    """Record the launches (a subprocess on "sim"; or take ``launches``, record_elsewhere()'s) and compile their
    kernels (a subprocess without the simulator); raises ToolMissing when ptxas, libNVVM or NVRTC is missing,
    RuntimeError when a step fails."""
    if ptxas_path() is None:
        raise ToolMissing("ptxas was not found on PATH (nor in $CUDA_HOME/bin)")
    t = time.perf_counter()
    launches = record_elsewhere() if launches is None else launches
    record_s = time.perf_counter() - t
    pairs = [[k, json.loads(s)] for k, s in sorted({(r["kernel"], json.dumps(r["signature"])) for r in launches})]
    t = time.perf_counter()
    compiled = compile_elsewhere(pairs, archs)
    return Report(launches, compiled, list(archs), record_s, time.perf_counter() - t)


def compile_elsewhere(pairs, archs, ptx_cc=(7, 5)) -> list:
    """:func:`compile_kernels` in a subprocess without the simulator (this process may be on "sim", or a test
    process that must not import numba.cuda)."""
    with tempfile.TemporaryDirectory(prefix="gpucnn-kernels-") as tmp:
        job, out = os.path.join(tmp, "job.json"), os.path.join(tmp, "compiled.json")
        with open(job, "w") as f:
            json.dump({"pairs": pairs, "archs": list(archs), "ptx_cc": list(ptx_cc)}, f)
        rc, err = _run_here(["--compile", job, out], None)
        if rc == _TOOL_MISSING:
            raise ToolMissing(err.strip().splitlines()[-1])
        if rc:
            raise RuntimeError(f"compiling the kernels for a real GPU failed:\n{err}")
        with open(out) as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------------ 3. check

def _key(kernel, signature):
    return kernel, json.dumps([list(s) for s in signature])


def illegal_launches(report: Report) -> list:
    """(arch, launch dict, problems) for every recorded launch some architecture would refuse."""
    res = {_key(c["kernel"], c["signature"]): c["resources"] for c in report.compiled}
    bad = []
    for r in report.launches:
        for a in report.archs:
            problems = launch_problems(r["threads"], r["shared_bytes"],
                                       Resources(**res[_key(r["kernel"], r["signature"])][a]), ARCHS[a], r["blocks"])
            if problems:
                bad.append((a, r, problems))
    return bad


def _label(signature) -> str:
    """A signature by the floating point dtypes of its arrays, in argument order ("float32", "float64/float32")."""
    floats = [s[1] for s in signature if s[0] == "array" and s[1].startswith("float")]
    return "/".join(dict.fromkeys(floats)) or "/".join(dict.fromkeys(s[1] for s in signature if s[0] == "array"))


def table(report: Report, arch: str) -> list:
    """One row per (kernel, signature) on ``arch``: kernel, dtype, registers, shared, spills, the largest
    block, the blocks gpucnn launches, and the lowest occupancy among its launches."""
    rows = []
    for c in sorted(report.compiled, key=lambda c: (c["kernel"], _label(c["signature"]))):
        res = Resources(**c["resources"][arch])
        mine = [r for r in report.launches if _key(r["kernel"], r["signature"]) == _key(c["kernel"], c["signature"])]
        occ = [occupancy(r["threads"], r["shared_bytes"], res, ARCHS[arch]) for r in mine]
        worst = min(occ, key=lambda o: o.fraction)
        rows.append({
            "kernel": c["kernel"], "dtype": _label(c["signature"]), "registers": res.registers,
            "shared": res.shared, "spills": res.spill_stores + res.spill_loads, "max_block": max_block(res),
            "blocks_used": sorted({r["threads"] for r in mine}),
            "dynamic_shared": max(r["shared_bytes"] for r in mine),
            "occupancy": worst.fraction, "limiter": worst.limiter,
        })
    return rows


def format_table(rows) -> str:
    head = ("kernel", "dtype", "regs", "static smem", "spills", "max block", "block used", "dyn smem",
            "occupancy")
    lines = [head]
    for r in rows:
        occ = "ILLEGAL" if r["limiter"] == "illegal" else f"{r['occupancy']:.0%} ({r['limiter']})"
        lines.append((r["kernel"], r["dtype"], str(r["registers"]), f"{r['shared']:,}", str(r["spills"]),
                      str(r["max_block"]), ",".join(map(str, r["blocks_used"])), f"{r['dynamic_shared']:,}", occ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
                     for line in lines)


# ------------------------------------------------------------------------------------------------ the command

def main(argv=None) -> int:
    """``gpucnn kernels [--arch sm_90] [--json PATH]`` (``argv`` without the "kernels"; default sys.argv[1:]): print
    each kernel's resources and every launch that breaks a limit. Returns the exit status: 0 when every launch
    fits every architecture asked for, 1 when one does not, 2 when the report cannot be made here (ptxas,
    libNVVM or NVRTC missing, or a bad command line)."""
    p = argparse.ArgumentParser(prog="gpucnn kernels",
                                description="Registers, shared memory and occupancy of gpucnn's Numba kernels on "
                                            "real GPUs, and every launch that breaks a limit (no GPU needed; "
                                            "needs ptxas, libNVVM and NVRTC).")
    p.add_argument("--arch", action="append", choices=sorted(ARCHS),
                   help="an architecture to check (repeatable; default: all of " + ", ".join(ARCHS) + ")")
    p.add_argument("--json", metavar="PATH", help="also write the whole report as JSON")
    p.add_argument("--record", metavar="OUT", help=argparse.SUPPRESS)              # step 1, on "sim"
    p.add_argument("--compile", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)  # step 2
    try:
        args = p.parse_args(argv)
    except SystemExit as e:             # --help (0) or a bad command line (2): returned, not raised
        return int(e.code or 0)
    if args.record:
        with open(args.record, "w") as f:
            json.dump(record(), f)
        return 0
    if args.compile:
        with open(args.compile[0]) as f:
            job = json.load(f)
        try:
            compiled = compile_kernels(job["pairs"], job["archs"], tuple(job["ptx_cc"]))
        except ToolMissing as e:
            print(e, file=sys.stderr)
            return _TOOL_MISSING
        with open(args.compile[1], "w") as f:
            json.dump(compiled, f)
        return 0

    archs = list(dict.fromkeys(args.arch or ARCHS))
    try:
        report = collect(archs)
    except (ToolMissing, RuntimeError) as e:
        print(f"gpucnn kernels: {e}", file=sys.stderr)
        return 2
    for a in archs:
        arch = ARCHS[a]
        print(f"\n## {a} ({arch.gpus}): per SM {REGISTERS_PER_SM:,} registers, {arch.threads_per_sm:,} threads, "
              f"{arch.blocks_per_sm} blocks, {arch.shared_per_sm // KiB} KiB shared memory; per block "
              f"{MAX_THREADS_PER_BLOCK:,} threads, {REGISTERS_PER_BLOCK:,} registers, {SHARED_PER_BLOCK // KiB} KiB "
              "shared memory\n")
        print(format_table(table(report, a)))
    missing = sorted(set(all_kernels()) - {r["kernel"] for r in report.launches})
    if missing:
        print(f"\nNot launched by the recorded runs (not checked): {', '.join(missing)}")
    print(f"\n{len(report.launches)} distinct launches recorded in {report.record_s:.1f} s, "
          f"{len(report.compiled)} kernel variants compiled in {report.compile_s:.1f} s.")
    bad = illegal_launches(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": archs, "launches": report.launches, "compiled": report.compiled,
                       "tables": {a: table(report, a) for a in archs},
                       "illegal": [{"arch": a, "launch": r, "problems": pr} for a, r, pr in bad]}, f, indent=1)
    if not bad:
        print("Every launch fits every architecture checked.")
        return 0
    print(f"\n{len(bad)} launch(es) that a GPU would refuse:")
    for a, r, problems in bad:
        print(f"  {a}: {r['kernel']} ({_label(r['signature'])}) {r['blocks']:,} x {r['threads']} threads, "
              f"{r['shared_bytes']:,} B dynamic shared memory, in {r['scenario']}: {'; '.join(problems)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
