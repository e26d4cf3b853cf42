"""The generation request: what a user asks for, as small frozen parts, the same from every door.

`GenerationRequest` groups the settings as a user thinks of them (prompt and size, sampling, seeds,
init image, hires fix, refiner, SDXL conditions, tiling). It is the single owner of:

- the keywords of `Pipeline.generate` (`from_kwargs`, `keywords()`): each part's field names;
- validation against a model manifest (`validate`): every user error is raised before a session runs,
  and the result is a `Plan` with what the stages need (sizes, seeds drawn, resolved samplers,
  the decoded init image, the hires target);
- the A1111 infotext it produces (`infotext`) and reads back (`from_infotext`, A1111's
  `parse_generation_parameters` semantics).

A new option is a field of its part (default, `help`, infotext key) plus its infotext lines in that
part's `params`/`read` (`simple_params`/`simple_read` by name for "written when not the default").
`Pipeline.generate` takes it as a keyword and the CLI derives its flag from the field with no edit;
the HTTP API maps A1111's field name in its own table (sdonnx/server/a1111.py).
tests/test_request_fields.py walks the fields and fails until the new one reaches every door.
"""
from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from types import MappingProxyType

from . import __version__, limits
from .infotext import format_infotext, parse_infotext
from .schedules import SCHEDULER_NAMES

MAX_SEED = 2**32 - 1
# the precision the UNet ran in (a load option, not a request field: runtime/precision.py says why)
PRECISION_KEY = "Precision"
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
_MISSING = object()


def option(default, key=None, help="", *, kind=None, choices=None, cli=True):
    """A request field: default, A1111 infotext key (None: not written), CLI help, value kind for doors
    that read text (defaults to the default's type), allowed text values, cli=False to keep it off the CLI."""
    return field(default=default, metadata={"key": key, "help": help, "kind": kind or type(default),
                                            "choices": choices, "cli": cli})


class _Part:
    """Shared behaviour of the request's parts (frozen dataclasses)."""

    def given(self):
        """{field: value} of the fields set away from their default."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {f.name: values[f.name] for f in dataclasses.fields(self)
                if values[f.name] != f.default and not (isinstance(values[f.name], MappingProxyType)
                                                        and not values[f.name])}

    def simple_params(self, *names):
        """Infotext {key: value} of keyed fields, left out (None) at their default."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in names and f.metadata["key"]:
                value = getattr(self, f.name)
                out[f.metadata["key"]] = None if value == f.default else value
        return out

    @classmethod
    def simple_read(cls, params, *names):
        """Inverse of simple_params: {field: value} for the keys present in an infotext."""
        out = {}
        for f in dataclasses.fields(cls):
            key = f.metadata["key"]
            if f.name in names and key in params:
                out[f.name] = _parse(f.metadata["kind"], params[key], key)
        return out


def _parse(kind, text, key):
    try:
        if kind is bool:
            return text.strip().lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise ValueError(f"infotext {key}: {text!r} is not a valid {kind.__name__}") from None


# --------------------------------------------------------------------------------------------- parts

@dataclass(frozen=True)
class PromptPart(_Part):
    """Prompt, size and batch."""

    prompt: str = option("", "Prompt", "The prompt (A1111 prompt language, <lora:name:w> tags).", cli=False)
    negative_prompt: str = option("", "Negative prompt", "Negative prompt.")
    width: int = option(None, "Size", "Image width (multiple of 8); default: the model's native size or the "
                        "init image's.", kind=int)
    height: int = option(None, "Size", "Image height (multiple of 8); default as width.", kind=int)
    batch_size: int = option(1, help="Images per batch (each gets seed + its index).")
    batch_count: int = option(1, help="Batches, one after the other.")
    clip_skip: int = option(1, "Clip skip", "Stop the text encoder this many layers early (A1111's clip skip).")
    emphasis: str = option("Original", "Emphasis", "How (word:1.2) weights apply (A1111's emphasis modes).",
                           choices=("Original", "No norm", "Ignore", "None"))

    def params(self, plan):
        return {"Size": (plan.width, plan.height), "Clip skip": self.clip_skip}

    def emphasis_params(self):
        emphasized = self.emphasis != "Original" and any(c in self.prompt + self.negative_prompt for c in "([")
        return {"Emphasis": self.emphasis if emphasized else None}

    @classmethod
    def read(cls, params):
        out = cls.simple_read(params, "prompt", "negative_prompt", "clip_skip", "emphasis")
        if "Size-1" in params:
            out["width"], out["height"] = int(params["Size-1"]), int(params["Size-2"])
        return out


