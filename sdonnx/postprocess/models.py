"""Finding post-processing models by kind and name in a list of folders (A1111's models/ESRGAN,
models/RealESRGAN, models/SwinIR, models/GFPGAN, models/Codeformer, ...).

A folder may hold converted models (sub-folders with a post-processing `sdonnx.json`) and files not yet
converted (`.pth`, `.safetensors`, ...): both are listed, so that asking for an unconverted one says how
to convert it instead of "unknown name". A converted model hides the file it was made from.
"""
import logging
from dataclasses import dataclass
from pathlib import Path

from ..manifest import MANIFEST_NAME, ManifestError
from .manifest import FORMAT, load_postprocess_manifest, read_manifest_json

log = logging.getLogger(__name__)

MODEL_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")


class ModelNotFound(ValueError):
    """No model of that name; the message lists the names there are."""


class NotConverted(ValueError):
    """The model is there as a torch file that has not been converted yet; the message says how."""


@dataclass(frozen=True)
class Found:
    """One model in the folders: converted (folder + manifest) or a file waiting to be converted (source)."""

    name: str  # the name users choose it by
    kind: str
    folder: Path | None = None  # the converted model's folder
    manifest: object = None  # PostprocessManifest of a converted model
    source: Path | None = None  # the unconverted file

    @property
    def converted(self):
        return self.manifest is not None


def scan(folders, kind, naming=None):
    """Every model of `kind` in `folders` (missing folders are skipped): folder by folder, by name within one.

    Unconverted files are taken to be of `kind`: they sit in that kind's folders. naming(stem) -> the
    user-facing name of a model made from a file of that stem (default: the stem, as A1111)."""
    naming = naming or (lambda stem: stem)
    folders = [Path(f) for f in folders if f and Path(f).is_dir()]
    converted = {folder: [Found(naming(m.name), kind, folder=path, manifest=m) for m, path in _converted(folder, kind)]
                 for folder in folders}
    made_from = {Path(f.manifest.source.get("file", f.manifest.name)).stem for found in converted.values() for f in found}
    found = {}
    for folder in folders:
        files = [Found(naming(p.stem), kind, source=p) for p in folder.iterdir()
                 if p.is_file() and p.suffix.lower() in MODEL_FILE_SUFFIXES and p.stem not in made_from]
        for model in sorted(converted[folder] + files, key=lambda f: (f.name.lower(), not f.converted)):
            found.setdefault(model.name, model)
    return list(found.values())


def _converted(folder, kind):
    """(manifest, folder) of the converted models of `kind` in `folder` and its direct sub-folders."""
    for path in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if not (path / MANIFEST_NAME).is_file():
            continue
        try:
            raw = read_manifest_json(path)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("kind") != kind:
                continue
            yield load_postprocess_manifest(path, kind), path
        except ManifestError as e:  # one damaged folder must not hide the others
            log.warning("skipping %s: %s", path, e)


def find(folders, kind, name, naming=None, what=None):
    """The converted model `name` of `kind` -> Found; ModelNotFound naming the choices, or NotConverted
    saying which command converts it."""
    what = what or kind.replace("_", " ")
    models = scan(folders, kind, naming)
    for model in models:
        if model.name == name:
            if not model.converted:
                raise NotConverted(convert_hint(model.source, what, name))
            return model
    listed = ", ".join(m.name for m in models) or "none installed"
    searched = ", ".join(str(f) for f in folders if f) or "no folders"
    raise ModelNotFound(f"unknown {what} {name!r}; available: {listed} (searched {searched})")


def convert_hint(source, what, name):
    """The message for a model that is there but not converted."""
    target = Path(source).with_suffix("")
    return (f"{what} {name!r} ({source}) is not converted yet; convert it once with "
            f"`sdonnx convert \"{source}\" -o \"{target}\"`")
