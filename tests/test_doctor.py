"""`sdonnx doctor`: nodes a provider has no kernel for, from the shipped DirectML table (onnx only, no torch)."""
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from sdonnx.kernels import STANDARD, check_model, fallbacks, load_table, parse_table, value_types

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from update_dml_kernels import dml_rows, write_table  # noqa: E402

# an excerpt of onnxruntime's docs/OperatorKernels.md (commit 001d12d), as written there: a continuation row
# (empty op cell), an op with alternative signatures ("or"), the next provider's section after it
DOCUMENT = """
<a name="dmlexecutionprovider"/>

## Operators implemented by DmlExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Abs|*in* X:**T**<br> *out* Y:**T**|13+|**T** = tensor(float), tensor(float16), tensor(int16), tensor(int32), tensor(int64), tensor(int8)|
|||6+|**T** = tensor(float), tensor(float16), tensor(int16), tensor(int32), tensor(int64), tensor(int8)|
|Clip|*in* input:**T**<br> *in* min:**T**<br> *in* max:**T**<br> *out* output:**T**<br><br>or<br><br>*in* input:**T**<br> *out* output:**T**|13+|**T** = tensor(float), tensor(float16), tensor(int16), tensor(int32), tensor(int64), tensor(int8), tensor(uint16), tensor(uint32), tensor(uint64), tensor(uint8)|
|||11+|**T** = tensor(float), tensor(float16)|
| |
|**Operator Domain:** *com.microsoft*||||
|BiasGelu|*in* A:**T**<br> *in* B:**T**<br> *out* C:**T**|1+|**T** = tensor(float), tensor(float16)|
| |
| |


<a name="webgpuexecutionprovider"/>

## Operators implemented by WebGpuExecutionProvider

| Op Name | Parameters | OpSet Version | Types Supported |
|---------|------------|---------------|-----------------|
|**Operator Domain:** *ai.onnx*||||
|Abs|*in* X:**T**<br> *out* Y:**T**|13+|**T** = tensor(float)|
"""


def test_script_reads_the_documents_table(tmp_path):
    rows = dml_rows(DOCUMENT)
    assert [(d, op, opset) for d, op, opset, _, _ in rows] == [
        ("ai.onnx", "Abs", "13+"), ("ai.onnx", "Abs", "6+"), ("ai.onnx", "Clip", "13+"), ("ai.onnx", "Clip", "11+"),
        ("com.microsoft", "BiasGelu", "1+")]
    assert rows[1][3] == rows[0][3]  # the continuation row carries the parameters forward
    out = tmp_path / "table.tsv"
    write_table(rows, out, onnxruntime="1.24.4", commit="abc", source="test")
    table = parse_table(out.read_text())
    assert table.provider == "DmlExecutionProvider"
    clip = table.kernels[(STANDARD, "Clip")]
    assert [(k.start, k.end) for k in clip] == [(13, 2**31 - 1), (11, 2**31 - 1)]
    assert clip[1].types == {"T": {"tensor(float)", "tensor(float16)"}}
    assert table.signatures[("com.microsoft", "BiasGelu")].inputs == ("T", "T")


def test_shipped_table_rows_are_what_the_script_reads_from_the_document():
    """The excerpt's rows, parsed by the script, are the shipped table's rows for those ops."""
    shipped = [line.split("\t") for line in load_table_text().splitlines() if line and not line.startswith("#")]
    for row in dml_rows(DOCUMENT):
        assert list(row) in shipped, row


def load_table_text():
    from importlib import resources

    return resources.files("sdonnx").joinpath("data", "dml_kernels.tsv").read_text(encoding="utf-8")


def test_shipped_table_names_its_version_and_the_extra_pins_it():
    table = load_table("dml")
    assert "onnxruntime: 1.24.4" in table.source and "001d12d" in table.source
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"onnxruntime-directml==1.24.4"' in pyproject
    assert len(table.kernels) > 150 and ("com.microsoft", "MultiHeadAttention") in table.kernels


