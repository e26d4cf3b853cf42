"""Seamless tiling without re-export: convolutions pad by wrapping around instead of with zeros.

A1111's tiling sets every Conv2d to padding_mode="circular". The exported graphs carry zero padding in
each Conv's `pads`, so here the graph is rewritten at load time: before a padded Conv, Slice + Concat put
the last p rows/columns in front and the first p behind (opset 17 has no Pad mode "wrap"; that came in
opset 19 and the graphs stay at 17), and the Conv's own pads drop to 0 on the wrapped axes. Padding that
is not a Conv's own (the VAE encoder's explicit zero Pad before its stride-2 convs) stays zero, as in
A1111, where only Conv2d.padding_mode changes.

Where the rewritten graph lives (ONNX Runtime resolves external weights relative to the model file and
refuses absolute paths, paths leaving the model's folder and symlinks that resolve outside it):
- normally a sibling `model.tiled-<axes>.onnx` beside `model.onnx`, holding the same initializer entries,
  so it finds the same `model.onnx.data`; written once (atomically), rewritten when `model.onnx` is newer;
- when that folder is not writable, the rewritten graph is handed to ONNX Runtime as bytes together with
  the session option that names the folder of the external weights (onnxruntime 1.21 or later).
"""
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

AXES = ("x", "y", "xy")
# spatial axis of a 2D Conv's input [N, C, H, W] for each user-facing axis: x runs along the width
_AXIS = {"y": 2, "x": 3}
_INT64_MAX = 2**63 - 1
WEIGHTS_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def tiling_axes(value):
    """True / "xy" -> "xy", "x", "y"; None / False -> None (no tiling)."""
    if value is None or value is False:
        return None
    if value is True:
        return "xy"
    key = str(value).strip().lower()
    key = {"yx": "xy", "both": "xy"}.get(key, key)
    if key not in AXES:
        raise ValueError(f"tiling {value!r}: choose one of {', '.join(AXES)}, True or None")
    return key


def _int64(graph, constants, values):
    """Name of an int64 initializer holding `values`, created once per graph."""
    from onnx import TensorProto, helper

    values = tuple(int(v) for v in values)
    if values not in constants:
        name = f"sdonnx_wrap_const_{len(constants)}"
        graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        constants[values] = name
    return constants[values]


def _wrap_nodes(graph, constants, source, axis, before, after, prefix):
    """Nodes that pad `source` along `axis` by wrapping: [last `before` | source | first `after`]."""
    from onnx import helper

    parts, nodes = [], []
    axes = _int64(graph, constants, [axis])
    if before:
        tail = f"{prefix}/tail"
        nodes.append(helper.make_node("Slice", [source, _int64(graph, constants, [-before]),
                                                _int64(graph, constants, [_INT64_MAX]), axes], [tail], name=tail))
        parts.append(tail)
    parts.append(source)
    if after:
        head = f"{prefix}/head"
        nodes.append(helper.make_node("Slice", [source, _int64(graph, constants, [0]),
                                                _int64(graph, constants, [after]), axes], [head], name=head))
        parts.append(head)
    out = f"{prefix}/wrapped"
    nodes.append(helper.make_node("Concat", parts, [out], name=out, axis=axis))
    return nodes, out


def _conv_pads(node):
    """The Conv's pads attribute (or None when it has none); refuses auto_pad SAME_*, whose pads depend on
    the input size."""
    from onnx import helper

    attrs = {a.name: a for a in node.attribute}
    auto_pad = helper.get_attribute_value(attrs["auto_pad"]).decode() if "auto_pad" in attrs else "NOTSET"
    if auto_pad not in ("NOTSET", "VALID"):
        raise ValueError(f"Conv {node.name!r} uses auto_pad={auto_pad}; wrap padding needs explicit pads")
    return attrs.get("pads")


def wrap_padding(model, axes="xy"):
    """A copy of `model` whose padded 2D Convs pad by wrapping around on `axes` ("x", "y" or "xy").

    Pads may be asymmetric ([top, left, bottom, right]); the other axis keeps its zero padding. Works on
    a proto loaded without external data: initializers keep their references to the weights file.
    """
    import onnx

    axes = tiling_axes(axes)
    if axes is None:
        raise ValueError("wrap_padding needs axes: x, y or xy")
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    constants, nodes, wrapped = {}, [], 0
    for node in graph.node:
        pads = _conv_pads(node) if node.op_type == "Conv" else None
        if pads is None or len(pads.ints) != 4 or not any(pads.ints):
            nodes.append(node)
            continue
        new_pads = list(pads.ints)
        source = node.input[0]
        for axis_name in sorted(axes, reverse=True):  # y (height) first, then x: the corners wrap too
            axis = _AXIS[axis_name]
            before, after = new_pads[axis - 2], new_pads[axis]
            if before or after:
                added, source = _wrap_nodes(graph, constants, source, axis, before, after,
                                            f"sdonnx_wrap_{wrapped}_{axis_name}")
                nodes.extend(added)
                new_pads[axis - 2] = new_pads[axis] = 0
        node.input[0] = source
        pads.ints[:] = new_pads
        nodes.append(node)
        wrapped += 1
    del graph.node[:]
    graph.node.extend(nodes)
    log.debug("wrap padding on %s: %d convs rewritten", axes, wrapped)
    return result


def tiled_path(path, axes):
    """Where the rewritten graph of `path` is cached: `model.tiled-<axes>.onnx` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tiled-{axes}{path.suffix}")


def _write_atomic(model, target):
    """Write the proto to `target` through a temporary file in the same folder (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tiled_model(path, tiling):
    """(source, session config) for an InferenceSession over `path` with wrap padding on `tiling`'s axes.

    source is the cached sibling file's path, or the rewritten graph as bytes when the model folder is not
    writable; session config then names the folder of the external weights.
    """
    axes = tiling_axes(tiling)
    path = Path(path)
    target = tiled_path(path, axes)
    if target.exists() and target.stat().st_mtime_ns >= path.stat().st_mtime_ns:
        return str(target), {}
    try:
        import onnx
    except ImportError as e:
        raise RuntimeError("tiling rewrites the ONNX graph and needs the onnx package: pip install onnx") from e
    model = wrap_padding(onnx.load(str(path), load_external_data=False), axes)
    try:
        _write_atomic(model, target)
        return str(target), {}
    except OSError as e:
        log.info("cannot cache %s (%s); loading the tiled graph from memory", target, e)
    _check_bytes_loading(path)
    return model.SerializeToString(), {WEIGHTS_FOLDER_KEY: str(path.parent.resolve())}


def _check_bytes_loading(path):
    import onnxruntime as ort

    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < (1, 21):
        raise RuntimeError(f"tiling: the folder of {path} is not writable, and onnxruntime {ort.__version__} "
                           f"cannot load a graph from memory with its weights in that folder (1.21 or later "
                           f"can); make the folder writable or upgrade onnxruntime")
