"""convert --optimize / --quantize: derived graphs beside the base, held to the parity gate, used at run time."""
import json

import numpy as np
import onnx
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


# every combination `sdonnx convert --help` offers, on each family's tiny model: (optimize target, dtype, quantize)
OFFERED = [(None, "fp16", None), (None, "fp32", "int8"), ("cpu", "fp32", None), ("cpu", "fp16", None),
           ("cpu", "fp32", "int8"), ("gpu", "fp32", None), ("gpu", "fp16", None), ("dml", "fp32", None),
           ("dml", "fp16", None)]
REFUSED = [("gpu", "fp32", "int8"), ("dml", "fp32", "int8"), ("cpu", "fp16", "int8"), (None, "fp16", "int8")]


@pytest.fixture(scope="module")
def family_parts(tiny_diffusers, tiny_onnx, tiny_sdxl):
    """family -> (component specs with their torch modules, the folder of its converted base graphs): the
    base graphs are exported once per family and every plan derives from them."""
    from converters.components import component_specs
    from converters.convert import load_source

    cache = {}

    def get(family):
        if family not in cache:
            folder, _, base = tiny_sdxl("base") if family == "sdxl" else (*tiny_diffusers(family), tiny_onnx(family))
            loaded = load_source(folder)
            encoders = {name: model for name, (model, _) in loaded.text_encoders().items()}
            cache[family] = (component_specs(encoders, loaded.unet, loaded.vae), base)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def shared_fusions():
    """onnxruntime's Python fusions (converters.optimize._fuse) run once per base graph and target, not once per
    combination: (cpu, fp32), (cpu, fp16) and (cpu, fp32, int8) start from the same fused graph, which the
    fusion, a pure function of the graph, the component, the target and the head count, would make again
    identically (they are most of each combination's time). Every consumer gets its own copy, since the fp16
    and int8 steps rewrite the graph they are given; those steps and each parity gate run per combination."""
    import os

    import converters.optimize as optimize

    fuse, made = optimize._fuse, {}

    def shared(model, component, target, num_heads):
        key = (os.getcwd(), component, target, num_heads)  # derive() runs it in the base graph's folder
        if key not in made:
            made[key] = fuse(model, component, target, num_heads)
        fused_model, fused = made[key]
        copy = onnx.ModelProto()
        copy.CopyFrom(fused_model)
        return copy, dict(fused)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optimize, "_fuse", shared)
        yield


def derive_all(specs, base, plan, folder):
    """derive_checked for every component -> {component: manifest fields} of those the plan changes."""
    from converters.optimize import derive_checked

    derived = {}
    for spec in specs:
        fields = derive_checked(spec, base / spec.name / "model.onnx", plan, folder, 1e-3, lambda message: None,
                                out_dir=folder / spec.name)
        if fields:
            derived[spec.name] = fields
    return derived


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("optimize, dtype, quantize", OFFERED)
def test_every_offered_combination_converts(family_parts, shared_fusions, family, optimize, dtype, quantize,
                                            tmp_path):
    """Each combination derives every component it applies to and passes the parity gate against torch
    (derive_checked raises ParityError past the tolerance; fp16 graphs that did not load failed here)."""
    specs, base = family_parts(family)
    derived = derive_all(specs, base, Plan(optimize=optimize, dtype=dtype, quantize=quantize), tmp_path)
    assert "unet" in derived
    for name, fields in derived.items():
        record = fields["optimized"]
        assert (tmp_path / fields["optimized_path"]).is_file()
        assert record["dtype"] == ("fp16" if dtype == "fp16" and name != "vae_encoder" else "fp32")
        assert record["parity_checked"]["provider"] == "CPUExecutionProvider"
        assert not (tmp_path / fields["optimized_path"]).with_name("cpu_twin.onnx").exists()
    unet = derived["unet"]["optimized"]["parity_checked"]
    if optimize in ("gpu", "dml"):  # their UNets hold nodes the CPU cannot run as written
        assert unet["graph"] == "cpu twin" and unet["replaced"]
    else:
        assert unet == {"provider": "CPUExecutionProvider", "graph": "as written", "replaced": {}}
    if optimize == "dml":
        _assert_directml_recipe(specs, base, derived, tmp_path, dtype, attention=family == "sd1")


