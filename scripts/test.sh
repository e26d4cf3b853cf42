#!/usr/bin/env bash
# Install sdonnx with everything its tests need into .venv, then run the test suite.
# Usage: bash scripts/test.sh [pytest args...]    (CI runs exactly this; see README)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# The three installs wait mostly on the network, so chromium (apt) and the OpenVINO environment are filled
# in the background while pip fills .venv. A venv's own pip is kept unless it is too old for an editable
# install of a pyproject (pip >= 21.3; the Pythons we test with bundle 23 or newer).
recent_pip() { "$1" -c 'import pip, sys; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (21, 3))'; }

# the web page's tests drive a headless Chromium; install it where we may (they skip, saying why, otherwise)
chromium_job=
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium) >"$logs/chromium" 2>&1 &
  chromium_job=$!
fi
# OpenVINO runs in its own environment: onnxruntime-openvino installs the same `onnxruntime` module as
# onnxruntime. tests/test_openvino.py converts the tiny models here and generates with them there (no torch
# there). SDONNX_SKIP_OPENVINO=1 leaves it out; where the wheel does not install, that test skips, saying so.
# Its editable install runs while torch installs into .venv, and is waited for before .venv's own editable
# install: both write sdonnx.egg-info in this folder.
openvino_job=
if [ "${SDONNX_SKIP_OPENVINO:-0}" != 1 ]; then
  ( ([ -x .venv-openvino/bin/python ] || "$PYTHON" -m venv .venv-openvino) &&
    (recent_pip .venv-openvino/bin/python || .venv-openvino/bin/python -m pip install --quiet --upgrade pip) &&
    .venv-openvino/bin/python -m pip install --quiet -e ".[openvino]" ) >"$logs/openvino" 2>&1 &
  openvino_job=$!
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
recent_pip python || python -m pip install --quiet --upgrade pip
# torch is the converter's and the tests' only (never the runtime's). 2.13.0 is the CPU build we test
# with; any torch >= 2.1 works.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
if [ -n "$openvino_job" ] && ! wait "$openvino_job"; then
  tail -n 5 "$logs/openvino"
  echo "note: onnxruntime-openvino did not install; tests/test_openvino.py will skip"
  rm -rf .venv-openvino
fi
python -m pip install --quiet -e ".[cpu,convert,serve,test,opencv,ray]"
# k-diffusion is the reference for sampler math; its own requirements (torchvision, clip, ...) are not
# needed for sampling.py and do not install beside every torch, hence --no-deps.
python -m pip install --quiet --no-deps "k-diffusion==0.1.1.post1"
if [ -n "$chromium_job" ] && ! wait "$chromium_job"; then
  tail -n 5 "$logs/chromium"
  echo "note: chromium not installed; the browser tests will skip"
fi
export HF_HUB_OFFLINE=1
python -m pytest "$@"
