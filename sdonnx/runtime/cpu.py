"""What this CPU can do fast: the instruction-set features that matter for lower precisions, read at run time.

Machines of the same kind differ (a VM may hide AMX; an AMD EPYC has AVX-512 but no AMX), so nothing is
assumed: Linux reads /proc/cpuinfo; elsewhere (Windows, macOS) the features are unknown and only fp32 is
called fast, while OpenVINO, where installed, answers for its own device (openvino_capabilities).
"""
import ctypes
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# /proc/cpuinfo flag -> the name users know, in the order `sdonnx providers` prints them
FEATURES = {"amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8", "amx_fp16": "AMX-FP16", "avx512_bf16": "AVX512-BF16",
            "avx512_fp16": "AVX512-FP16", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI",
            "avx512f": "AVX512F", "avx2": "AVX2", "fma": "FMA"}
# a precision is fast where the CPU multiplies in it natively. AVX512-FP16 alone is not enough: OpenVINO's
# f16 hint ran a 3x3 convolution stack 1.6x slower than fp32 on a Xeon with AVX512-FP16 and AMX-BF16 (bf16:
# 3x faster), so fp16 counts as fast only with AMX-FP16
FAST_WITH = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16",),
             "int8": ("amx_int8", "avx512_vnni", "avx_vnni")}


def cpu_flags(cpuinfo="/proc/cpuinfo", platform=None):
    """The CPU's feature flags (lower case) from the first processor's `flags` line; an empty set where
    there is no /proc/cpuinfo (Windows, macOS) or it cannot be read."""
    if not (platform or sys.platform).startswith("linux"):
        return frozenset()
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError as e:
        log.info("cannot read %s (%s): CPU features unknown", cpuinfo, e)
    return frozenset()


def features(flags):
    """The FEATURES present in `flags`, by their display names."""
    return [name for flag, name in FEATURES.items() if flag in flags]


def fast_precisions(flags):
    """The precisions this CPU computes natively: fp32 always, bf16/fp16/int8 where FAST_WITH's instructions
    are there."""
    return ["fp32"] + [p for p, needs in FAST_WITH.items() if any(f in flags for f in needs)]


def openvino_capabilities(device="CPU"):
    """OpenVINO's own OPTIMIZATION_CAPABILITIES of `device` ({"FP32", "BF16", "FP16", "INT8", ...}), read
    through the C library the onnxruntime-openvino package ships; None where that library is not installed
    or does not answer (the plain onnxruntime package, another OS's file name)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    folder = Path(onnxruntime.__file__).parent / "capi"
    names = {"win32": "openvino_c.dll", "darwin": "libopenvino_c.dylib"}
    path = folder / names.get(sys.platform, "libopenvino_c.so")
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        core, value = ctypes.c_void_p(), ctypes.c_char_p()
        if lib.ov_core_create(ctypes.byref(core)) != 0:
            return None
        try:
            status = lib.ov_core_get_property(core, device.encode(), b"OPTIMIZATION_CAPABILITIES", ctypes.byref(value))
            found = set(value.value.decode().split()) if status == 0 and value.value else None
            if status == 0:
                lib.ov_free(value)
            return found
        finally:
            lib.ov_core_free(core)
    except (OSError, AttributeError) as e:
        log.info("OpenVINO's C library did not answer (%s)", e)
        return None
