"""Derived graphs for speed: ONNX Runtime's transformer fusions, fp16 and int8, written beside the base graph.

The base graph (`<component>/model.onnx`, fp32, initializers named as the checkpoint) stays: the
manifest's `weights` map refers to it, run-time LoRA merges into it, and an fp16 VAE decoder falls
back to it when its output overflows. Fusions pack Q/K/V weights into one initializer, so a derived
graph cannot carry that map; it is run whenever no LoRA is active (`Component.optimized_path`).
"""
import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from sdonnx.manifest import relative_path

from .export import DATA_FILE, MODEL_FILE

log = logging.getLogger(__name__)

TARGETS = ("cpu", "gpu", "dml")
QUANTIZE = ("int8",)
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_decoder": "vae",
               "vae_encoder": "vae"}
# fused ops only the CUDA/ROCm/DirectML kernels implement (the CPU EP has MultiHeadAttention, Attention,
# LayerNormalization, SkipLayerNormalization, QuickGelu/BiasGelu, but no GroupNorm/BiasSplitGelu/NhwcConv)
GPU_ONLY_FUSIONS = ("enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add",
                    "enable_nhwc_conv")
# packed QKV/KV layouts are what the fp16 GPU kernels are fast at; the CPU kernel wants them separate
PACKED_FUSIONS = ("enable_packed_qkv", "enable_packed_kv")
# DirectML: the fusions onnxruntime's own DirectML Stable Diffusion engine and Olive choose. On: attention
# as MultiHeadAttention (packed Q/K/V), LayerNorm, Gelu/BiasGelu, GroupNorm in NCHW; off: fused ops its
# kernels lack (NhwcConv, BiasSplitGelu, BiasAdd, SkipGroupNorm) and SkipLayerNorm, which it runs slower
# than LayerNorm plus an Add
DML_FUSIONS = {"enable_gelu": True, "enable_layer_norm": True, "enable_attention": True,
               "use_multi_head_attention": True, "enable_bias_gelu": True, "enable_group_norm": True,
               "group_norm_channels_last": False, "enable_packed_qkv": True, "enable_packed_kv": True,
               "enable_skip_layer_norm": False, "enable_bias_skip_layer_norm": False, "enable_nhwc_conv": False,
               "enable_bias_splitgelu": False, "enable_bias_add": False, "enable_skip_group_norm": False,
               "enable_gelu_approximation": False, "enable_gemm_fast_gelu": False, "enable_qordered_matmul": False}
# fused GPU GroupNorm kernels take fp16 in and out and keep their statistics in fp32 (the DirectML recipe
# forces its inputs to fp16 rather than keeping the op in fp32 behind casts)
FP16_FORCED_INPUTS = {"GroupNorm": [0, 1, 2], "SkipGroupNorm": [0, 1, 2, 3, 4]}
# ops kept in fp32 in fp16 graphs: reductions over many squares/exponentials that leave fp16's range
# (|x| > 256 squared is past 65504) — the unfused GroupNorm (InstanceNormalization), LayerNorm, softmax
FP16_OP_BLOCK_LIST = ("InstanceNormalization", "LayerNormalization", "SkipLayerNormalization", "GroupNorm",
                      "SkipGroupNorm", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Range",
                      "Resize", "Upsample")
FP16_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")  # the VAE encoder (img2img only) stays fp32
QUANTIZE_COMPONENTS = ("unet",)
# parity allowances (relative to the output's scale) of derived graphs against torch
TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.25}


class OptimizeError(ValueError):
    """A derived-graph request that cannot be carried out (bad target, dtype or quantization)."""


@dataclass(frozen=True)
class Plan:
    """What to derive from each base graph. optimize: None or a target ("cpu"/"gpu")."""

    optimize: str | None = None
    dtype: str = "fp32"
    quantize: str | None = None

    def __post_init__(self):
        if self.optimize is not None and self.optimize not in TARGETS:
            raise OptimizeError(f"optimize target {self.optimize!r}: choose one of {', '.join(TARGETS)}")
        if self.dtype not in ("fp32", "fp16"):
            raise OptimizeError(f"dtype {self.dtype!r}: choose fp32 or fp16")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise OptimizeError(f"quantize {self.quantize!r}: choose one of {', '.join(QUANTIZE)}")
        if self.quantize and self.dtype == "fp16":
            raise OptimizeError("int8 quantization is for the CPU fp32 UNet; it does not combine with fp16")
        if self.quantize and self.optimize not in (None, "cpu"):
            raise OptimizeError(f"int8 quantization is for the CPU provider (dynamically quantized MatMuls); "
                                f"it does not combine with --target {self.optimize}")

    def applies(self, component):
        return bool(self.optimize or (self.dtype == "fp16" and component in FP16_COMPONENTS)
                    or (self.quantize and component in QUANTIZE_COMPONENTS))

    def dtype_of(self, component):
        return "fp16" if self.dtype == "fp16" and component in FP16_COMPONENTS else "fp32"

    def tolerance(self, component):
        if self.quantize and component in QUANTIZE_COMPONENTS:
            return TOLERANCE["int8"]
        return TOLERANCE[self.dtype_of(component)]

    def describe(self, component):
        """The manifest's record of what was done to this component's graph."""
        return {"target": self.optimize, "dtype": self.dtype_of(component),
                "quantize": self.quantize if component in QUANTIZE_COMPONENTS else None}