@dataclass(frozen=True)
class SamplingPart(_Part):
    """Sampler, schedule, steps, CFG, sigma overrides and sampler options."""

    sampler: str = option("Euler a", "Sampler", "A1111 sampler name, e.g. 'DPM++ 2M' (legacy 'DPM++ 2M Karras' too).")
    scheduler: str = option("Automatic", "Schedule type", "Schedule type: " + ", ".join(SCHEDULER_NAMES) + ".")
    steps: int = option(20, "Steps", "Sampling steps.")
    cfg_scale: float = option(7.0, "CFG scale", "Classifier-free guidance scale.")
    sigma_min: float = option(None, "Schedule min sigma", "Override the schedule's smallest sigma.", kind=float)
    sigma_max: float = option(None, "Schedule max sigma", "Override the schedule's largest sigma.", kind=float)
    rho: float = option(None, "Schedule rho", "Override rho (Karras, Polyexponential).", kind=float)
    eta: float = option(None, "Eta", "Noise multiplier of ancestral/SDE samplers and DDIM [sampler's default].",
                        kind=float)
    s_churn: float = option(None, "Sigma churn", "Euler/Heun/DPM2 churn [0].", kind=float)
    s_tmin: float = option(None, "Sigma tmin", "Churn from this sigma up [0].", kind=float)
    s_tmax: float = option(None, "Sigma tmax", "Churn up to this sigma [inf].", kind=float)
    s_noise: float = option(None, "Sigma noise", "Noise scale of stochastic samplers [1].", kind=float)
    # options of a single sampler (LMS order, UniPC variant, DPM adaptive tolerances, ...): {name: value}
    sampler_options: MappingProxyType = option(None, None, "KEY=VALUE: another option of the sampler "
                                               "(order, r, solver_type, rtol, ...).", kind=dict)

    A1111_OPTIONS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")

    def __post_init__(self):
        object.__setattr__(self, "sampler_options", MappingProxyType(dict(self.sampler_options or {})))

    def options(self):
        """Every sampler option given: {name: value}."""
        named = {name: getattr(self, name) for name in self.A1111_OPTIONS if getattr(self, name) is not None}
        return {**named, **self.sampler_options}

    def params(self, plan):
        return {"Steps": self.steps, "Sampler": plan.sampler.sampler, "Schedule type": plan.sampler.schedule,
                "CFG scale": self.cfg_scale}

    def override_params(self):
        return {"Schedule max sigma": self.sigma_max, "Schedule min sigma": self.sigma_min, "Schedule rho": self.rho}

    def option_params(self, plan):
        """Sampler options that differ from A1111's defaults, under A1111's infotext names."""
        defaults = plan.sampler.options
        return {option_key(k): v for k, v in self.options().items() if defaults.get(k, _MISSING) != v}

    @classmethod
    def read(cls, params):
        out = cls.simple_read(params, "steps", "cfg_scale", "sigma_min", "sigma_max", "rho", *cls.A1111_OPTIONS)
        sampler, schedule = params.get("Sampler"), params.get("Schedule type")
        if sampler is not None:
            from .samplers.registry import split_legacy_name

            split = split_legacy_name(sampler) if schedule is None else None
            out["sampler"], schedule = split if split else (sampler, schedule)
        if schedule is not None:
            out["scheduler"] = schedule
        others = {k: v for k, v in _read_sampler_options(params).items() if k not in cls.A1111_OPTIONS}
        if others:
            out["sampler_options"] = others
        return out


@dataclass(frozen=True)
class SeedPart(_Part):
    """Seed, variation seed and strength, resize-from, ENSD, RNG source."""

    seed: int = option(-1, "Seed", "-1 draws a random seed.")
    subseed: int = option(-1, "Variation seed", "Variation seed (-1: random when a strength is set).")
    subseed_strength: float = option(0.0, "Variation seed strength", "How far towards the variation seed's noise.")
    seed_resize_from_w: int = option(0, "Seed resize from", "Draw the noise as for this width (A1111's resize seed).")
    seed_resize_from_h: int = option(0, "Seed resize from", "Draw the noise as for this height.")
    ensd: int = option(0, "ENSD", "Eta noise seed delta (ancestral and SDE noise).")
    rng: str = option("nv", "RNG", "Random source: nv reproduces A1111's GPU seeds, cpu its CPU seeds.",
                      choices=("nv", "cpu"))

    def params(self, plan):
        resized = self.seed_resize_from_w > 0 and self.seed_resize_from_h > 0
        return {"RNG": {"nv": "NV", "cpu": "CPU"}.get(self.rng, self.rng),
                "Variation seed strength": self.subseed_strength if plan.subseed is not None else None,
                "Seed resize from": (self.seed_resize_from_w, self.seed_resize_from_h) if resized else None,
                "ENSD": self.ensd or None}

    def image_params(self, plan, index):
        """Each image's own seed, and its variation seed when one is in use (A1111)."""
        seed, subseed = plan.image_seeds(index)
        return {"Seed": seed} if subseed is None else {"Seed": seed, "Variation seed": subseed}

    @classmethod
    def read(cls, params):
        out = cls.simple_read(params, "seed", "subseed", "subseed_strength", "ensd")
        if "Seed resize from-1" in params:
            out["seed_resize_from_w"] = int(params["Seed resize from-1"])
            out["seed_resize_from_h"] = int(params["Seed resize from-2"])
        # A1111's default when RNG is absent is its GPU source, which "nv" reproduces
        rng = params.get("RNG", "GPU")
        out["rng"] = {"CPU": "cpu", "NV": "nv", "GPU": "nv"}.get(rng, rng)
        return out


