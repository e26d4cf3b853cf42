"""Export one component to ONNX, keep its weights named, and check it against torch."""
import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

log = logging.getLogger(__name__)

OPSET = 17
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ALIGN = 64 * 1024  # external tensors of this size or more start at multiples of it (memory-mappable)


class ParityError(RuntimeError):
    """An exported graph disagrees with its torch module beyond tolerance."""


def export_component(spec, outdir, opset=OPSET):
    """Export spec.wrapper to outdir/<name>/model.onnx with external weights; returns the ONNX path."""
    target = Path(outdir) / spec.name
    target.mkdir(parents=True, exist_ok=True)
    names = list(spec.contract.inputs) + list(spec.contract.outputs)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            spec.wrapper.eval(), spec.example, str(raw), dynamo=False, opset_version=opset,
            input_names=list(spec.contract.inputs), output_names=list(spec.contract.outputs),
            dynamic_axes=spec.contract.dynamic_axes(),
            # unfolded and named: run-time LoRA replaces initializers by their checkpoint names
            do_constant_folding=False, export_params=True,
        )
        model = onnx.load(str(raw), load_external_data=False)
        _check_io(model, names, spec.name)
        path = target / MODEL_FILE
        save_with_external_data(model, path, Path(tmp))
    return path


def save_with_external_data(model, path, source_dir=None):
    """Save `model` with every initializer in one `model.onnx.data` beside it, tensor by tensor.

    Initializers may hold their bytes in the proto or refer to files in source_dir (torch writes one file
    per tensor for graphs over 2 GB): nothing holds a second copy of all weights, so a 10 GB SDXL UNet is
    re-packed in the memory of its largest tensor. Tensors of 64 KiB and more start at 64 KiB offsets,
    so ONNX Runtime can memory-map them (page size on Linux, allocation granularity on Windows) instead
    of copying them at session creation.
    """
    from onnx.external_data_helper import ExternalDataInfo

    path = Path(path)
    with open(path.parent / DATA_FILE, "wb") as data:
        for tensor in model.graph.initializer:
            if _shape_operand(tensor):
                continue
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = ExternalDataInfo(tensor)
                with open(Path(source_dir) / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    blob = f.read(info.length) if info.length else f.read()
                del tensor.external_data[:]
            elif tensor.HasField("raw_data"):
                blob = tensor.raw_data
            else:  # typed fields (float_data, int64_data, ...)
                blob = numpy_helper.to_array(tensor).tobytes()
            offset = data.tell()
            if len(blob) >= ALIGN:
                offset = -(-offset // ALIGN) * ALIGN
                data.seek(offset)
            data.write(blob)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            for key, value in (("location", DATA_FILE), ("offset", offset), ("length", len(blob))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            tensor.data_location = onnx.TensorProto.EXTERNAL
        data.truncate()
    onnx.save_model(model, str(path))


def _shape_operand(tensor):
    """Small integer tensors stay in the graph: they are shapes and axes (the packed-QKV fusion's Reshape
    target, for one), and onnxruntime's shape inference at load time does not read external data."""
    return (tensor.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
            and tensor.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(tensor.dims)) <= 64)


def _check_io(model, names, component):
    got = [v.name for v in model.graph.input] + [v.name for v in model.graph.output]
    if got != names:
        raise RuntimeError(f"{component}: exported I/O {got} differ from the contract {names}")


def _digest(array):
    return hashlib.sha1(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()


def weight_map(spec, onnx_path):
    """Map the component's torch weight names (diffusers naming) to ONNX initializer names.

    Names survive export when constant folding is off; a weight the exporter merged with an identical
    tensor is found by content. Weights the graph does not use (e.g. the VAE encoder inside the
    decoder's wrapper) are left out.
    """
    model = onnx.load(str(onnx_path), load_external_data=False)
    init_names = {i.name for i in model.graph.initializer}
    state = {k[len(spec.weight_prefix):] if k.startswith(spec.weight_prefix) else k: v
             for k, v in spec.wrapper.state_dict().items()}
    mapping = {name: spec.weight_prefix + name for name in state if spec.weight_prefix + name in init_names}
    missing = [n for n in state if n not in mapping]
    if missing:  # one initializer in memory at a time
        from sdonnx.adapters.onnx_weights import OnnxWeights

        weights = OnnxWeights(onnx_path)
        by_digest = {_digest(weights.read(init)): init for init in weights.names()}
        for name in missing:
            found = by_digest.get(_digest(state[name].detach().cpu().numpy()))
            if found:
                mapping[name] = found
    return mapping


def parity_check(spec, onnx_path, tolerance):
    """Run torch and ONNX Runtime (CPU) on the check inputs; returns the max abs error.

    The error is measured relative to the output's own scale: |ort - torch| <= tolerance * max(1, |torch|max).
    """
    import onnxruntime as ort

    cases = []
    for inputs in [spec.example, *spec.check]:  # torch first: its activations are gone before ORT loads
        with torch.no_grad():
            expected = spec.wrapper(*inputs)
        cases.append((inputs, [e.numpy() for e in (expected if isinstance(expected, (tuple, list)) else (expected,))]))
    # the graph as exported, with ONNX Runtime's own rewrites off: the check is about the export, and
    # unrewritten weights stay memory-mapped from the aligned data file instead of being copied beside
    # the torch module (a 10 GB SDXL UNet would otherwise be held twice)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs, expected in cases:
        feeds = {name: t.numpy() for name, t in zip(spec.contract.inputs, inputs)}
        actual = session.run(list(spec.contract.outputs), feeds)
        for name, a, e in zip(spec.contract.outputs, actual, expected):
            err = float(np.abs(a.astype(np.float64) - e).max())
            scale = max(1.0, float(np.abs(e).max()))
            log.info("%s.%s %s: max abs err %.3g (scale %.3g)", spec.name, name, a.shape, err, scale)
            if not err <= tolerance * scale:
                raise ParityError(
                    f"{spec.name}: output {name!r} differs from torch by {err:.3g} "
                    f"(allowed {tolerance * scale:.3g}) for inputs of shapes {[tuple(t.shape) for t in inputs]}")
            worst = max(worst, err)
    return worst