def derive(base_path, component, plan, num_heads=0, out_dir=None):
    """Write the derived graph of `component` to <out_dir or component folder>/optimized/model.onnx; returns its path and the
    fused-operator counts. num_heads: the attention heads when every block has the same number (SD 1.x),
    else 0 (diffusers' export reshapes by a computed shape, so the fusion cannot read it off the graph)."""
    base_path = Path(base_path)
    folder = base_path.parent
    # the weights stay in the base graph's data file: the fusions read the few they rewrite from there (the
    # optimizer's shape inference serializes the whole model several times: with the weights in memory a
    # full-size SD 1.5 UNet peaked at 21.9 GB anonymous memory in it, 7.9 GB kept afterwards)
    model = onnx.load(str(base_path), load_external_data=False)
    fused = {}
    if plan.optimize:
        with _working_directory(folder):  # external data locations are relative to the graph's folder
            model, fused = _fuse(model, component, plan.optimize, num_heads)
    if plan.dtype_of(component) == "fp16":
        from onnx.external_data_helper import load_external_data_for_model

        _annotate_types(model)  # before the weights come in: the type walk needs the graph only
        load_external_data_for_model(model, str(folder))  # the conversion rewrites every float weight
        model = _to_fp16(model, plan.optimize)
    target = Path(out_dir or folder) / "optimized" / MODEL_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    if plan.quantize and component in QUANTIZE_COMPONENTS:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source = Path(tmp) / MODEL_FILE
            _save(model, source, folder)
            del model  # the quantizer loads its own copies: a full-size UNet peaks at ~10 GB on its own
            _quantize_int8(source, target)
    else:
        _save(model, target, folder)
    return target, fused


@contextlib.contextmanager
def _working_directory(folder):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _save(model, path, source_dir):
    """Save with one data file beside `path`; initializers still referring to the base graph's data file
    are copied from it (source_dir) tensor by tensor."""
    from .export import save_with_external_data

    save_with_external_data(model, path, source_dir)


def fold_weight_transposes(model):
    """Transpose(initializer) and Unsqueeze(initializer, constant axes) -> the folded initializer. The export
    keeps weights unfolded (named for LoRA); the attention fusion wants MatMul weights it can read, the
    GroupNorm fusion its gamma/beta as [C, 1, 1] constants."""
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    kept = []
    for node in model.graph.node:
        folded = _folded(node, inits, constants)
        if folded is None:
            kept.append(node)
        else:
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(folded), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _folded(node, inits, constants):
    """The value of a Transpose/Unsqueeze of an initializer, or None when the node is not one."""
    if not node.input or node.input[0] not in inits:
        return None
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        return np.transpose(numpy_helper.to_array(inits[node.input[0]]), perm)
    if node.op_type == "Unsqueeze" and len(node.input) == 2 and node.input[1] in constants:
        array = numpy_helper.to_array(inits[node.input[0]])
        axes = sorted(int(a) % (array.ndim + len(constants[node.input[1]].reshape(-1)))
                      for a in constants[node.input[1]].reshape(-1))
        for axis in axes:
            array = np.expand_dims(array, axis)
        return array
    return None


def fusion_options(component, target):
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions(MODEL_TYPES[component])
    if target == "dml":
        chosen = DML_FUSIONS
    else:
        chosen = dict.fromkeys(GPU_ONLY_FUSIONS + PACKED_FUSIONS if target == "cpu" else PACKED_FUSIONS, False)
    for name, value in chosen.items():
        if hasattr(options, name):  # options differ between onnxruntime versions
            setattr(options, name, value)
    return options


