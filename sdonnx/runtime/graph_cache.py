"""ONNX Runtime's optimized graphs kept per machine, so a CPU-provider session skips graph optimization.

Every CPU session re-runs ONNX Runtime's graph optimizations (constant folding, fusions, the NCHWc layout
rewrite of the convolutions) at creation. The optimized graph is saved once (`optimized_model_filepath`)
and loaded with optimizations off next time. It is only valid for the onnxruntime version, the CPU (the
layout rewrite picks kernels by instruction set) and the graph it was made from, so its folder is named by
a hash of those: the onnxruntime version, the CPU's feature flags, the graph file's bytes, its data file's
size and modification time, and the session settings that change optimization.

Safe against concurrent processes and damage: each entry is written under a temporary name and renamed into
place whole (a process that loses the race drops its copy); an entry records its files' sizes, and one that
does not match or that onnxruntime cannot load is removed and made again.
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


def cache_dir():
    """SDONNX_GRAPH_CACHE ("" turns the cache off), else the user's cache folder / sdonnx / ort-optimized;
    None when off."""
    from .providers import user_cache_dir

    configured = os.environ.get("SDONNX_GRAPH_CACHE")
    if configured is not None:
        return Path(configured) if configured else None
    return user_cache_dir() / "sdonnx" / "ort-optimized"


def entry_key(path, settings=()):
    """The hash naming the optimized graph of the graph file `path` on this machine: onnxruntime version,
    CPU flags, the graph's bytes, its data file's size and mtime, and `settings` (session config items)."""
    import onnxruntime as ort

    from .cpu import cpu_flags

    path = Path(path)
    digest = hashlib.sha256()
    digest.update(f"onnxruntime {ort.__version__}\n".encode())
    digest.update(" ".join(sorted(cpu_flags())).encode() + b"\n")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    for data in sorted(path.parent.glob(path.name + ".data")) + sorted(path.parent.glob("*.data")):
        stat = data.stat()
        digest.update(f"\n{data.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    digest.update(json.dumps(sorted(settings)).encode())
    return digest.hexdigest()[:32]


def lookup(folder, key):
    """The cached graph's path when its entry is complete (sizes as recorded), else None; a damaged entry
    is removed."""
    entry = Path(folder) / key
    record = entry / ENTRY_FILE
    if not record.is_file():
        return None
    try:
        sizes = json.loads(record.read_text(encoding="utf-8"))["sizes"]
        intact = all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        intact = False
    if not intact:
        log.warning("optimized-graph cache entry %s is damaged; it is made again", entry)
        discard(entry)
        return None
    return entry / MODEL_FILE


def staging(folder, key):
    """A fresh temporary folder for a new entry (beside the final one: the rename stays on one disk)."""
    path = Path(folder) / f".{key}.{os.getpid()}.{os.urandom(4).hex()}"
    path.mkdir(parents=True)
    return path


def publish(temporary, folder, key):
    """Record the files' sizes and rename the temporary folder into place; False (and the copy dropped)
    when another process was first or the folder cannot be renamed."""
    temporary = Path(temporary)
    sizes = {p.name: p.stat().st_size for p in temporary.iterdir() if p.is_file()}
    if MODEL_FILE not in sizes:
        discard(temporary)
        return False
    (temporary / ENTRY_FILE).write_text(json.dumps({"sizes": sizes}), encoding="utf-8")
    try:
        os.replace(temporary, Path(folder) / key)  # a folder onto an existing one fails: the other copy stays
    except OSError:
        discard(temporary)
        return False
    return True


def discard(path):
    shutil.rmtree(path, ignore_errors=True)


def save_options(options, temporary):
    """Session options that make onnxruntime write its optimized graph into `temporary` (weights in one data
    file: a UNet is over protobuf's 2 GB limit)."""
    options.optimized_model_filepath = str(Path(temporary) / MODEL_FILE)
    # onnxruntime warns that a graph saved after its NCHWc layout rewrite fits this machine only: that is why
    # the entry's key holds the CPU's flags; the warning would print at every first run of a model
    options.log_severity_level = 3
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return options
