"""Shared fixtures: tiny models built and converted once per test session (no downloads)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at test time
# the CPU provider's optimized-graph cache writes to the user's cache folder: off, except where a test sets it
os.environ.setdefault("SDONNX_GRAPH_CACHE", "")
# One compute thread per process (torch's OpenMP pool and onnxruntime's intra-op pool): the test models are
# tiny (8x8 latents), far below the size where a second thread pays, and both pools spin while they wait,
# so with two cores the torch reference, the ONNX session and any busy neighbour fight for the same core.
# Measured on the tiny sd1 under load: the diffusers reference took 7 CPU s with 2 threads, 0.18 s with 1;
# one sdonnx generate 0.23 s, 0.075 s. Set before torch is imported; children (CLI, OpenVINO) inherit it.
# Tests of the thread count itself set or clear SDONNX_THREADS with monkeypatch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SDONNX_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """family -> (diffusers folder, the torch StableDiffusionPipeline it holds)."""
    tiny_models = pytest.importorskip("tiny_models")
    cache = {}

    def get(family):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-diffusers")
            cache[family] = (folder, tiny_models.save_pipeline(folder, family))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_onnx(tiny_diffusers, tmp_path_factory):
    """family -> sdonnx model folder converted from the tiny diffusers folder."""
    from converters.convert import convert

    cache = {}

    def get(family):
        if family not in cache:
            folder, _ = tiny_diffusers(family)
            out = tmp_path_factory.mktemp(f"{family}-onnx") / "model"
            convert(folder, out)
            cache[family] = out
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """kind ("base", "refiner", "inpaint") -> (diffusers folder, torch pipeline, sdonnx model folder)."""
    tiny = pytest.importorskip("tiny_sdxl")
    from converters.convert import convert

    cache = {}

    def get(kind="base"):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(f"sdxl-{kind}-diffusers")
            pipe = tiny.save(folder, kind)
            out = tmp_path_factory.mktemp(f"sdxl-{kind}-onnx") / "model"
            convert(folder, out)
            cache[kind] = (folder, pipe, out)
        return cache[kind]

    return get
