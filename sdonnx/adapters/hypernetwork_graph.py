"""Hypernetworks in the exported UNet: a load-time rewrite of the base graph, no re-export.

A1111 runs every attention layer's context through the hypernetwork module of the context's width before
the k projection and through the other module before the v projection; the context is the text embedding
in cross-attention and the layer's own (normed) image tokens in self-attention, so a file with 320/640/1280
modules changes every self-attention layer too. Several hypernetworks chain (the second takes the first's
k and v outputs). Here the same happens in the graph: each to_k / to_v projection (found from the
manifest's weight map: initializer -> Transpose/Cast -> MatMul) gets its context through the inserted
modules. Modules read the same tensor in many places (the text embedding feeds every cross-attention;
a self-attention's to_k and to_v share one input), so each (tensor, hypernetwork, k/v) is built once.

The multipliers are one graph input, `hypernet_multipliers` [number of hypernetworks]: changing a strength
reuses the session. The module weights are baked in: another file is another graph. A float16 graph
gets its context cast to float32 for the modules and back after each hypernetwork, as A1111 runs them in
float32 (devices.cond_cast_float).

The rewritten graph goes to ONNX Runtime as bytes, with the session option that names the folder of the
base graph's external weights (onnxruntime 1.21 or later): nothing is written beside the model.
"""
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .hypernetwork import LAYER_NORM_EPS, HypernetworkError, HypernetworkLibrary

log = logging.getLogger(__name__)

MULTIPLIERS_INPUT = "hypernet_multipliers"
_PROJECTION = re.compile(r"\.(attn\d+)\.to_([kv])\.weight$")
_FLOAT, _FLOAT16 = 1, 10  # onnx TensorProto data types
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805  # torch.nn.SELU's constants
_RRELU_SLOPE = (1 / 8 + 1 / 3) / 2  # torch.nn.RReLU in eval mode: the mean of its default [lower, upper]


@dataclass(frozen=True)
class Target:
    """One k or v projection: the MatMul/Gemm node's name, the projection ("k"/"v"), its input width, whether
    the graph computes it in float16, and whether it is a self-attention (attn1) or cross-attention layer."""

    node: str
    kind: str
    width: int
    float16: bool
    cross: bool


def _consumers(graph):
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _attr(node, name, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_targets(graph, weights):
    """weights: the manifest's {canonical name: initializer} of the UNet -> [Target] of every attention's
    to_k and to_v. Raises HypernetworkError where a projection's weight does not lead to one MatMul."""
    inits = {t.name: t for t in graph.initializer}
    users = _consumers(graph)
    targets = []
    for canonical, init_name in sorted(weights.items()):
        match = _PROJECTION.search(canonical)
        if not match or init_name not in inits:
            continue
        targets.append(_target(canonical, inits[init_name], users, kind=match.group(2), cross=match.group(1) != "attn1"))
    return targets


def _target(canonical, init, users, kind, cross):
    """Follow the weight through Transposes and Casts to the MatMul (or Gemm) that applies it."""
    dims, elem, name = list(init.dims), init.data_type, init.name
    while True:
        found = users.get(name, [])
        if len(found) != 1:
            raise HypernetworkError(f"the UNet graph uses {canonical} in {len(found)} places; hypernetworks need "
                                    f"it to feed one projection (re-convert the model)")
        node = found[0]
        if node.op_type == "Transpose":
            perm = _attr(node, "perm") or list(reversed(range(len(dims))))
            dims = [dims[p] for p in perm]
        elif node.op_type == "Cast":
            elem = _attr(node, "to")
        elif node.op_type in ("MatMul", "Gemm") and list(node.input[1:2]) == [name] and len(dims) == 2:
            width = dims[1] if node.op_type == "Gemm" and _attr(node, "transB", 0) else dims[0]
            return Target(node.name, kind, int(width), elem == _FLOAT16, cross)
        else:
            raise HypernetworkError(f"the UNet graph applies {canonical} through a {node.op_type} node, not a "
                                    f"MatMul; hypernetworks cannot be inserted there")
        name = node.output[0]


class _Builder:
    """New nodes and initializers for one graph, with unique names."""

    def __init__(self, graph):
        self.graph, self.nodes, self._n, self._consts, self._inits = graph, [], 0, {}, set()

    def op(self, op_type, inputs, **attrs):
        from onnx import helper

        self._n += 1
        out = f"sdonnx_hypernet/{op_type}_{self._n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def init(self, name, array):
        """An initializer, added once per name: a module's weights are shared by every layer it runs in."""
        from onnx import numpy_helper

        if name not in self._inits:
            self._inits.add(name)
            self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.float32):
        key = (float(value), np.dtype(dtype).str)
        if key not in self._consts:
            self._consts[key] = self.init(f"sdonnx_hypernet.const_{len(self._consts)}", np.array(value, dtype))
        return self._consts[key]

    def take(self):
        nodes, self.nodes = self.nodes, []
        return nodes


