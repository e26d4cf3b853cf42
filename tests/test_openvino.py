"""The OpenVINO provider for real, on the CPU device: tiny SD 1.x, SD 2.x (v-prediction) and SDXL models.

onnxruntime and onnxruntime-openvino install the same module, so the OpenVINO runs happen in their own
environment (.venv-openvino, made by scripts/test.sh: onnxruntime-openvino and sdonnx's runtime
dependencies, no torch); this suite builds and converts the models and LoRA files, then runs
tests/openvino_child.py there once. The child generates every case with the CPU provider and with OpenVINO
in that one environment. Tolerance: as the LoRA and parity tests, max 2 and mean 0.05 pixel units (8-bit)
between the providers (measured: max 1, mean <= 0.001). The base graphs are also checked, op by op, against
the OpenVINO provider's supported-op table (tests/data/openvino-ops.tsv, from onnxruntime's
onnxruntime/core/providers/openvino/ov_versions/data_ops.cc at commit 0dd87689, OpenVINO <= 2024.3 entries)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = Path(__file__).parent / "data" / "openvino-ops.tsv"
TIGHT = {"max": 2, "mean": 0.05}
OPENVINO = "OpenVINOExecutionProvider"


def openvino_python():
    """The OpenVINO environment's interpreter: SDONNX_OPENVINO_PYTHON, else .venv-openvino in the repository."""
    configured = os.environ.get("SDONNX_OPENVINO_PYTHON")
    if configured:
        return Path(configured)
    scripts = "Scripts/python.exe" if sys.platform.startswith("win") else "bin/python"
    return ROOT / ".venv-openvino" / scripts


def _kwargs(seed=1, **more):
    return {"prompt": "a red cube", "steps": 3, "sampler": "Euler", "seed": seed, "width": 64, "height": 64, **more}


@pytest.fixture(scope="module")
def report(tiny_onnx, tiny_diffusers, tiny_sdxl, tmp_path_factory):
    python = openvino_python()
    if not python.exists():
        pytest.skip(f"no OpenVINO environment at {python}: scripts/test.sh makes it (or set SDONNX_OPENVINO_PYTHON)")
    from test_lora import peft_lora, write_kohya

    lora_dir = tmp_path_factory.mktemp("ov-loras")
    _, torch_pipe = tiny_diffusers("sd1")
    for name, seed in (("a", 1), ("b", 2)):
        layers, configs = peft_lora(torch_pipe, rank=4, alpha=8, seed=seed)
        write_kohya(lora_dir / f"{name}.safetensors", layers, configs)
    cases = [
        {"name": "sd1", "model": str(tiny_onnx("sd1")), "lora_dir": str(lora_dir), "runs": [
            {"label": "base", "kwargs": _kwargs()},
            {"label": "lora a", "kwargs": _kwargs(prompt="a red cube <lora:a:0.8>")},
            {"label": "lora b", "kwargs": _kwargs(prompt="a red cube <lora:b:1>")},
            {"label": "base again", "kwargs": _kwargs()},
            {"label": "96x64 batch 2", "kwargs": _kwargs(seed=2, width=96, batch_size=2)},
            {"label": "tiling", "kwargs": _kwargs(tiling="xy")}]},
        {"name": "sd2", "model": str(tiny_onnx("sd2")), "runs": [{"label": "base", "kwargs": _kwargs()}]},
        {"name": "sdxl", "model": str(tiny_sdxl("base")[2]), "runs": [{"label": "base", "kwargs": _kwargs()}]},
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SDONNX_OPENVINO_CACHE": str(tmp_path_factory.mktemp("ov-cache"))}
    done = subprocess.run([str(python), str(Path(__file__).parent / "openvino_child.py")], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _runs(report):
    return [(f"{name} {label}", run) for name, runs in report.items() if name != "cache_files"
            for label, run in runs.items()]


def test_every_session_really_runs_on_openvino(report):
    for label, run in _runs(report):
        assert set(run["providers"].values()) == {OPENVINO}, label
        assert set(run["devices"].values()) == {"CPU"} and set(run["cpu_providers"].values()) == {"CPUExecutionProvider"}
        assert "unet" in run["providers"] and "vae_decoder" in run["providers"], label
    # no node of the base graphs fell back to the CPU provider (onnxruntime's profile of the first run)
    for name in ("sd1", "sd2", "sdxl"):
        assert report[name]["base"]["fell_back"] and not any(report[name]["base"]["fell_back"].values()), name


def test_images_match_the_cpu_provider(report):
    for label, run in _runs(report):
        assert run["max"] <= TIGHT["max"] and run["mean"] <= TIGHT["mean"], (label, run["max"], run["mean"])
        assert run["same_infotext"], label


def test_dynamic_sizes_and_batches(report):
    assert report["sd1"]["96x64 batch 2"]["shape"] == [2, 64, 96, 3]
    assert report["sd1"]["base"]["shape"] == [1, 64, 64, 3]


def test_lora_switching_and_tiling(report):
    sd1 = report["sd1"]
    digests = {label: run["digest"] for label, run in sd1.items()}
    assert len({digests["base"], digests["lora a"], digests["lora b"], digests["tiling"]}) == 4
    assert digests["base again"] == digests["base"]  # dropping the tag restores the base sessions exactly


def test_compiled_models_are_cached_but_not_lora_merged_ones(report):
    sd1 = report["sd1"]
    assert sd1["base"]["cache_count"] >= 3  # text encoder, UNet, VAE decoder
    assert sd1["lora a"]["cache_count"] == sd1["lora b"]["cache_count"] == sd1["base"]["cache_count"]


# ------------------------------------------------------------------ the base graphs against OpenVINO's op table


def openvino_ops():
    """{op: {devices}} from the OpenVINO provider's supported-op table (any OpenVINO version listed)."""
    ops = {}
    for line in TABLE.read_text().splitlines():
        if line.startswith("#") or line.startswith("op\t") or not line.strip():
            continue
        op, _version, devices = line.split("\t")
        ops.setdefault(op, set()).update(devices.split(","))
    return ops


def unsupported_nodes(path, ops, device="CPU"):
    """[(op type, domain)] of the graph's nodes OpenVINO's table does not list for `device` (subgraphs
    of If/Loop included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    found, graphs = set(), [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            devices = ops.get(node.op_type, set()) if node.domain in ("", "ai.onnx") else set()
            if not devices & {device, "All"}:
                found.add((node.op_type, node.domain or "ai.onnx"))
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sorted(found)


def test_base_graphs_use_only_ops_openvino_runs(tiny_onnx, tiny_sdxl):
    ops = openvino_ops()
    assert "Conv" in ops and "MultiHeadAttention" not in ops  # the table is read, and has no contrib ops
    from sdonnx.manifest import load_manifest

    for folder in (tiny_onnx("sd1"), tiny_onnx("sd2"), tiny_sdxl("base")[2]):
        manifest = load_manifest(folder)
        for name, component in manifest.components.items():
            for device in ("CPU", "GPU"):
                assert unsupported_nodes(Path(folder) / component.path, ops, device) == [], (folder, name, device)


def test_the_op_check_sees_contrib_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8])
    node = helper.make_node("MultiHeadAttention", ["x", "x", "x"], ["y"], domain="com.microsoft", num_heads=1)
    graph = helper.make_graph([node, helper.make_node("Relu", ["y"], ["z"])], "g", [x],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 8])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert unsupported_nodes(tmp_path / "m.onnx", openvino_ops()) == [("MultiHeadAttention", "com.microsoft")]
