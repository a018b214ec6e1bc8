#!/usr/bin/env bash
# The whole test suite: the CPU process, then the "sim" process (Numba picks simulator or GPU once per
# process). On a machine with a usable CUDA GPU, `python -m pytest -m gpu` adds the GPU suite.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -m "not sim and not gpu" "$@"; cpu=$?
GPUCNN_DEVICE=sim python3 -m pytest -m sim "$@"; sim=$?
echo "cpu suite exit $cpu, sim suite exit $sim"
[ "$cpu" -eq 0 ] && [ "$sim" -eq 0 ]
