"""The arithmetic precision a model runs in: fp32, bf16, fp16 or int8, or `auto`.

A load option, not a request field, like the provider and A1111's own `--precision`/`--no-half` launch
flags: it decides which graphs are loaded and how a provider compiles them (OpenVINO compiles a bf16 UNet
once, taking seconds to minutes), so a change means new sessions and a second copy of the weights; a server
switching per request would hold both or recompile on every switch.

What each provider can do (checked before any session; an impossible one is an error naming the valid
choices; only `auto` picks, and says what it picked in `-v` logs):
- OpenVINO: any graph in bf16 or fp16 through its inference precision hint (`load_config`
  {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}; "BF16" is not a `precision` value the provider takes),
  where OpenVINO lists the precision among the device's capabilities; int8 runs a model's statically
  quantized (QDQ) UNet (`sdonnx quantize`).
- The CPU provider: fp32; int8 with the model's int8 UNet (static QDQ, or the dynamic one of
  `convert --quantize int8`); fp16 with the fp16 graphs of `convert --dtype fp16` (slow: the CPU provider
  has few fp16 kernels, measured 1.9x slower than fp32 on a 3x3 convolution stack). No bf16: its x86 kernels
  have no bf16 path.
- GPU providers: fp32, and fp16 with the model's fp16 graphs.
"""
import logging
from dataclasses import dataclass, field

from ..request import PRECISIONS
from . import cpu

log = logging.getLogger(__name__)

CHOICES = (*PRECISIONS, "auto")
# OpenVINO's names for its inference precision hint
OPENVINO_HINT = {"bf16": "bf16", "fp16": "f16"}
# what `auto` tries on each provider, fastest first; each must also be fast on this CPU (cpu.fast_precisions)
# and possible with this model. Cost bounds (bench/precision.py, full-size SD 1.5): bf16 through OpenVINO
# keeps the UNet's relative error near 1-3% and the image above 30 dB PSNR against fp32
AUTO_ORDER = {"openvino": ("bf16", "fp32"), "cpu": ("int8", "fp32")}
GPU_AUTO_ORDER = ("fp16", "fp32")


class PrecisionError(ValueError):
    """A precision that is unknown, or that this provider, CPU or model cannot run."""


@dataclass(frozen=True)
class Precision:
    """A resolved precision. name: what runs (None: each graph as converted, the default); openvino: provider
    option overrides (the inference precision hint)."""

    name: str | None = None
    openvino: dict = field(default_factory=dict)

    def graph(self, spec, component):
        """Which graph of `spec` runs: "derived" (spec.optimized_path), "base" (spec.path), or a variant's
        relative path (the static int8 UNet)."""
        derived = spec.optimized_path is not None
        quantized = derived and bool(spec.optimized.get("quantize"))
        half = derived and spec.optimized.get("dtype") == "fp16"
        if self.name is None:
            return "derived" if derived else "base"
        if self.name == "int8" and component == "unet":
            variant = spec.variants.get("int8")
            return variant["path"] if variant else "derived"
        if self.name == "fp16" and not self.openvino:
            return "derived" if half else "base"
        return "derived" if derived and not (quantized or half) else "base"

    def label(self, manifest, base=False):
        """The precision the UNet runs in, for the infotext and logs; base: the UNet runs its fp32 base graph
        (LoRA, hypernetworks, tiling)."""
        if self.openvino or self.name in ("fp32", "bf16"):
            return self.name
        spec = manifest.components["unet"]
        which = "base" if base else self.graph(spec, "unet")
        if which == "base":
            return "fp32"
        if which != "derived":
            return "int8"
        return "int8" if spec.optimized.get("quantize") else spec.optimized.get("dtype", "fp32")


def canonical(precision):
    """None (the model's graphs as converted) or one of CHOICES; anything else is a PrecisionError."""
    if precision is None:
        return None
    key = str(precision).strip().lower()
    if key not in CHOICES:
        raise PrecisionError(f"unknown precision {precision!r}; choose one of {', '.join(CHOICES)}")
    return key


