"""The manifest of a converted post-processing model (`sdonnx.json` in its folder): upscalers, face
restorers, face detectors and face parsers.

One ONNX graph per folder. The manifest says what the runtime must know to feed it and read it back:
its kind, architecture, scale, input layout, channel order and value range, fixed input size (graphs
traced at one size: SwinIR tiles, 512x512 face nets) and tile limits, plus kind-specific facts (`facts`).
Written by converters/postprocess (last, so a folder without it is not a model); read here without torch.
"""
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..manifest import (MANIFEST_NAME, ManifestError, ModelFileError, _build, _check_path, _check_text, _kind,
                        read_manifest_json as read_json)

FORMAT = "sdonnx-postprocess"
FORMAT_VERSION = 1
KINDS = ("upscaler", "face_restorer", "face_detector", "face_parser")
CHANNEL_ORDERS = ("RGB", "BGR")
LAYOUTS = ("NCHW",)
MAX_SCALE = 16


class PostprocessManifestError(ManifestError):
    """The folder is not a converted post-processing model, or its manifest is unusable."""


TILING_MODES = ("blend", "average")


@dataclass
class Tiling:
    """How the graph may be run in tiles. size: the one input size a fixed-size graph takes (None: any
    size); multiple: input sides must be multiples of it; default/overlap: the tile and overlap used
    when the caller does not choose (A1111's ESRGAN_tile and ESRGAN_tile_overlap: 192 and 8); mode: how
    A1111 joins the tiles of this architecture: "blend" (8-bit tiles pasted with linear ramps, ESRGAN
    family) or "average" (float tiles summed and divided by their count, after padding the image to the
    multiple by mirroring: SwinIR)."""

    size: int | None = None
    multiple: int = 1
    default: int = 192
    overlap: int = 8
    mode: str = "blend"


@dataclass
class PostprocessManifest:
    kind: str  # one of KINDS
    name: str  # the source file's stem: how A1111 names the model (upscalers map a few to built-in names)
    architecture: str  # "ESRGAN", "RealESRGAN-compact", "SwinIR", "GFPGAN", ...
    graph: str  # the ONNX file, relative to the folder
    inputs: dict  # {input name: [dimension name or null per axis]}; the first input is the image
    outputs: dict  # {output name: [...]}; the first output is the image (or the kind's main result)
    scale: int = 1  # output side / input side of the image
    channel_order: str = "RGB"  # of the image input and output
    value_range: list = field(default_factory=lambda: [0.0, 1.0])  # pixel values [black, white] in and out
    layout: str = "NCHW"
    input_size: list | None = None  # [H, W] the graph was traced at, when it takes no other size
    tiling: Tiling = field(default_factory=Tiling)
    parity_max_abs_err: float | None = None  # the graph against its torch module at convert time
    parity_tolerance: float | None = None
    source: dict = field(default_factory=dict)  # {"file": name, "sha256": ..., "bytes": ...}
    facts: dict = field(default_factory=dict)  # kind-specific: architecture hyperparameters, templates, ...
    converter: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def image_input(self):
        return next(iter(self.inputs))

    @property
    def image_output(self):
        return next(iter(self.outputs))

    def to_json(self):
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise PostprocessManifestError(f"the manifest must be a JSON object, got {_kind(data)}")
        if data.get("format") != FORMAT:
            raise PostprocessManifestError(f"not a post-processing model manifest (format {data.get('format')!r}, "
                                           f"expected {FORMAT!r})")
        version = data.get("format_version", 0)
        if type(version) is not int or version > FORMAT_VERSION:
            raise PostprocessManifestError(f"manifest format {version!r} is not one this sdonnx understands "
                                           f"({FORMAT_VERSION}); upgrade sdonnx or convert the model again")
        data = dict(data)
        data["tiling"] = _build(Tiling, data.get("tiling", {}), "tiling")
        manifest = _build(cls, data, "the manifest")
        manifest.validate()
        return manifest

    def validate(self):
        """Types and values of every field; a hand-edited or hostile manifest is refused naming the field."""
        try:
            _validate(self)
        except PostprocessManifestError:
            raise
        except ManifestError as e:
            raise PostprocessManifestError(str(e)) from None


