"""The model folder's manifest (`sdonnx.json`): the only source of model facts for the runtime.

Written by the converter (last, so a folder without it is not a model) and read here without torch.
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MANIFEST_NAME = "sdonnx.json"
FORMAT = "sdonnx"
FORMAT_VERSION = 1
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
PREDICTIONS = ("epsilon", "v_prediction")
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")


class ManifestError(ValueError):
    """The folder is not an sdonnx model, or its manifest is unusable."""


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
        if data.get("format") != FORMAT:
            raise ManifestError(f"not an sdonnx manifest (format {data.get('format')!r})")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ManifestError(f"manifest format {data['format_version']} is newer than this sdonnx "
                                f"understands ({FORMAT_VERSION}); upgrade sdonnx")
        data = dict(data)
        data["noise_schedule"] = NoiseSchedule(**data.get("noise_schedule", {}))
        data["text_encoders"] = [TextEncoderInfo(**t) for t in data["text_encoders"]]
        data["components"] = {k: Component(**v) for k, v in data["components"].items()}
        manifest = cls(**data)
        manifest.validate()
        return manifest

    def validate(self):
        if self.family not in FAMILIES:
            raise ManifestError(f"family {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        if self.prediction_type not in PREDICTIONS:
            raise ManifestError(f"prediction type {self.prediction_type!r}: expected one of {', '.join(PREDICTIONS)}")
        needed = [t.component for t in self.text_encoders] + ["unet", "vae_decoder"]
        missing = [c for c in needed if c not in self.components]
        if missing:
            raise ManifestError(f"manifest lacks the component(s) {', '.join(missing)}")


def load_manifest(folder):
    """Read and validate folder/sdonnx.json; raises ManifestError naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"model folder {str(folder)!r} does not exist")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{str(folder)!r} is not an sdonnx model folder (no {MANIFEST_NAME}); "
                            f"convert a checkpoint first with `sdonnx convert SOURCE -o {folder}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"cannot read {path}: {e}") from e
    try:
        return Manifest.from_dict(data)
    except (TypeError, KeyError) as e:
        raise ManifestError(f"{path} is malformed: {e}") from e
