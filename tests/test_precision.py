"""Precision choice (runtime/precision.py), CPU feature detection (runtime/cpu.py), the `Precision` infotext
key, and the static int8 UNet of `sdonnx quantize` (converters/quantize.py) on the tiny SD 1.x model."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sdonnx import Pipeline
from sdonnx.manifest import load_manifest
from sdonnx.request import GenerationRequest
from sdonnx.runtime import cpu
from sdonnx.runtime.precision import Precision, PrecisionError, resolve

SAPPHIRE = frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16",
                      "amx_int8", "amx_tile"})
ZEN3 = frozenset({"avx2", "fma"})
OV_CAPS = {"FP32", "BF16", "FP16", "INT8"}


def kwargs(**more):
    return {"prompt": "a red cube", "steps": 3, "sampler": "Euler", "seed": 3, "width": 64, "height": 64, **more}


def psnr(a, b):
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    return 10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12))


@pytest.fixture(scope="module")
def quantized(tiny_onnx, tmp_path_factory):
    """A copy of the tiny SD 1.x model with its static int8 UNet (4 prompts x 8 steps at 64x64)."""
    from converters.quantize import quantize_unet

    folder = tmp_path_factory.mktemp("int8") / "model"
    shutil.copytree(tiny_onnx("sd1"), folder)
    variant = quantize_unet(folder, size=64, steps=8)
    return folder, variant


# ------------------------------------------------------------------------------------------ CPU features


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma avx512_bf16 amx_int8\n\nprocessor\t: 1\nflags\t: fpu\n")
    flags = cpu.cpu_flags(str(info), platform="linux")
    assert {"avx2", "avx512_bf16", "amx_int8"} <= flags and cpu.features(flags) == ["AMX-INT8", "AVX512-BF16", "AVX2", "FMA"]
    assert cpu.fast_precisions(flags) == ["fp32", "bf16", "int8"]


def test_cpu_flags_never_fail(tmp_path):
    """Windows and macOS have no /proc/cpuinfo; an unreadable file is as good as none."""
    assert cpu.cpu_flags(platform="win32") == frozenset() and cpu.cpu_flags(platform="darwin") == frozenset()
    assert cpu.cpu_flags(str(tmp_path / "missing"), platform="linux") == frozenset()
    assert cpu.fast_precisions(frozenset()) == ["fp32"]


def test_avx512_fp16_alone_is_not_fast_fp16():
    """Measured: OpenVINO's f16 hint ran slower than fp32 on a CPU with AVX512-FP16 but no AMX-FP16."""
    assert "fp16" not in cpu.fast_precisions(SAPPHIRE) and "fp16" in cpu.fast_precisions(SAPPHIRE | {"amx_fp16"})


# ------------------------------------------------------------------------------------------ selection


def test_openvino_takes_bf16_as_its_inference_precision_hint(tiny_onnx):
    manifest = load_manifest(tiny_onnx("sd1"))
    chosen = resolve("BF16", "openvino", "CPU", manifest, SAPPHIRE, OV_CAPS)
    assert chosen.name == "bf16"
    assert chosen.openvino == {"load_config": {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}}
    assert resolve("fp16", "openvino", "CPU", manifest, SAPPHIRE, OV_CAPS).openvino["load_config"]["CPU"] == {
        "INFERENCE_PRECISION_HINT": "f16"}
    assert resolve("fp32", "openvino", "CPU", manifest, SAPPHIRE, OV_CAPS) == Precision("fp32")


@pytest.mark.parametrize("precision, provider, caps, words", [
    ("bf16", "cpu", None, ["no bf16 kernels", "valid with provider cpu and this model: fp32"]),
    ("bf16", "openvino", {"FP32", "FP16"}, ["lists no BF16", "valid with provider openvino and this model: fp32, fp16"]),
    ("int8", "cpu", None, ["no int8 UNet", "sdonnx quantize"]),
    ("int8", "openvino", OV_CAPS, ["no int8 UNet", "fp32, bf16, fp16"]),
    ("fp16", "cpu", None, ["no fp16 graphs", "--dtype fp16"]),
    ("int8", "cuda", None, ["not cuda"]),
])
def test_impossible_precisions_name_the_valid_ones(tiny_onnx, precision, provider, caps, words):
    with pytest.raises(PrecisionError) as e:
        resolve(precision, provider, "CPU", load_manifest(tiny_onnx("sd1")), SAPPHIRE, caps)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_unknown_precision_names_the_choices(tiny_onnx):
    with pytest.raises(PrecisionError, match="unknown precision 'int4'; choose one of fp32, bf16, fp16, int8, auto"):
        resolve("int4", "cpu", None, load_manifest(tiny_onnx("sd1")))


