"""The CPU twin of GPU-fused graphs: each GPU-only contrib op replaced by standard ops, checked against numpy
definitions of the op (onnxruntime's contrib-op documentation) on one-node graphs."""
import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from converters.cpu_twin import TwinError, cpu_twin  # noqa: E402

RNG = np.random.default_rng(0)


def _model(node, inputs, outputs, initializers=()):
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape)
                                             for n, a in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(a, n) for n, a in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _run_twin(model, feeds, replaced_op):
    twin, replaced = cpu_twin(model)
    assert replaced == {replaced_op: 1}
    session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _group_norm(x_nchw, gamma, beta, groups, eps, silu):
    n, c = x_nchw.shape[:2]
    grouped = x_nchw.reshape(n, groups, -1).astype(np.float64)
    normed = (grouped - grouped.mean(-1, keepdims=True)) / np.sqrt(grouped.var(-1, keepdims=True) + eps)
    y = normed.reshape(x_nchw.shape) * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)
    return y / (1 + np.exp(-y)) if silu else y


@pytest.mark.parametrize("channels_last", [1, 0])
@pytest.mark.parametrize("activation", [0, 1])
def test_group_norm(channels_last, activation):
    x = RNG.standard_normal((2, 8, 3, 5)).astype(np.float32) * 3 + 1  # NCHW
    gamma, beta = RNG.standard_normal(8).astype(np.float32), RNG.standard_normal(8).astype(np.float32)
    feed = x.transpose(0, 2, 3, 1) if channels_last else x
    node = helper.make_node("GroupNorm", ["x", "gamma", "beta"], ["y"], domain="com.microsoft", groups=4,
                            epsilon=1e-5, activation=activation, channels_last=channels_last)
    (y,) = _run_twin(_model(node, {"x": feed}, ["y"], [("gamma", gamma), ("beta", beta)]), {"x": feed}, "GroupNorm")
    expected = _group_norm(x, gamma, beta, 4, 1e-5, activation)
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1) if channels_last else expected, atol=1e-5)


def test_skip_group_norm_and_its_sum():
    x, skip = (RNG.standard_normal((1, 4, 4, 8)).astype(np.float32) for _ in range(2))  # NHWC
    gamma, beta, bias = (RNG.standard_normal(8).astype(np.float32) for _ in range(3))
    node = helper.make_node("SkipGroupNorm", ["x", "gamma", "beta", "skip", "bias"], ["y", "s"],
                            domain="com.microsoft", groups=2, epsilon=1e-5, activation=1, channels_last=1)
    y, s = _run_twin(_model(node, {"x": x, "skip": skip}, ["y", "s"], [("gamma", gamma), ("beta", beta), ("bias", bias)]),
                     {"x": x, "skip": skip}, "SkipGroupNorm")
    np.testing.assert_allclose(s, x + skip + bias, atol=1e-6)
    expected = _group_norm((x + skip + bias).transpose(0, 3, 1, 2), gamma, beta, 2, 1e-5, True)
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), atol=1e-5)


def test_bias_split_gelu():
    x, bias = RNG.standard_normal((2, 6, 16)).astype(np.float32), RNG.standard_normal(16).astype(np.float32)
    node = helper.make_node("BiasSplitGelu", ["x", "bias"], ["y"], domain="com.microsoft")
    (y,) = _run_twin(_model(node, {"x": x}, ["y"], [("bias", bias)]), {"x": x}, "BiasSplitGelu")
    left, right = np.split((x + bias).astype(np.float64), 2, axis=-1)
    gelu = right * 0.5 * (1 + np.vectorize(math.erf)(right / math.sqrt(2)))
    np.testing.assert_allclose(y, left * gelu, atol=1e-5)


def test_bias_add():
    x, skip, bias = RNG.standard_normal((2, 6, 8)), RNG.standard_normal((2, 6, 8)), RNG.standard_normal(8)
    x, skip, bias = (a.astype(np.float32) for a in (x, skip, bias))
    node = helper.make_node("BiasAdd", ["x", "bias", "skip"], ["y"], domain="com.microsoft")
    (y,) = _run_twin(_model(node, {"x": x, "skip": skip}, ["y"], [("bias", bias)]), {"x": x, "skip": skip}, "BiasAdd")
    np.testing.assert_allclose(y, x + bias + skip, atol=1e-6)


def test_nhwc_conv_matches_conv():
    x = RNG.standard_normal((1, 4, 7, 7)).astype(np.float32)
    w, b = RNG.standard_normal((6, 4, 3, 3)).astype(np.float32), RNG.standard_normal(6).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1], "strides": [2, 2], "kernel_shape": [3, 3]}
    reference = _model(helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs), {"x": x}, ["y"], [("w", w), ("b", b)])
    (expected,) = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    nhwc = x.transpose(0, 2, 3, 1)
    node = helper.make_node("NhwcConv", ["x", "w", "b"], ["y"], domain="com.microsoft", **attrs)
    (y,) = _run_twin(_model(node, {"x": nhwc}, ["y"], [("w", w.transpose(0, 2, 3, 1)), ("b", b)]), {"x": nhwc}, "NhwcConv")
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), atol=1e-5)


@pytest.mark.parametrize("packing", ["qkv", "kv"])
def test_packed_attention_matches_separate_inputs(packing):
    """The CPU kernel refuses packed layouts at run time ("Packed QKV ... not implemented for CPU")."""
    b, s, heads, h = 2, 5, 2, 4
    q, k, v = (RNG.standard_normal((b, s, heads, h)).astype(np.float32) for _ in range(3))
    flat = {n: a.reshape(b, s, heads * h) for n, a in zip("qkv", (q, k, v))}
    separate = _model(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                                       num_heads=heads), flat, ["y"])
    (expected,) = ort.InferenceSession(separate.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, flat)
    if packing == "qkv":
        feeds = {"qkv": np.stack([q, k, v], axis=3)}
        node = helper.make_node("MultiHeadAttention", ["qkv"], ["y"], domain="com.microsoft", num_heads=heads)
    else:
        feeds = {"q": flat["q"], "kv": np.stack([k, v], axis=3)}
        node = helper.make_node("MultiHeadAttention", ["q", "kv"], ["y"], domain="com.microsoft", num_heads=heads)
    (y,) = _run_twin(_model(node, feeds, ["y"]), feeds, "MultiHeadAttention")
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_graph_the_cpu_runs_needs_no_twin():
    node = helper.make_node("Relu", ["x"], ["y"])
    assert cpu_twin(_model(node, {"x": np.zeros((2, 2), np.float32)}, ["y"])) == (None, {})


def test_unknown_gpu_only_op_is_refused_with_its_name():
    node = helper.make_node("GemmFastGelu", ["x", "w"], ["y"], domain="com.microsoft")
    model = _model(node, {"x": np.zeros((2, 2), np.float32)}, ["y"], [("w", np.zeros((2, 2), np.float32))])
    with pytest.raises(TwinError, match="com.microsoft.GemmFastGelu"):
        cpu_twin(model)
