"""An AUTOMATIC1111 data folder (`--data-dir`, A1111's own flag; `SDONNX_DATA_DIR`): where each kind of file
lives, by A1111's folder names, and the checkpoints and VAEs in it named as A1111 names them.

A1111 calls a checkpoint by its path under models/Stable-diffusion (`sub/model.safetensors`), by that
without the suffix and with `_` for `/` (`sub_model`), by its file stem, by its title `name [shorthash]` (the
first 10 hex of the file's sha256), by the sha256 itself and by the legacy hash (8 hex of the sha256 of 64 KiB
at offset 1 MiB). A VAE is called by its file name, suffix included (`vae-ft-mse-840000-ema-pruned.safetensors`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .infotext import sha256_file

log = logging.getLogger(__name__)

ENV = "SDONNX_DATA_DIR"

# what sdonnx reads from a data folder -> the folders A1111 keeps it in (the first existing one is used where
# a Pipeline takes one folder)
FOLDERS = {
    "checkpoints": ("models/Stable-diffusion",),
    "vae": ("models/VAE",),
    "lora": ("models/Lora", "models/LyCORIS"),
    "embeddings": ("embeddings",),
    "hypernetworks": ("models/hypernetworks",),
    "esrgan": ("models/ESRGAN",),
    "realesrgan": ("models/RealESRGAN",),
    "gfpgan": ("models/GFPGAN",),
    "codeformer": ("models/Codeformer",),
    "controlnet": ("models/ControlNet",),
    "onnx": ("models/ONNX",),  # sdonnx's converted copies (A1111's ONNX/Olive fork keeps its own here too)
}
STYLES = "styles.csv"
A1111_HASH_CACHE = "cache.json"  # A1111's {"hashes": {"checkpoint/NAME": {"mtime", "sha256"}}}
HASH_CACHE = "hashes.json"  # sdonnx's own, in the cache folder: {abspath: {"size", "mtime", "sha256"}}
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt")
VAE_BESIDE = tuple(".vae" + s for s in (".pt", ".ckpt", ".safetensors"))  # A1111's order beside a checkpoint
HEX = re.compile(r"[0-9a-fA-F]+")
TITLE = re.compile(r"(.+) \[([0-9a-fA-F]{8,10})\]")


class ModelNotFound(ValueError):
    """A model name matches nothing: no converted folder, checkpoint file or checkpoint in the data folder."""


@dataclass(frozen=True)
class DataDir:
    """An A1111 install's data folder (the one holding `models/`, `embeddings/`, `styles.csv`)."""

    root: Path

    @classmethod
    def from_option(cls, value=None):
        """The data folder a --data-dir value (or SDONNX_DATA_DIR when None) names; None without either."""
        if isinstance(value, DataDir):
            return value
        value = value if value is not None else os.environ.get(ENV) or None
        if value is None:
            return None
        root = Path(value).expanduser()
        if not root.is_dir():
            raise ValueError(f"data folder {str(root)!r} does not exist (--data-dir / {ENV}): give the folder "
                             f"of an A1111 install, the one holding models/ and embeddings/")
        return cls(root)

    def folders(self, kind):
        return [self.root / rel for rel in FOLDERS[kind]]

    def folder(self, kind):
        """The first existing folder of a kind, else where A1111 would make it."""
        found = [f for f in self.folders(kind) if f.is_dir()]
        return found[0] if found else self.folders(kind)[0]

    def existing(self, kind):
        """The folder of a kind when it exists, else None."""
        folder = self.folder(kind)
        return folder if folder.is_dir() else None

    @property
    def styles(self):
        return self.root / STYLES

    @property
    def cache_root(self):
        return self.folder("onnx")

    def hashes(self):
        return HashCache(self.cache_root / HASH_CACHE, self.root / A1111_HASH_CACHE, self.folder("checkpoints"))

    def checkpoints(self):
        """The checkpoint files A1111 lists (models/Stable-diffusion, recursively), sorted by name."""
        base = self.folder("checkpoints")
        hashes = self.hashes()
        return [Checkpoint.at(path, base, hashes) for path in _files(base, CHECKPOINT_SUFFIXES)
                if not path.name.lower().endswith(VAE_BESIDE)]

    def vaes(self):
        """{name: path} of the VAEs A1111 offers: models/VAE/** and *.vae.* files beside checkpoints;
        the name is the file name, as A1111's sd_vae setting and infotext `VAE` give it."""
        beside = [p for p in _files(self.folder("checkpoints"), VAE_SUFFIXES) if p.name.lower().endswith(VAE_BESIDE)]
        found = {p.name: p for p in beside}
        found.update({p.name: p for p in _files(self.folder("vae"), VAE_SUFFIXES)})
        return dict(sorted(found.items(), key=lambda item: _natural(item[0])))

    def find_checkpoint(self, name):
        """The checkpoint A1111 would take for `name` (any of its ids); ModelNotFound naming the choices."""
        checkpoints = self.checkpoints()
        for c in checkpoints:
            if name in c.names():
                return c
        if HEX.fullmatch(name) and len(name) in (8, 10, 64):  # a hash: hash the files (cached) until one matches
            for c in checkpoints:
                if name.lower() in (c.sha256[:len(name)], c.legacy_hash):
                    return c
        titled = TITLE.fullmatch(name)
        if titled:  # "name [hash]" from an infotext or another install: the name, when its hash agrees
            for c in checkpoints:
                if titled.group(1) in (c.name, c.stem, c.model_name) and \
                        titled.group(2).lower() in (c.sha256[:len(titled.group(2))], c.legacy_hash):
                    return c
        choices = ", ".join(c.title for c in checkpoints) or f"none in {self.folder('checkpoints')}"
        raise ModelNotFound(f"model {name!r} not found; checkpoints: {choices}")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file and A1111's names for it. sha256 is computed on first use (then cached on disk)."""

    path: Path
    name: str  # path under models/Stable-diffusion, "/"-separated, suffix kept: A1111's `name`
    hashes: object = field(compare=False, repr=False)

    @classmethod
    def at(cls, path, base, hashes):
        try:
            name = Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            name = Path(path).name
        return cls(Path(path), name, hashes)

    @property
    def stem(self):
        return self.path.stem  # A1111's name_for_extra: what infotexts' `Model:` holds

    @property
    def model_name(self):
        return os.path.splitext(self.name.replace("/", "_"))[0]

    @property
    def cached_sha256(self):
        """The sha256 when a hash cache knows it for the file as it is now, else None (nothing is read)."""
        return self.hashes.lookup(self.path, self.name)

    @property
    def sha256(self):
        return self.hashes.sha256(self.path, self.name)

    @property
    def shorthash(self):
        return self.sha256[:10]

    @property
    def legacy_hash(self):
        return legacy_hash(self.path)

    @property
    def title(self):
        """A1111's title: `name [shorthash]` when the hash is known (A1111 lists unhashed files by name)."""
        known = self.cached_sha256
        return f"{self.name} [{known[:10]}]" if known else self.name

    @property
    def config(self):
        """The `.yaml` config beside the file (A1111 reads MODEL.yaml), or None."""
        path = self.path.with_suffix(".yaml")
        return path if path.is_file() else None

    def names(self):
        """The ids A1111 accepts for this checkpoint without hashing it (hashes when already known)."""
        ids = {self.name, self.model_name, self.stem, str(self.path)}
        known = self.cached_sha256
        if known:
            ids |= {known, known[:10], f"{self.name} [{known[:10]}]", f"{self.stem} [{known[:10]}]"}
        return ids

    def as_a1111(self, converted=None):
        """A1111's /sd-models entry."""
        known = self.cached_sha256
        return {"title": self.title, "model_name": self.model_name, "hash": known[:10] if known else None,
                "sha256": known, "filename": str(self.path), "config": str(self.config) if self.config else None}