def _fuse(model, component, target, num_heads):
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        fold_weight_transposes(model), model_type=MODEL_TYPES[component], num_heads=num_heads, hidden_size=0,
        optimization_options=fusion_options(component, target),
        # 0: the Python fusions only; ONNX Runtime's own level-1..3 passes run at session creation,
        # where they can use the provider the session really has
        opt_level=0, use_gpu=target != "cpu")
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    log.info("%s fused: %s", component, fused or "nothing")
    model = optimized.model
    if target == "cpu":
        split = split_self_attention(model)
        if split:
            fused["MultiHeadAttention"] = fused.get("MultiHeadAttention", 0) + split
            fused["Attention"] = fused.get("Attention", 0) - split
            fused = {k: v for k, v in fused.items() if v}
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the fused ops' domain
    return model, fused


def split_self_attention(model):
    """Attention(x, packed QKV weight, bias) -> three MatMuls + MultiHeadAttention(q, k, v, bias); returns
    how many nodes were rewritten.

    The fusion gives self-attention the `Attention` op, whose CPU kernel materializes the whole
    [heads, tokens, tokens] score matrix (1 GiB per call for SD 1.5 at 512x512: 4096 tokens, batch 2);
    the CPU kernel of MultiHeadAttention with separate Q, K, V and no mask runs MLAS's flash attention,
    tiled to the L2 cache (measured on one 4096-token block: 0.42 s against 0.56 s, and no score matrix).
    Nodes with a mask, past state or causal flag stay as they are (the flash path does not take them)."""
    from onnx import helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, rewritten, dropped = [], 0, set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Attention" or node.domain != "com.microsoft" or len(node.input) > 3
                or len(node.output) > 1 or node.input[1] not in inits or attrs.get("unidirectional")
                or attrs.get("qkv_hidden_sizes")):
            nodes.append(node)
            continue
        x, packed, bias = (list(node.input) + [""])[:3]
        weight = numpy_helper.to_array(inits[packed])
        width = weight.shape[1] // 3
        qkv = []
        for i, part in enumerate("qkv"):
            name = f"{node.name}_{part}_weight"
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight[:, i * width:(i + 1) * width]), name))
            qkv.append(f"{node.name}_{part}")
            nodes.append(helper.make_node("MatMul", [x, name], [qkv[-1]], name=f"{node.name}_{part}_MatMul"))
        if bias and bias in inits and not numpy_helper.to_array(inits[bias]).any():
            dropped.add(bias)  # diffusers' q/k/v projections have no bias: skip the kernel's bias pass
            bias = ""
        extra = {k: v for k, v in attrs.items() if k in ("scale", "mask_filter_value")}
        nodes.append(helper.make_node("MultiHeadAttention", qkv + ([bias] if bias else []), list(node.output),
                                      name=node.name, domain="com.microsoft", num_heads=attrs["num_heads"], **extra))
        dropped.add(packed)
        rewritten += 1
    if rewritten:
        used = {name for node in nodes for name in node.input}
        # deleted in place: extend() of a kept list would copy every tensor proto, weights included
        for index in reversed(range(len(model.graph.initializer))):
            name = model.graph.initializer[index].name
            if name in dropped and name not in used:
                del model.graph.initializer[index]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def _annotate_types(model):
    """Record every value's element type in value_info. The fp16 conversion decides where casts go from
    value_info, and onnx's shape inference leaves the fused contrib ops' outputs untyped: a kept-fp32
    SkipLayerNormalization then fed an fp16 MatMul with no cast between them."""
    from onnx import helper

    from sdonnx.kernels import installed_table, value_types

    known = {v.name for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    known |= {i.name for i in model.graph.initializer}
    for name, kind in value_types(model, installed_table("cpu")).items():
        if name not in known and kind.startswith("tensor("):
            elem = getattr(onnx.TensorProto, kind[len("tensor("):-1].upper())
            model.graph.value_info.append(helper.make_tensor_value_info(name, elem, None))


def _to_fp16(model, target=None):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    forced = FP16_FORCED_INPUTS if target in ("gpu", "dml") else {}
    # keep_io_types: the graph's inputs and outputs stay float32, the runtime's API does not change;
    # the types come from _annotate_types (onnx's shape inference does not know the fused ops)
    return convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                    op_block_list=[op for op in FP16_OP_BLOCK_LIST if op not in forced],
                                    force_fp16_inputs=forced)


