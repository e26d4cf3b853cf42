#!/usr/bin/env bash
# Install sdonnx with everything its tests need into .venv, then run the test suite.
# Usage: bash scripts/test.sh [pytest args...]    (CI runs exactly this; see README)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch is the converter's and the tests' only (never the runtime's). 2.13.0 is the CPU build we test
# with; any torch >= 2.1 works.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[cpu,convert,serve,test,opencv,ray]"
# k-diffusion is the reference for sampler math; its own requirements (torchvision, clip, ...) are not
# needed for sampling.py and do not install beside every torch, hence --no-deps.
python -m pip install --quiet --no-deps "k-diffusion==0.1.1.post1"
# the web page's test drives a headless Chromium; install it where we may (it skips, saying why, otherwise)
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "note: chromium not installed; the browser test will skip"
fi
# OpenVINO runs in its own environment: onnxruntime-openvino installs the same `onnxruntime` module as
# onnxruntime. tests/test_openvino.py converts the tiny models here and generates with them there (no torch
# there). SDONNX_SKIP_OPENVINO=1 leaves it out; where the wheel does not install, that test skips, saying so.
if [ "${SDONNX_SKIP_OPENVINO:-0}" != 1 ]; then
  [ -x .venv-openvino/bin/python ] || "$PYTHON" -m venv .venv-openvino
  if ! (.venv-openvino/bin/python -m pip install --quiet --upgrade pip &&
        .venv-openvino/bin/python -m pip install --quiet -e ".[openvino]"); then
    echo "note: onnxruntime-openvino did not install; tests/test_openvino.py will skip"
    rm -rf .venv-openvino
  fi
fi
export HF_HUB_OFFLINE=1
python -m pytest "$@"
