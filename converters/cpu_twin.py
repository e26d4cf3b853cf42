"""A CPU-runnable twin of a graph fused for a GPU, so the parity gate can run it on a machine without one.

The GPU recipes fuse into contrib ops only the CUDA/DirectML kernels implement (GroupNorm, SkipGroupNorm,
NhwcConv, BiasSplitGelu, BiasAdd). The twin is the same graph with the same weights and every other fused
node, each such node replaced by its definition in standard ONNX ops (the semantics onnxruntime documents
for the contrib op). What the parity check then measures is the fusion's rewrite of the graph: the
patterns matched, the weights moved (NhwcConv's transposed filters, GroupNorm's gamma/beta), attributes
(groups, epsilon, activation, channels_last). What it cannot measure is the GPU kernels' own arithmetic.
fp16 nodes without a CPU fp16 kernel are run by onnxruntime's CPU provider through its own casts to fp32.
"""
import logging
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sdonnx.kernels import fallbacks, installed_table

log = logging.getLogger(__name__)


class TwinError(ValueError):
    """A node the CPU has no kernel for and that the twin has no definition of."""


def cpu_twin(model):
    """-> (twin model or None when `model` runs on the CPU as it is, {op: nodes replaced})."""
    missing = [f for f in fallbacks(model, installed_table("cpu")) if f.reason == "op"]
    unknown = sorted({f"{f.domain}.{f.op}" for f in missing if f.op not in LOWERINGS})
    if unknown:
        raise TwinError(f"the CPU provider has no kernel for {', '.join(unknown)} and the parity check has no "
                        f"CPU definition of it; the graph cannot be checked on this machine")
    names = {f.node for f in missing} | {node.name or node.output[0] for node in model.graph.node if _packed(node)}
    if not names:
        return None, {}
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes, replaced = [], Counter()
    for node in model.graph.node:
        if (node.name or node.output[0]) in names:
            build = _Builder(twin.graph, node.name or node.output[0], opset)
            LOWERINGS[node.op_type](node, build)
            nodes.extend(build.nodes)
            replaced[node.op_type] += 1
        else:
            nodes.append(node)
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    return twin, dict(replaced)


class _Builder:
    """Appends standard-op nodes (and small constant initializers) named after the replaced node."""

    def __init__(self, graph, prefix, opset):
        self.graph, self.prefix, self.opset, self.nodes, self.count = graph, prefix, opset, [], 0

    def _name(self):
        self.count += 1
        return f"{self.prefix}/twin_{self.count}"

    def op(self, op_type, inputs, output=None, **attrs):
        name = self._name()
        self.nodes.append(helper.make_node(op_type, inputs, [output or name], name=name, **attrs))
        return output or name

    def const(self, array):
        name = self._name()
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def split(self, x, axis, parts):
        """x in `parts` equal pieces along `axis` (Split's signature changed at opset 18)."""
        name = self._name()
        outputs = [f"{name}_{i}" for i in range(parts)]
        attrs = {"axis": axis, **({"num_outputs": parts} if self.opset >= 18 else {})}
        self.nodes.append(helper.make_node("Split", [x], outputs, name=name, **attrs))
        return outputs


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _group_norm(build, x, gamma, beta, output, attrs):
    """GroupNorm (com.microsoft): x NHWC when channels_last (the default), else NCHW; per-group statistics,
    per-channel gamma/beta, then SiLU when activation is 1."""
    channels_last = attrs.get("channels_last", 1)
    if channels_last:
        x = build.op("Transpose", [x], perm=[0, 3, 1, 2])
    groups = attrs["groups"]
    grouped = build.op("Reshape", [x, build.const(np.array([0, groups, -1], np.int64))])
    ones = build.op("CastLike", [build.const(np.ones(groups, np.float32)), grouped])
    zeros = build.op("CastLike", [build.const(np.zeros(groups, np.float32)), grouped])
    normed = build.op("InstanceNormalization", [grouped, ones, zeros], epsilon=attrs.get("epsilon", 1e-5))
    y = build.op("Reshape", [normed, build.op("Shape", [x])])
    per_channel = build.const(np.array([1, -1, 1, 1], np.int64))
    scale = build.op("Reshape", [build.op("CastLike", [gamma, y]), per_channel])
    shift = build.op("Reshape", [build.op("CastLike", [beta, y]), per_channel])
    y = build.op("Add", [build.op("Mul", [y, scale]), shift])
    if attrs.get("activation"):
        y = build.op("Mul", [y, build.op("Sigmoid", [y])])
    if channels_last:
        y = build.op("Transpose", [y], perm=[0, 2, 3, 1])
    build.op("Identity", [y], output)