@dataclass(frozen=True)
class InitPart(_Part):
    """img2img and inpainting: the init image, strength, resize mode, mask and A1111's mask options."""

    init_image: object = option(None, None, "img2img: start from this image (a PIL image or a path).", kind=str)
    strength: float = option(0.75, "Denoising strength", "img2img denoising strength in (0, 1].")
    resize_mode: int = option(0, "Resize mode", "0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale.",
                              choices=("0", "1", "2", "3"))
    mask: object = option(None, None, "Inpainting mask (white = repaint), the init image's size.", kind=str)
    mask_blur: int = option(4, "Mask blur", "Mask blur radius in pixels.")
    inpainting_fill: int = option(1, "Masked content", "Masked content: 0 fill, 1 original, 2 latent noise, "
                                  "3 latent nothing.", choices=("0", "1", "2", "3"))
    inpaint_full_res: bool = option(False, "Inpaint area", "Inpaint area: only the masked part.")
    inpaint_full_res_padding: int = option(32, "Masked area padding", "Padding around the masked part, in pixels.")
    inpainting_mask_invert: bool = option(False, "Mask mode", "Repaint the black part of the mask instead.")

    def params(self, plan):
        from .img2img import MASKED_CONTENT, RESIZE_MODES

        init = plan.init
        if init is None:
            return {}
        if init.mask is None:
            return {"Resize mode": RESIZE_MODES[init.resize_mode].capitalize() if init.resize_mode else None}
        return {"Mask blur": self.mask_blur, "Masked content": MASKED_CONTENT[init.fill],
                "Inpaint area": "Only masked" if init.mask.crop else None,
                "Masked area padding": self.inpaint_full_res_padding if init.mask.crop else None}

    def mask_mode_params(self, plan):
        return {"Mask mode": "Inpaint not masked" if plan.init and plan.init.mask and self.inpainting_mask_invert
                else None}

    @classmethod
    def read(cls, params):
        from .img2img import MASKED_CONTENT, RESIZE_MODES

        out = cls.simple_read(params, "mask_blur", "inpaint_full_res_padding")
        if "Resize mode" in params:
            out["resize_mode"] = RESIZE_MODES.index(params["Resize mode"].lower())
        if "Masked content" in params:
            out["inpainting_fill"] = MASKED_CONTENT.index(params["Masked content"].lower())
        if "Inpaint area" in params:
            out["inpaint_full_res"] = params["Inpaint area"] == "Only masked"
        if "Mask mode" in params:
            out["inpainting_mask_invert"] = params["Mask mode"] == "Inpaint not masked"
        return out


@dataclass(frozen=True)
class HiresPart(_Part):
    """A1111's hires fix: a second img2img pass at a larger size."""

    hires: bool = option(False, None, "Hires fix: a second pass at a larger size.")
    hires_scale: float = option(2.0, "Hires upscale", "Scale of the second pass.")
    hires_width: int = option(0, "Hires resize", "Second pass width (0: from the scale or the height).")
    hires_height: int = option(0, "Hires resize", "Second pass height (0: from the scale or the width).")
    hires_upscaler: str = option("Latent", "Hires upscaler", "Latent, Latent (antialiased), Latent (bicubic), "
                                 "Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact), Lanczos, "
                                 "Nearest, None. Or an upscaler model by A1111's name (R-ESRGAN 4x+, 4x-UltraSharp, "
                                 "...) from models/ESRGAN, models/RealESRGAN, models/SwinIR.")
    hires_steps: int = option(0, "Hires steps", "Second pass steps (0: as many as --steps).")
    hires_denoising: float = option(0.7, "Denoising strength", "Second pass denoising strength.")
    hires_sampler: str = option(None, "Hires sampler", "Second pass sampler [the first pass's].", kind=str)
    hires_scheduler: str = option(None, "Hires schedule type", "Second pass schedule type [the first pass's].",
                                  kind=str)
    hires_prompt: str = option(None, "Hires prompt", "Second pass prompt [the prompt].", kind=str)
    hires_negative_prompt: str = option(None, "Hires negative prompt", "Second pass negative prompt.", kind=str)

    def params(self, plan):
        hr = plan.hires
        if hr is None:
            return {}
        return {"Hires upscale": hr.scale, "Hires resize": None if hr.scale else (hr.width, hr.height),
                "Hires steps": self.hires_steps or None, "Hires upscaler": self.hires_upscaler,
                "Hires sampler": self.hires_sampler, "Hires schedule type": self._hires_schedule(plan),
                "Hires prompt": self.hires_prompt or None, "Hires negative prompt": self.hires_negative_prompt or None}

    def _hires_schedule(self, plan):
        """As given; else, when another hires sampler resolved "Automatic" to another schedule than the first
        pass's (which is written resolved), that one, so the text reproduces the image."""
        if self.hires_scheduler or not self.hires_sampler:
            return self.hires_scheduler
        return plan.hires_sampler.schedule if plan.hires_sampler.schedule != plan.sampler.schedule else None

    @classmethod
    def read(cls, params):
        out = cls.simple_read(params, "hires_scale", "hires_upscaler", "hires_steps", "hires_sampler",
                              "hires_scheduler", "hires_prompt", "hires_negative_prompt")
        if "Hires resize-1" in params:
            out["hires_width"], out["hires_height"] = int(params["Hires resize-1"]), int(params["Hires resize-2"])
        if out:
            out["hires"] = True
            if "Denoising strength" in params:
                out["hires_denoising"] = float(params["Denoising strength"])
        return out


