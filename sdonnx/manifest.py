"""The model folder's manifest (`sdonnx.json`): the only source of model facts for the runtime.

Written by the converter (last, so a folder without it is not a model) and read here without torch.
"""
import json
import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath, PureWindowsPath

from .diffusion.sigmas import BETA_SCHEDULES
from .limits import MAX_MANIFEST_BYTES

MANIFEST_NAME = "sdonnx.json"
FORMAT = "sdonnx"
FORMAT_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
PREDICTIONS = ("epsilon", "v_prediction")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


class ManifestError(ValueError):
    """The folder is not an sdonnx model, or its manifest is unusable."""


class ModelFileError(ManifestError):
    """A file the manifest names (graph, its data, tokenizer, token embeddings) is missing or damaged."""


def relative_path(path, folder):
    """How the manifest names a file in the model folder: relative, with "/" whichever OS converted the
    model (a Windows-made "unet\\model.onnx" is one odd file name on Linux)."""
    return path.relative_to(folder).as_posix()


@dataclass
class NoiseSchedule:
    """The training noise schedule (diffusers scheduler config terms)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    num_train_timesteps: int = 1000


@dataclass
class TextEncoderInfo:
    """One CLIP text encoder and its tokenizer."""

    component: str = "text_encoder"
    tokenizer: str = "tokenizer/tokenizer.json"
    token_embeddings: str = "text_encoder/token_embeddings.safetensors"  # [vocab, hidden], key "weight"
    hidden_size: int = 768
    num_layers: int = 12
    max_length: int = 77
    bos_id: int = 49406
    eos_id: int = 49407
    pad_id: int = 49407
    # which hidden state conditions the UNet: None = the last layer's, final layer norm applied (clip skip N
    # reads hidden_states_normed[-N]); an index = the raw output hidden_states[index] (SDXL: -2, no final
    # layer norm; clip skip does not apply, as in A1111)
    hidden_layer: int | None = None
    pooled: str | None = None  # graph output whose vector the UNet also takes (SDXL: "text_embeds"), if any


@dataclass
class Component:
    """One ONNX graph: its file, I/O contract, weight-name map and parity result."""

    path: str
    inputs: dict
    outputs: dict
    input_dtypes: dict = field(default_factory=dict)
    dtype: str = "fp32"
    weights: dict = field(default_factory=dict)  # checkpoint (diffusers) weight name -> ONNX initializer
    parity_max_abs_err: float | None = None
    # a faster graph derived from `path` (fused, fp16 or int8: converters/optimize.py), run when no LoRA is
    # active; `path` stays the fp32 graph that `weights` names (LoRA merges, the fp16 VAE's fp32 fallback)
    optimized_path: str | None = None
    optimized: dict = field(default_factory=dict)  # target, dtype, quantize, fused op counts, parity error
    # more graphs derived from `path`, by the precision they run in ({"int8": {"path": ..., how it was made,
    # its measured cost}}: the static QDQ UNet of `sdonnx quantize`), chosen with Pipeline.load(precision=)
    variants: dict = field(default_factory=dict)

    @property
    def optimized_dtype(self):
        return self.optimized.get("dtype", self.dtype) if self.optimized_path else self.dtype


@dataclass
class Manifest:
    name: str
    family: str
    prediction_type: str
    components: dict
    text_encoders: list
    noise_schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    latent_channels: int = 4
    unet_in_channels: int = 4
    vae_scale_factor: int = 8
    vae_scaling_factor: float = 0.18215
    sample_size: int = 64  # latent size the UNet was trained at: native image size = sample_size * vae_scale_factor
    # SDXL's added UNet conditions: time ids are (h, w) original size, (top, left) crop, then (h, w) target
    # size, or the aesthetic score instead of the target size when requires_aesthetics_score (the refiner)
    addition_time_embed_dim: int | None = None
    requires_aesthetics_score: bool = False
    force_zeros_for_empty_prompt: bool = False  # an empty negative prompt conditions as zeros (SDXL, A1111 too)
    model_hash: str | None = None
    source: dict = field(default_factory=dict)
    converter: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def native_size(self):
        return self.sample_size * self.vae_scale_factor

    @property
    def has_added_conditions(self):
        """The UNet takes pooled text embeddings and time ids besides the context (SDXL)."""
        return "time_ids" in self.components["unet"].inputs

    @property
    def is_sdxl(self):
        """An SDXL base or refiner (A1111's `is_sdxl`: it picks SDXL's Align Your Steps table)."""
        return self.family in ("sdxl", "sdxl_refiner")

    @property
    def is_inpaint(self):
        return self.unet_in_channels == 2 * self.latent_channels + 1

    def to_json(self):
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data):
        if not isinstance(data, dict):
            raise ManifestError(f"the manifest must be a JSON object, got {_kind(data)}")
        if data.get("format") == "sdonnx-controlnet":
            raise ManifestError("this folder holds a ControlNet: name it in a ControlNet unit (controlnet=, "
                                "--controlnet), not as the model")
        if data.get("format") == "sdonnx-postprocess":  # sdonnx/postprocess/manifest.py's
            raise ManifestError(f"this is a converted {str(data.get('kind', 'post-processing')).replace('_', ' ')} "
                                f"model, not a Stable Diffusion model (upscalers are used by name: --upscaler, "
                                f"--hires-upscaler)")
        if data.get("format") != FORMAT:
            raise ManifestError(f"not an sdonnx manifest (format {data.get('format')!r})")
        version = data.get("format_version", 0)
        if type(version) is not int:
            raise ManifestError(f"format_version must be a whole number, got {_kind(version)}")
        if version > FORMAT_VERSION:
            raise ManifestError(f"manifest format {version} is newer than this sdonnx understands ({FORMAT_VERSION}); "
                                f"upgrade sdonnx")
        data = dict(data)
        data["noise_schedule"] = _build(NoiseSchedule, data.get("noise_schedule", {}), "noise_schedule")
        encoders = data.get("text_encoders")
        if not isinstance(encoders, list):
            raise ManifestError(f"text_encoders must be a list, got {_kind(encoders)}")
        data["text_encoders"] = [_build(TextEncoderInfo, t, f"text_encoders[{i}]") for i, t in enumerate(encoders)]
        components = data.get("components")
        if not isinstance(components, dict):
            raise ManifestError(f"components must be an object, got {_kind(components)}")
        data["components"] = {k: _build(Component, v, f"components.{k}") for k, v in components.items()}
        manifest = _build(cls, data, "the manifest")
        manifest.validate()
        return manifest

    def validate(self):
        """Every field has its type and a usable value, every file it names lies inside the folder: a
        hand-edited or hostile manifest is refused here, naming the field, not deep inside a run."""
        _check_text(self.name, "name")
        if self.family not in FAMILIES:
            raise ManifestError(f"family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        if self.prediction_type not in PREDICTIONS:
            raise ManifestError(f"prediction type {self.prediction_type!r}: expected one of {', '.join(PREDICTIONS)}")
        for name, top in _COUNTS.items():
            _check_count(getattr(self, name), name, top)
        _check_number(self.vae_scaling_factor, "vae_scaling_factor", low=0.0)
        if self.addition_time_embed_dim is not None:
            _check_count(self.addition_time_embed_dim, "addition_time_embed_dim", 1 << 16)
        for name in ("requires_aesthetics_score", "force_zeros_for_empty_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ManifestError(f"{name} must be true or false, got {_kind(getattr(self, name))}")
        if self.model_hash is not None:
            _check_text(self.model_hash, "model_hash")
        _check_schedule(self.noise_schedule)
        if not self.text_encoders:
            raise ManifestError("text_encoders is empty: a model needs at least one text encoder")
        for i, info in enumerate(self.text_encoders):
            _check_text_encoder(info, f"text_encoders[{i}]")
        for name, component in self.components.items():
            _check_component(component, f"components.{name}")
        needed = [t.component for t in self.text_encoders] + ["unet", "vae_decoder"]
        missing = [c for c in needed if c not in self.components]
        if missing:
            raise ManifestError(f"manifest lacks the component(s) {', '.join(missing)}")

    def files(self):
        """The files this manifest names, relative to the model folder."""
        named = [p for c in self.components.values() for p in (c.path, c.optimized_path) if p]
        named += [v["path"] for c in self.components.values() for v in c.variants.values()]
        return named + [p for t in self.text_encoders for p in (t.tokenizer, t.token_embeddings)]


# integer fields and their largest sensible value (0 is never one: a scale factor of 0 divides by zero)
_COUNTS = {"latent_channels": 64, "unet_in_channels": 256, "vae_scale_factor": 64, "sample_size": 1024}


def _kind(value):
    """A JSON value's type in JSON's words, for messages."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _check_text(value, name):
    if not isinstance(value, str):
        raise ManifestError(f"{name} must be a string, got {_kind(value)}")


