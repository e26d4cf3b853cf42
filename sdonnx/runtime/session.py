"""One wrapper around onnxruntime.InferenceSession: feeds validated, dtypes cast, outputs as float32."""
import contextlib
import ctypes
import gc
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import limits

log = logging.getLogger(__name__)

# onnxruntime writes why a provider did not start to the process's stderr (file descriptor 2), not to
# Python: while a session is created, fd 2 is pointed at a file. One swap at a time across threads.
_NATIVE_LOG_LOCK = threading.Lock()
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


def thread_count(platform=None):
    """Intra-op threads: SDONNX_THREADS, else one per physical core: counted from /proc/cpuinfo on Linux;
    elsewhere 0, onnxruntime's own default, which asks the OS for the physical cores (Windows has no
    /proc, and halving the logical count would be wrong on CPUs without SMT)."""
    if os.environ.get("SDONNX_THREADS"):
        return int(os.environ["SDONNX_THREADS"])
    return physical_cores() if (platform or sys.platform).startswith("linux") else 0


def return_freed_memory():
    """Hand memory freed by dropped sessions back to the OS. glibc keeps freed heap blocks for reuse, and
    most of a UNet's weights are blocks below its mmap threshold: without a trim, the process's resident
    memory after dropping the UNet session stays as high as with it (measured: 3.7 GB kept on SD 1.5).
    A no-op where the C library has no malloc_trim (macOS, Windows, musl)."""
    gc.collect()  # a session held only by reference cycles (sampler closures) goes now, not at some later gc
    trim_heap()


def trim_heap(platform=None):
    """glibc's malloc_trim(0): True when it ran. Only Linux has it (libc.so.6 is glibc's name; musl has
    no malloc_trim, Windows and macOS no libc.so.6)."""
    if not (platform or sys.platform).startswith("linux"):
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


@contextlib.contextmanager
def native_log():
    """Collect what native code writes to stderr (file descriptor 2) meanwhile: yields a list that holds
    the text afterwards. Where fd 2 cannot be swapped (no console: pythonw on Windows), the list stays
    empty and nothing is collected."""
    collected = []
    with _NATIVE_LOG_LOCK, tempfile.TemporaryFile() as sink:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, AttributeError, ValueError):
            yield collected
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield collected
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            collected.append(sink.read().decode("utf-8", "replace"))


def start_session(source, options, providers, name="session", auto=False):
    """An InferenceSession that runs on providers[0], or the reason it does not.

    onnxruntime, when a provider fails to start, logs a line and runs the session on the next provider in
    the list (at least the CPU). Here a provider asked for that did not start raises ProviderStartError
    with onnxruntime's reason; with auto=True a warning says so and the session runs on the next provider.
    Whatever else onnxruntime logged while creating the session is passed on to stderr."""
    from .providers import ProviderStartError, user_name

    wanted = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    session, reason = _create_checked(source, options, providers, wanted)
    if reason is None:
        return session
    if not auto:
        raise ProviderStartError(user_name(wanted), reason)
    log.warning("%s: %s did not start (%s); running on %s", name, user_name(wanted), reason,
                user_name(session.get_providers()[0]))
    return session


def _create_checked(source, options, providers, wanted):
    """(session, None) when it runs on `wanted`, else (a session on the next provider, onnxruntime's reason)."""
    import onnxruntime as ort

    from .providers import native_reason

    try:
        # onnxruntime says "provider X is not in available provider names" as a Python warning
        with native_log() as logged, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            session = ort.InferenceSession(source, sess_options=options, providers=providers, enable_fallback=0)
    except Exception as error:
        if wanted == "CPUExecutionProvider":
            sys.stderr.write("".join(logged))  # onnxruntime's log beside its exception
            raise
        # the provider or the model? A model the CPU cannot load either raises here, as it should
        session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        return session, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if session.get_providers()[0] != wanted:
        return session, (native_reason("".join(logged)) or "; ".join(str(w.message).strip() for w in warned)
                         or "onnxruntime gave no reason")
    sys.stderr.write("".join(logged))
    for warning in warned:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return session, None


def session_options(plan):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # one intra-op thread per physical core (SDONNX_THREADS overrides); inter-op stays 1: the graphs are
    # chains of big ops, not parallel branches
    options.intra_op_num_threads = thread_count()
    if plan.disable_mem_pattern:
        options.enable_mem_pattern = False
    if plan.sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    for key, value in plan.session_config.items():
        options.add_session_config_entry(key, str(value))
    return options


# onnxruntime's exception classes that mean the graph or its data file could not be read; FAIL only with
# these words (it also stands for provider and memory failures)
_LOAD_ERRORS = ("InvalidProtobuf", "NoSuchFile", "NoModel", "InvalidGraph")
_DATA_FAILURES = ("external data", "external initializer", "out of bounds or can not be read", "deserialize tensor")