@dataclass(frozen=True)
class RefinerPart(_Part):
    """A1111's refiner switch (SDXL)."""

    refiner: object = option(None, "Refiner", "Refiner model folder (or a Pipeline); takes over at the switch.",
                             kind=str)
    refiner_switch_at: float = option(0.8, "Refiner switch at", "Fraction of the steps after which the refiner "
                                      "takes over.")

    def params(self, plan, refiner_name):
        if self.refiner is None:
            return {}
        return {"Refiner": refiner_name, "Refiner switch at": self.refiner_switch_at}

    @classmethod
    def read(cls, params):
        out = cls.simple_read(params, "refiner_switch_at")
        if "Refiner" in params:
            # written "name [hash]": the folder name is what a door can look up
            out["refiner"] = params["Refiner"].rsplit(" [", 1)[0]
        return out


@dataclass(frozen=True)
class SdxlPart(_Part):
    """SDXL's added conditions (A1111 sends the image size; these are the rest)."""

    crop_top_left: tuple = option((0, 0), "Crop top left", "SDXL crop condition TOP,LEFT (Python: a pair).", kind=str)
    aesthetic_score: float = option(6.0, "Aesthetic score", "Refiner models' aesthetic score.")
    negative_aesthetic_score: float = option(2.5, "Negative aesthetic score", "Refiner models' negative "
                                             "aesthetic score.")

    def __post_init__(self):
        object.__setattr__(self, "crop_top_left", tuple(self.crop_top_left))

    def params(self):
        crop = tuple(int(v) for v in self.crop_top_left)
        return {"Crop top left": None if crop == (0, 0) else f"{crop[0]}x{crop[1]}",
                **self.simple_params("aesthetic_score", "negative_aesthetic_score")}

    @classmethod
    def read(cls, params):
        out = cls.simple_read(params, "aesthetic_score", "negative_aesthetic_score")
        if "Crop top left-1" in params:
            out["crop_top_left"] = (int(params["Crop top left-1"]), int(params["Crop top left-2"]))
        return out


@dataclass(frozen=True)
class TilingPart(_Part):
    """Seamless tiling and the VAE in tiles."""

    tiling: object = option(None, "Tiling", "Seamless tiling: True/xy, x or y.", kind=str, choices=("xy", "x", "y"))
    tiled_vae: bool = option(None, "Tiled VAE", "VAE in tiles (None: for large images).", kind=bool)

    def params(self):
        from .runtime.tiling import tiling_axes

        axes = tiling_axes(self.tiling)
        # A1111 has only on/off ("Tiling: True"); one axis is written by its name
        return {"Tiling": True if axes == "xy" else axes, "Tiled VAE": self.tiled_vae}

    @classmethod
    def read(cls, params):
        out = {}
        if "Tiling" in params:
            value = params["Tiling"]
            out["tiling"] = value if value in ("x", "y") else _parse(bool, value, "Tiling") or None
        if "Tiled VAE" in params:
            out["tiled_vae"] = _parse(bool, params["Tiled VAE"], "Tiled VAE")
        return out


@dataclass(frozen=True)
class ControlNetPart(_Part):
    """sd-webui-controlnet units: ControlNetUnit objects, or dicts of the extension's API fields."""

    controlnet: tuple = option((), "ControlNet", "ControlNet units (sdonnx.controlnet.ControlNetUnit or dicts of the "
                               "extension's unit fields: model, image, module, weight, guidance_start, ...).",
                               kind=tuple, cli=False)

    def __post_init__(self):
        from .controlnet.unit import ControlNetUnit

        units = self.controlnet
        if units is None or isinstance(units, (dict, ControlNetUnit)):
            units = () if units is None else (units,)
        object.__setattr__(self, "controlnet", tuple(ControlNetUnit.from_dict(u, i) for i, u in enumerate(units)))

    @property
    def units(self):
        """The enabled units, in order."""
        return tuple(u for u in self.controlnet if u.enabled)

    def params(self, titles=None):
        """`ControlNet N: "Module: ..., Model: name [hash], ..."` per enabled unit (titles: the models' list names)."""
        titles = titles or {}
        return {f"ControlNet {i}": unit.infotext(titles.get(i, unit.model)) for i, unit in enumerate(self.units)}

    @classmethod
    def read(cls, params):
        from .controlnet.unit import ControlNetUnit

        keys = sorted((int(k.split()[-1]), k) for k in params if re.fullmatch(r"ControlNet \d+", k))
        return {"controlnet": tuple(ControlNetUnit.from_infotext(params[k]) for _, k in keys)} if keys else {}