def _assert_directml_recipe(specs, base, derived, folder, dtype, attention):
    """onnxruntime's DirectML recipe (GroupNorm, MultiHeadAttention, LayerNorm fused; none of the fused ops
    DirectML lacks; GroupNorm fed fp16 in fp16 graphs) and every node of every graph, base and derived,
    on a DirectML kernel per the shipped table."""
    from sdonnx.kernels import check_graph, load_table, value_types

    table = load_table("dml")
    graphs = [base / spec.name / "model.onnx" for spec in specs] + [folder / f["optimized_path"] for f in derived.values()]
    assert [check_graph(g, table).fallbacks for g in graphs] == [[]] * len(graphs)
    assert all(f["optimized"]["dml_fallback_nodes"] == 0 for f in derived.values())
    unet = onnx.load(str(folder / derived["unet"]["optimized_path"]), load_external_data=False)
    ops = {n.op_type for n in unet.graph.node}
    # attention fuses where one head count fits every block (SD 1.x; optimize.attention_heads): the SD 2.x
    # and SDXL graphs keep it as MatMul/Softmax, which DirectML runs as well (unfused)
    assert {"GroupNorm", "LayerNormalization"} | ({"MultiHeadAttention"} if attention else set()) <= ops
    assert not ops & {"NhwcConv", "BiasSplitGelu", "BiasAdd", "SkipLayerNormalization", "SkipGroupNorm"}
    if dtype == "fp16":
        types = value_types(unet, table)
        assert {types[n.input[0]] for n in unet.graph.node if n.op_type == "GroupNorm"} == {"tensor(float16)"}


@pytest.mark.parametrize("optimize, dtype, quantize", REFUSED)
def test_combinations_that_cannot_work_are_refused_up_front(optimize, dtype, quantize):
    with pytest.raises(OptimizeError, match="int8"):
        Plan(optimize=optimize, dtype=dtype, quantize=quantize)
    with pytest.raises(ConvertError, match="int8"):
        convert("does-not-matter", "/nonexistent/out", optimize=optimize, dtype=dtype, quantize=quantize)


def test_readme_gpu_line_converts(tiny_diffusers, tmp_path):
    """`sdonnx convert SRC -o OUT --optimize --dtype fp16`, the README's line for CUDA and DirectML users."""
    from click.testing import CliRunner

    from sdonnx.cli import main

    folder, _ = tiny_diffusers("sd1")
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out), "--optimize", "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "sdonnx.json").read_text())
    assert manifest["converter"]["optimize"] == "gpu" and manifest["converter"]["dtype"] == "fp16"
    assert manifest["components"]["unet"]["optimized"]["parity_checked"]["graph"] == "cpu twin"
    # the same folder on a machine without a GPU: the base graphs run (the GPU-fused UNet would not start)
    from sdonnx.pipeline import Pipeline

    pipe = Pipeline.load(out, provider="cpu")
    result = pipe.generate("a cat", steps=2, seed=1)
    assert result.images[0].size == (64, 64)
    unet = pipe._component("unet")
    assert unet.is_base and unet.session.path == out / manifest["components"]["unet"]["path"]


def test_convert_for_directml_reports_kernel_coverage(tiny_diffusers, tmp_path):
    """`--target dml` runs the doctor on every graph as it goes and records the count in the manifest."""
    from click.testing import CliRunner

    from sdonnx.cli import main

    folder, _ = tiny_diffusers("sd1")
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["convert", str(folder), "-o", str(out), "--target", "dml", "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert "unet/optimized/model.onnx: all" in result.output and "nodes have DirectML kernels" in result.output
    manifest = json.loads((out / "sdonnx.json").read_text())
    assert manifest["converter"]["optimize"] == "dml"
    assert manifest["components"]["unet"]["optimized"]["dml_fallback_nodes"] == 0


@pytest.mark.parametrize("target, provider, derived", [
    (None, "openvino", True), ("cpu", "cpu", True), ("cpu", "cuda", True), ("cpu", "openvino", False),
    ("cpu", "migraphx", False), ("gpu", "cuda", True), ("gpu", "cpu", False), ("gpu", "dml", False),
    ("dml", "dml", True), ("dml", "cpu", False), ("dml", "openvino", False)])
def test_fused_graphs_run_only_where_their_kernels_exist(target, provider, derived):
    from types import SimpleNamespace

    from sdonnx.runtime.components import derived_runs_on

    spec = SimpleNamespace(optimized={"target": target, "dtype": "fp16"})
    assert derived_runs_on(spec, SimpleNamespace(names=[provider, "cpu"])) is derived
