#!/usr/bin/env bash
# One short GPU check (issue 17), under 10 minutes, ending with one summary line `device_check: ...`:
# sdonnx on ONNX Runtime's CUDA provider vs the CPU provider (tiny SD 1.x / 2.x-v / SDXL, full-size random
# SD 1.5 fp32 and fp16), and a 512x512 generate timed against diffusers on the same GPU (bench/device_check.py).
#
#   bash bench/device_check.sh [--tiny-only]
#
# Needs python3 with torch (CUDA), an onnxruntime that offers CUDAExecutionProvider, diffusers, transformers
# and sdonnx's runtime packages. Where the machine's own onnxruntime is a CPU build, put an onnxruntime-gpu
# in GPU_SITE (default /tmp/gpu-site; it goes first on PYTHONPATH). Optional inputs found under .gpu/:
#   .gpu/*/ort-*.tar.xz.part*   pieces of a tar.xz of an onnxruntime-gpu site (unpacked into GPU_SITE)
#   .gpu/*/*.whl                wheels installed into GPU_SITE without dependencies (e.g. diffusers)
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_SITE:-/tmp/gpu-site}
mkdir -p "$SITE"
parts=$(ls .gpu/*/ort-*.tar.xz.part* 2>/dev/null | sort -t/ -k3)
if [ -n "$parts" ]; then
  # shellcheck disable=SC2086
  cat $parts | python3 -c "import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.stdin.buffer), mode='r|').extractall('$SITE')" \
    || { echo "device_check: FAIL could not unpack the onnxruntime-gpu pieces"; exit 1; }
fi
if ls .gpu/*/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .gpu/*/*.whl \
    || { echo "device_check: FAIL could not install the carried wheels"; exit 1; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
timeout "${DEVICE_CHECK_TIMEOUT:-560}" python3 bench/device_check.py "$@"
