"""A converted ControlNet: its manifest (`sdonnx.json` with format "sdonnx-controlnet"), its ONNX graph and the
folder of them that units name models from (`models/ControlNet`, the extension's folder).

The graph takes the UNet's own inputs plus the control image and gives the residuals that the UNet adds to its
skip connections (`down_block_res_0`, ...) and to its middle block's output (`mid_block_res`), unscaled: the
unit's weight, soft injection, cond-only control and global average pooling are applied in numpy
(`controlnet.apply`), as sd-webui-controlnet applies them in its UNet hook.
"""
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..limits import MAX_MANIFEST_BYTES
from ..manifest import (MANIFEST_NAME, Component, ManifestError, ModelFileError, _build, _check_component, _check_count,
                        read_manifest_json)

log = logging.getLogger(__name__)

FORMAT = "sdonnx-controlnet"
FORMAT_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl")
CONTROL_IMAGE_INPUT = "controlnet_cond"
MID_RESIDUAL = "mid_block_res"
# what a ControlNet file may be called in models/ControlNet before it is converted
SOURCE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def down_residual(i):
    """Name of the i-th skip-connection residual (conv_in's output is 0), a ControlNet output and a UNet input."""
    return f"down_block_res_{i}"


def residual_names(count):
    """The names of `count` residuals in the order the ControlNet gives them: the skips, then the middle block."""
    return [down_residual(i) for i in range(count - 1)] + [MID_RESIDUAL]


class ControlNetError(ValueError):
    """A ControlNet unit that cannot run: unknown model, a model for another family, a damaged folder."""


@dataclass
class ControlNetManifest:
    """What the runtime knows about a converted ControlNet."""

    name: str
    family: str  # the base model family it was trained on: sd1, sd2 or sdxl
    graph: Component
    residuals: int  # skip-connection residuals + the middle block's (SD 1.x/2.x: 13, SDXL: 10)
    context_dim: int  # width of encoder_hidden_states
    latent_channels: int = 4
    conditioning_channels: int = 3
    # the extension's global_average_pooling (shuffle models): residuals averaged over space, cond rows only
    global_average_pooling: bool = False
    model_hash: str | None = None  # A1111's short hash of the source file, shown as "name [hash]"
    source: dict = field(default_factory=dict)
    converter: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def title(self):
        """The extension's model-list name: "name [hash]"."""
        return f"{self.name} [{self.model_hash}]" if self.model_hash else self.name

    @property
    def outputs(self):
        return residual_names(self.residuals)

    def to_json(self):
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ManifestError(f"not an sdonnx ControlNet (format {found!r})")
        if type(data.get("format_version")) is not int or data["format_version"] > FORMAT_VERSION:
            raise ManifestError(f"ControlNet format {data.get('format_version')!r} is not one this sdonnx reads "
                                f"(1 to {FORMAT_VERSION}); upgrade sdonnx")
        data = dict(data)
        data["graph"] = _build(Component, data.get("graph"), "graph")
        manifest = _build(cls, data, "the ControlNet manifest")
        manifest.validate()
        return manifest

    def validate(self):
        if not isinstance(self.name, str):
            raise ManifestError("name must be a string")
        if self.family not in FAMILIES:
            raise ManifestError(f"family {self.family!r}: expected one of {', '.join(FAMILIES)}")
        for name, top in (("residuals", 64), ("context_dim", 1 << 16), ("latent_channels", 64),
                          ("conditioning_channels", 64)):
            _check_count(getattr(self, name), name, top)
        if not isinstance(self.global_average_pooling, bool):
            raise ManifestError("global_average_pooling must be true or false")
        _check_component(self.graph, "graph")
        if list(self.graph.outputs) != self.outputs:
            raise ManifestError(f"graph outputs {list(self.graph.outputs)} are not the {self.residuals} residuals "
                                f"{self.outputs[0]} ... {self.outputs[-1]}")


