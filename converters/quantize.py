"""A statically quantized int8 UNet (QDQ), calibrated on the model's own sampling trajectory: `sdonnx quantize`.

Static quantization needs the range of every activation it quantizes. They are measured where the UNet will
run: the model generates a few prompts with the fp32 graphs and every UNet call's inputs are kept (latents
at every noise level of a real trajectory, real text conditioning, CFG batch). onnxruntime.quantization
then takes each convolution's and each weight MatMul's input range (MinMax) over those calls and writes a QDQ
graph: int8 weights per output channel, uint8 activations (the u8s8 form x86 int8 kernels take, VNNI and
AMX-INT8). Attention's activation-by-activation MatMuls, normalizations and softmax stay fp32.

The graph is written beside the base one (`unet/int8/model.onnx`) and recorded as the UNet's int8 variant
in the manifest with its cost: the relative error of its output against the fp32 graph at three noise levels
of a prompt not used for calibration. `Pipeline.load(precision="int8")` runs it on the CPU provider or
OpenVINO. No torch: the runtime package and onnxruntime's quantization tools only.
"""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse at dusk",
           "portrait of an old man with a grey beard, studio lighting", "a bowl of red apples on a wooden table")
HELD_OUT = "a city street in the rain at night, neon signs"  # the cost check's prompt: not calibrated on
COST_TIMESTEPS = (999, 500, 50)
VARIANT_DIR = "int8"


class QuantizeError(ValueError):
    """A quantization that cannot be made (bad arguments, a model folder without a UNet)."""


def record_unet_calls(model_dir, prompts, size, steps, seed=0, cfg_scale=7.0):
    """Generate each prompt with the fp32 graphs (Euler) and return every UNet call's feeds."""
    from sdonnx import Pipeline

    pipe = Pipeline.load(model_dir, provider="cpu", precision="fp32")
    unet = pipe._component("unet")  # created now and kept (lowmem off): the recorder sees every call
    calls, run = [], unet.session.run

    def recording(feeds, outputs=None, steady=()):
        calls.append({k: np.array(v, dtype=np.float32) for k, v in feeds.items()})
        return run(feeds, outputs, steady)

    unet.session.run = recording
    for i, prompt in enumerate(prompts):
        pipe.generate(prompt, steps=steps, sampler="Euler", cfg_scale=cfg_scale, seed=seed + i, width=size, height=size)
    return calls


class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over recorded feeds."""

    def __init__(self, calls):
        self._calls = iter(calls)

    def get_next(self):
        return next(self._calls, None)

    def rewind(self):  # not needed by MinMax; present for the interface
        pass


def kept_fp32(model):
    """Names of the nodes that stay fp32 among those quantize_graph would quantize: MatMuls whose second
    input is not an initializer (attention's Q.K and .V: their ranges vary per call and per head), and the
    convolutions that read the graph's input or write its output (conv_in sees the latents' whole range over
    the trajectory, conv_out makes the prediction itself; keeping both in fp32 took the tiny model's error at
    t=999 from 43% to 29%, at little cost: 4 channels on one side)."""
    inits = {i.name for i in model.graph.initializer}
    ends = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node
            if (n.op_type == "MatMul" and n.input[1] not in inits)
            or (n.op_type == "Conv" and (n.input[0] in ends or n.output[0] in ends))]


def quantize_graph(source, target, calls):
    """Write the QDQ int8 graph of `source` to `target` (weights in one data file beside it)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(source), load_external_data=False)
    skip = kept_fp32(graph)
    del graph
    quantize_static(str(source), str(target), _Feeds(calls), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["Conv", "MatMul"], nodes_to_exclude=skip, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    extra_options={"MatMulConstBOnly": True})


def relative_errors(fp32_path, int8_path, calls):
    """{timestep: relative L2 error of the int8 UNet's output against the fp32 one} on these feeds."""
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, int8_path)]
    errors = {}
    for feeds in calls:
        want, got = (s.run(None, feeds)[0] for s in sessions)
        errors[int(round(float(feeds["timestep"][0])))] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    return errors


def nearest_calls(calls, timesteps=COST_TIMESTEPS):
    """The recorded call nearest to each wanted timestep."""
    return [min(calls, key=lambda c: abs(float(c["timestep"][0]) - t)) for t in timesteps]


def quantize_unet(model_dir, prompts=PROMPTS, size=None, steps=12, seed=0, progress=None):
    """Make and record the model's static int8 UNet; returns the manifest's variant entry."""
    from sdonnx.manifest import MANIFEST_NAME, load_manifest

    report = progress or log.info
    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    if not prompts or steps < 2:
        raise QuantizeError("give at least one calibration prompt and 2 or more steps")
    size = size or manifest.native_size
    if size % 8:
        raise QuantizeError(f"calibration size {size} is not a multiple of 8")
    base = model_dir / manifest.components["unet"].path
    report(f"recording the UNet's inputs: {len(prompts)} prompt(s), {steps} steps, {size}x{size}")
    calls = record_unet_calls(model_dir, prompts, size, steps, seed)
    held_out = nearest_calls(record_unet_calls(model_dir, [HELD_OUT], size, max(steps, 10), seed + 100))
    final = model_dir / "unet" / VARIANT_DIR
    staging = model_dir / "unet" / f".{VARIANT_DIR}-{os.getpid()}"  # renamed into place once complete
    staging.mkdir()
    try:
        report(f"calibrating and quantizing on {len(calls)} UNet calls")
        quantize_graph(base, staging / "model.onnx", calls)
        errors = relative_errors(base, staging / "model.onnx", held_out)
        report("int8 UNet relative error: " + ", ".join(f"t={t}: {e:.2%}" for t, e in errors.items()))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    variant = {"path": f"unet/{VARIANT_DIR}/model.onnx",
               "method": "static QDQ: onnxruntime.quantization MinMax, int8 weights per channel, uint8 activations; "
                         "Conv and weight MatMuls",
               "calibration": {"prompts": len(prompts), "steps": steps, "size": size, "unet_calls": len(calls)},
               "relative_error": {str(t): round(e, 5) for t, e in errors.items()}}
    _write_variant(model_dir / MANIFEST_NAME, "unet", "int8", variant)
    return variant


def _write_variant(path, component, precision, variant):
    """Record the variant in the manifest: written to a temporary name, then renamed over it."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    data["components"][component].setdefault("variants", {})[precision] = variant
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)
