"""External VAEs as A1111 selects them (`--vae`, the `sd_vae` setting): a file in models/VAE or MODEL.vae.* beside
a checkpoint, converted once on its own (sdonnx/cache.py, kind "vae") and used by every model of its latent space.

Why the runtime swaps graphs instead of converting a model per VAE: a VAE's graphs are a tenth of an SD 1.x model
and the same for every model of the family, so one converted copy per VAE file serves all models (N + M
conversions instead of N x M, and no model copy per choice); a request can change the VAE without touching the
model, as A1111's setting does. The model's manifest keeps naming its own VAE graphs; a converted VAE folder
carries `vae.json` naming its decoder and encoder graphs with the same I/O contract, and the Pipeline opens those
in place of the model's (sdonnx/pipeline.py `_component`). The model's latent scaling factor stays the model's:
A1111 applies the checkpoint's, whatever VAE decodes.

Which latent space a VAE file is for is not in its weights (SD 1.x/2.x and SDXL VAEs have the same layers), so it
is read from, in order: safetensors metadata `modelspec.architecture`; the checkpoint it sits beside
(MODEL.vae.*); the file name (`xl` in it: sdxl_vae, sdxl-vae-fp16-fix, ...). An SD 1.x VAE on SDXL decodes to
noise in A1111; here it is refused with the reason.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

VAE_MANIFEST = "vae.json"
VAE_FORMAT = "sdonnx-vae"
AUTOMATIC, NONE = "Automatic", "None"
# latent spaces: the models whose latents a VAE decodes, as A1111's families
LATENT_SPACES = {"sd": ("sd1", "sd2"), "sdxl": ("sdxl", "sdxl_refiner")}
SPACE_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}


def latent_space(family):
    return next(space for space, families in LATENT_SPACES.items() if family in families)


@dataclass(frozen=True)
class VaeManifest:
    """vae.json: the converted VAE's graphs (manifest.Component, the same contract as a model's VAE graphs)."""

    name: str
    family: str  # latent space: "sd" or "sdxl"
    latent_channels: int
    vae_scale_factor: int
    components: dict


@dataclass(frozen=True)
class ExternalVae:
    """A VAE file chosen for a generate call, and its converted folder."""

    name: str  # A1111's name: the file name (infotext `VAE`)
    source: Path
    sha256: str  # infotext `VAE hash`: its first 10 hex
    folder: Path
    manifest: VaeManifest


def load_vae_folder(folder):
    """Read and check a converted VAE folder's vae.json; ValueError naming what is wrong."""
    from .manifest import Component, ManifestError, _build, _check_component, read_manifest_json

    path = Path(folder) / VAE_MANIFEST
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} is not a converted VAE (no {VAE_MANIFEST})")
    data = read_manifest_json(path)
    if not isinstance(data, dict) or data.get("format") != VAE_FORMAT:
        raise ManifestError(f"{path} is not a converted VAE ({VAE_FORMAT})")
    components = {}
    for name in ("vae_decoder", "vae_encoder"):
        components[name] = _build(Component, data.get("components", {}).get(name), f"{path}: {name}")
        _check_component(components[name], name)
        if not (Path(folder) / components[name].path).is_file():
            raise ManifestError(f"{folder}: {components[name].path} is missing; convert the VAE again")
    if data.get("family") not in LATENT_SPACES:
        raise ManifestError(f"{path}: family {data.get('family')!r} is not one of {', '.join(LATENT_SPACES)}")
    return VaeManifest(str(data.get("name")), data["family"], int(data.get("latent_channels", 4)),
                       int(data.get("vae_scale_factor", 8)), components)


def vae_family(path, beside_family=None):
    """The latent space ("sd" or "sdxl") a VAE file is for (see the module's docstring for the order)."""
    architecture = _metadata(path).get("modelspec.architecture", "").lower()
    if architecture:
        return "sdxl" if "xl" in architecture else "sd"
    if beside_family is not None:
        return latent_space(beside_family)
    return "sdxl" if re.search(r"xl", Path(path).name, re.I) else "sd"