def load_controlnet_manifest(folder):
    """Read and check folder/sdonnx.json of a converted ControlNet; ManifestError / ModelFileError name the
    problem."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} is not a converted ControlNet (no {MANIFEST_NAME}); convert it first "
                            f"with `sdonnx convert CONTROLNET_FILE -o {folder}`")
    data = read_manifest_json(path)
    try:
        manifest = ControlNetManifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    if not (folder / manifest.graph.path).is_file():
        raise ModelFileError(f"{folder}: {manifest.graph.path} named by {MANIFEST_NAME} is missing; convert the "
                             f"ControlNet again")
    return manifest


def is_controlnet_folder(folder):
    """Whether `folder` holds a converted ControlNet (its manifest says so; nothing else is checked)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return path.stat().st_size <= MAX_MANIFEST_BYTES and json.loads(path.read_text("utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def check_fits(manifest, model):
    """The ControlNet can steer this model (a Manifest): same family, context width and latent channels."""
    family = "sdxl" if model.family in ("sdxl", "sdxl_refiner") else model.family
    if model.family == "sdxl_refiner":
        raise ControlNetError(f"ControlNet {manifest.name}: the SDXL refiner takes no ControlNet (the extension "
                              f"applies units to the base model only)")
    if manifest.family != family:
        raise ControlNetError(f"ControlNet {manifest.name} is a {manifest.family} model; {model.name} is {model.family}:"
                              f" choose a ControlNet made for {family}")
    widths = sum(t.hidden_size for t in model.text_encoders) if model.has_added_conditions else \
        model.text_encoders[0].hidden_size
    if manifest.context_dim != widths or manifest.latent_channels != model.latent_channels:
        raise ControlNetError(f"ControlNet {manifest.name} takes {manifest.context_dim}-wide text and "
                              f"{manifest.latent_channels} latent channels; {model.name} gives {widths} and "
                              f"{model.latent_channels}: it was made for another model")


class ControlNetModel:
    """A converted ControlNet folder: manifest now, session on first call."""

    def __init__(self, folder, plan, manifest=None):
        self.folder = Path(folder)
        self.manifest = manifest or load_controlnet_manifest(folder)
        self.plan = plan
        self._session = None

    @property
    def session(self):
        if self._session is None:
            from ..runtime.session import Session

            g = self.manifest.graph
            self._session = Session(self.folder / g.path, self.plan, name=f"controlnet {self.manifest.name}",
                                    dims=g.inputs)
        return self._session

    def release(self):
        """Drop the session (lowmem: the ControlNet is freed between stages); the next call makes it again."""
        self._session = None

    def __call__(self, sample, timestep, context, image, **added):
        """sample: [B, C, h, w] (already scaled by c_in), timestep: [B], context: [B, T, D], image: [B, 3, 8h,
        8w] in [0, 1] (inpaint: -1 where masked) -> [residual, ...] in `manifest.outputs` order, unscaled."""
        feeds = {"sample": sample, "timestep": np.asarray(timestep, np.float32).reshape(-1),
                 "encoder_hidden_states": context, CONTROL_IMAGE_INPUT: image, **added}
        out = self.session.run(feeds, steady=("encoder_hidden_states", CONTROL_IMAGE_INPUT, *added))
        return [out[name] for name in self.manifest.outputs]


@dataclass(frozen=True)
class Library:
    """The ControlNet folder(s) a pipeline takes unit models from: converted ControlNet folders by name, or
    "name [hash]" as the extension lists them; a unit may also name a folder path."""

    folders: tuple
    cache: object = None  # sdonnx.cache.ConversionCache (--data-dir): ControlNet files are converted on first use

    def models(self):
        """{name: folder} of the converted ControlNets found, sorted by name (first folder wins)."""
        found = {}
        for root in self.folders:
            root = Path(root)
            if root.is_dir():
                for child in sorted(root.iterdir()):
                    if child.is_dir() and is_controlnet_folder(child):
                        found.setdefault(child.name, child)
        return found

    def titles(self):
        """The extension's model list: "name [hash]" of every converted ControlNet."""
        out = []
        for name, folder in self.models().items():
            try:
                out.append(load_controlnet_manifest(folder).title)
            except ManifestError as e:
                log.warning("skipping ControlNet %s: %s", folder, e)
        return out

    def find(self, name):
        """The folder of the ControlNet a unit names: a folder path, a name, or "name [hash]" (the hash is the
        extension's decoration; a name alone is enough). ControlNetError names what exists."""
        text = str(name).strip()
        path = Path(text)
        if path.is_dir():
            return path
        models = self.models()
        bare = text.rsplit(" [", 1)[0] if text.endswith("]") else text
        for candidate in (text, bare, Path(bare).stem):
            if candidate in models:
                return models[candidate]
        source = self._unconverted(bare)
        if source is not None and self.cache is not None:
            return self.cache.get("controlnet", source)
        raise ControlNetError(self._not_found(text, bare, models))

    def _unconverted(self, bare):
        """The ControlNet file of that name not converted yet (models/ControlNet/NAME.pth, ...), or None."""
        found = [p for root in self.folders if Path(root).is_dir() for p in sorted(Path(root).iterdir())
                 if p.is_file() and p.suffix.lower() in SOURCE_SUFFIXES and p.stem == Path(bare).stem]
        return found[0] if found else None

    def _not_found(self, text, bare, models):
        where = ", ".join(str(f) for f in self.folders) or "no folder"
        src = self._unconverted(bare)
        if src is not None:
            return (f"ControlNet {text!r}: {src} is not converted yet; run `sdonnx convert {src} -o "
                    f"{src.with_suffix('')}` once")
        listed = ", ".join(models) if models else "none converted"
        return f"ControlNet model {text!r} not found in {where}; available: {listed}"
