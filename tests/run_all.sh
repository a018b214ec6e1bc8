#!/usr/bin/env bash
# The whole test suite: the CPU process, then the "sim" process (Numba picks simulator or GPU once per
# process). On a machine with a usable CUDA GPU, `python -m pytest -m gpu` adds the GPU suite.
# GPUCNN_POISON=1 fills every buffer with NaN at its declared end of life (gpucnn.memory.poison): the sim
# run has it on throughout, and the CPU training-step tests run once more with it (on "cpu" nothing reuses
# memory, so poison is what checks the lifetimes there).
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -m "not sim and not gpu" "$@"; cpu=$?
GPUCNN_POISON=1 python3 -m pytest -m "not sim and not gpu" tests/test_model.py tests/test_fusion.py \
    tests/test_speed.py "$@"; poison=$?
GPUCNN_POISON=1 GPUCNN_DEVICE=sim python3 -m pytest -m sim "$@"; sim=$?
echo "cpu suite exit $cpu, cpu training steps poisoned exit $poison, sim suite (poisoned) exit $sim"
[ "$cpu" -eq 0 ] && [ "$poison" -eq 0 ] && [ "$sim" -eq 0 ]
