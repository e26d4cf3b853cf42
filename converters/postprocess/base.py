"""The architecture-independent half of converting a post-processing model: safe loading, recognition,
export, the parity check against torch, the manifest, and the folder written only when all passed."""
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdonnx.infotext import sha256_file
from sdonnx.manifest import MANIFEST_NAME
from sdonnx.postprocess.manifest import PostprocessManifest, Tiling

from ..checkpoint import CheckpointError, _load_pickle, _load_safetensors
from ..convert import ConvertError, _remove_leftovers, _replace_folder

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
OPSET = 17
SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
# nested dicts the training frameworks save the weights under (basicsr: params_ema / params)
WRAPPERS = ("params_ema", "params", "state_dict", "model", "net_g")


class PostprocessConvertError(ConvertError):
    """A post-processing model file that cannot be converted; the message says why."""


class NotRecognised(PostprocessConvertError):
    """No post-processing architecture claims the file's weights."""


@dataclass
class Recognised:
    """What an architecture module found in a state dict: the loaded torch module and the manifest facts."""

    kind: str
    architecture: str
    module: torch.nn.Module
    inputs: dict  # {name: [dimension name or None per axis]}
    outputs: dict
    checks: list  # input tuples the export is checked on; the first is also the export's example
    scale: int = 1
    channel_order: str = "BGR"
    value_range: tuple = (0.0, 1.0)
    input_size: list | None = None
    tiling: Tiling = field(default_factory=Tiling)
    facts: dict = field(default_factory=dict)
    tolerance: float = 1e-4  # allowed |onnx - torch| relative to max(1, |torch| max)