def _lower_group_norm(node, build):
    x, gamma, beta = node.input[:3]
    _group_norm(build, x, gamma, beta, node.output[0], _attrs(node))


def _lower_skip_group_norm(node, build):
    """SkipGroupNorm: s = x + skip (+ bias), y = GroupNorm(s); s is the optional second output."""
    x, gamma, beta, skip = node.input[:4]
    bias = node.input[4] if len(node.input) > 4 else ""
    summed_name = node.output[1] if len(node.output) > 1 and node.output[1] else None
    summed = build.op("Add", [x, skip], None if bias else summed_name)
    if bias:
        summed = build.op("Add", [summed, bias], summed_name)
    _group_norm(build, summed, gamma, beta, node.output[0], _attrs(node))


def _lower_nhwc_conv(node, build):
    """NhwcConv: Conv on NHWC input with filters stored [M, kH, kW, C/group]."""
    x = build.op("Transpose", [node.input[0]], perm=[0, 3, 1, 2])
    w = build.op("Transpose", [node.input[1]], perm=[0, 3, 1, 2])
    y = build.op("Conv", [x, w] + list(node.input[2:3]), **_attrs(node))
    build.op("Transpose", [y], node.output[0], perm=[0, 2, 3, 1])


def _lower_bias_split_gelu(node, build):
    """BiasSplitGelu: (x + bias) split in two on the last axis, left * Gelu(right) (erf form)."""
    left, right = build.split(build.op("Add", list(node.input[:2])), -1, 2)
    erf = build.op("Erf", [build.op("Mul", [right, build.op("CastLike", [build.const(np.float32(1 / np.sqrt(2))), right])])])
    one = build.op("CastLike", [build.const(np.float32(1.0)), right])
    half = build.op("CastLike", [build.const(np.float32(0.5)), right])
    gelu = build.op("Mul", [build.op("Mul", [right, half]), build.op("Add", [erf, one])])
    build.op("Mul", [left, gelu], node.output[0])


def _lower_bias_add(node, build):
    """BiasAdd: x + bias + skip."""
    x, bias, skip = node.input[:3]
    build.op("Add", [build.op("Add", [x, bias]), skip], node.output[0])


def _packed(node):
    """MultiHeadAttention with Q/K/V packed into the query ([B, S, N, 3, H]) or K/V into the key
    ([B, L, N, 2, H]): the DirectML and CUDA kernels take these layouts, the CPU kernel does not."""
    if node.op_type != "MultiHeadAttention" or node.domain != "com.microsoft":
        return False
    inputs = list(node.input) + ["", ""]
    return not inputs[2]


def _unpack_attention(node, build):
    """Packed MultiHeadAttention -> the same op with Q, K, V as separate [B, S, N*H] tensors."""
    inputs = list(node.input) + ["", ""]
    flat = build.const(np.array([0, 0, -1], np.int64))
    if not inputs[1]:
        q, k, v = (build.op("Reshape", [part, flat]) for part in build.split(inputs[0], 3, 3))
    else:
        q = inputs[0]
        k, v = (build.op("Reshape", [part, flat]) for part in build.split(inputs[1], 3, 2))
    rest = list(node.input[3:])
    build.nodes.append(helper.make_node("MultiHeadAttention", [q, k, v] + rest, list(node.output),
                                        name=f"{build.prefix}/twin_unpacked", domain="com.microsoft", **_attrs(node)))


LOWERINGS = {"GroupNorm": _lower_group_norm, "SkipGroupNorm": _lower_skip_group_norm, "NhwcConv": _lower_nhwc_conv,
             "BiasSplitGelu": _lower_bias_split_gelu, "BiasAdd": _lower_bias_add,
             "MultiHeadAttention": _unpack_attention}