def _activation(b, kind, params, x, name):
    """torch.nn activations (eval mode, default arguments) as opset-17 nodes."""
    simple = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "softplus": "Softplus", "softsign": "Softsign"}
    if kind in simple:
        return b.op(simple[kind], [x])
    if kind in ("leakyrelu", "rrelu"):
        return b.op("LeakyRelu", [x], alpha=0.01 if kind == "leakyrelu" else _RRELU_SLOPE)
    if kind in ("elu", "celu"):
        return b.op("Elu" if kind == "elu" else "Celu", [x], alpha=1.0)
    if kind == "selu":
        return b.op("Selu", [x], alpha=_SELU_ALPHA, gamma=_SELU_SCALE)
    if kind in ("relu6", "hardtanh"):
        low, high = (0.0, 6.0) if kind == "relu6" else (-1.0, 1.0)
        return b.op("Clip", [x, b.const(low), b.const(high)])
    if kind == "hardsigmoid":
        return b.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)
    if kind in ("swish", "hardswish"):  # x * hardsigmoid(x), HardSwish's definition: OpenVINO's EP lacks that op
        return b.op("Mul", [x, b.op("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
    if kind in ("hardshrink", "softshrink"):
        return b.op("Shrink", [x], lambd=0.5, bias=0.0 if kind == "hardshrink" else 0.5)
    if kind == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])])
    if kind == "mish":  # Mish is opset 18
        return b.op("Mul", [x, b.op("Tanh", [b.op("Softplus", [x])])])
    if kind == "gelu":  # exact (erf) GELU, torch's default; Gelu is opset 20
        erf = b.op("Erf", [b.op("Mul", [x, b.const(2 ** -0.5)])])
        return b.op("Mul", [b.op("Mul", [x, b.const(0.5)]), b.op("Add", [erf, b.const(1.0)])])
    if kind == "tanhshrink":
        return b.op("Sub", [x, b.op("Tanh", [x])])
    if kind == "logsigmoid":
        return b.op("Neg", [b.op("Softplus", [b.op("Neg", [x])])])
    if kind == "prelu":
        return b.op("PRelu", [x, b.init(f"{name}.slope", params[0])])
    raise HypernetworkError(f"activation {kind!r} has no graph form")


def _module_nodes(b, module, x, prefix, multiplier):
    """x + mlp(x) * multiplier for one Module; x: [B, T, width] float32."""
    h = x
    for j, layer in enumerate(module.layers):
        name = f"{prefix}.{j}"
        if layer.kind == "linear":
            weight, bias = layer.params
            h = b.op("Add", [b.op("MatMul", [h, b.init(f"{name}.weight", weight.T)]), b.init(f"{name}.bias", bias)])
        elif layer.kind == "norm":
            weight, bias = layer.params
            h = b.op("LayerNormalization", [h, b.init(f"{name}.weight", weight), b.init(f"{name}.bias", bias)],
                     axis=-1, epsilon=LAYER_NORM_EPS)
        else:
            h = _activation(b, layer.kind, layer.params, h, name)
    return b.op("Add", [x, b.op("Mul", [h, multiplier])])


def insert_hypernetworks(model, targets, chain):
    """A copy of `model` with the hypernetworks `chain` (in order) in front of the `targets` of matching width,
    and the graph input `hypernet_multipliers` [len(chain)]. Works on a proto loaded without external data."""
    import onnx
    from onnx import TensorProto, helper

    if any(layer.kind == "norm" for h in chain for m in h.modules.values() for mod in m for layer in mod.layers):
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < 17:
            raise HypernetworkError(f"hypernetworks with layer norm need a graph of opset 17 or later; this one is {opset}")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    graph.input.append(helper.make_tensor_value_info(MULTIPLIERS_INPUT, TensorProto.FLOAT, [len(chain)]))
    b = _Builder(graph)
    multipliers = [b.op("Gather", [MULTIPLIERS_INPUT, b.const(i, np.int64)], axis=0) for i in range(len(chain))]
    by_node = {t.node: t for t in targets}
    built, nodes = {}, b.take()
    for node in graph.node:
        target = by_node.get(node.name)
        if target is not None:
            node.input[0] = _chain(b, built, chain, multipliers, target, node.input[0])
            nodes.extend(b.take())
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return result


