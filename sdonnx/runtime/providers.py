"""Execution providers: names users type, auto-selection, per-EP options, flavour conflicts, and the proof
that a provider really starts (onnxruntime otherwise falls back to the CPU with a log line and no error)."""
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

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
# OpenVINO device strings --device takes (GPU.<n> picks one of several GPUs; AUTO/HETERO/MULTI:<list> combine)
OPENVINO_DEVICE = re.compile(r"^(CPU|NPU|GPU(\.\d+)?|AUTO|(AUTO|HETERO|MULTI):[A-Z0-9.,]+)$")
OPENVINO_DEVICE_CHOICES = "CPU, GPU, GPU.0, GPU.1, NPU or AUTO"
# what to do when a provider asked for does not start
ADVICE = {
    "cuda": "install the CUDA and cuDNN versions this onnxruntime-gpu build was made for, check --device-id, "
            "or choose another --provider",
    "dml": "update the GPU driver, check --device-id (the adapter index), or choose another --provider",
    "openvino": "choose a device that `sdonnx providers` lists with --device (CPU runs on any x86 machine)",
    "migraphx": "install the ROCm/MIGraphX versions this onnxruntime build was made for, or choose another --provider",
    "rocm": "install the ROCm version this onnxruntime build was made for, or choose another --provider",
}


class ProviderError(ValueError):
    """A requested execution provider is unknown, not available on this machine, or did not start."""


class ProviderStartError(ProviderError):
    """Provider `name` (user-facing) was asked for and did not start; `reason` is onnxruntime's."""

    def __init__(self, name, reason):
        super().__init__(failure(name, reason))
        self.name, self.reason = name, reason


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
    # chosen by `auto`: a session whose first provider does not start warns and runs on the next one;
    # a provider named by the user that does not start is an error
    auto: bool = False

    @property
    def one_run_at_a_time(self):
        """DirectML sessions must not run concurrently (the provider's documentation): callers serialize."""
        return self.sequential

    def device(self, ort_name):
        """The device `ort_name` was asked to run on, as users name it ("CPU", "GPU.1", "0")."""
        options = dict(self.providers).get(ort_name, {})
        if "device_type" in options:
            return options["device_type"]
        return str(options["device_id"]) if "device_id" in options else "CPU"


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
    """User-facing names of the providers this onnxruntime build offers, in AUTO_ORDER (offered is not
    started: see `probe`)."""
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


def plan(provider="auto", device_id=0, device=None, openvino=None):
    """Resolve `provider` ("auto", a name, or a list of names) into a ProviderPlan.

    Each provider other than the CPU is started on a one-node graph first: a named one that does not start
    is a ProviderError with onnxruntime's reason; `auto` warns and takes the next. device: the OpenVINO
    device (default: a GPU when OpenVINO finds one, else the CPU). openvino: OpenVINO provider options
    that replace the defaults of `openvino_options` (a None value removes one)."""
    requested = [provider] if isinstance(provider, str) else list(provider)
    names = [canonical(p) for p in requested]
    offered = available()
    auto = names == ["auto"]
    options = lambda n: provider_options(n, device_id, device, openvino)  # noqa: E731
    if auto:
        names = [_first_that_starts(offered, options)]
    else:
        missing = [n for n in names if n not in offered]
        if missing:
            conflict = flavour_conflict()
            raise ProviderError(f"provider {', '.join(missing)} is not available here; available: "
                                f"{', '.join(offered)}" + (f". {conflict}" if conflict else ""))
        for name in names:
            reason = None if name == "cpu" else probe(name, options(name))
            if reason:
                raise ProviderStartError(name, reason)
    if device is not None and names[0] != "openvino":
        raise ProviderError(f"--device {device!r} chooses an OpenVINO device, but the provider is {names[0]}; "
                            f"use --provider openvino (CUDA and DirectML take --device-id)")
    if "cpu" not in names:
        names.append("cpu")  # ops a GPU provider lacks fall back to the CPU
    result = ProviderPlan(names=names, providers=[(PROVIDERS[n], options(n)) for n in names], auto=auto)
    if names[0] in ("cuda", "dml"):
        # the device types OrtValue documents ("cpu", "cuda", "cann", "dml"); ROCm/MIGraphX/OpenVINO run unbound
        result.bind_device = (names[0], int(device_id))
    if "dml" in names:
        # DirectML requires these (ONNX Runtime's DirectML EP documentation)
        result.disable_mem_pattern = True
        result.sequential = True
        result.static_shapes = True
    return result