def check_space(family, name, model_manifest):
    """ValueError with the reason when a VAE of latent space `family` cannot decode the model's latents."""
    space = latent_space(model_manifest.family)
    if family != space:
        raise ValueError(f"VAE {name} is an {SPACE_NAMES[family]} VAE; {model_manifest.name} is an "
                         f"{SPACE_NAMES[space]} model ({model_manifest.family}), whose latents it cannot decode (they "
                         f"are scaled and distributed differently): choose an {SPACE_NAMES[space]} VAE, Automatic "
                         f"or None")


def check_fits(vae_manifest, name, model_manifest):
    """ValueError with the reason when the converted VAE cannot decode the model's latents."""
    check_space(vae_manifest.family, name, model_manifest)
    if (vae_manifest.latent_channels, vae_manifest.vae_scale_factor) != (model_manifest.latent_channels,
                                                                         model_manifest.vae_scale_factor):
        raise ValueError(f"VAE {name} has {vae_manifest.latent_channels} latent channels at 1/"
                         f"{vae_manifest.vae_scale_factor}; {model_manifest.name} needs "
                         f"{model_manifest.latent_channels} at 1/{model_manifest.vae_scale_factor}")


def find_vae_file(value, checkpoint, data):
    """The VAE file `value` selects, as A1111's sd_vae: None/"None" -> None (the model's own); "Automatic" ->
    the VAE whose name starts with the checkpoint's file name (MODEL.vae.safetensors beside it), else None; a
    path; or a name from the data folder's VAEs. Returns (path, family hint) or None; ValueError naming the
    choices for an unknown name."""
    if value in (None, "", AUTOMATIC, "auto"):
        return _beside(checkpoint, data)
    if value == NONE:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path, None
    available = data.vaes() if data is not None else {}
    if value in available:
        return available[value], None
    choices = ", ".join([AUTOMATIC, NONE, *available]) if data is not None else \
        f"{AUTOMATIC}, {NONE} or a VAE file (--data-dir lists the VAEs of an A1111 install)"
    raise ValueError(f"VAE {value!r} not found; choose {choices}")


def _beside(checkpoint, data):
    """A1111's "found near the checkpoint": a VAE whose file name starts with the checkpoint's (MODEL.vae.pt,
    MODEL.vae.ckpt, MODEL.vae.safetensors beside it, or one of that name in models/VAE)."""
    if checkpoint is None:
        return None
    stem = Path(checkpoint).name.rsplit(".", 1)[0]
    candidates = dict(data.vaes()) if data is not None else {}
    for suffix in (".vae.pt", ".vae.ckpt", ".vae.safetensors"):
        path = Path(checkpoint).with_name(stem + suffix)
        if path.is_file():
            candidates.setdefault(path.name, path)
    for name, path in candidates.items():
        if name.startswith(stem):
            return path, "beside"
    return None


def _metadata(path):
    """A .safetensors header's metadata ({} otherwise)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > 100 << 20:
                return {}
            meta = json.loads(f.read(size)).get("__metadata__", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def load_external_vae(path, model_manifest, data=None, beside=None, progress=None):
    """The ExternalVae for a VAE file: converted on first use into the conversion cache (kind "vae": one
    copy per file, shared by every model), checked to decode this model's latents."""
    from .datadir import model_cache

    cache = model_cache(data)
    family = vae_family(path, model_manifest.family if beside else None)
    check_space(family, Path(path).name, model_manifest)  # before any convert
    sha256 = cache.hashes.sha256(path)
    folder = cache.get("vae", path, {"family": family}, progress, sha256=sha256)
    manifest = load_vae_folder(folder)
    check_fits(manifest, Path(path).name, model_manifest)
    return ExternalVae(Path(path).name, Path(path), sha256, folder, manifest)