def legacy_hash(path):
    """A1111's old model hash: 8 hex of the sha256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


class HashCache:
    """sha256 of large files, kept in a JSON file keyed by (absolute path, size, mtime) so a file is read once
    while unchanged; A1111's own cache.json is read too (its `checkpoint/NAME` entries, by mtime)."""

    def __init__(self, path, a1111_path=None, checkpoints_dir=None):
        self.path, self.a1111_path, self.checkpoints_dir = Path(path), a1111_path, checkpoints_dir

    def lookup(self, file, a1111_name=None):
        stat = Path(file).stat()
        entry = self._read().get(str(Path(file).resolve()))
        if entry and entry.get("size") == stat.st_size and entry.get("mtime") == stat.st_mtime:
            return entry.get("sha256")
        if a1111_name and self.a1111_path:
            theirs = _read_json(self.a1111_path).get("hashes", {}).get(f"checkpoint/{a1111_name}")
            if isinstance(theirs, dict) and theirs.get("mtime") == stat.st_mtime and _is_sha256(theirs.get("sha256")):
                return theirs["sha256"]
        return None

    def sha256(self, file, a1111_name=None):
        known = self.lookup(file, a1111_name)
        if known:
            return known
        stat = Path(file).stat()
        log.info("hashing %s (%.1f GB)", file, stat.st_size / 1e9)
        digest = sha256_file(file)
        if Path(file).stat().st_mtime == stat.st_mtime:  # not changed while it was read
            self._store(str(Path(file).resolve()), {"size": stat.st_size, "mtime": stat.st_mtime, "sha256": digest})
        return digest

    def _read(self):
        data = _read_json(self.path)
        return data if isinstance(data, dict) else {}

    def _store(self, key, entry):
        """Read-modify-replace: two writers at once may lose one entry (it is hashed again), never the file."""
        data = self._read()
        data[key] = entry
        try:
            write_atomic(self.path, json.dumps(data, indent=1))
        except OSError as e:  # a read-only install still works, hashing again next time
            log.warning("cannot save file hashes to %s: %s", self.path, e)


