"""What the server can offer: converted model folders, LoRA files and embeddings, found on disk."""
import csv
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.hypernetwork import HypernetworkLibrary
from ..manifest import MANIFEST_NAME, ManifestError, load_manifest

log = logging.getLogger(__name__)

ADAPTER_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
STYLES_NAME = "styles.csv"  # A1111's styles file, here in the models folder


class UnknownModel(ValueError):
    """A checkpoint name matches no model the server knows."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    manifest: object = field(compare=False, repr=False)

    @property
    def model_hash(self):
        return self.manifest.model_hash

    @property
    def title(self):
        """A1111's checkpoint title: ``name [hash]``."""
        return f"{self.name} [{self.model_hash}]" if self.model_hash else self.name

    def as_a1111(self):
        return {"title": self.title, "model_name": self.name, "hash": self.model_hash, "sha256": None,
                "filename": str(self.path), "config": None}

    def names(self):
        return {self.title, self.name, self.model_hash, str(self.path)} - {None}


@dataclass(frozen=True)
class CheckpointEntry:
    """A checkpoint of the data folder (--data-dir), listed as A1111 lists it; converted on its first request
    (path and manifest are None until then)."""

    checkpoint: object  # datadir.Checkpoint
    path: Path | None = None
    manifest: object = field(default=None, compare=False, repr=False)

    @property
    def name(self):
        return self.checkpoint.stem  # A1111's sd_model_name

    @property
    def model_hash(self):
        known = self.checkpoint.cached_sha256
        return known[:10] if known else self.manifest.model_hash if self.manifest else None

    @property
    def title(self):
        return self.checkpoint.title

    def as_a1111(self):
        return self.checkpoint.as_a1111()

    def names(self):
        return self.checkpoint.names() | {self.title}