@dataclass(frozen=True)
class FacesPart(_Part):
    """A1111's "Restore faces": GFPGAN or CodeFormer on every image after it is decoded (and after the
    hires pass), before it is saved; the inpainting paste-back comes after it, as in A1111."""

    restore_faces: str = option(None, "Face restoration", "Restore faces with this model (A1111's Restore faces): "
                                "GFPGAN or CodeFormer.", kind=str, choices=("GFPGAN", "CodeFormer"))
    codeformer_weight: float = option(0.5, "CodeFormer weight", "CodeFormer fidelity: 0 the codebook's face "
                                      "(quality), 1 the input's (A1111's code_former_weight).")

    def params(self):
        """A1111 writes the model's name; the weight is sdonnx's own key, written when CodeFormer runs with a
        weight other than A1111's default."""
        weight = self.codeformer_weight if self.restore_faces == "CodeFormer" and self.codeformer_weight != 0.5 else None
        return {"Face restoration": self.restore_faces, "CodeFormer weight": weight}

    @classmethod
    def read(cls, params):
        return cls.simple_read(params, "restore_faces", "codeformer_weight")


@dataclass(frozen=True)
class VaePart(_Part):
    """The VAE that decodes and encodes: A1111's sd_vae setting (sdonnx/vae.py)."""

    vae: str = option(None, "VAE", "VAE: a file, a name from models/VAE (--data-dir), Automatic (MODEL.vae.* beside "
                      "the checkpoint) or None (the model's own) [Automatic].", kind=str)

    @classmethod
    def read(cls, params):
        # written from the VAE that ran (its file name, as A1111), with `VAE hash`
        return {"vae": params["VAE"]} if params.get("VAE") else {}


PARTS = {"prompt": PromptPart, "sampling": SamplingPart, "seeds": SeedPart, "init": InitPart, "hires": HiresPart,
         "refiner": RefinerPart, "sdxl": SdxlPart, "tiling": TilingPart, "controlnet": ControlNetPart,
         "faces": FacesPart, "vae": VaePart}


# ---------------------------------------------------------------------------------------- request