def _quantize_int8(source, target):
    """Dynamic int8 quantization of the MatMuls (weights int8 per channel, activations quantized per call).

    Convolutions stay fp32: ONNX Runtime's dynamic ConvInteger on the CPU is slower than its fp32 conv."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul", "Attention"],
                     per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})


def attention_heads(spec):
    """Heads per attention block of the component's torch module when one number fits all, else 0."""
    config = getattr(getattr(spec.wrapper, "model", None), "config", None)
    if spec.name.startswith("text_encoder"):
        return int(getattr(config, "num_attention_heads", 0) or 0)
    if spec.name.startswith("vae"):
        return 1  # diffusers' VAE mid-block attention: one head over all channels
    # diffusers' SD 1.x config calls the head count attention_head_dim; later configs name it properly
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "attention_head_dim", None)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads]
    return int(heads[0]) if heads[0] and len(set(heads)) == 1 else 0


def derive_checked(spec, base_path, plan, staging, tolerance, report, out_dir=None):
    """Derive spec's graph per `plan` and hold it to the convert's parity gate against torch; returns the
    manifest fields for it ({} when the plan leaves the component as is). out_dir: where the derived
    graph's folder goes (default: beside the base graph)."""
    if not plan.applies(spec.name):
        return {}
    base_path = Path(base_path)
    if plan.optimize == "dml":
        _report_dml_coverage(base_path, base_path.parent.parent, report)
    report(f"optimizing {spec.name} ({', '.join(f'{k}={v}' for k, v in plan.describe(spec.name).items() if v)})")
    path, fused = derive(base_path, spec.name, plan, num_heads=attention_heads(spec), out_dir=out_dir)
    from sdonnx.runtime.session import return_freed_memory

    return_freed_memory()  # the fusion's garbage, before the parity check loads the derived graph
    if not fused and plan.describe(spec.name) == {"target": plan.optimize, "dtype": "fp32", "quantize": None}:
        shutil.rmtree(path.parent)  # nothing fused for this provider: the base graph is as fast
        report(f"{spec.name}: nothing to fuse for {plan.optimize}; the base graph runs")
        return {}
    err, checked = _parity_checked(spec, path, max(tolerance, plan.tolerance(spec.name)), report)
    coverage = _report_dml_coverage(path, staging, report) if plan.optimize == "dml" else {}
    return {"optimized_path": relative_path(path, staging),
            "optimized": {**plan.describe(spec.name), "fused": fused, "parity_max_abs_err": err,
                          "parity_checked": checked, **coverage}}


def _report_dml_coverage(path, root, report):
    """`sdonnx doctor --provider dml` on one graph, as the convert goes: every node DirectML has no kernel
    for (it would run on the CPU, with copies across) is reported; the count goes into the manifest."""
    from sdonnx.kernels import check_graph, load_table

    result = check_graph(path, load_table("dml"), relative_path(path, root))
    if not result.fallbacks:
        report(f"{result.graph}: all {result.nodes} nodes have DirectML kernels")
    for f in result.fallbacks:
        report(f"warning: {result.graph}: {f.node} ({f.domain}.{f.op}) has no DirectML kernel ({f.reason}: "
               f"{f.detail}); it would run on the CPU")
    return {"dml_fallback_nodes": len(result.fallbacks)}


def _parity_checked(spec, path, tolerance, report):
    """Parity of the derived graph against torch on the CPU provider -> (max abs error, what was run).

    A graph fused for a GPU holds contrib ops the CPU has no kernel for: its CPU twin (converters/cpu_twin.py)
    runs instead, the same graph with those nodes replaced by their definitions in standard ops."""
    from .cpu_twin import cpu_twin
    from .export import parity_check

    twin, replaced = cpu_twin(onnx.load(str(path), load_external_data=False))
    checked = {"provider": "CPUExecutionProvider", "graph": "as written" if twin is None else "cpu twin",
               "replaced": replaced}
    if twin is None:
        report(f"checking optimized {spec.name} against torch")
        return parity_check(spec, path, tolerance), checked
    nodes = ", ".join(f"{op} x{n}" for op, n in sorted(replaced.items()))
    report(f"checking optimized {spec.name} against torch on the CPU, through its CPU twin: the nodes the CPU "
           f"provider cannot run as written ({nodes}) replaced by their definitions in ops it can run")
    twin_path = path.with_name("cpu_twin.onnx")  # beside the graph: shares its external data file
    onnx.save_model(twin, str(twin_path))
    try:
        return parity_check(spec, twin_path, tolerance), checked
    finally:
        twin_path.unlink(missing_ok=True)
