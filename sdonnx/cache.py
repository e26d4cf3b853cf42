"""Converted copies of source files (checkpoints, VAEs; upscalers, face models and ControlNets plug in the same
way), made on first use and kept in a cache folder (`DATA/models/ONNX` with --data-dir).

An entry is a folder `<stem>-<sha10>-<key>` (VAEs: `vae-<sha10>-<key>`, shared by copies of one file): the
source file's A1111 short hash, and `key` the hash of what the conversion depends on (the file's whole sha256,
the kind's converter version, the options such as a `.yaml` config's prediction type). An edited or replaced file, or a new converter version, so gets a new
entry; entries never change once made, which is what makes sharing them between processes safe:

- a convert runs in a child process (`python -m converters.first_use`: the torch side; this process never
  imports torch nor keeps a convert's GBs of memory), writing into a staging folder `.NAME.partial-...`;
- the entry appears by one rename once the converter finished and the result checked, so an interrupted
  or killed convert never leaves a folder that loads;
- an exclusive lock per entry (`.NAME.lock`, released by the OS when its holder dies) makes a second process
  wait for the first and then use its entry; under the lock, staging folders of dead converts are removed.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .datadir import HASH_CACHE, HashCache, _read_json, write_atomic

log = logging.getLogger(__name__)

RECORD = "sdonnx-cache.json"  # in each entry: what it was made from and how
LAST_USED = ".last-used"  # its mtime is the entry's last use
TIMINGS = "timings.json"  # seconds per GB of source, per kind, measured on this machine
ENV = "SDONNX_CACHE_DIR"


@dataclass(frozen=True)
class Kind:
    """A kind of source file the cache converts."""

    name: str
    converter: str  # "module:function" run in the child: function(source, out, options, report)
    version: int  # raise when the converter's output changes: older entries are no longer used
    folder: str  # under the cache root ("" for checkpoints: their entries are model folders the server lists)
    complete: str  # the file the converter writes last: a folder without it is no entry
    seconds_per_gb: float  # first guess of the time, until this machine has converted one of the kind
    modules: tuple = ("torch", "diffusers", "transformers", "converters")  # what the converter imports
    # entries named after the source file (a checkpoint's name is the model's name in infotexts), or only after
    # its content (a VAE: copies of one file under other names, MODEL.vae.safetensors, share one entry)
    named: bool = True


KINDS = {
    "checkpoint": Kind("checkpoint", "converters.first_use:checkpoint", 1, "", "sdonnx.json", 120.0),
    "vae": Kind("vae", "converters.first_use:vae", 1, "VAE", "vae.json", 60.0, named=False),
    "controlnet": Kind("controlnet", "converters.first_use:controlnet", 1, "ControlNet", "sdonnx.json", 60.0),
    # upscalers (sdonnx/postprocess/upscale.py Upscalers) and, once their lookup takes a cache, face restorers
    "postprocess": Kind("postprocess", "converters.first_use:postprocess", 1, "postprocess", "sdonnx.json", 60.0,
                        modules=("torch", "converters")),
}


class ConverterMissing(ValueError):
    """Converting needs the torch side (the `convert` extra), which is not installed here."""


class ConvertFailed(ValueError):
    """The converter ran and failed; the message carries its last words."""


@dataclass(frozen=True)
class Progress:
    """One report of a running conversion: a message, and the stage counts when known."""

    message: str
    done: int = 0
    total: int = 0
    expected_seconds: float | None = None


def default_root():
    """The cache folder without a data folder: SDONNX_CACHE_DIR, else the user's cache folder."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home())) / "sdonnx" / "ONNX"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdonnx" / "ONNX"