def _graph(nodes, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def _op_older_than_its_kernels(table):
    """(op, its first ONNX version) for a standard op whose DirectML kernels all start at a later version."""
    first_versions = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            first_versions[schema.name] = min(first_versions.get(schema.name, 10**6), schema.since_version)
    return next((op, first_versions[op]) for (domain, op), kernels in sorted(table.kernels.items())
                if domain == STANDARD and op in first_versions and min(k.start for k in kernels) > first_versions[op])


def test_reasons_op_opset_and_type():
    table = load_table("dml")
    op, first = _op_older_than_its_kernels(table)
    schema = onnx.defs.get_schema(op, first, "")
    old = helper.make_node(op, [f"i{i}" for i in range(schema.min_input)], ["o_old"], name="old")
    model = _graph([
        helper.make_node("Abs", ["d"], ["d_abs"], name="abs_double"),  # DirectML's Abs takes no double
        helper.make_node("BiasGelu", ["x", "x"], ["y"], name="bias_gelu", domain="com.microsoft"),
        helper.make_node("GemmFastGelu", ["x", "x"], ["z"], name="gemm_fast_gelu", domain="com.microsoft"),
    ], [("d", TensorProto.DOUBLE), ("x", TensorProto.FLOAT16)], [("d_abs", TensorProto.DOUBLE), ("y", TensorProto.FLOAT16),
                                                                 ("z", TensorProto.FLOAT16)])
    found = {f.node: f for f in fallbacks(model, table)}
    assert set(found) == {"abs_double", "gemm_fast_gelu"}
    assert found["abs_double"].reason == "type" and "tensor(double)" in found["abs_double"].detail
    assert found["gemm_fast_gelu"].reason == "op"
    old_model = _graph([old], [(f"i{i}", TensorProto.FLOAT) for i in range(schema.min_input)], [("o_old", TensorProto.FLOAT)],
                       opset=first)
    (f,) = fallbacks(old_model, table)
    assert f.reason == "opset" and f.op == op


def test_fp16_types_follow_through_contrib_ops():
    """Value types are walked through fused ops onnx's inference does not know, from the table's signatures."""
    model = _graph([helper.make_node("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft"),
                    helper.make_node("Cast", ["y"], ["y32"], to=TensorProto.FLOAT),
                    helper.make_node("Shape", ["y32"], ["s"])],
                   [("x", TensorProto.FLOAT16), ("b", TensorProto.FLOAT16)], [("s", TensorProto.INT64)])
    types = value_types(model, load_table("dml"))
    assert types["y"] == "tensor(float16)" and types["y32"] == "tensor(float)" and types["s"] == "tensor(int64)"


def test_cli_doctor_lists_fallbacks_and_exits_1(tmp_path):
    from click.testing import CliRunner

    from sdonnx.cli import main

    path = tmp_path / "g.onnx"
    onnx.save(_graph([helper.make_node("Abs", ["d"], ["e"], name="abs_double")], [("d", TensorProto.DOUBLE)],
                     [("e", TensorProto.DOUBLE)]), str(path))
    result = CliRunner().invoke(main, ["doctor", str(path), "--provider", "dml"])
    assert result.exit_code == 1
    assert "g.onnx: 1 of 1 nodes have no dml kernel" in result.output
    assert "abs_double (ai.onnx.Abs): type:" in result.output
    result = CliRunner().invoke(main, ["doctor", str(path), "--provider", "tpu"])
    assert result.exit_code == 2 and "provider 'tpu'" in result.output and "Traceback" not in result.output


def test_converted_model_folder_is_checked_graph_by_graph(tiny_onnx):
    from click.testing import CliRunner

    from sdonnx.cli import main

    reports = check_model(tiny_onnx("sd1"), "dml")
    assert {r.graph for r in reports} >= {"unet/model.onnx", "text_encoder/model.onnx", "vae_decoder/model.onnx"}
    assert all(not r.fallbacks and r.nodes > 0 for r in reports)
    result = CliRunner().invoke(main, ["doctor", str(tiny_onnx("sd1"))])
    assert result.exit_code == 0 and "unet/model.onnx: all" in result.output


def test_doctor_imports_no_torch():
    import subprocess

    code = ("import sys, sdonnx.kernels as k; k.load_table('dml'); "
            "assert not {'torch', 'converters', 'transformers', 'diffusers'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("cell, expected", [("13+", (13, 2**31 - 1)), ("[6, 12]", (6, 12)), ("11", (11, 11))])
def test_opset_cells(cell, expected):
    from sdonnx.kernels import parse_opset

    assert parse_opset(cell) == expected
