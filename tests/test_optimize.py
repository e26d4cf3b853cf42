"""convert --optimize / --quantize: derived graphs beside the base, held to the parity gate, used at run time."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.transformers.optimizer")

from converters.convert import ConvertError, convert
from converters.optimize import OptimizeError, Plan, derive


@pytest.fixture(scope="module")
def optimized_model(tiny_diffusers, tmp_path_factory):
    folder, _ = tiny_diffusers("sd1")
    out = tmp_path_factory.mktemp("sd1-optimized") / "model"
    convert(folder, out, optimize="cpu")
    return out


def _image(folder, **kwargs):
    from sdonnx.pipeline import Pipeline

    pipe = Pipeline.load(folder, provider="cpu")
    image = pipe.generate("a red cube", steps=3, sampler="Euler", seed=7, width=64, height=64, **kwargs).images[0]
    return pipe, np.asarray(image, np.float32)


def test_optimized_graphs_are_fused_and_recorded(optimized_model):
    manifest = json.loads((optimized_model / "sdonnx.json").read_text())
    unet = manifest["components"]["unet"]
    assert unet["optimized_path"] == "unet/optimized/model.onnx"
    assert (optimized_model / unet["optimized_path"]).is_file()
    assert unet["optimized"]["fused"].get("Attention", 0) + unet["optimized"]["fused"].get("MultiHeadAttention", 0) > 0
    assert unet["optimized"]["parity_max_abs_err"] is not None
    # the base graph and its weight map stay for LoRA
    assert (optimized_model / unet["path"]).is_file() and unet["weights"]
    assert manifest["components"]["text_encoder"]["optimized"]["fused"].get("SkipLayerNormalization")
    assert manifest["converter"]["optimize"] == "cpu"


def test_cpu_self_attention_takes_the_flash_kernel(optimized_model):
    """For the CPU, self-attention is MultiHeadAttention with separate Q, K, V (MLAS flash attention) rather
    than the fused Attention op, which materializes the full score matrix."""
    nodes = _nodes(optimized_model / "unet" / "optimized" / "model.onnx")
    mha = [n for n in nodes if n.op_type == "MultiHeadAttention"]
    assert not [n for n in nodes if n.op_type == "Attention"]
    # self-attention: q, k and v are projections of one input; cross-attention's k/v come from the text
    projections = {n.output[0]: n.input[0] for n in nodes if n.op_type == "MatMul"}
    self_attention = [n for n in mha if len({projections.get(i) for i in n.input[:3]}) == 1]
    assert self_attention and len(self_attention) * 2 == len(mha)
    assert all(len(n.input) == 3 for n in self_attention)  # no bias input: the zero bias was dropped
    manifest = json.loads((optimized_model / "sdonnx.json").read_text())
    assert manifest["components"]["unet"]["optimized"]["fused"]["MultiHeadAttention"] == len(mha)


def test_optimized_image_matches_the_base_graphs(optimized_model, tiny_onnx):
    pipe, fast = _image(optimized_model)
    assert not pipe._component("unet").is_base
    _, base = _image(tiny_onnx("sd1"))
    assert np.abs(fast - base).max() <= 2


def test_base_graph_on_request_and_for_lora(optimized_model):
    from sdonnx.manifest import load_manifest
    from sdonnx.runtime import providers
    from sdonnx.runtime.components import UNet

    manifest, plan = load_manifest(optimized_model), providers.plan("cpu")
    assert UNet(optimized_model, manifest, "unet", plan, base=True).is_base
    weight = manifest.components["unet"].weights["unet.conv_in.weight"]
    from sdonnx.adapters.onnx_weights import OnnxWeights

    original = OnnxWeights(optimized_model / manifest.components["unet"].path).get(weight)
    lora = UNet(optimized_model, manifest, "unet", plan, replacements={weight: original})
    assert lora.is_base and lora.session.path.name == "model.onnx" and lora.session.path.parent.name == "unet"


def test_int8_unet_runs_with_a_bounded_error(tiny_onnx, tmp_path):
    import onnxruntime as ort

    base = tiny_onnx("sd1") / "unet" / "model.onnx"
    path, _ = derive(base, "unet", Plan(optimize="cpu", quantize="int8"), num_heads=8, out_dir=tmp_path)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), np.float32), "timestep": np.array([300, 300], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 64), np.float32)}
    expected = ort.InferenceSession(str(base), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "QAttention") for n in _nodes(path))
    got = session.run(None, feeds)[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.25


def _nodes(path):
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.node


@pytest.mark.parametrize("kwargs, message", [({"optimize": "tpu"}, "cpu, gpu"), ({"quantize": "int4"}, "int8"),
                                             ({"dtype": "fp16", "quantize": "int8"}, "fp16")])
def test_bad_requests_are_refused(kwargs, message):
    with pytest.raises(OptimizeError, match=message):
        Plan(**kwargs)
    with pytest.raises(ConvertError, match=message):
        convert("does-not-matter", "/nonexistent/out", **kwargs)


def test_cli_offers_the_options():
    from click.testing import CliRunner

    from sdonnx.cli import main

    text = CliRunner().invoke(main, ["convert", "--help"]).output
    assert "--optimize" in text and "--quantize" in text and "fp16" in text
