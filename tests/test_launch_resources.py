"""Every Numba launch gpucnn makes must fit a real GPU's per-block limits (registers, threads, shared memory), and
fill it (the fill rule below).

The simulator cannot tell: on an H200, _pool_act_bias_grad_kernel (80 registers per thread) launched with 1,024
threads failed with CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES. gpucnn.kernel_report records every launch of real-size
training on "sim" (sized as "cuda" sizes them) and compiles each kernel with Numba, NVVM and ptxas for sm_75,
sm_80, sm_89 and sm_90, with no GPU; both in subprocesses, so this CPU-suite process never imports numba.cuda.
The first tests check the check itself, on made-up launches.
"""
import pytest

from gpucnn import kernel_report as kr
from gpucnn.kernels import reduce

SM90 = kr.ARCHS["sm_90"]


def res(registers, shared=0):
    return kr.Resources(registers=registers, shared=shared, spill_stores=0, spill_loads=0, stack=0)


# --------------------------------------------------------------------------------------------- the check


def test_the_h200_failure_is_illegal():
    # what the H200 refused: 80 registers x 1,024 threads = 81,920 > 65,536
    problems = kr.launch_problems(1024, 4096, res(80), SM90)
    assert problems and "81,920 registers" in problems[0] and "at most 768 threads" in problems[0]
    assert kr.launch_problems(768, 3072, res(80), SM90) == []
    assert kr.launch_problems(512, 2048, res(94), kr.ARCHS["sm_80"]) == []


@pytest.mark.parametrize("registers, largest", [(32, 1024), (64, 1024), (65, 896), (72, 896), (80, 768),
                                                (94, 640), (124, 512), (140, 384), (255, 256), (256, 0)])
def test_max_block(registers, largest):
    assert kr.max_block(res(registers)) == largest
    if largest:
        assert not kr.launch_problems(largest, 0, res(registers), SM90)
    if largest < 1024:
        assert kr.launch_problems(largest + 32, 0, res(registers), SM90)


def test_registers_are_allocated_per_warp_and_sub_partition():
    # 81 registers count as 88 (a warp's 2,592 rounded up to 2,816); 25 warps count as 28 (4 sub-partitions)
    assert kr.block_registers(32, 81) == 88 * 32 * 4
    assert kr.block_registers(800, 80) == 2560 * 28
    assert kr.launch_problems(800, 0, res(80), SM90)          # 25 x 2,560 = 64,000 would fit without the rounding


def test_other_limits():
    assert kr.launch_problems(1056, 0, res(16), SM90)                     # threads
    assert kr.launch_problems(128, 48 * 1024 - 100, res(16, shared=101), SM90)   # static + dynamic shared
    assert not kr.launch_problems(128, 48 * 1024 - 100, res(16, shared=100), SM90)
    assert kr.launch_problems(128, 0, res(16), SM90, blocks=2 ** 31)       # grid


def test_occupancy():
    assert kr.occupancy(256, 0, res(32), SM90) == (8, 1.0, "threads")
    # 124 registers: a warp takes 4,096, a sub-partition holds 4 warps, the SM 16: two blocks of 8 warps
    assert kr.occupancy(256, 3564, res(124), SM90) == (2, 0.25, "registers")
    assert kr.occupancy(1024, 0, res(32), kr.ARCHS["sm_75"]) == (1, 1.0, "threads")
    assert kr.occupancy(32, 40 * 1024, res(16), SM90).limiter == "shared"     # 41 KiB a block: 5 in 228 KiB
    assert kr.occupancy(1024, 0, res(80), SM90) == (0, 0.0, "illegal")


def test_parse_ptxas():
    text = """ptxas info    : 24 bytes gmem
ptxas info    : Compiling entry function '_ZN6gpucnn7kernels' for 'sm_90'
ptxas info    : Function properties for _ZN6gpucnn7kernels
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 2048 bytes smem"""
    assert kr.parse_ptxas(text) == kr.Resources(80, 2048, 4, 12, 8)


def test_a_recorded_1024_thread_launch_is_reported():
    # the whole check on a made-up report: the H200's launch, and the fixed one
    sig = [["array", "float32", 4], ["scalar", "int64"]]
    launch = {"kernel": "activation._pool_act_bias_grad_kernel", "blocks": 6, "threads": 1024, "shared_bytes": 4096,
              "signature": sig, "largest": 1, "count": 1, "scenario": "made up"}
    compiled = [{"kernel": launch["kernel"], "signature": sig, "resources": {"sm_90": res(80)._asdict()}}]
    bad = kr.illegal_launches(kr.Report([launch], compiled, ["sm_90"], 0, 0))
    assert [(a, r["threads"]) for a, r, _ in bad] == [("sm_90", 1024)]
    fixed = dict(launch, threads=512, shared_bytes=2048)
    assert kr.illegal_launches(kr.Report([fixed], compiled, ["sm_90"], 0, 0)) == []


# --------------------------------------------------------------------------------------------- gpucnn's launches


@pytest.fixture(scope="module")
def launches():
    """Every distinct launch of gpucnn.kernel_scenarios' runs, recorded once (a subprocess on "sim", seconds)."""
    return kr.record_elsewhere()


@pytest.fixture(scope="module")
def report(launches):
    try:
        return kr.collect(launches=launches)
    except kr.ToolMissing as e:
        pytest.skip(f"cannot compile kernels for a real GPU here: {e}")


