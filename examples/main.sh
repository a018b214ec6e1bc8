#!/usr/bin/env bash
# The main job on a fresh machine: install gpucnn (with CuPy when an NVIDIA driver is present), get
# Fashion-MNIST from Debian's package, and train LeNet-5 on it - on the GPU when there is one, else the CPU.
# Extra arguments go to `gpucnn train` (e.g. --epochs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
if command -v nvidia-smi >/dev/null 2>&1; then
  cuda_major=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -n 1)
  case "$cuda_major" in
    12) extra="[cuda12]" ;;
    13|14|15) extra="[cuda13]" ;;
    *) echo "main: nvidia-smi reports no CUDA version I know ($cuda_major); installing the CPU version" ;;
  esac
fi
python3 -m pip install -q -e ".$extra"
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${GPUCNN_DATA:-}" ] && [ ! -d ~/.gpucnn/data/fashion-mnist ]; then
  sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get update -qq && $sudo_ apt-get install -y -qq dataset-fashion-mnist
fi
gpucnn info
exec gpucnn train lenet5 --dataset fashion-mnist --epochs 10 --batch-size 128 --optimizer sgd --lr 0.05 \
  --momentum 0.9 --weight-decay 5e-4 --out "runs/lenet5-fashion-mnist-$(date +%Y%m%d-%H%M%S)" "$@"