@dataclass(frozen=True)
class GenerationRequest:
    """Everything a generate call is asked to do (see the module docstring)."""

    prompt: PromptPart = field(default_factory=PromptPart)
    sampling: SamplingPart = field(default_factory=SamplingPart)
    seeds: SeedPart = field(default_factory=SeedPart)
    init: InitPart = field(default_factory=InitPart)
    hires: HiresPart = field(default_factory=HiresPart)
    refiner: RefinerPart = field(default_factory=RefinerPart)
    sdxl: SdxlPart = field(default_factory=SdxlPart)
    tiling: TilingPart = field(default_factory=TilingPart)
    controlnet: ControlNetPart = field(default_factory=ControlNetPart)
    faces: FacesPart = field(default_factory=FacesPart)
    vae: VaePart = field(default_factory=VaePart)

    @staticmethod
    def fields():
        """[(part name, dataclasses.Field)] of every request field, in order."""
        return [(name, f) for name, part in PARTS.items() for f in dataclasses.fields(part)]

    @classmethod
    def keywords(cls):
        """The keyword names `from_kwargs` (and `Pipeline.generate`) take, with their defaults."""
        return {f.name: f.default for _, f in cls.fields()}

    @classmethod
    def from_kwargs(cls, **kwargs):
        """Build from `Pipeline.generate`'s keywords; keywords no part has go to the sampler
        (sampler_options), as generate has always taken them."""
        owners = {f.name: part for part, f in cls.fields()}
        grouped = {part: {} for part in PARTS}
        extra = {}
        for name, value in kwargs.items():
            if name in owners:
                grouped[owners[name]][name] = value
            else:
                extra[name] = value
        if extra:
            grouped["sampling"]["sampler_options"] = {**grouped["sampling"].get("sampler_options", {}), **extra}
        return cls(**{part: PARTS[part](**values) for part, values in grouped.items()})

    def to_kwargs(self, changed_only=False):
        """The flat keywords that build this request again: {name: value}."""
        out = {}
        for part in PARTS:
            values = getattr(self, part)
            out.update(values.given() if changed_only else
                       {f.name: getattr(values, f.name) for f in dataclasses.fields(values)})
        out["sampler_options"] = dict(self.sampling.sampler_options)
        if changed_only and not out["sampler_options"]:
            del out["sampler_options"]
        return out

    def replace(self, **kwargs):
        """A copy with these keywords changed."""
        return GenerationRequest.from_kwargs(**{**self.to_kwargs(), **kwargs})

    # ------------------------------------------------------------------ infotext

    @classmethod
    def from_infotext(cls, text):
        """The request that an A1111/sdonnx infotext describes (A1111's parse_generation_parameters
        semantics: legacy combined sampler names split, `Size: WxH`, A1111's defaults for missing keys)."""
        params = parse_infotext(text)
        kwargs = {}
        for part in PARTS.values():
            kwargs.update(part.read(params))
        if "Denoising strength" in params and not kwargs.get("hires"):
            kwargs["strength"] = float(params["Denoising strength"])
        return cls.from_kwargs(**kwargs)

    @staticmethod
    def load_options_from_infotext(text):
        """The load options an infotext records beside the request: {"precision": ...} when it names one
        (an image made in bf16 is reproduced in bf16); a value sdonnx does not know is a ValueError."""
        value = parse_infotext(text).get(PRECISION_KEY)
        if value is None:
            return {}
        if value.strip().lower() not in PRECISIONS:
            raise ValueError(f"infotext {PRECISION_KEY}: {value!r} is not one of {', '.join(PRECISIONS)}")
        return {"precision": value.strip().lower()}

    @classmethod
    def from_a1111(cls, payload, mode="txt2img", **context):
        """The request an A1111 API payload (a txt2img/img2img body as a dict) asks for, with A1111's
        field names and defaults; sdonnx/server/a1111.py holds the field tables (needs the serve extra).
        context: options (A1111 settings), styles ({name: (prompt, negative)}), find_model(name)."""
        try:
            from .server.a1111 import request_from_a1111
        except ImportError as e:
            raise ImportError(f"reading A1111 payloads needs the serve extra: pip install 'sdonnx[serve]' ({e})") from e
        return request_from_a1111(payload, mode, **context)[0]

    def infotext_params(self, plan, facts=None):
        """The infotext's {key: value} for every image of the job (Seed and Variation seed are per image).

        facts: what the model side knows ("Model hash", "Model", "VAE hash", "VAE", "Lora hashes", "TI hashes",
        "Refiner", "Precision": the UNet's precision when not fp32)."""
        facts = facts or {}
        hr, init = plan.hires, plan.init
        # known keys are put in A1111's order by the formatter; the others keep this order (as before the
        # request existed, so the text stays the same for the same settings), new keys go last
        tiling = self.tiling.params()
        return {**self.sampling.params(plan), **self.prompt.params(plan),
                "Model hash": facts.get("Model hash"), "Model": facts.get("Model"),
                "VAE hash": facts.get("VAE hash"), "VAE": facts.get("VAE"),
                "Denoising strength": init.strength if init else (hr.denoising if hr else None),
                "Lora hashes": facts.get("Lora hashes"), "TI hashes": facts.get("TI hashes"),
                **self.prompt.emphasis_params(), **self.seeds.params(plan),
                "Tiling": tiling["Tiling"], **self.sampling.override_params(), **self.init.params(plan),
                **self.hires.params(plan), **self.refiner.params(plan, facts.get("Refiner")),
                **self.sampling.option_params(plan), **self.init.mask_mode_params(plan), **self.sdxl.params(),
                "Tiled VAE": tiling["Tiled VAE"], **self.controlnet.params(facts.get("ControlNet")),
                PRECISION_KEY: facts.get(PRECISION_KEY), **self.faces.params(),
                "Version": f"sdonnx {__version__}"}

    def infotext(self, plan, index=0, facts=None, params=None):
        """A1111 infotext of image `index` of the job."""
        params = params if params is not None else self.infotext_params(plan, facts)
        return format_infotext(self.prompt.prompt, self.prompt.negative_prompt,
                               {**params, **self.seeds.image_params(plan, index)})

    # ------------------------------------------------------------------ validation

    def validate(self, manifest, model_sigmas=None):
        """Check every setting against the model and return the Plan; a ValueError names the first bad
        value and the valid choices. Decodes the init image and mask; runs no session.

        model_sigmas: the model's ascending sigma table (computed from the manifest when None)."""
        if model_sigmas is None:
            from .diffusion.sigmas import betas_from_config, model_sigmas as table

            ns = manifest.noise_schedule
            model_sigmas = table(betas_from_config(ns.beta_start, ns.beta_end, ns.beta_schedule,
                                                   ns.num_train_timesteps))
        return _make_plan(self, manifest, model_sigmas)


@dataclass(frozen=True)
class Plan:
    """A validated request's derived values, what the pipeline's stages run on."""

    width: int
    height: int
    shape: tuple  # per-image latent shape (C, H/f, W/f)
    seed: int  # the job's first seed (drawn when -1 was asked)
    subseed: object  # int: the first variation seed; None without variation
    sampler: object  # samplers.Resolved
    sigmas: object  # the first pass's sigmas (img2img: the sliced tail)
    init: object = None  # img2img.InitPlan
    hires: object = None  # img2img.HiresPlan
    hires_sampler: object = None  # samplers.Resolved of the hires pass
    hires_sigmas: object = None
    tiling: object = None  # "xy", "x", "y" or None

    def image_seeds(self, index):
        """(seed, variation seed or None) of image `index` of the job, as A1111: seed + index; with a
        variation strength every image keeps the seed and the variation seed counts up instead."""
        if self.subseed is None:
            return self.seed + index, None
        return self.seed, self.subseed + index

    def batch_seeds(self, n, batch_size):
        """Seeds (and variation seeds, or None) of batch n."""
        seeds, subseeds = zip(*(self.image_seeds(n * batch_size + j) for j in range(batch_size)))
        return list(seeds), None if self.subseed is None else list(subseeds)