def _check_count(value, name, top):
    if type(value) is not int or not 1 <= value <= top:
        shown = value if type(value) is int else _kind(value)
        raise ManifestError(f"{name} must be a whole number from 1 to {top}, got {shown}")


def _check_number(value, name, low, high=math.inf):
    """A finite real number with low < value < high."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ManifestError(f"{name} must be a finite number, got {_kind(value) if not isinstance(value, float) else value}")
    if not low < value < high:
        raise ManifestError(f"{name} must be above {low}{f' and below {high}' if high < math.inf else ''}, got {value}")


def _check_path(value, name):
    """A relative path inside the model folder ("/"-separated, as the converter writes it)."""
    _check_text(value, name)
    parts = re.split(r"[\\/]", value)
    if not value or PurePosixPath(value).is_absolute() or PureWindowsPath(value).anchor or ".." in parts:
        raise ManifestError(f"{name} {value!r} is not a path inside the model folder")


def _check_schedule(ns):
    if not isinstance(ns, NoiseSchedule):
        raise ManifestError("noise_schedule must be an object")
    _check_number(ns.beta_start, "noise_schedule.beta_start", 0.0, 1.0)
    _check_number(ns.beta_end, "noise_schedule.beta_end", 0.0, 1.0)
    if ns.beta_schedule not in BETA_SCHEDULES:
        raise ManifestError(f"noise_schedule.beta_schedule {ns.beta_schedule!r}: expected one of "
                            f"{', '.join(BETA_SCHEDULES)}")
    _check_count(ns.num_train_timesteps, "noise_schedule.num_train_timesteps", 10_000)


def _check_text_encoder(info, where):
    if info.component not in COMPONENTS or not info.component.startswith("text_encoder"):
        raise ManifestError(f"{where}.component {info.component!r}: expected text_encoder or text_encoder_2")
    _check_path(info.tokenizer, f"{where}.tokenizer")
    _check_path(info.token_embeddings, f"{where}.token_embeddings")
    for name, top in (("hidden_size", 1 << 16), ("num_layers", 1024), ("max_length", 4096)):
        _check_count(getattr(info, name), f"{where}.{name}", top)
    for name in ("bos_id", "eos_id", "pad_id"):
        if type(getattr(info, name)) is not int or getattr(info, name) < 0:
            raise ManifestError(f"{where}.{name} must be a token id (a whole number from 0)")
    if info.hidden_layer is not None and type(info.hidden_layer) is not int:
        raise ManifestError(f"{where}.hidden_layer must be a whole number or null, got {_kind(info.hidden_layer)}")
    if info.pooled is not None:
        _check_text(info.pooled, f"{where}.pooled")


def _check_component(c, where):
    _check_path(c.path, f"{where}.path")
    if c.optimized_path is not None:
        _check_path(c.optimized_path, f"{where}.optimized_path")
    for name in ("inputs", "outputs", "input_dtypes", "weights", "optimized", "variants"):
        if not isinstance(getattr(c, name), dict):
            raise ManifestError(f"{where}.{name} must be an object, got {_kind(getattr(c, name))}")
    for name, dims in (*c.inputs.items(), *c.outputs.items()):
        if not isinstance(dims, list) or not all(d is None or isinstance(d, str) for d in dims):
            raise ManifestError(f"{where}: the dimensions of {name} must be a list of names or nulls")
    _check_text(c.dtype, f"{where}.dtype")
    for precision, variant in c.variants.items():
        if not isinstance(variant, dict) or "path" not in variant:
            raise ManifestError(f"{where}.variants.{precision} must be an object with a path")
        _check_path(variant["path"], f"{where}.variants.{precision}.path")
    if c.parity_max_abs_err is not None and (isinstance(c.parity_max_abs_err, bool)
                                             or not isinstance(c.parity_max_abs_err, (int, float))):
        raise ManifestError(f"{where}.parity_max_abs_err must be a number or null")


def _build(cls, data, where):
    """A dataclass from a JSON object, naming unknown and missing fields."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must be an object, got {_kind(data)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"{where} has unknown field(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError:  # a required field left out
        required = [f.name for f in fields(cls)
                    if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        raise ManifestError(f"{where} lacks the field(s) {', '.join(required)}") from None


def read_manifest_json(path, error=None):
    """The JSON of a manifest file (sdonnx.json, vae.json), at most MAX_MANIFEST_BYTES; `error` (default
    ManifestError) names the file and what is wrong. Every manifest reader goes through here, so a hostile
    folder meets one size limit and one set of parse errors."""
    error = error or ManifestError
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise error(f"{path} is {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"cannot read {path}: {e}") from None


def load_manifest(folder):
    """Read and validate folder/sdonnx.json, and check that the files it names are there; raises
    ManifestError (ModelFileError for a missing file) naming the file and what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"model folder {str(folder)!r} does not exist")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} is not an sdonnx model folder (no {MANIFEST_NAME}); "
                            f"convert a checkpoint first with `sdonnx convert SOURCE -o {folder}`")
    data = read_manifest_json(path)
    try:
        manifest = Manifest.from_dict(data)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    missing = [name for name in manifest.files() if not (folder / name).is_file()]
    if missing:
        raise ModelFileError(f"{folder}: {', '.join(missing)} named by {MANIFEST_NAME} "
                             f"{'is' if len(missing) == 1 else 'are'} missing; convert the model again")
    return manifest
