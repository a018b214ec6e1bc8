#!/usr/bin/env bash
# The whole test suite. Numba picks simulator or GPU once per process, so the "sim" tests run apart from the CPU
# ones. The sim suite is the slow part (every CUDA thread is a Python thread): it runs as GPUCNN_SIM_SHARDS
# processes (default 2, each every n-th sim test) beside the CPU process, and a last process runs the registry
# checks over what the shards recorded (tests/conftest.py). On a machine with a usable CUDA GPU,
# `python -m pytest -m gpu` adds the GPU suite.
# GPUCNN_POISON=1 fills every buffer with NaN at its declared end of life (gpucnn.memory.poison): the sim
# run has it on throughout, and the CPU training-step tests run once more with it (on "cpu" nothing reuses
# memory, so poison is what checks the lifetimes there).
set -uo pipefail
cd "$(dirname "$0")/.."
shards=${GPUCNN_SIM_SHARDS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sim_env=(env GPUCNN_POISON=1 GPUCNN_DEVICE=sim GPUCNN_SIM_RECORDS="$work/records")
pids=()
for ((k = 0; k < shards; k++)); do
    "${sim_env[@]}" GPUCNN_TEST_SHARD="$k/$shards" python3 -m pytest -m sim "$@" > "$work/sim-$k.log" 2>&1 &
    pids+=($!)
done
echo "sim suite: $shards shards running in the background; their output follows the CPU suite's"
python3 -m pytest -m "not sim and not gpu" "$@"; cpu=$?
GPUCNN_POISON=1 python3 -m pytest -m "not sim and not gpu" tests/test_model.py tests/test_fusion.py \
    tests/test_speed.py "$@"; poison=$?
sim=0
for ((k = 0; k < shards; k++)); do
    wait "${pids[$k]}"; status=$?
    echo; echo "==================== sim shard $k/$shards (poisoned): exit $status ===================="
    cat "$work/sim-$k.log"
    [ "$status" -eq 0 ] || sim=1
done
echo; echo "==================== sim registry checks over every shard's kernels ===================="
"${sim_env[@]}" python3 -m pytest -m sim tests/test_registry.py "$@"; registry=$?
echo "cpu suite exit $cpu, cpu training steps poisoned exit $poison, sim shards (poisoned) $([ $sim -eq 0 ] && echo passed || echo FAILED), sim registry exit $registry"
[ "$cpu" -eq 0 ] && [ "$poison" -eq 0 ] && [ "$sim" -eq 0 ] && [ "$registry" -eq 0 ]
