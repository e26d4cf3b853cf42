"""The UNet with ControlNet residual inputs: a load-time rewrite of the exported UNet graph, no re-export.

diffusers' UNet adds a ControlNet's residuals to the skip connections the up blocks concatenate, and its middle
block's output; the down path itself is unchanged. In the exported graph each up block's `torch.cat([h, skip])`
is a Concat node named `.../up_blocks.N/Concat[_k]` (the exporter names nodes by module scope, and every graph
sdonnx ever exported comes from the same exporter): the k-th such node, in execution order, takes skip
connection N-1-k, and the first one also takes the middle block's output as `h`. Here each of those inputs
becomes `Add(skip, down_block_res_i)` (`Add(h, mid_block_res)`) with the residuals as new graph inputs, so:
- models converted before ControlNet support get it without re-export, and both graphs share the one weights
  file (the rewritten proto goes to ONNX Runtime as bytes with the folder of its external data);
- the plain UNet graph stays as it is: without a ControlNet nothing changes in speed or memory;
- numpy sums the units' residuals (per-unit weights, guidance windows, control modes) and feeds one set.
The residual inputs take any shape that broadcasts onto their skip connection: zeros of shape [1, 1, 1, 1]
when no unit is active at a step, [B, C, 1, 1] for globally pooled (shuffle) residuals.
"""
import re
from pathlib import Path

from .model import MID_RESIDUAL, ControlNetError, down_residual

_UP_CONCAT = re.compile(r"(?:^|/)up_blocks\.(\d+)/Concat(?:_(\d+))?$")


def skip_concats(graph):
    """The up blocks' skip Concat nodes in execution order -> [node]; the k-th takes skip N-1-k as input 1."""
    found = []
    for position, node in enumerate(graph.node):
        match = _UP_CONCAT.search(node.name)
        if node.op_type == "Concat" and match and len(node.input) == 2:
            found.append((int(match.group(1)), int(match.group(2) or 0), position, node))
    return [node for *_, node in sorted(found, key=lambda f: f[:3])]


def residual_count(graph):
    """How many residuals (skips + middle block) this UNet graph takes."""
    return len(skip_concats(graph)) + 1


def add_residual_inputs(model, float16=False):
    """A copy of the UNet `model` (a ModelProto, loaded without external data) that takes the ControlNet residuals
    down_block_res_0 .. down_block_res_{N-1} and mid_block_res as float32 inputs (float16: the graph computes in
    float16, as a `--dtype fp16` graph does inside its float32 inputs and outputs; the residuals are cast to it).
    ControlNetError when the graph does not have the expected skip connections."""
    import onnx
    from onnx import TensorProto, helper

    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    concats = skip_concats(graph)
    _check_layout(graph, concats)
    skips = len(concats)
    for k, node in enumerate(concats):
        node.input[1] = _add(graph, node, 1, down_residual(skips - 1 - k), float16)
    concats[0].input[0] = _add(graph, concats[0], 0, MID_RESIDUAL, float16)
    for name in [down_residual(i) for i in range(skips)] + [MID_RESIDUAL]:
        # rank 4, every dimension free: a residual broadcasts onto its skip connection
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * 4))
    _sort_topologically(graph)
    return result


def _add(graph, concat, index, residual, float16):
    """An Add node (and a Cast for float16 graphs) placed in the graph (sorted later) that adds `residual` to the
    concat's input `index`."""
    from onnx import TensorProto, helper

    out, source = f"sdonnx_controlnet/{residual}_added", residual
    if float16:
        source = f"sdonnx_controlnet/{residual}_fp16"
        graph.node.append(helper.make_node("Cast", [residual], [source], name=source, to=TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Add", [concat.input[index], source], [out], name=out))
    return out


def _check_layout(graph, concats):
    """The skip concats were found, and their skip inputs are made before the middle block's output, in order."""
    if not concats:
        raise ControlNetError("the UNet graph has no up_blocks.N/Concat nodes: it was not exported by sdonnx's "
                              "converter, so ControlNet residuals cannot be added to it; convert the model again")
    made_at = {out: i for i, node in enumerate(graph.node) for out in node.output}
    made_at.update({i.name: -1 for i in graph.input})
    made_at.update({t.name: -1 for t in graph.initializer})
    skips = [made_at.get(node.input[1]) for node in concats]
    mid = made_at.get(concats[0].input[0])
    if None in skips or mid is None or skips != sorted(skips, reverse=True) or not max(skips) < mid:
        raise ControlNetError("the UNet graph's skip connections are not in the order diffusers makes them; "
                              "ControlNet residuals cannot be added to it (convert the model again)")


def _sort_topologically(graph):
    """Put the appended nodes right before their first consumer (ONNX wants nodes in topological order): an Add
    before its Concat, a Cast before its Add."""
    added = {n.output[0]: n for n in graph.node if n.name.startswith("sdonnx_controlnet/")}
    ordered = []

    def place(name):
        node = added.pop(name, None)
        if node is not None:
            for i in node.input:
                place(i)
            ordered.append(node)

    for node in graph.node:
        if node.name.startswith("sdonnx_controlnet/"):
            continue
        for i in node.input:
            place(i)
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)


def unet_graph(folder, manifest, tiling=None, plan=None, precision=None):
    """(model bytes, session config) of the model's UNet with residual inputs (and wrap padding for `tiling`), for
    runtime.session.Session(graph=...): the weights stay in the graph's own data file. plan: the graph the
    pipeline's precision (runtime.precision.Precision) picks, the derived (optimized, fp16) one or a variant (int8),
    where the plan's first provider runs it; None, or with tiling (LoRAs pass None: they name the base graph's
    weights, tiling its convolutions): the fp32 base graph."""
    import onnx

    from ..runtime.components import derived_runs_on
    from ..runtime.precision import Precision
    from ..runtime.tiling import WEIGHTS_FOLDER_KEY, wrap_padding

    spec = manifest.components["unet"]
    which = "base" if plan is None or tiling else (precision or Precision()).graph(spec, "unet")
    if which == "derived" and not derived_runs_on(spec, plan):
        which = "base"
    path = (Path(folder) / {"base": spec.path, "derived": spec.optimized_path}.get(which, which)).resolve()
    model = add_residual_inputs(onnx.load(str(path), load_external_data=False),
                                float16=which == "derived" and spec.optimized_dtype == "fp16")
    if tiling:
        model = wrap_padding(model, tiling)
    _check_bytes_loading(ControlNetError)
    return model.SerializeToString(), {WEIGHTS_FOLDER_KEY: str(path.parent)}


def _check_bytes_loading(error):
    import onnxruntime as ort

    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < (1, 21):
        raise error(f"ControlNet needs onnxruntime 1.21 or later (the UNet with residual inputs is loaded from "
                    f"memory beside its weights file); this is {ort.__version__}")