def load_weights(path):
    """{key: tensor} of a .pth/.safetensors file, loaded without running pickle code (weights only), the
    training frameworks' wrappers (params_ema, params, state_dict) unwrapped."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise PostprocessConvertError(f"{path.name}: expected one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise PostprocessConvertError(f"{path}: no such file")
    try:
        loaded = _load_safetensors(path) if path.suffix.lower() == ".safetensors" else _load_pickle(path)
    except CheckpointError as e:
        raise PostprocessConvertError(str(e)) from None
    for _ in range(2):  # {"params_ema": {...}} and {"state_dict": {"model": ...}} alike
        if isinstance(loaded, dict):
            inner = next((loaded[k] for k in WRAPPERS if isinstance(loaded.get(k), dict)), None)
            loaded = inner if inner is not None and not any(torch.is_tensor(v) for v in loaded.values()) else loaded
    if not isinstance(loaded, dict):
        raise PostprocessConvertError(f"{path.name}: expected a dict of tensors, found {type(loaded).__name__}")
    state = {k: v for k, v in loaded.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not state:
        raise PostprocessConvertError(f"{path.name}: contains no tensors")
    return state


def recognise(state, name):
    """The first architecture that claims `state` -> Recognised; a PostprocessConvertError otherwise."""
    from . import RECOGNISERS

    for claim in RECOGNISERS:
        found = claim(state, name)
        if found is not None:
            return found
    from . import KNOWN

    sample = ", ".join(sorted(state)[:4])
    raise NotRecognised(f"{name}: not a post-processing model this converter knows ({', '.join(KNOWN)}); "
                                  f"its first keys: {sample}")


def looks_like_postprocess(source):
    """Whether `source` is a single file that a post-processing architecture claims (the convert
    command's dispatch). Diffusion checkpoints answer False after a look at their keys; an unreadable file
    answers False too, and the diffusion converter reports why in its own words."""
    path = Path(source)
    if not path.is_file() or path.suffix.lower() not in SUFFIXES:
        return False
    try:
        if any(key.startswith(_DIFFUSION_PREFIXES) for key in _keys(path)):
            return False
        state = load_weights(path)
    except PostprocessConvertError:
        return False
    try:
        recognise(state, path.stem)
    except NotRecognised:
        return False
    except PostprocessConvertError:
        return True  # claimed but broken: convert_postprocess says what is wrong with it
    return True


# Stable Diffusion checkpoints and ControlNets: left to their own converters after a look at the keys
_DIFFUSION_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                       "control_model.", "input_hint_block.", "controlnet_cond_embedding.")


def _keys(path):
    """The tensor names of a file; a .safetensors header is read alone (a 7 GB checkpoint stays on disk)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # noqa: BLE001 - any unreadable header is "not ours" here
            raise PostprocessConvertError(f"{path.name}: not a readable safetensors file ({e})") from None
    return list(load_weights(path))  # zip pickles are memory-mapped: their data is not read yet


def convert_postprocess(source, outdir, *, force=False, progress=None, tolerance=None):
    """Convert a post-processing model file into `outdir` (graph + manifest) -> PostprocessManifest.
    The folder appears only when the export matched its torch module."""
    report = progress or (lambda message: log.info(message))
    source, outdir = Path(source), Path(outdir).absolute()
    _check_target(outdir, force)
    report(f"loading {source}")
    found = recognise(load_weights(source), source.stem)
    report(f"recognised {found.architecture} ({found.kind}, scale {found.scale})")
    outdir.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(outdir, report)
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.partial-{os.getpid()}-", dir=outdir.parent))
    try:
        manifest = _build(found, source, staging, tolerance or found.tolerance, report)
        _check_target(outdir, force)
        _replace_folder(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report(f"wrote {outdir}")
    return manifest


def _check_target(outdir, force):
    """The output folder may be written: missing, empty, or (force) a converted post-processing model."""
    if outdir.exists() and not outdir.is_dir():
        raise PostprocessConvertError(f"output {str(outdir)!r} exists and is not a folder")
    if not outdir.is_dir() or not any(outdir.iterdir()):
        return
    from sdonnx.postprocess.manifest import FORMAT, read_manifest_json

    try:
        raw = read_manifest_json(outdir)
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PostprocessConvertError(f"output folder {str(outdir)!r} is not empty and is not a converted model; "
                                      f"choose another folder")
    ours = {MANIFEST_NAME, raw.get("graph"), f"{raw.get('graph')}.data"}
    foreign = sorted(p.name for p in outdir.iterdir() if p.name not in ours)
    if foreign:
        raise PostprocessConvertError(f"output folder {str(outdir)!r} holds other files ({', '.join(foreign[:5])}); "
                                      f"choose another folder")
    if not force:
        raise PostprocessConvertError(f"output folder {str(outdir)!r} holds a converted model; pass --force to replace it")


def _build(found, source, staging, tolerance, report):
    report(f"exporting {found.architecture}")
    path = staging / GRAPH
    export(found, path)
    report("checking the graph against torch")
    err = parity_check(found, path, tolerance)
    manifest = PostprocessManifest(
        kind=found.kind, name=source.stem, architecture=found.architecture, graph=GRAPH,
        inputs={k: list(v) for k, v in found.inputs.items()}, outputs={k: list(v) for k, v in found.outputs.items()},
        scale=found.scale, channel_order=found.channel_order, value_range=[float(v) for v in found.value_range],
        input_size=found.input_size, tiling=found.tiling, parity_max_abs_err=err, parity_tolerance=tolerance,
        source={"file": source.name, "sha256": sha256_file(source), "bytes": source.stat().st_size},
        facts=dict(found.facts), converter={"torch": torch.__version__, "opset": OPSET})
    manifest.validate()
    (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")  # last: it makes the folder a model
    return manifest


def export(found, path):
    """torch.onnx.export of found.module on its first check input, with the declared dynamic axes."""
    dynamic = {name: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
               for name, dims in {**found.inputs, **found.outputs}.items()}
    with torch.no_grad():
        torch.onnx.export(found.module.eval(), tuple(found.checks[0]), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(found.inputs), output_names=list(found.outputs),
                          dynamic_axes={k: v for k, v in dynamic.items() if v})


def parity_check(found, path, tolerance):
    """Max |onnx - torch| over the check inputs; ParityError-like PostprocessConvertError past tolerance
    (relative to max(1, |torch| max))."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in found.checks:
        with torch.no_grad():
            expected = found.module(*inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        feeds = {name: t.numpy() for name, t in zip(found.inputs, inputs)}
        actual = session.run(list(found.outputs), feeds)
        for name, a, e in zip(found.outputs, actual, expected):
            e = e.numpy()
            if a.shape != e.shape:
                raise PostprocessConvertError(f"{found.architecture}: output {name} has shape {a.shape}, torch {e.shape}")
            err = float(np.abs(a.astype(np.float64) - e).max())
            allowed = tolerance * max(1.0, float(np.abs(e).max()))
            log.info("%s.%s %s: max abs err %.3g", found.architecture, name, a.shape, err)
            if not err <= allowed or not math.isfinite(err):
                raise PostprocessConvertError(f"{found.architecture}: the ONNX graph differs from torch by {err:.3g} "
                                              f"(allowed {allowed:.3g}) on inputs {[tuple(t.shape) for t in inputs]}")
            worst = max(worst, err)
    return worst


def check_loaded(module, state, name, architecture):
    """Load `state` into `module` strictly; a mismatch is the file's fault, named as such."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise PostprocessConvertError(f"{name}: looks like {architecture} but its weights do not fit "
                                      f"({detail[:300]})") from None
    return module.eval()