def test_auto_picks_what_is_fast_here_and_says_so(tiny_onnx, quantized, caplog):
    plain, with_int8 = load_manifest(tiny_onnx("sd1")), load_manifest(quantized[0])
    with caplog.at_level("INFO", logger="sdonnx.runtime.precision"):
        assert resolve("auto", "openvino", "CPU", plain, SAPPHIRE, OV_CAPS).name == "bf16"
    assert "precision auto: bf16 on openvino" in caplog.text
    assert resolve("auto", "openvino", "CPU", plain, ZEN3, {"FP32", "INT8"}).name == "fp32"
    assert resolve("auto", "cpu", None, with_int8, SAPPHIRE).name == "int8"
    assert resolve("auto", "cpu", None, with_int8, ZEN3).name == "fp32"  # no VNNI/AMX: int8 is not fast
    assert resolve("auto", "cpu", None, plain, SAPPHIRE).name == "fp32"
    assert resolve(None, "cpu", None, plain) == Precision()  # default: each graph as converted


def test_cpu_provider_pipeline_errors_before_any_session(tiny_onnx):
    with pytest.raises(PrecisionError, match="bf16"):
        Pipeline.load(tiny_onnx("sd1"), provider="cpu", precision="bf16")


# ------------------------------------------------------------------------------------------ infotext


def test_precision_in_the_infotext_only_when_not_fp32_and_read_back(quantized):
    folder, _ = quantized
    fp32 = Pipeline.load(folder, provider="cpu", precision="fp32").generate(**kwargs())
    int8 = Pipeline.load(folder, provider="cpu", precision="int8").generate(**kwargs())
    default = Pipeline.load(folder, provider="cpu").generate(**kwargs())  # the base graph: no derived one
    assert "Precision" not in fp32.infotext and "Precision" not in default.infotext
    assert "Precision: int8" in int8.infotext
    assert GenerationRequest.load_options_from_infotext(int8.infotext) == {"precision": "int8"}
    assert GenerationRequest.load_options_from_infotext(fp32.infotext) == {}
    # the rest of the request reads back unchanged, the key is no request field
    assert GenerationRequest.from_infotext(int8.infotext) == GenerationRequest.from_infotext(fp32.infotext)
    with pytest.raises(ValueError, match="'int3' is not one of fp32, bf16, fp16, int8"):
        GenerationRequest.load_options_from_infotext(int8.infotext.replace("Precision: int8", "Precision: int3"))


def test_lora_free_base_graph_label(quantized):
    """With LoRA, hypernetworks or tiling the UNet runs its fp32 base graph: the infotext says so."""
    folder, _ = quantized
    result = Pipeline.load(folder, provider="cpu", precision="int8").generate(**kwargs(tiling="xy"))
    assert "Precision" not in result.infotext