def _validate(m):
    if m.kind not in KINDS:
        raise PostprocessManifestError(f"kind {m.kind!r}: expected one of {', '.join(KINDS)}")
    for name in ("name", "architecture"):
        _check_text(getattr(m, name), name)
        if not getattr(m, name):
            raise PostprocessManifestError(f"{name} is empty")
    _check_path(m.graph, "graph")
    for name in ("inputs", "outputs"):
        _check_io(getattr(m, name), name)
    _whole(m.scale, "scale", 1, MAX_SCALE)
    if m.channel_order not in CHANNEL_ORDERS:
        raise PostprocessManifestError(f"channel_order {m.channel_order!r}: expected one of {', '.join(CHANNEL_ORDERS)}")
    if m.layout not in LAYOUTS:
        raise PostprocessManifestError(f"layout {m.layout!r}: expected one of {', '.join(LAYOUTS)}")
    if (not isinstance(m.value_range, list) or len(m.value_range) != 2
            or not all(_finite(v) for v in m.value_range) or not m.value_range[0] < m.value_range[1]):
        raise PostprocessManifestError(f"value_range must be [low, high] with low < high, got {m.value_range!r}")
    if m.input_size is not None:
        if not isinstance(m.input_size, list) or len(m.input_size) != 2:
            raise PostprocessManifestError(f"input_size must be [height, width] or null, got {m.input_size!r}")
        for side in m.input_size:
            _whole(side, "input_size", 1, 1 << 14)
    _check_tiling(m.tiling)
    for name in ("parity_max_abs_err", "parity_tolerance"):
        if getattr(m, name) is not None and not _finite(getattr(m, name)):
            raise PostprocessManifestError(f"{name} must be a number or null")
    for name in ("source", "facts", "converter"):
        if not isinstance(getattr(m, name), dict):
            raise PostprocessManifestError(f"{name} must be an object, got {_kind(getattr(m, name))}")


def _check_io(io, name):
    if not isinstance(io, dict) or not io:
        raise PostprocessManifestError(f"{name} must be a non-empty object of tensor names")
    for tensor, dims in io.items():
        if not isinstance(dims, list) or not all(d is None or isinstance(d, (str, int)) for d in dims):
            raise PostprocessManifestError(f"{name}.{tensor}: the dimensions must be a list of names, sizes or nulls")


def _check_tiling(t):
    if t.size is not None:
        _whole(t.size, "tiling.size", 1, 1 << 14)
    _whole(t.multiple, "tiling.multiple", 1, 1 << 10)
    _whole(t.default, "tiling.default", 0, 1 << 14)
    _whole(t.overlap, "tiling.overlap", 0, 1 << 12)
    if t.mode not in TILING_MODES:
        raise PostprocessManifestError(f"tiling.mode {t.mode!r}: expected one of {', '.join(TILING_MODES)}")


def _whole(value, name, low, high):
    if type(value) is not int or not low <= value <= high:
        raise PostprocessManifestError(f"{name} must be a whole number from {low} to {high}, "
                                       f"got {value if type(value) is int else _kind(value)}")


def _finite(value):
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def read_manifest_json(folder):
    """The raw JSON object of folder/sdonnx.json (size-limited), or a PostprocessManifestError."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise PostprocessManifestError(f"{str(folder)!r} is not a converted model folder (no {MANIFEST_NAME})")
    return read_json(path, PostprocessManifestError)


def load_postprocess_manifest(folder, kind=None):
    """Read and validate folder/sdonnx.json of a post-processing model (of `kind` when given) and check
    that its graph is there; raises PostprocessManifestError naming the file and what is wrong."""
    folder = Path(folder)
    try:
        manifest = PostprocessManifest.from_dict(read_manifest_json(folder))
    except ManifestError as e:
        raise PostprocessManifestError(f"{folder / MANIFEST_NAME}: {e}") from None
    if kind is not None and manifest.kind != kind:
        raise PostprocessManifestError(f"{folder} holds a model of kind {manifest.kind!r}, not {kind!r}")
    if not (folder / manifest.graph).is_file():
        raise ModelFileError(f"{folder}: {manifest.graph} named by {MANIFEST_NAME} is missing; convert the model again")
    return manifest