class ConversionCache:
    """The converted copies under one root folder."""

    def __init__(self, root, hashes=None):
        self.root = Path(root)
        self.hashes = hashes or HashCache(self.root / HASH_CACHE)

    def entry_path(self, kind, source, sha256, options=None):
        kind = KINDS[kind] if isinstance(kind, str) else kind
        key = _digest({"sha256": sha256, "version": kind.version, "options": options or {}})[:8]
        stem = _safe(Path(source).stem) if kind.named else kind.name
        return self.root / kind.folder / f"{stem}-{sha256[:10]}-{key}"

    def find(self, kind, source, options=None, sha256=None):
        """The entry of `source` when it is converted, else None (hashes the file, cached)."""
        path = self.entry_path(kind, source, sha256 or self.hashes.sha256(source), options)
        return path if _complete(path, KINDS[kind] if isinstance(kind, str) else kind) else None

    def get(self, kind, source, options=None, progress=None, sha256=None):
        """The entry of `source`, converting it first when there is none. progress(Progress) hears the
        stages; it may raise to stop the convert (the server's interrupt), which leaves no entry."""
        kind = KINDS[kind] if isinstance(kind, str) else kind
        source = Path(source)
        report = progress or (lambda p: log.info("%s", p.message))
        if sha256 is None:
            report(Progress(f"hashing {source.name}"))
            sha256 = self.hashes.sha256(source)
        path = self.entry_path(kind, source, sha256, options)
        if _complete(path, kind):
            touch(path)
            return path
        check_converter(kind, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _Lock(path.with_name(f".{path.name}.lock"), lambda: report(Progress(
                f"waiting for another process converting {source.name}"))):
            if not _complete(path, kind):  # the process we waited for may have made it
                remove_leftovers(path)
                self._convert(kind, source, sha256, options or {}, path, report)
        touch(path)
        return path

    def _convert(self, kind, source, sha256, options, path, report):
        size = source.stat().st_size
        expected = max(10.0, size / 1e9 * self._rate(kind))
        report(Progress(f"converting {source.name} ({size / 1e9:.1f} GB) to ONNX, once: about "
                        f"{_duration(expected)}", expected_seconds=expected))
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
        started = time.monotonic()
        try:
            out = staging / "entry"
            run_converter(kind, source, out, options, report, staging / "convert.log")
            if not (out / kind.complete).is_file():
                raise ConvertFailed(f"the {kind.name} converter finished without writing {kind.complete}")
            seconds = time.monotonic() - started
            stat = source.stat()
            record = {"kind": kind.name, "source": str(source.resolve()), "sha256": sha256, "size": stat.st_size,
                      "mtime": stat.st_mtime, "converter": kind.converter, "version": kind.version,
                      "options": options, "sdonnx": __version__, "created": time.time(), "seconds": round(seconds, 1)}
            (out / RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
            _publish(out, path, kind)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._learn(kind, size, seconds)
        report(Progress(f"converted {source.name} in {_duration(seconds)}: {path}"))

    def _rate(self, kind):
        rate = _read_json(self.root / TIMINGS).get(kind.name)
        return rate if isinstance(rate, (int, float)) and rate > 0 else kind.seconds_per_gb

    def _learn(self, kind, size, seconds):
        if size < 200e6:  # small files time the child's start-up, not the convert
            return
        timings = _read_json(self.root / TIMINGS)
        timings[kind.name] = seconds / (size / 1e9)
        try:
            write_atomic(self.root / TIMINGS, json.dumps(timings))
        except OSError:
            pass

    # ------------------------------------------------------------------ listing and pruning

    def entries(self):
        """Every entry under the root: [Entry]."""
        found = []
        for kind in KINDS.values():
            folder = self.root / kind.folder
            if folder.is_dir():
                found += [Entry.read(p, kind) for p in sorted(folder.iterdir())
                          if p.is_dir() and not p.name.startswith(".") and (p / RECORD).is_file()]
        return found

    def leftovers(self):
        """Staging folders no running convert holds (killed converts)."""
        out = []
        for kind in KINDS.values():
            folder = self.root / kind.folder
            if folder.is_dir():
                for p in folder.glob(".*.partial-*"):
                    entry = p.name[1:].split(".partial-")[0]
                    if p.is_dir() and not _Lock.held(folder / f".{entry}.lock"):
                        out.append(p)
        return out


@dataclass(frozen=True)
class Entry:
    """A cache entry as `sdonnx cache list` shows it."""

    path: Path
    kind: str
    record: dict

    @classmethod
    def read(cls, path, kind):
        record = _read_json(path / RECORD)
        return cls(path, kind.name, record if isinstance(record, dict) else {})

    @property
    def source(self):
        return self.record.get("source")

    @property
    def source_present(self):
        """The source file still exists with the content this entry was made from (size and mtime)."""
        try:
            stat = Path(self.source).stat()
        except (OSError, TypeError):
            return False
        return stat.st_size == self.record.get("size") and stat.st_mtime == self.record.get("mtime")

    @property
    def current(self):
        """Made by the kind's current converter version (older ones are never used again)."""
        return self.record.get("version") == KINDS[self.kind].version

    @property
    def size(self):
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    @property
    def last_used(self):
        marker = self.path / LAST_USED
        return marker.stat().st_mtime if marker.exists() else self.record.get("created", 0.0)


def entry_source(folder):
    """The source file a cache entry (e.g. a model converted on first use) was made from, when it is still there;
    None for any other folder (a model converted by hand)."""
    record = _read_json(Path(folder) / RECORD)
    source = record.get("source") if isinstance(record, dict) else None
    return Path(source) if isinstance(source, str) and Path(source).is_file() else None


def remove_entry(path):
    """Remove an entry: renamed away first (one step), so nothing half-removed ever looks like an entry."""
    path = Path(path)
    doomed = path.with_name(f".{path.name}.partial-removing-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def touch(path):
    try:
        (Path(path) / LAST_USED).touch()
    except OSError:  # a read-only cache still serves
        pass


def remove_leftovers(path):
    """Staging folders of this entry: called under its lock, so no live convert owns them."""
    for p in path.parent.glob(f".{path.name}.partial-*"):
        log.info("removing %s, left by a convert that did not finish", p.name)
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------- the converter child


def check_converter(kind, source):
    """ConverterMissing, saying what to do, when the torch side cannot run here."""
    missing = [m for m in kind.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConverterMissing(
            f"{Path(source).name} is not converted yet, and converting needs the converter extra, which is not "
            f"installed here (missing {', '.join(missing)}): pip install 'sdonnx[convert]' (the CPU build of torch "
            f"is enough), or convert on another machine with `sdonnx convert {Path(source).name} -o FOLDER` and "
            f"give that folder to -m")


def run_converter(kind, source, out, options, report, log_path):
    """Run the kind's converter in a child process; progress lines go to report. Any exception (the
    report's own, a KeyboardInterrupt) stops the child."""
    command = [sys.executable, "-m", "converters.first_use", kind.converter, str(source), str(out), json.dumps(options)]
    with open(log_path, "wb") as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL)
        try:
            for line in child.stdout:
                event = _event(line)
                if event is not None:
                    report(event)
            code = child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
    if code != 0:
        raise ConvertFailed(f"converting {Path(source).name} failed: {_last_words(log_path)}")


def _event(line):
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        return None
    return Progress(data["message"], int(data.get("done") or 0), int(data.get("total") or 0))


def _last_words(log_path):
    """The child's error: its last non-empty stderr line (the converter's own one-line message)."""
    try:
        lines = [ln.strip() for ln in Path(log_path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


# ---------------------------------------------------------------------------- helpers


class _Lock:
    """An exclusive lock on a file, held until released or the process dies (flock / msvcrt)."""

    def __init__(self, path, on_wait=None):
        self.path, self.on_wait, self.file = Path(path), on_wait, None

    def __enter__(self):
        self.file = open(self.path, "a+b")
        if not _try_lock(self.file):
            if self.on_wait:
                self.on_wait()
            _lock(self.file)
        return self

    def __exit__(self, *exc):
        # closing releases the lock. The (empty) file stays: unlinking it would let a waiter lock the old file
        # while a newcomer locks a new one of the same name
        self.file.close()

    @staticmethod
    def held(path):
        """Whether some process holds the lock at `path` now."""
        if not Path(path).exists():
            return False
        with open(path, "a+b") as f:
            return not _try_lock(f)


if os.name == "nt":
    import msvcrt

    def _try_lock(f):
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _lock(f):
        while not _try_lock(f):
            time.sleep(0.5)
else:
    import fcntl

    def _try_lock(f):
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _lock(f):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def _publish(out, path, kind):
    """Move a finished conversion into place: one rename, atomic on one file system, so the entry appears whole
    or not at all. Should another process have published the same entry meanwhile (only possible when a lock
    file was removed under a waiter), its entry is kept and this one dropped."""
    try:
        os.rename(out, path)
    except OSError:
        if not _complete(path, kind):
            raise


def _complete(path, kind):
    return path.is_dir() and (path / kind.complete).is_file() and (path / RECORD).is_file()


def _digest(data):
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _safe(stem):
    """A file stem usable as a folder name everywhere."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip(".") or "model"


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