def _make_plan(request, manifest, model_sigmas):
    p, s = request.prompt, request.sampling
    # sizes, counts and finite numbers first: nothing below (the init image's resize, the sigma tables, the
    # noise) may allocate for a request over the limits
    limits.check_generation({**request.to_kwargs(), **s.sampler_options}, manifest.native_size)
    _check_prompt(p, manifest)
    init = _init_plan(request.init, p, manifest)
    factor = manifest.vae_scale_factor
    width, height = check_size(init.width if init else (p.width or manifest.native_size),
                               init.height if init else (p.height or manifest.native_size), factor)
    sampler, sigmas = _sampling(s, s.sampler, s.scheduler, positive_int("steps", s.steps), model_sigmas,
                                init.strength if init else None, manifest.is_sdxl)
    check_sampler_options(sampler.sampler, s.options())
    _check_option_ranges(s)
    _check_counts(request)
    hires, hires_sampler, hires_sigmas = _hires(request, width, height, manifest, model_sigmas)
    seed, subseed = _seeds(request.seeds)
    _check_refiner(request.refiner)
    _check_sdxl(request.sdxl)
    _check_controlnet(request.controlnet, init)
    _check_faces(request.faces)
    if request.vae.vae is not None and not isinstance(request.vae.vae, str):
        raise ValueError(f"vae must be a file, a VAE's name, Automatic or None, got {request.vae.vae!r}")
    return Plan(width, height, (manifest.latent_channels, height // factor, width // factor), seed, subseed,
                sampler, sigmas, init, hires, hires_sampler, hires_sigmas, _tiling(request.tiling))


def _check_prompt(p, manifest):
    from .prompt.conditioning import check_emphasis

    for name in ("prompt", "negative_prompt"):
        if not isinstance(getattr(p, name), str):
            raise ValueError(f"{name} must be text, got {type(getattr(p, name)).__name__}")
    positive_int("batch_size", p.batch_size)
    positive_int("batch_count", p.batch_count)
    layers = min(t.num_layers for t in manifest.text_encoders)
    if positive_int("clip_skip", p.clip_skip) > layers:
        raise ValueError(f"clip_skip {p.clip_skip}: {manifest.name}'s text encoder has {layers} layers; "
                         f"choose 1 to {layers}")
    check_emphasis(p.emphasis)


def _init_plan(part, p, manifest):
    from .img2img import InitPlan

    if part.init_image is None:
        if part.mask is not None:
            raise ValueError("a mask needs an init_image to inpaint")
        return None
    return InitPlan.make(part.init_image, part.mask, p.width, p.height, resize_mode=part.resize_mode,
                         mask_blur=part.mask_blur, invert=part.inpainting_mask_invert,
                         only_masked=part.inpaint_full_res, padding=part.inpaint_full_res_padding,
                         fill=part.inpainting_fill, strength=part.strength, factor=manifest.vae_scale_factor)


def _sampling(s, sampler, scheduler, steps, model_sigmas, strength, sdxl):
    """(Resolved, sigmas) of one pass; the sigma overrides apply to every pass, as A1111's settings."""
    from .img2img import img2img_sigmas
    from .samplers import build_sigmas, resolve

    resolved = resolve(sampler, scheduler)
    for name in ("sigma_min", "sigma_max", "rho"):
        if getattr(s, name) is not None and not finite(name, getattr(s, name)) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(s, name)}")
    if s.sigma_min is not None and s.sigma_max is not None and s.sigma_min >= s.sigma_max:
        raise ValueError(f"sigma_min {s.sigma_min} must be below sigma_max {s.sigma_max}")
    finite("cfg_scale", s.cfg_scale)
    sigmas = build_sigmas(resolved, steps, model_sigmas, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho,
                          sdxl=sdxl)
    return resolved, img2img_sigmas(sigmas, strength)


def _hires(request, width, height, manifest, model_sigmas):
    """(HiresPlan, Resolved, sigmas) of the hires pass, or Nones; names are checked before any pass runs."""
    from .img2img import hires_plan

    h, s = request.hires, request.sampling
    if not h.hires:
        return None, None, None
    steps = s.steps if not h.hires_steps else positive_int("hires_steps", h.hires_steps)
    hr = hires_plan(width, height, h.hires_scale, h.hires_width, h.hires_height, h.hires_upscaler, steps,
                    h.hires_denoising, manifest.vae_scale_factor, bool(h.hires_steps))
    # A1111: "use same sampler / scheduler" means the first pass's settings, resolved for this pass
    resolved, sigmas = _sampling(s, h.hires_sampler or s.sampler, h.hires_scheduler or s.scheduler, hr.steps,
                                 model_sigmas, hr.denoising, manifest.is_sdxl)
    return hr, resolved, sigmas