def write_atomic(path, text):
    """Write text to path through a temporary file and a rename: readers see the old or the new file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and HEX.fullmatch(value) is not None


def _files(folder, suffixes):
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted((p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file()),
                  key=lambda p: _natural(p.as_posix()))


def _natural(text):
    """A1111's natural sort key: digits compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


# ------------------------------------------------------------------------------------------ yaml configs

def read_config(path):
    """The facts a checkpoint's `.yaml` config (ldm/sgm style, as A1111 reads beside the file) gives:
    {"prediction": "v_prediction" | "epsilon", "family": "sd1" | "sd2" | "sdxl"}, each only when the file says.

    Only two keys are read, line by line, as plain text (nothing is evaluated; no yaml parser is needed for
    them): `parameterization:` ("v" means v-prediction; ldm's default is eps) and the `target:` classes of the
    text encoder / model, which tell the family."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")[:1 << 20]
    except OSError as e:
        raise ValueError(f"cannot read the config {path}: {e}") from None
    facts = {}
    targets = re.findall(r"^\s*target:\s*['\"]?([\w.]+)", text, re.M)
    if any(t.startswith("sgm.") for t in targets):
        facts["family"] = "sdxl"
    elif any(t.endswith("FrozenOpenCLIPEmbedder") for t in targets):
        facts["family"] = "sd2"
    elif any(t.endswith("FrozenCLIPEmbedder") for t in targets):
        facts["family"] = "sd1"
    param = re.search(r"^\s*parameterization:\s*['\"]?(\w+)", text, re.M)
    scaling = [t.rsplit(".", 1)[-1] for t in targets if "Scaling" in t]  # sgm's denoiser scaling classes
    if any(s.startswith("VScaling") for s in scaling):
        facts["prediction"] = "v_prediction"
    elif "EpsScaling" in scaling:
        facts["prediction"] = "epsilon"
    elif param:
        facts["prediction"] = "v_prediction" if param.group(1).lower() in ("v", "v_prediction") else "epsilon"
    elif any(t.startswith("ldm.models.diffusion") for t in targets):
        facts["prediction"] = "epsilon"  # ldm's LatentDiffusion defaults to eps when the key is absent
    return facts


# ------------------------------------------------------------------------------------------ -m NAME

def model_cache(data=None):
    """The conversion cache of a data folder (DATA/models/ONNX), or the user's own without one."""
    from .cache import ConversionCache, default_root

    if data is not None:
        return ConversionCache(data.cache_root, data.hashes())
    return ConversionCache(default_root())


def resolve_model(name, data=None, progress=None):
    """-m NAME -> a converted model folder: NAME itself when it is a folder; a checkpoint file, or a checkpoint
    of the data folder by any name A1111 gives it, converted on first use (progress(cache.Progress) hears how
    it goes); or a converted folder in the data folder's models/ONNX."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        base = data.folder("checkpoints") if data is not None else path.parent
        cache = model_cache(data)
        return convert_checkpoint(Checkpoint.at(path, base, cache.hashes), cache, progress)
    if data is None:
        raise ModelNotFound(f"model {name!r} does not exist (no such folder or file): give a converted model "
                            f"folder or a checkpoint file, or --data-dir (or {ENV}) to find checkpoints by name in "
                            f"an A1111 install")
    converted = data.cache_root / name
    if (converted / "sdonnx.json").is_file():
        return converted
    return convert_checkpoint(data.find_checkpoint(name), model_cache(data), progress)


def convert_checkpoint(checkpoint, cache, progress=None):
    """The cache entry (model folder) of a checkpoint, converted once; a `.yaml` beside it sets the prediction
    type and family."""
    options = read_config(checkpoint.config) if checkpoint.config else {}
    return cache.get("checkpoint", checkpoint.path, options, progress, sha256=checkpoint.sha256)


def cached_checkpoint(checkpoint, cache):
    """The converted folder of a checkpoint when the cache has it, found without reading the file (its hash
    from the hash cache); None when it is not converted or not hashed yet."""
    known = checkpoint.cached_sha256
    if not known:
        return None
    options = read_config(checkpoint.config) if checkpoint.config else {}
    return cache.find("checkpoint", checkpoint.path, options, sha256=known)