def with_openvino_options(plan, overrides):
    """The plan with these OpenVINO provider options set over its own (a dict value is sent as JSON, the
    form `load_config` takes)."""
    import dataclasses

    def updated(name, options):
        if name != PROVIDERS["openvino"]:
            return name, options
        return name, {**options, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in overrides.items()}}

    return dataclasses.replace(plan, providers=[updated(n, o) for n, o in plan.providers])


def _first_that_starts(offered, options):
    """auto: the first offered provider whose one-node session starts (the CPU always does)."""
    for name in offered:
        reason = None if name == "cpu" else probe(name, options(name))
        if not reason:
            log.info("auto: using %s", name)
            return name
        log.warning("auto: %s did not start (%s); trying the next provider", name, reason)
    return "cpu"


def user_name(ort_name):
    """"CUDAExecutionProvider" -> "cuda" (unknown names unchanged)."""
    return next((k for k, v in PROVIDERS.items() if v == ort_name), ort_name)


def failure(name, reason):
    """The message for provider `name` asked for by name that did not start."""
    advice = ADVICE.get(name, "choose another --provider")
    if name == "openvino":
        advice += f"; OpenVINO finds: {', '.join(openvino_devices()) or 'no devices'}"
    return f"provider {name} did not start: {clean_reason(reason)}; {advice}"


def clean_reason(message):
    """onnxruntime's message without the source location and C++ signature it starts with."""
    text = str(message).strip()
    if re.match(r"^\S+\.(cc|cpp|h):\d+ ", text) and ") " in text:
        text = text.rsplit(") ", 1)[1]
    return text


def provider_options(name, device_id=0, device=None, openvino=None):
    """The ONNX Runtime options of provider `name` (user-facing)."""
    if name in ("cuda", "rocm", "migraphx", "dml"):
        return {"device_id": int(device_id)}
    if name == "openvino":
        options = openvino_options(openvino_device(device))
        for key, value in (openvino or {}).items():
            if value is None:
                options.pop(key, None)
            else:
                options[key] = value if isinstance(value, str) else json.dumps(value)
        return options
    return {}


# ---------------------------------------------------------------------------------------------- OpenVINO


def openvino_devices():
    """The devices OpenVINO finds here ("CPU", "GPU.0", "NPU", ...); [] where the build does not say."""
    try:
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return []
    lister = getattr(_pybind_state, "get_available_openvino_device_ids", None)
    try:
        return list(lister()) if lister else []
    except RuntimeError:  # a build without the OpenVINO provider
        return []


def openvino_device(device=None):
    """--device checked and upper-cased; None: a GPU when OpenVINO finds one, else the CPU (a device string
    naming a missing GPU makes the provider fail, so "AUTO:GPU,CPU" is no default)."""
    if device is None:
        return "GPU" if any(d.startswith("GPU") for d in openvino_devices()) else "CPU"
    value = str(device).strip().upper()
    if not OPENVINO_DEVICE.match(value):
        found = ", ".join(openvino_devices()) or "none listed"
        raise ProviderError(f"unknown OpenVINO device {device!r}; choose {OPENVINO_DEVICE_CHOICES} "
                            f"(found here: {found})")
    return value