def _seeds(part):
    from .diffusion.rng import SOURCES

    if part.rng not in SOURCES:
        raise ValueError(f"unknown RNG source {part.rng!r}; valid: {', '.join(SOURCES)}")
    for name in ("seed", "subseed", "seed_resize_from_w", "seed_resize_from_h", "ensd"):
        _whole(name, getattr(part, name))
    if not 0.0 <= finite("subseed_strength", part.subseed_strength) <= 1.0:
        raise ValueError(f"subseed_strength (variation strength) must be in [0, 1], got {part.subseed_strength}")
    seed = random_seed() if int(part.seed) == -1 else int(part.seed)
    if part.subseed_strength <= 0:
        return seed, None
    return seed, random_seed() if int(part.subseed) == -1 else int(part.subseed)


def _check_refiner(part):
    if part.refiner is not None and not 0 < finite("refiner_switch_at", part.refiner_switch_at) < 1:
        raise ValueError(f"refiner_switch_at {part.refiner_switch_at!r}: choose a fraction between 0 and 1")


def _check_sdxl(part):
    if len(part.crop_top_left) != 2 or any(int(v) != v for v in part.crop_top_left):
        raise ValueError(f"crop_top_left {part.crop_top_left!r}: give two whole numbers (top, left)")
    finite("aesthetic_score", part.aesthetic_score)
    finite("negative_aesthetic_score", part.negative_aesthetic_score)


def _check_controlnet(part, init):
    """Each enabled unit's values, and a control image for each (img2img: the init image stands in)."""
    from .controlnet.model import ControlNetError

    if len(part.units) > limits.MAX_CONTROLNET_UNITS:
        raise ValueError(f"{len(part.units)} ControlNet units: at most {limits.MAX_CONTROLNET_UNITS}")
    for i, unit in enumerate(part.units):
        unit.check(i)
        if unit.image is None and init is None:
            raise ControlNetError(f"ControlNet unit {i}: no control image; give the unit an image (in img2img "
                                  f"the init image is used when it has none)")


def _check_faces(part):
    from .postprocess.faces import RESTORERS

    if part.restore_faces is not None and part.restore_faces not in RESTORERS:
        raise ValueError(f"restore_faces {part.restore_faces!r}: choose one of {', '.join(RESTORERS)}")
    if not 0.0 <= finite("codeformer_weight", part.codeformer_weight) <= 1.0:
        raise ValueError(f"codeformer_weight must be in [0, 1], got {part.codeformer_weight}")


def _tiling(part):
    from .runtime.tiling import tiling_axes

    if part.tiled_vae not in (None, True, False):
        raise ValueError(f"tiled_vae {part.tiled_vae!r}: choose True, False or None (automatic)")
    return tiling_axes(part.tiling)


def _whole(name, value, what="a whole number"):
    try:
        if not isinstance(value, bool) and int(value) == value:
            return int(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise ValueError(f"{name} must be {what}, got {value!r}")


def positive_int(name, value):
    if _whole(name, value, "a positive whole number") < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def _check_option_ranges(s):
    """A1111's sampler options are non-negative numbers (s_tmax may be infinite)."""
    for name in s.A1111_OPTIONS:
        value = getattr(s, name)
        if value is None:
            continue
        value = float(value) if name == "s_tmax" else finite(name, value)
        if not value >= 0:
            raise ValueError(f"{name} must be 0 or more, got {getattr(s, name)!r}")


def _check_counts(request):
    """Pixel counts and radii that may be 0 but not negative."""
    h, i = request.hires, request.init
    for name, value in (("hires_width", h.hires_width), ("hires_height", h.hires_height),
                        ("hires_steps", h.hires_steps), ("mask_blur", i.mask_blur),
                        ("inpaint_full_res_padding", i.inpaint_full_res_padding)):
        if _whole(name, value) < 0:
            raise ValueError(f"{name} must be 0 or more, got {value!r}")


def check_size(width, height, factor):
    for name, value in (("width", width), ("height", height)):
        if _whole(name, value) < factor or value % factor:
            raise ValueError(f"{name} {value} is not a positive multiple of {factor}; "
                             f"use a size like {max(factor, int(value) // factor * factor)}")
    return int(width), int(height)


def check_sampler_options(sampler, options):
    import inspect

    from .samplers import SAMPLERS

    params = inspect.signature(SAMPLERS[sampler]).parameters.values()
    accepted = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("noise_sampler", "callback")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no option {', '.join(unknown)}; "
                         f"its options: {', '.join(accepted) or 'none'}")


def option_key(name):
    """A sampler option's infotext key: A1111's names for its five, "Lower order final" style otherwise."""
    names = {"eta": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax",
             "s_noise": "Sigma noise"}
    return names.get(name, name.replace("_", " ").capitalize())


def _read_sampler_options(params):
    """Every sampler option an infotext names, typed as the sampler functions' defaults."""
    import inspect

    from .samplers import SAMPLERS

    found = {}
    for fn in SAMPLERS.values():
        for p in inspect.signature(fn).parameters.values():
            key = option_key(p.name)
            if p.kind is p.KEYWORD_ONLY and key in params and p.name not in ("noise_sampler", "callback"):
                kind = type(p.default) if p.default is not None else str
                found[p.name] = _parse(float if kind is int and "." in params[key] else kind, params[key], key)
    return found


def random_seed():
    return random.randint(0, MAX_SEED)


def finite(name, value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value