class ModelStore:
    """Model folders under the given paths (a model folder, or a folder of model folders), rescanned on refresh."""

    def __init__(self, sources, lora_dirs=(), embedding_dirs=(), hypernetwork_dirs=(), controlnet_dirs=(), data=None):
        self.sources = [Path(s) for s in sources]
        self.controlnet_dirs = [Path(d) for d in controlnet_dirs]  # every one is searched, in order
        self.data = data  # datadir.DataDir: its checkpoints (converted on first use), VAEs and styles.csv
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.embedding_dirs = [Path(d) for d in embedding_dirs]
        self.hypernetwork_dirs = [Path(d) for d in hypernetwork_dirs]
        for dirs in (self.lora_dirs, self.embedding_dirs, self.hypernetwork_dirs):
            existing = [d for d in dirs if d.is_dir()]
            if len(existing) > 1:  # a Pipeline reads one folder of each
                log.warning("using %s; not %s", existing[0], ", ".join(map(str, existing[1:])))
        self._lock = threading.Lock()
        self._models = []
        self.current = None
        self.refresh()

    @property
    def models(self):
        with self._lock:
            return list(self._models)

    def refresh(self):
        """Rescan the sources; the current model stays current while it still exists."""
        found = []
        for source in self.sources:
            for folder in _model_folders(source):
                try:
                    found.append(ModelEntry(folder.name, folder, load_manifest(folder)))
                except ManifestError as e:
                    log.warning("skipping %s: %s", folder, e)
        found += self._checkpoints()
        with self._lock:
            self._models = found
            same = [m for m in found if self.current is not None and m.title == self.current.title]
            self.current = same[0] if same else found[0] if found else None
        return found

    def _checkpoints(self):
        """The data folder's checkpoints, each with its converted folder when the cache holds one."""
        if self.data is None:
            return []
        from ..datadir import cached_checkpoint, model_cache

        cache, out = model_cache(self.data), []
        for ckpt in self.data.checkpoints():
            folder = cached_checkpoint(ckpt, cache)
            out.append(self._checkpoint_entry(ckpt, folder))
        return out

    @staticmethod
    def _checkpoint_entry(ckpt, folder):
        try:
            return CheckpointEntry(ckpt, folder, load_manifest(folder)) if folder else CheckpointEntry(ckpt)
        except ManifestError as e:
            log.warning("%s: its converted copy %s is unusable (%s); it is converted again on first use", ckpt.path,
                        folder, e)
            return CheckpointEntry(ckpt)

    def convert(self, entry, progress=None):
        """Convert a listed checkpoint (the worker runs this: it takes minutes) -> its entry with the model
        folder; the list and the current model follow."""
        from ..datadir import convert_checkpoint, model_cache

        folder = convert_checkpoint(entry.checkpoint, model_cache(self.data), progress)
        converted = self._checkpoint_entry(entry.checkpoint, folder)
        if converted.manifest is None:
            raise ManifestError(f"the converted copy of {entry.checkpoint.path} does not load")
        with self._lock:
            self._models = [converted if getattr(m, "checkpoint", None) == entry.checkpoint else m
                            for m in self._models]
            if self.current is not None and getattr(self.current, "checkpoint", None) == entry.checkpoint:
                self.current = converted
        return converted

    def vaes(self):
        """{name: path} of the VAEs the data folder offers (A1111's sd_vae names)."""
        return self.data.vaes() if self.data is not None else {}

    def find(self, name):
        """A model by A1111 title, folder name, hash or path (a data folder's checkpoints by any A1111 id)."""
        for m in self.models:
            if name in m.names():
                return m
        choices = ", ".join(m.title for m in self.models) or "none (check the models folder)"
        raise UnknownModel(f"model {name!r} not found; available: {choices}")

    def select(self, name):
        entry = self.find(name)
        with self._lock:
            self.current = entry
        return entry

    @property
    def lora_dir(self):
        """The LoRA folder generation reads (the first that exists): a Pipeline takes one."""
        return _first_existing(self.lora_dirs)

    @property
    def embeddings_dir(self):
        """The embeddings folder generation reads (the first that exists), None without one."""
        return _first_existing(self.embedding_dirs)

    def controlnets(self):
        """The converted ControlNets units can name (controlnet.model.Library over the ControlNet folders)."""
        from ..controlnet.model import Library

        return Library(tuple(self.controlnet_dirs))

    @property
    def hypernetwork_dir(self):
        """The hypernetwork folder generation reads (the first that exists), None without one."""
        return _first_existing(self.hypernetwork_dirs)

    def hypernetworks(self):
        """A1111 /hypernetworks entries: name and path of the .pt files generation can use."""
        folder = self.hypernetwork_dir
        if folder is None:
            return []
        return [{"name": name, "path": str(path)} for name, path in HypernetworkLibrary(folder).paths().items()]

    def styles(self):
        """A1111's prompt styles: {name: (prompt, negative prompt)} from styles.csv in the models folders,
        read on every call (A1111 reloads the file too); the first definition of a name wins."""
        found = {}
        roots = self.sources + ([self.data.root] if self.data is not None else [])
        for source in roots:
            path = source / STYLES_NAME
            if path.is_file():
                for row in _read_styles(path):
                    found.setdefault(row[0], row[1:])
        return found

    def lora_names(self):
        """The names `<lora:name:...>` tags can use: file names without suffix, as a Pipeline finds them."""
        return {path.stem for path in _files(self.lora_dirs)}

    def loras(self):
        """A1111 /loras entries: name, alias, path, metadata (the safetensors header's metadata)."""
        out = []
        for path in _files(self.lora_dirs):
            meta = _safetensors_header(path).get("__metadata__", {}) if path.suffix == ".safetensors" else {}
            out.append({"name": path.stem, "alias": meta.get("ss_output_name", path.stem), "path": str(path),
                        "metadata": meta})
        return out

    def embeddings(self):
        """A1111 /embeddings shape: {"loaded": {name: {...}}, "skipped": {}}; shape/vectors read from headers."""
        loaded = {}
        for path in _files(self.embedding_dirs):
            shape, vectors = None, None
            if path.suffix == ".safetensors":
                tensors = {k: v["shape"] for k, v in _safetensors_header(path).items() if k != "__metadata__"}
                shapes = list(tensors.values())
                if {"clip_l", "clip_g"} <= set(tensors) and all(len(tensors[k]) == 2 for k in ("clip_l", "clip_g")):
                    # SDXL: one embedding with a part per text encoder; A1111 reports the summed width
                    vectors, shape = tensors["clip_l"][0], tensors["clip_l"][1] + tensors["clip_g"][1]
                elif shapes and len(shapes[0]) == 2:
                    vectors, shape = shapes[0]
            loaded[path.stem] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                 "shape": shape, "vectors": vectors}
        return {"loaded": loaded, "skipped": {}}


def _model_folders(source):
    if (source / MANIFEST_NAME).is_file():
        return [source]
    if source.is_dir():
        return sorted(p for p in source.iterdir() if (p / MANIFEST_NAME).is_file())
    log.warning("%s is neither a model folder nor a folder of models", source)
    return []


def _first_existing(dirs):
    return next((d for d in dirs if d.is_dir()), None)


def _read_styles(path):
    """styles.csv rows as (name, prompt, negative prompt); A1111's header: name,prompt,negative_prompt."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        log.warning("cannot read %s: %s", path, e)
        return []
    return [(row["name"], row.get("prompt") or "", row.get("negative_prompt") or "") for row in rows
            if row.get("name")]


def _files(dirs):
    d = _first_existing(dirs)  # the folder generation reads: the lists show what it can use
    if d is not None:
        yield from sorted(p for p in d.rglob("*") if p.suffix.lower() in ADAPTER_SUFFIXES and p.is_file())


def _safetensors_header(path):
    """The JSON header of a .safetensors file ({} when unreadable), without touching the tensors."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > 100 << 20:
                return {}
            return json.loads(f.read(size))
    except (OSError, ValueError) as e:
        log.warning("cannot read %s: %s", path, e)
        return {}