def test_cli_precision_flag_and_from_image(quantized, tmp_path):
    from sdonnx.cli import main

    folder, _ = quantized
    runner = CliRunner()
    done = runner.invoke(main, ["generate", "a red cube", "-m", str(folder), "--provider", "cpu", "--steps", "2",
                                "-W", "64", "-H", "64", "--precision", "int8", "-o", str(tmp_path / "a")])
    assert done.exit_code == 0, done.output
    made = next((tmp_path / "a").glob("*.png"))
    again = runner.invoke(main, ["generate", "-m", str(folder), "--provider", "cpu", "--from-image", str(made),
                                 "-o", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    from sdonnx.image import read_infotext

    assert "Precision: int8" in read_infotext(next((tmp_path / "b").glob("*.png")))
    bad = runner.invoke(main, ["generate", "x", "-m", str(folder), "--provider", "cpu", "--precision", "bf16",
                               "-o", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "error: precision bf16 cannot run here" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------ int8


def test_quantize_writes_a_qdq_unet_close_to_fp32(quantized):
    """The static int8 UNet: QDQ nodes around int8 weights, recorded in the manifest with its cost, and its
    output close to the fp32 graph's on a prompt it was not calibrated on. Tolerance: relative L2 error
    0.35 at t=999, 0.1 below. The tiny random model's latents grow 14x over its trajectory (mean |x| 0.8 at
    t=999, 11 at t=0; a trained model's stay near 1), so one static range per tensor is coarse for the
    first step; measured 27.7% / 5.4% / 2.4% (the trained demo model: 2.0% / 2.6% / 7.5% at t=999/545/91)."""
    import onnx

    folder, variant = quantized
    manifest = load_manifest(folder)
    assert manifest.components["unet"].variants["int8"] == json.loads(json.dumps(variant))
    graph = onnx.load(str(folder / variant["path"]), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") > 10 and ops.count("QuantizeLinear") > 5
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) > 10
    errors = {int(t): e for t, e in variant["relative_error"].items()}
    high = max(errors)
    assert errors[high] < 0.35 and all(e < 0.1 for t, e in errors.items() if t != high), errors
    assert variant["calibration"] == {"prompts": 4, "steps": 8, "size": 64, "unet_calls": 32}


# ------------------------------------------------------------------------------------------ OpenVINO bf16


def test_openvino_bf16_close_to_fp32(tiny_onnx, tmp_path):
    """bf16 through OpenVINO's inference precision hint on the tiny model, against OpenVINO fp32 (same seed).
    Tolerance: PSNR >= 30 dB (the issue's bound for bf16; bf16 keeps 8 bits of mantissa, ~0.4% per value;
    measured 35.2 dB, largest difference 23 of 255 on this random-weight model)."""
    import os
    import subprocess

    from test_openvino import openvino_python

    python = openvino_python()
    if not python.exists():
        pytest.skip(f"no OpenVINO environment at {python}: scripts/test.sh makes it")
    if "bf16" not in cpu.fast_precisions(cpu.cpu_flags()):
        pytest.skip("this CPU has no AVX512-BF16/AMX: OpenVINO would not run bf16")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "SDONNX_OPENVINO_CACHE": str(tmp_path / "cache")}
    case = {"model": str(tiny_onnx("sd1")), "kwargs": kwargs()}
    done = subprocess.run([str(python), str(Path(__file__).parent / "openvino_precision_child.py")],
                          input=json.dumps(case), capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["bf16"]["unet"] == report["fp32"]["unet"] == "OpenVINOExecutionProvider"
    assert json.loads(report["bf16"]["options"]["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}
    assert "load_config" not in report["fp32"]["options"]
    assert "Precision: bf16" in report["bf16"]["infotext"] and "Precision" not in report["fp32"]["infotext"]
    assert report["psnr"] >= 30, report


def test_providers_command_reports_cpu_features():
    from sdonnx.cli import cpu_lines

    lines = list(cpu_lines(True, SAPPHIRE, {"FP32", "BF16", "INT8"}))
    assert lines[0] == "cpu features: AMX-BF16, AMX-INT8, AVX512-BF16, AVX512-FP16, AVX512-VNNI, AVX512F, AVX2, FMA"
    assert lines[1].startswith("fast precisions here: fp32, bf16, int8 (")
    assert lines[2] == "openvino CPU capabilities: BF16, FP32, INT8"
    assert list(cpu_lines(False, frozenset()))[:2] == ["cpu features: unknown (no /proc/cpuinfo)",
                                                       lines[1].replace("fp32, bf16, int8", "fp32")]


def test_server_refuses_at_start_a_precision_a_model_cannot_run(tiny_onnx):
    pytest.importorskip("fastapi")
    from sdonnx.server import create_app

    with pytest.raises(ValueError, match=r"model model: precision int8 cannot run here: the model has no int8 UNet"):
        create_app(tiny_onnx("sd1"), provider="cpu", precision="int8")
    assert create_app(tiny_onnx("sd1"), provider="cpu", precision="fp32") is not None
