"""Shared fixtures: tiny models built and converted once per test session (no downloads)."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at test time
# the CPU provider's optimized-graph cache writes to the user's cache folder: off, except where a test sets it
os.environ.setdefault("SDONNX_GRAPH_CACHE", "")
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