def _damaged_model(path, error):
    """A ModelFileError naming the graph for onnxruntime's "cannot load this model" errors, else None."""
    from ..manifest import ModelFileError

    text = str(error)
    kind = type(error).__name__
    if kind not in _LOAD_ERRORS and not (kind == "Fail" and any(w in text.lower() for w in _DATA_FAILURES)):
        return None
    reason = re.split(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", text)[-1].strip().splitlines()[0]
    reason = re.sub(r"\S+\.cc:\d+ \S+ ", "", reason)  # onnxruntime's source locations
    return ModelFileError(f"the graph {path} or its data file is missing or damaged ({reason[:300]}); "
                          f"convert the model again")


class Session:
    """run(feeds) -> {output name: array}, for one ONNX graph of a model folder.

    With a plan that wants static shapes (DirectML), the graph's free dimensions are fixed per call shape
    (`add_free_dimension_override_by_name`, from the manifest's dimension names) and the sessions are kept
    in a small least-recently-used cache: DirectML compiles and plans memory for fixed shapes only."""

    def __init__(self, path, plan, name=None, replacements=None, tiling=None, dims=None, graph=None):
        """replacements: {initializer name: array} used instead of the graph's own values (run-time LoRA);
        each must keep the initializer's shape and dtype. tiling: "x", "y", "xy" or None: convolutions pad
        by wrapping around on those axes (seamless tiling; runtime/tiling.py). dims: {input name: [dimension
        name or None per axis]} (the manifest's `inputs`), for static-shape plans. graph: (model bytes,
        session config) of a rewrite of `path` made by the caller, tiling included (run-time hypernetworks)."""
        import onnxruntime as ort

        self.name = name or Path(path).parent.name
        self.path = Path(path)
        self._plan = plan
        # ONNX Runtime borrows these buffers for the session's lifetime: keep them referenced
        self._replacements = [(n, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)))
                              for n, a in (replacements or {}).items()]
        self._source, self._config = str(path), {}
        if graph is not None:
            self._source, self._config = graph
        elif tiling:
            from .tiling import tiled_model

            self._source, self._config = tiled_model(path, tiling)
        self._dims = {k: list(v) for k, v in (dims or {}).items()} if plan.static_shapes else {}
        self._sessions = OrderedDict()  # free-dimension overrides -> session (one entry, () , when dynamic)
        self._session = None
        self.ran_on = None  # (ORT provider, device) of the session created last; None before the first
        # DirectML sessions must not run concurrently (a server thread per request would otherwise)
        self._one_at_a_time = threading.Lock() if plan.one_run_at_a_time else contextlib.nullcontext()
        # GPU plans: steady inputs kept on the device between calls ({name: (host copy, device OrtValue)})
        self._resident, self._binding_failed, self.resident_reused = {}, False, 0
        if not self._dims:
            self._session = self._sessions[()] = self._create(())

    def _options(self, overrides):
        options = session_options(self._plan)
        if self._replacements:
            options.add_external_initializers([n for n, _ in self._replacements], [v for _, v in self._replacements])
        for key, value in self._config.items():
            options.add_session_config_entry(key, value)
        for dim, value in overrides:
            options.add_free_dimension_override_by_name(dim, value)
        return options

    def _start(self, source, options, providers):
        try:
            return start_session(source, options, providers, name=self.name, auto=self._plan.auto)
        except Exception as error:
            damaged = _damaged_model(self.path, error)
            if damaged is None:
                raise
            raise damaged from None

    def _create(self, overrides):
        """A session with ((dimension name, value), ...) fixed."""
        from . import graph_cache
        from .providers import without_compiled_cache

        providers = without_compiled_cache(self._plan.providers) if self._replacements else self._plan.providers
        folder = graph_cache.cache_dir() if self._cacheable(overrides) else None
        session = self._from_graph_cache(folder, overrides, providers) if folder is not None else None
        if session is None:
            session = self._start(self._source, self._options(overrides), providers)
        self.ran_on = (session.get_providers()[0], self._plan.device(session.get_providers()[0]))
        log.info("%s: runs on %s (device %s)", self.name, *self.ran_on)
        self._inputs = {i.name: _ORT_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        return session

    def _cacheable(self, overrides):
        """Whether the optimized graph may come from (and go to) the graph cache: the CPU provider running the
        graph file as it is (LoRA replacements, rewrites and fixed dimensions change what is optimized)."""
        return (self._plan.names[0] == "cpu" and not self._replacements and not overrides and not self._config
                and self._source == str(self.path))

    def _from_graph_cache(self, folder, overrides, providers):
        """A session on the cached optimized graph (optimizations off: they ran when it was saved), or on
        the graph file with its optimized graph saved to the cache; None where the cache folder cannot be
        written (the caller makes a plain session)."""
        import onnxruntime as ort

        from . import graph_cache

        key = graph_cache.entry_key(self.path, self._plan.session_config.items())
        cached = graph_cache.lookup(folder, key)
        if cached is not None:
            options = self._options(overrides)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                session = start_session(str(cached), options, providers, name=self.name)
                log.info("%s: optimized graph loaded from %s", self.name, cached.parent)
                return session
            except Exception as error:  # noqa: BLE001 - any failure of a cached file: make it again
                log.warning("%s: the cached optimized graph %s does not load (%s); it is made again", self.name,
                            cached.parent, str(error).strip().splitlines()[0] if str(error).strip() else error)
                graph_cache.discard(cached.parent)
        try:
            temporary = graph_cache.staging(folder, key)
        except OSError as error:
            log.info("%s: optimized-graph cache off: cannot write in %s (%s)", self.name, folder, error)
            return None
        try:
            session = self._start(self._source, graph_cache.save_options(self._options(overrides), temporary),
                                  providers)
        except BaseException:
            graph_cache.discard(temporary)
            raise
        if graph_cache.publish(temporary, folder, key):
            log.info("%s: optimized graph saved to %s", self.name, Path(folder) / key)
        return session

    def _for(self, feeds):
        """The session for these feeds' shapes (static plans: created on first use, least recently used
        evicted beyond the plan's static_cache)."""
        if not self._dims:
            return self._session
        overrides = {}
        for input_name, names in self._dims.items():
            shape = np.shape(feeds[input_name]) if input_name in feeds else ()
            for dim, value in zip(names, shape):
                if dim is not None and overrides.setdefault(dim, int(value)) != int(value):
                    raise ValueError(f"{self.name}: dimension {dim!r} is {overrides[dim]} and {value} in one call")
        key = tuple(sorted(overrides.items()))
        if key in self._sessions:
            self._sessions.move_to_end(key)
        else:
            self._session = None  # the evicted session must lose every reference to be freed
            while len(self._sessions) >= max(1, self._plan.static_cache):
                self._sessions.popitem(last=False)
                return_freed_memory()
            log.info("%s: session for %s", self.name, ", ".join(f"{k}={v}" for k, v in key) or "fixed shapes")
            self._sessions[key] = self._create(key)
        self._session = self._sessions[key]
        return self._session

    @property
    def shapes_cached(self):
        """The free-dimension settings of the sessions held, oldest first (static plans)."""
        return [dict(key) for key in self._sessions]

    @property
    def providers(self):
        """The providers the session runs on (a static-shape session not yet created: the plan's)."""
        return self._session.get_providers() if self._session else [name for name, _ in self._plan.providers]

    def run(self, feeds, outputs=None, steady=()):
        """steady: names of inputs that usually repeat from call to call (the text conditioning over the
        sampling steps); on a GPU plan they stay on the device while their values do not change."""
        with self._one_at_a_time:
            return self._run(feeds, outputs, steady)

    def _run(self, feeds, outputs, steady):
        session = self._for(feeds)
        unknown = set(feeds) - set(self._inputs)
        missing = set(self._inputs) - set(feeds)
        if unknown or missing:
            raise ValueError(f"{self.name}: feeds {sorted(feeds)} do not match the graph inputs {sorted(self._inputs)}")
        cast = {k: np.ascontiguousarray(v, dtype=self._inputs[k]) for k, v in feeds.items()}
        names = list(outputs or self.output_names)
        values = None
        if self._plan.bind_device and not self._binding_failed:
            values = self._run_bound(session, cast, names, steady)
        if values is None:
            values = self._run_plain(session, cast, names)
        return {n: (v.astype(np.float32) if v.dtype == np.float16 else v) for n, v in zip(names, values)}

    def _run_plain(self, session, cast, names):
        try:
            return session.run(names, cast)
        except Exception as error:  # noqa: BLE001 - only allocation failures become OutOfMemory
            if not limits.is_allocation_failure(error):
                raise
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in cast.items())
            raise limits.out_of_memory(f"{self.name} ({shapes})", error) from error

    def _run_bound(self, session, cast, names, steady):
        """One run through an IO binding: steady inputs whose values did not change since the last call are
        bound from the device copy made then (no host-to-device copy); the rest are copied in by ONNX
        Runtime. None (and plain runs from then on) where this build cannot place values on the device."""
        import onnxruntime as ort

        kind, device_id = self._plan.bind_device
        try:
            binding = session.io_binding()
            for name, value in cast.items():
                if name not in steady:
                    binding.bind_cpu_input(name, value)
                    continue
                held = self._resident.get(name)
                if held is not None and held[0].shape == value.shape and np.array_equal(held[0], value):
                    self.resident_reused += 1
                else:
                    held = self._resident[name] = (value.copy(), ort.OrtValue.ortvalue_from_numpy(value, kind, device_id))
                binding.bind_ortvalue_input(name, held[1])
            for name in names:
                binding.bind_output(name)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception as error:  # noqa: BLE001 - any binding failure: plain runs are always correct
            log.warning("%s: IO binding on %s unavailable (%s); running without it", self.name, kind, error)
            self._binding_failed = True
            self._resident.clear()
            return None