def _chain(b, built, chain, multipliers, target, source):
    """The tensor the projection reads after every hypernetwork of `chain` with its width: `source` when none."""
    x = source
    for i, hypernetwork in enumerate(chain):
        pair = hypernetwork.modules.get(target.width)
        if pair is None:
            continue
        key = (x, i, target.kind)
        if key not in built:
            module = pair[0] if target.kind == "k" else pair[1]
            prefix = f"sdonnx_hypernet.{i}.{target.width}.{target.kind}"
            x32 = b.op("Cast", [x], to=_FLOAT) if target.float16 else x
            out = _module_nodes(b, module, x32, prefix, multipliers[i])
            built[key] = b.op("Cast", [out], to=_FLOAT16) if target.float16 else out
        x = built[key]
    return x


# ---------------------------------------------------------------------------------------------- pipeline

class UnetHypernetworks:
    """What a pipeline holds: the hypernetwork folder, and the UNet's base graph without its weights (read
    once, on first use): a new set of hypernetworks rewrites that in memory and never re-reads the model."""

    def __init__(self, model_folder, manifest, folder):
        self.library = HypernetworkLibrary(folder)
        spec = manifest.components["unet"]
        self.path = Path(model_folder) / spec.path
        self.weights = spec.weights
        self.model_name = manifest.name
        self._graph = None  # (ModelProto without external data, [Target])

    def _base(self):
        if self._graph is None:
            import onnx

            model = onnx.load(str(self.path), load_external_data=False)
            self._graph = model, find_targets(model.graph, self.weights)
        return self._graph

    def attention_widths(self):
        """{width: set of "self-attention" / "cross-attention"} of the UNet's attention contexts."""
        out = {}
        for t in self._base()[1]:
            out.setdefault(t.width, set()).add("cross-attention" if t.cross else "self-attention")
        return out

    def select(self, requests):
        """HypernetRequests -> [(Hypernetwork, multiplier)] of those that change this UNet. As A1111: an unknown
        name is left out with a warning; a module whose width is no attention context's does nothing, and a
        file with no such module is left out (warned either way)."""
        active, widths = [], None
        for request in requests:
            hypernetwork = self.library.get(request.name)
            if hypernetwork is None:
                available = self.library.names()
                log.warning("hypernetwork %r not found in %s (%s); generating without it", request.name,
                            self.library.folder, f"available: {', '.join(available[:20])}" if available else "no .pt files")
                continue
            widths = widths if widths is not None else self.attention_widths()
            unused = [w for w in hypernetwork.widths if w not in widths]
            if unused:
                log.warning("%s", _width_message(hypernetwork, unused, widths, self.model_name))
            if len(unused) < len(hypernetwork.widths):
                active.append((hypernetwork, float(request.multiplier)))
        return active

    def graph(self, chain, tiling=None, residuals=False):
        """(model bytes, session config) of the UNet with `chain` inserted (and wrap padding for `tiling`, and
        ControlNet residual inputs when `residuals`: node names, which the targets follow, stay)."""
        from ..runtime.tiling import WEIGHTS_FOLDER_KEY, wrap_padding

        _check_bytes_loading()
        model, targets = self._base()
        if residuals:
            from ..controlnet.residuals import add_residual_inputs

            model = add_residual_inputs(model)
        if tiling:
            model = wrap_padding(model, tiling)
        rewritten = insert_hypernetworks(model, targets, chain)
        return rewritten.SerializeToString(), {WEIGHTS_FOLDER_KEY: str(self.path.parent.resolve())}


def _width_message(hypernetwork, unused, widths, model_name):
    def listed(kind):
        return ", ".join(str(w) for w in sorted(widths) if kind in widths[w]) or "none"

    model = f"{model_name} (self-attention widths {listed('self-attention')}, text context {listed('cross-attention')})"
    modules = ", ".join(str(w) for w in unused)
    if len(unused) == len(hypernetwork.widths):
        return (f"hypernetwork {hypernetwork.name}: none of its modules ({modules}) has the width of an attention "
                f"context of {model}: it was made for another model; generating without it")
    used = ", ".join(str(w) for w in hypernetwork.widths if w in widths)
    return (f"hypernetwork {hypernetwork.name}: its {modules} module(s) match no attention context of {model} and do "
            f"nothing; its {used} module(s) apply, as in A1111")


def _check_bytes_loading():
    import onnxruntime as ort

    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < (1, 21):
        raise RuntimeError(f"hypernetworks need onnxruntime 1.21 or later (it loads the rewritten UNet from memory "
                           f"with its weights in the model folder); this is {ort.__version__}")


class WithMultipliers:
    """The UNet facade of a graph with hypernetworks: each call feeds the multipliers [len(chain)] (an input
    that repeats over the steps, so a GPU keeps it resident)."""

    def __init__(self, unet, multipliers):
        self.unet, self.multipliers = unet, multipliers

    def __call__(self, sample, timestep, context, **added):
        return self.unet(sample, timestep, context, **added, **{MULTIPLIERS_INPUT: self.multipliers})

    def __getattr__(self, name):  # session, is_base, ... of the facade
        return getattr(self.unet, name)