def _regs(report, kernel, dtype, arch):
    found = [c["resources"][arch]["registers"] for c in report.compiled
             if c["kernel"] == kernel and kr._label(c["signature"]) == dtype]
    assert len(found) == 1, f"{kernel} ({dtype}) compiled {len(found)} times"
    return found[0]


def test_every_launch_fits_every_architecture(report):
    bad = kr.illegal_launches(report)
    if bad:
        pytest.fail(f"{len(bad)} launch(es) a GPU would refuse (`gpucnn kernels` shows every kernel's limits):\n"
                    + "\n".join(f"{a}: {r['kernel']} {r['blocks']} x {r['threads']} threads, {r['shared_bytes']:,} B "
                                 f"dynamic shared memory, in {r['scenario']}: {'; '.join(p)}" for a, r, p in bad))


# The H200's profiler also gave activation._pool_act_bias_grad_kernel 80 registers; that kernel has changed since (its
# bias sum spans many blocks, gpucnn.kernels.reduce: 96 registers on sm_90 here), so it is no reference any more.
H200 = {"conv._im2col_tiled_kernel": 80, "conv._col2im_tiled_kernel": 124}


@pytest.mark.parametrize("kernel", sorted(H200))
def test_registers_match_the_h200(report, kernel):
    # what the H200's profiler reported (sm_90, float32); the driver's own ptxas may differ by a register or two
    assert abs(_regs(report, kernel, "float32", "sm_90") - H200[kernel]) <= 4


def test_one_ptx_serves_every_architecture(report):
    # the report assembles one PTX, made for sm_75, for every architecture; on an H200 Numba makes one for sm_90a
    pairs = [[c["kernel"], c["signature"]] for c in report.compiled
             if c["kernel"] in H200 and kr._label(c["signature"]) == "float32"]
    assert len(pairs) == len(H200)
    for c in kr.compile_elsewhere(pairs, ["sm_90a"], ptx_cc=(9, 0, "a")):
        shared = next(s for s in report.compiled if (s["kernel"], s["signature"]) == (c["kernel"], c["signature"]))
        assert c["resources"]["sm_90a"] == shared["resources"]["sm_90"], c["kernel"]


def test_every_kernel_is_recorded(report):
    # a kernel no scenario launches would escape the check: add a scenario to kernel_scenarios.SCENARIOS
    launched = {r["kernel"] for r in report.launches}
    assert set(kr.all_kernels()) - launched == set()


def test_launches_are_sized_as_on_cuda(report):
    # shapes_only(cuda_shapes=True) must record "cuda"'s blocks, not the simulator's (8 or 16 threads at most)
    for kernel in ("conv._col2im_tiled_kernel", "conv._im2col_tiled_kernel", "activation._pool_act_bias_grad_kernel"):
        threads = [r["threads"] for r in report.launches if r["kernel"] == kernel]
        assert threads and min(threads) >= 32, (kernel, threads)


# --------------------------------------------------------------------------------------------- the fill rule
# On an H200 (132 SMs) a conv bias gradient on 6 blocks took 1,462 us and a dense one on ONE block 82-127 us: a launch
# that leaves most SMs idle turns microseconds of memory traffic into milliseconds. The rule, stated here on its own:
# (a) a launch whose largest array has at least 2**16 elements uses at least 264 blocks (2 per SM on 132 SMs);
# (b) no launch leaves more than 64 elements of its largest array to a thread.

def starving(launches) -> list:
    """The launches (record()'s dicts) that break the fill rule."""
    return [r for r in launches if (r["largest"] >= 2 ** 16 and r["blocks"] < 264)
            or r["largest"] > 64 * r["blocks"] * r["threads"]]


def test_the_fill_rule_finds_what_the_h200_found():
    h200 = [{"kernel": "activation._pool_act_bias_grad_kernel", "blocks": 6, "threads": 512, "largest": 4816896},
            {"kernel": "dense._bias_grad_kernel", "blocks": 1, "threads": 128, "largest": 30720},      # (b) only
            {"kernel": "ok", "blocks": 264, "threads": 256, "largest": 4325376},                     # 64 a thread
            {"kernel": "small", "blocks": 1, "threads": 64, "largest": 4096}]
    assert [r["kernel"] for r in starving(h200)] == ["activation._pool_act_bias_grad_kernel", "dense._bias_grad_kernel"]


def test_every_launch_fills_the_gpu(launches):
    bad = starving(launches)
    assert not bad, f"{len(bad)} launch(es) break the fill rule (264 blocks from 2**16 elements, 64 a thread):\n" + \
        "\n".join(f"{r['kernel']}: {r['blocks']:,} blocks x {r['threads']} threads, largest array {r['largest']:,} "
                  f"elements ({r['largest'] / (r['blocks'] * r['threads']):.0f} a thread), in {r['scenario']}"
                  for r in bad)


@pytest.mark.parametrize("segments", [1, 3, 6, 16, 96, 264, 4096])
@pytest.mark.parametrize("per_segment", [1, 7, 100, 1000, 10 ** 4, 65536, 200704, 10 ** 6, 3 * 10 ** 7])
def test_reduction_sizes_keep_the_rule(per_segment, segments):
    # gpucnn.kernels.reduce sizes every sum: whatever the shape, its grid keeps the rule and each block has values
    threads, chunks = reduce.reduction_grid(per_segment, segments)
    blocks = segments * chunks
    assert not starving([{"largest": per_segment * segments, "blocks": blocks, "threads": threads}])
    assert reduce.fills(per_segment * segments, blocks, threads)
    assert threads & (threads - 1) == 0 and 32 <= threads <= 256 and (chunks - 1) * threads < per_segment
