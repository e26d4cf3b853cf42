"""Execution providers: names users type, auto-selection, per-EP options, flavour conflicts."""
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# user-facing name -> ONNX Runtime provider name
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
ALIASES = {"directml": "dml", "gpu": "cuda", "ov": "openvino"}
# what `auto` prefers, best first (TensorRT is left to explicit configuration: it compiles per shape)
AUTO_ORDER = ("cuda", "migraphx", "rocm", "dml", "openvino", "cpu")
# the packages that all install the `onnxruntime` module; two at once break each other
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-rocm", "onnxruntime-migraphx", "onnxruntime-training", "ort-nightly",
                     "ort-nightly-gpu", "ort-nightly-directml", "onnxruntime-qnn")


class ProviderError(ValueError):
    """A requested execution provider is unknown or not available on this machine."""


@dataclass
class ProviderPlan:
    """What sessions are created with: ORT provider list (+ options) and session-option tweaks."""

    names: list  # user-facing names, best first
    providers: list  # [(ORT provider name, options dict)]
    session_config: dict = field(default_factory=dict)
    disable_mem_pattern: bool = False
    sequential: bool = False
    # DirectML: one session per input shape, free dimensions fixed (faster kernels, planned memory), the
    # static_cache most recently used kept (a hires fix uses two sizes; each session holds its own weights)
    static_shapes: bool = False
    static_cache: int = 2
    # (OrtValue device type, id) where steady inputs stay on the GPU between calls through an IO binding
    bind_device: tuple | None = None


def installed_flavours():
    """Names of the installed distributions that provide the onnxruntime module."""
    from importlib import metadata

    found = []
    for dist in ORT_DISTRIBUTIONS:
        try:
            metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        found.append(dist)
    return found


def flavour_conflict():
    """A message when more than one onnxruntime flavour is installed, else None."""
    found = installed_flavours()
    if len(found) <= 1:
        return None
    return (f"several onnxruntime packages are installed ({', '.join(found)}); they all provide the same "
            f"`onnxruntime` module and overwrite each other's files. Keep exactly one: "
            f"`pip uninstall {' '.join(found)}` then `pip install` the one for your GPU "
            f"(onnxruntime for CPU, onnxruntime-gpu for CUDA, onnxruntime-directml for DirectML, "
            f"onnxruntime-openvino for OpenVINO).")


def available():
    """User-facing names of the providers this onnxruntime build offers, in AUTO_ORDER."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ProviderError("onnxruntime is not installed; install exactly one flavour, e.g. "
                            "`pip install sdonnx[cpu]` (or [cuda], [directml], [openvino])") from e
    offered = set(ort.get_available_providers())
    return [name for name in AUTO_ORDER if PROVIDERS[name] in offered]


def canonical(name):
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in PROVIDERS and key != "auto":
        raise ProviderError(f"unknown provider {name!r}; choose auto or one of {', '.join(PROVIDERS)}")
    return key


def plan(provider="auto", device_id=0):
    """Resolve `provider` ("auto", a name, or a list of names) into a ProviderPlan."""
    requested = [provider] if isinstance(provider, str) else list(provider)
    names = [canonical(p) for p in requested]
    offered = available()
    if names == ["auto"]:
        names = [offered[0]]
    missing = [n for n in names if n not in offered]
    if missing:
        conflict = flavour_conflict()
        raise ProviderError(f"provider {', '.join(missing)} is not available here; available: {', '.join(offered)}"
                            + (f". {conflict}" if conflict else ""))
    if "cpu" not in names:
        names.append("cpu")  # ops a GPU provider lacks fall back to the CPU
    result = ProviderPlan(names=names, providers=[(PROVIDERS[n], _options(n, device_id)) for n in names])
    if names[0] in ("cuda", "dml"):
        # the device types OrtValue documents ("cpu", "cuda", "cann", "dml"); ROCm/MIGraphX/OpenVINO run unbound
        result.bind_device = (names[0], int(device_id))
    if "dml" in names:
        # DirectML requires these (ONNX Runtime's DirectML EP documentation)
        result.disable_mem_pattern = True
        result.sequential = True
        result.static_shapes = True
    return result


def _options(name, device_id):
    if name in ("cuda", "rocm", "migraphx", "dml"):
        return {"device_id": int(device_id)}
    if name == "openvino":
        return {"device_type": "AUTO:GPU,CPU"}  # an Intel GPU when present, else the CPU
    return {}