def openvino_options(device):
    """OpenVINO provider options for Stable Diffusion, set deliberately:
    - precision ACCURACY: each graph runs in its own precision. OpenVINO's GPU default (FP16) would run the
      fp32 VAE decoder in fp16 too, defeating the fp32 fallback for an overflowing fp16 VAE; convert with
      `--dtype fp16` for fp16 speed. (bf16 on a CPU goes through load_config
      {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}: "BF16" is not a precision value the provider takes.)
    - num_streams 1: one image batch at a time; more streams only help many concurrent requests.
    - num_of_threads: on the CPU, the same thread count as the CPU provider (SDONNX_THREADS, physical cores;
      OpenVINO's own default where the count is left to the runtime).
    - cache_dir: compiled models are kept (openvino_cache_dir), so the second run skips compilation."""
    from .session import thread_count

    options = {"device_type": device, "precision": "ACCURACY", "num_streams": "1"}
    if device == "CPU" and thread_count():
        options["num_of_threads"] = str(thread_count())
    cache = openvino_cache_dir()
    if cache:
        options["cache_dir"] = str(cache)
    return options


def openvino_cache_dir():
    """Where OpenVINO keeps compiled models: SDONNX_OPENVINO_CACHE ("" turns caching off), else the user's
    cache folder (%LOCALAPPDATA% on Windows, $XDG_CACHE_HOME or ~/.cache elsewhere) / sdonnx / openvino.
    None where it cannot be made."""
    configured = os.environ.get("SDONNX_OPENVINO_CACHE")
    if configured is not None:
        folder = Path(configured) if configured else None
    else:
        folder = user_cache_dir() / "sdonnx" / "openvino"
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.info("OpenVINO model cache off: cannot make %s (%s)", folder, e)
        return None
    return folder


def user_cache_dir(platform=None):
    """The per-user cache folder of this platform."""
    if (platform or sys.platform).startswith("win"):
        base = os.environ.get("LOCALAPPDATA")
        return Path(base) if base else Path.home() / "AppData" / "Local"
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base) if base else Path.home() / ".cache"


def without_compiled_cache(providers):
    """The provider list minus OpenVINO's compiled-model cache: for sessions with LoRA-merged weights, each
    weight set would leave a compiled copy of the whole graph on disk."""
    return [(name, {k: v for k, v in options.items() if k != "cache_dir"}) for name, options in providers]


# ---------------------------------------------------------------------------------------------- proof


def probe(name, options=None):
    """Start a one-node session on provider `name`: None when it runs there, else onnxruntime's reason."""
    from .session import start_session

    providers = [(PROVIDERS[name], dict(options or {}))]
    try:
        start_session(tiny_model(), None, providers, name=f"{name} probe")
    except ProviderStartError as e:
        return clean_reason(e.reason)
    return None


def tiny_model():
    """A one-node graph (y = x + x), serialized: what `probe` starts."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # every supported onnxruntime reads IR 8
    return model.SerializeToString()


def devices(name):
    """The devices provider `name` can use, as text ([] where this build does not list them)."""
    if name == "cpu":
        return ["CPU"]
    if name == "openvino":
        return openvino_devices()
    import onnxruntime as ort

    lister = getattr(ort, "get_ep_devices", None)  # onnxruntime >= 1.22
    if lister is None:
        return []
    # listed in onnxruntime's order, which need not be the --device-id numbering: no index is claimed
    return [_describe(d) for d in lister() if d.ep_name == PROVIDERS[name]]


def _describe(ep_device):
    hardware = ep_device.device
    description = dict(hardware.metadata).get("Description", "")
    kind = getattr(hardware.type, "name", str(hardware.type))
    return " ".join(part for part in (hardware.vendor, kind, description) if part)


def native_reason(text):
    """onnxruntime's reason from its log lines (errors first, else warnings), colour codes removed."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    errors = [_message(line) for line in lines if "[E:" in line]
    warnings = [_message(line) for line in lines if "[W:" in line]
    return "; ".join(errors or warnings)


def _message(line):
    """The message of one onnxruntime log line: after its `[ERROR]` tag or its logger's bracket."""
    if "[ERROR]" in line:
        return line.rsplit("[ERROR]", 1)[1].strip()
    head, _, rest = line.partition("] ")
    return rest.strip() or head