def possible(provider, device, manifest, flags=None, capabilities=None):
    """{precision: why not (None when it can run)} for this provider (user-facing name), device and model.
    flags: the CPU's feature flags (cpu.cpu_flags()); capabilities: OpenVINO's for `device` (looked up when
    None)."""
    unet = manifest.components["unet"]
    has_int8 = "int8" in unet.variants or bool(unet.optimized_path and unet.optimized.get("quantize"))
    has_fp16 = bool(unet.optimized_path and unet.optimized.get("dtype") == "fp16")
    no_int8 = "the model has no int8 UNet (make one with `sdonnx quantize MODEL`)"
    no_fp16 = "the model has no fp16 graphs (convert with --dtype fp16)"
    if provider == "openvino":
        caps = capabilities if capabilities is not None else _openvino_capabilities(device, flags)
        lacks = lambda p: None if p.upper() in caps else f"OpenVINO's {device} device lists no {p.upper()}"  # noqa: E731
        return {"fp32": None, "bf16": lacks("bf16"), "fp16": lacks("fp16"),
                "int8": ("OpenVINO runs the static (QDQ) int8 UNet; " + no_int8) if "int8" not in unet.variants
                else lacks("int8")}
    if provider == "cpu":
        return {"fp32": None, "bf16": "the CPU provider has no bf16 kernels on this platform (use --provider "
                                      "openvino: OpenVINO's bf16 inference precision)",
                "fp16": None if has_fp16 else no_fp16, "int8": None if has_int8 else no_int8}
    return {"fp32": None, "bf16": f"the {provider} provider runs no bf16 graphs", "fp16": None if has_fp16 else no_fp16,
            "int8": f"int8 graphs are for the CPU and OpenVINO providers, not {provider}"}


def _openvino_capabilities(device, flags):
    """OpenVINO's own answer; where its library does not answer, the CPU's flags for the CPU device."""
    caps = cpu.openvino_capabilities(device or "CPU")
    if caps is not None:
        return caps
    if (device or "CPU") != "CPU":
        return {"FP32", "FP16"}  # OpenVINO's GPU plugins compute fp16 natively
    flags = cpu.cpu_flags() if flags is None else flags
    return {p.upper() for p in cpu.fast_precisions(flags)}


def resolve(precision, provider, device, manifest, flags=None, capabilities=None):
    """The Precision to load with; a PrecisionError when `precision` cannot run here, naming the valid ones."""
    precision = canonical(precision)
    if precision is None:
        return Precision()
    why_not = possible(provider, device, manifest, flags, capabilities)
    valid = [p for p, reason in why_not.items() if reason is None]
    if precision == "auto":
        precision = _auto(provider, device, valid, flags)
    elif why_not[precision]:
        raise PrecisionError(f"precision {precision} cannot run here: {why_not[precision]}; valid with provider "
                             f"{provider} and this model: {', '.join(valid)} (or auto)")
    hint = OPENVINO_HINT.get(precision) if provider == "openvino" else None
    return Precision(precision, {"load_config": {device or "CPU": {"INFERENCE_PRECISION_HINT": hint}}} if hint else {})


def _auto(provider, device, valid, flags):
    """The first of the provider's AUTO_ORDER that can run here and, on a CPU, is fast on it."""
    on_cpu = provider == "cpu" or (provider == "openvino" and (device or "CPU") == "CPU")
    flags = cpu.cpu_flags() if flags is None else flags
    fast = set(cpu.fast_precisions(flags)) if on_cpu else set(PRECISIONS)
    for name in AUTO_ORDER.get(provider, GPU_AUTO_ORDER) if on_cpu else GPU_AUTO_ORDER:
        if name in valid and name in fast:
            log.info("precision auto: %s on %s (fast here: %s; possible: %s)", name, provider,
                     ", ".join(sorted(fast)), ", ".join(valid))
            return name
    return "fp32"
