"""One wrapper around onnxruntime.InferenceSession: feeds validated, dtypes cast, outputs as float32."""
import ctypes
import gc
import logging
import os
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_ORT_TO_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(double)": np.float64}


def physical_cores():
    """Physical cores of this machine (hyper-threads share one core's FMA units: no gain for GEMMs)."""
    cores, package = set(), None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key == "physical id":
                    package = value
                elif key == "core id":
                    cores.add((package, value))
    except OSError:
        pass
    return len(cores) or max(1, (os.cpu_count() or 2) // 2)


def return_freed_memory():
    """Hand memory freed by dropped sessions back to the OS. glibc keeps freed heap blocks for reuse, and
    most of a UNet's weights are blocks below its mmap threshold: without a trim, the process's resident
    memory after dropping the UNet session stays as high as with it (measured: 3.7 GB kept on SD 1.5).
    A no-op where the C library has no malloc_trim (macOS, Windows, musl)."""
    gc.collect()  # a session held only by reference cycles (sampler closures) goes now, not at some later gc
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def session_options(plan):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # one intra-op thread per physical core (SDONNX_THREADS overrides); inter-op stays 1: the graphs are
    # chains of big ops, not parallel branches
    options.intra_op_num_threads = int(os.environ.get("SDONNX_THREADS") or physical_cores())
    if plan.disable_mem_pattern:
        options.enable_mem_pattern = False
    if plan.sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in plan.session_config.items():
        options.add_session_config_entry(key, str(value))
    return options


class Session:
    """run(feeds) -> {output name: array}, for one ONNX graph of a model folder."""

    def __init__(self, path, plan, name=None, replacements=None, tiling=None):
        """replacements: {initializer name: array} used instead of the graph's own values (run-time LoRA);
        each must keep the initializer's shape and dtype. tiling: "x", "y", "xy" or None: convolutions pad
        by wrapping around on those axes (seamless tiling; runtime/tiling.py)."""
        import onnxruntime as ort

        self.name = name or Path(path).parent.name
        self.path = Path(path)
        options = session_options(plan)
        # ONNX Runtime borrows these buffers for the session's lifetime: keep them referenced
        self._replacements = [(n, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)))
                              for n, a in (replacements or {}).items()]
        if self._replacements:
            options.add_external_initializers([n for n, _ in self._replacements], [v for _, v in self._replacements])
        source = str(path)
        if tiling:
            from .tiling import tiled_model

            source, config = tiled_model(path, tiling)
            for key, value in config.items():
                options.add_session_config_entry(key, value)
        self._session = ort.InferenceSession(source, sess_options=options, providers=plan.providers)
        self._inputs = {i.name: _ORT_TO_NUMPY.get(i.type, np.float32) for i in self._session.get_inputs()}
        self.output_names = [o.name for o in self._session.get_outputs()]

    @property
    def providers(self):
        return self._session.get_providers()

    def run(self, feeds, outputs=None):
        unknown = set(feeds) - set(self._inputs)
        missing = set(self._inputs) - set(feeds)
        if unknown or missing:
            raise ValueError(f"{self.name}: feeds {sorted(feeds)} do not match the graph inputs {sorted(self._inputs)}")
        cast = {k: np.ascontiguousarray(v, dtype=self._inputs[k]) for k, v in feeds.items()}
        names = list(outputs or self.output_names)
        values = self._session.run(names, cast)
        return {n: (v.astype(np.float32) if v.dtype == np.float16 else v) for n, v in zip(names, values)}
