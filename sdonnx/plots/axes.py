"""A1111's X/Y/Z plot axis types, each a change of one cell of the plot (its request, or its model).

AXIS_TYPES lists A1111 1.10's axis types in its order, so that API clients that send an axis as its index
in A1111's dropdown (txt2img and img2img have their own lists) get the same axis here. The types sdonnx has no
equivalent for are listed too, with the reason, and refused by name.

An axis type applies a value to a `Cell` and returns the changed cell (`dataclasses.replace`): request fields
through `GenerationRequest.replace`, or the cell's model. Extra-network strengths are plotted the A1111 way, with
Prompt S/R on the tag: prompt ``a cat <lora:detail:0.4>``, X ``Prompt S/R: 0.4, 0.8, 1.2`` (or on the whole tag).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

from .. import limits
from ..request import GenerationRequest
from .values import expand_numbers, split_values

MODES = ("txt2img", "img2img")
PERMUTATIONS = "permutations"  # Prompt order's kind: every order of the values


@dataclass(frozen=True)
class Cell:
    """One cell of a plot: where it sits, and what it generates."""

    ix: int
    iy: int
    iz: int
    request: GenerationRequest
    model: object = None  # None: the plot's own model; else what Context.find_model returned


@dataclass(frozen=True)
class Context:
    """What axis values are checked against: the mode, the styles and the models a door knows.

    styles: {name: (prompt, negative prompt)} (A1111's styles.csv); find_model(name) -> a model object with
    .path (raises ValueError naming the choices); model_choices: the names to offer; upscalers: the names of
    the upscaler models found (the built-in hires upscalers are always there)."""

    mode: str = "txt2img"
    styles: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    find_model: Callable = None
    model_choices: tuple = ()
    upscalers: tuple = ()
    vaes: tuple = ()  # the VAE names a data folder offers (A1111's sd_vae choices besides Automatic and None)

    def model(self, name, what):
        if self.find_model is None:
            raise ValueError(f"{what}: no other models can be named here")
        return self.find_model(name)


@dataclass(frozen=True)
class AxisType:
    """One A1111 axis type: its label, value kind and how a value changes a cell."""

    label: str
    kind: object  # int, float, str or PERMUTATIONS
    apply: Callable = None  # (cell, value, values, context) -> cell
    fmt: str = "label"  # the legend: "label" (Steps: 20), "value", "join", "basename" or "nothing"
    choices: Callable = None  # context -> the valid values (a value outside them is refused before generating)
    cost: float = 0.0  # A1111's cost: slow changes (checkpoints) go to the outer loop
    modes: tuple = MODES
    unsupported: str = None  # why sdonnx has no such axis
    sampler_option: str = None  # the sampler option it sets (dropped for samplers without it, as A1111)

    def format(self, value):
        """The value's legend text, as A1111's format_value functions."""
        if self.fmt == "nothing":
            return ""
        if isinstance(value, float):
            value = round(value, 8)
        if self.fmt == "join":
            return ", ".join(value)
        if self.fmt == "basename":
            return os.path.basename(value)
        return str(value) if self.fmt == "value" else f"{self.label}: {value}"


# ---------------------------------------------------------------------------------------------- apply


def _fields(*names, convert=None):
    """Apply: set these request fields to the value (converted first)."""
    def apply(cell, value, values, context):
        value = convert(value) if convert else value
        return dataclasses.replace(cell, request=cell.request.replace(**{name: value for name in names}))
    return apply


def _nothing(cell, value, values, context):
    return cell


def _prompt_sr(cell, value, values, context):
    """A1111's Prompt S/R: the first value is searched for, and replaced by each value in turn."""
    search, p, h = values[0], cell.request.prompt, cell.request.hires
    if search not in p.prompt and search not in p.negative_prompt:
        raise ValueError(f"Prompt S/R did not find {search!r} in the prompt or the negative prompt")
    texts = {"prompt": p.prompt, "negative_prompt": p.negative_prompt,
             "hires_prompt": h.hires_prompt, "hires_negative_prompt": h.hires_negative_prompt}
    changed = {k: v.replace(search, value) for k, v in texts.items() if v}
    return dataclasses.replace(cell, request=cell.request.replace(**changed))


def reorder(prompt, tokens):
    """A1111's Prompt order: the tokens' places in the prompt, filled with the tokens in the given order."""
    found = sorted((prompt.find(token), token) for token in tokens)
    parts, rest = [], prompt
    for _, token in found:
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token):]
    return "".join(part + token for part, token in zip(parts, tokens)) + rest


def _prompt_order(cell, value, values, context):
    prompt = cell.request.prompt.prompt
    missing = [token for token in value if token not in prompt]
    if missing:
        raise ValueError(f"Prompt order did not find {missing[0]!r} in the prompt")
    return dataclasses.replace(cell, request=cell.request.replace(prompt=reorder(prompt, value)))


def _sampler(field_name, schedule_field):
    """A sampler name, A1111's legacy combined names ("DPM++ 2M Karras") setting the schedule too."""
    def apply(cell, value, values, context):
        from ..samplers.registry import split_legacy_name

        split = split_legacy_name(value)
        changes = {field_name: split[0], schedule_field: split[1]} if split else {field_name: value}
        return dataclasses.replace(cell, request=cell.request.replace(**changes))
    return apply


def _checkpoint(cell, value, values, context):
    return dataclasses.replace(cell, model=context.model(value, "Checkpoint name"))


def _refiner(cell, value, values, context):
    path = None if value in ("", "None", "none") else str(context.model(value, "Refiner checkpoint").path)
    return dataclasses.replace(cell, request=cell.request.replace(refiner=path))


def _styles(cell, value, values, context):
    """A1111's Styles axis: the value names styles (comma-separated) applied to the prompts."""
    from ..server.a1111 import apply_styles

    names = [name.strip() for name in value.split(",") if name.strip()]
    missing = [name for name in names if name not in context.styles]
    if missing:
        raise ValueError(f"Styles: no style {missing[0]!r}; styles: {', '.join(context.styles) or 'none defined'}")
    chosen = [context.styles[name] for name in names]
    p = cell.request.prompt
    return dataclasses.replace(cell, request=cell.request.replace(
        prompt=apply_styles(p.prompt, [s[0] for s in chosen]),
        negative_prompt=apply_styles(p.negative_prompt, [s[1] for s in chosen])))


def _size(cell, value, values, context):
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", value)
    if not match:
        raise ValueError(f"Size: {value!r} is not WIDTHxHEIGHT, e.g. 512x768")
    return dataclasses.replace(cell, request=cell.request.replace(width=int(match[1]), height=int(match[2])))


def _zero_is_none(value):
    """A1111's schedule overrides: 0 means the schedule's own value."""
    return value or None


# A1111's Face restore axis: a model's name turns restoring on with that model, a yes/no word turns it on (with
# A1111's default model, CodeFormer) or off
FACE_RESTORE_VALUES = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN", "true": "CodeFormer", "yes": "CodeFormer",
                       "y": "CodeFormer", "1": "CodeFormer", "false": None, "no": None, "n": None, "0": None,
                       "none": None}


def _face_restore(value):
    try:
        return FACE_RESTORE_VALUES[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"{value!r} is not one of CodeFormer, GFPGAN, True, False, None") from None


def _vae_choices(context):
    return ["Automatic", "None", *context.vaes]


def _check_vae(value, context):
    # a file path is a VAE too (--vae FILE); names are checked against what the data folder offers
    if value not in _vae_choices(context) and not os.path.isfile(value):
        raise ValueError(f"VAE {value!r} is neither a file nor one of {', '.join(_vae_choices(context))}")


def _rng(value):
    from ..server.a1111 import RNG_SOURCES

    return RNG_SOURCES[value]


# ---------------------------------------------------------------------------------------------- choices


def _samplers(context):
    from ..samplers import SAMPLER_NAMES

    return SAMPLER_NAMES


def _schedules(context):
    from ..schedules import SCHEDULER_NAMES

    return SCHEDULER_NAMES


def _upscalers(context):
    from ..img2img import IMAGE_UPSCALERS, LATENT_UPSCALERS

    return [*LATENT_UPSCALERS, *IMAGE_UPSCALERS, *context.upscalers]


def _check_sampler(value, context):
    from ..samplers import resolve

    resolve(value)  # legacy names and API aliases too; the error names the choices


def _check_schedule(value, context):
    from ..samplers import resolve

    resolve("Euler", value)


CHECKS = {"Sampler": _check_sampler, "Hires sampler": _check_sampler, "Schedule type": _check_schedule,
          "VAE": _check_vae, "Face restore": lambda value, context: _face_restore(value)}
# their values are checked when applied (a model or style lookup), not against a list
_CHECKED_WHEN_APPLIED = ("Checkpoint name", "Refiner checkpoint", "Styles")


def _why(reason):
    return AxisType("", str, unsupported=reason)


def _t(label, kind, apply=None, **kw):
    return AxisType(label, kind, apply, **kw)


_OPTION = "is an A1111 setting sdonnx does not have"
# A1111 1.10's axis_options, in its order (the UI dropdown's indices)
AXIS_TYPES = (
    _t("Nothing", str, _nothing, fmt="nothing"),
    _t("Seed", int, _fields("seed")),
    _t("Var. seed", int, _fields("subseed")),
    _t("Var. strength", float, _fields("subseed_strength")),
    _t("Steps", int, _fields("steps")),
    _t("Hires steps", int, _fields("hires_steps"), modes=("txt2img",)),
    _t("CFG Scale", float, _fields("cfg_scale")),
    _t("Image CFG Scale", float, modes=("img2img",), unsupported="instruct-pix2pix models are not supported"),
    _t("Prompt S/R", str, _prompt_sr, fmt="value"),
    _t("Prompt order", PERMUTATIONS, _prompt_order, fmt="join"),
    _t("Sampler", str, _sampler("sampler", "scheduler"), fmt="value", choices=_samplers, modes=("txt2img",)),
    _t("Hires sampler", str, _sampler("hires_sampler", "hires_scheduler"), choices=_samplers, modes=("txt2img",)),
    _t("Sampler", str, _sampler("sampler", "scheduler"), fmt="value", choices=_samplers, modes=("img2img",)),
    _t("Checkpoint name", str, _checkpoint, fmt="basename", cost=1.0,
       choices=lambda context: list(context.model_choices)),
    _t("Negative Guidance minimum sigma", float, unsupported="NGMS (s_min_uncond) is not implemented"),
    _t("Sigma Churn", float, _fields("s_churn"), sampler_option="s_churn"),
    _t("Sigma min", float, _fields("s_tmin"), sampler_option="s_tmin"),
    _t("Sigma max", float, _fields("s_tmax"), sampler_option="s_tmax"),
    _t("Sigma noise", float, _fields("s_noise"), sampler_option="s_noise"),
    _t("Schedule type", str, _fields("scheduler"), choices=_schedules),
    _t("Schedule min sigma", float, _fields("sigma_min", convert=_zero_is_none)),
    _t("Schedule max sigma", float, _fields("sigma_max", convert=_zero_is_none)),
    _t("Schedule rho", float, _fields("rho", convert=_zero_is_none)),
    _t("Skip Early CFG", float, unsupported="skip_early_cond " + _OPTION),
    _t("Beta schedule alpha", float, unsupported="beta_dist_alpha " + _OPTION + " (the Beta schedule uses 0.6)"),
    _t("Beta schedule beta", float, unsupported="beta_dist_beta " + _OPTION + " (the Beta schedule uses 0.6)"),
    _t("Eta", float, _fields("eta"), sampler_option="eta"),
    _t("Clip skip", int, _fields("clip_skip")),
    _t("Denoising", float, _fields("strength", "hires_denoising")),
    _t("Initial noise multiplier", float, unsupported="img2img noise is never scaled here"),
    _t("Extra noise", float, unsupported="img2img_extra_noise " + _OPTION),
    _t("Hires upscaler", str, _fields("hires_upscaler"), choices=_upscalers, modes=("txt2img",)),
    _t("Cond. Image Mask Weight", float, modes=("img2img",), unsupported="inpainting_mask_weight " + _OPTION),
    _t("VAE", str, _fields("vae"), cost=0.7, choices=_vae_choices),
    _t("Styles", str, _styles, choices=lambda context: list(context.styles)),
    _t("UniPC Order", int, cost=0.5, unsupported="A1111's global UniPC order: use --sampler-option order=N"),
    _t("Face restore", str, _fields("restore_faces", convert=_face_restore), fmt="value"),
    _t("Token merging ratio", float, unsupported="token merging is not implemented"),
    _t("Token merging ratio high-res", float, unsupported="token merging is not implemented"),
    _t("Always discard next-to-last sigma", str, unsupported="always_discard_next_to_last_sigma " + _OPTION),
    _t("SGM noise multiplier", str, unsupported="sgm_noise_multiplier " + _OPTION),
    _t("Refiner checkpoint", str, _refiner, fmt="basename", cost=1.0,
       choices=lambda context: ["None", *context.model_choices]),
    _t("Refiner switch at", float, _fields("refiner_switch_at")),
    _t("RNG source", str, _fields("rng", convert=_rng), choices=lambda context: ["GPU", "CPU", "NV"]),
    _t("FP8 mode", str, cost=0.9, unsupported="fp8 weights are not supported"),
    _t("Size", str, _size),
)
# axis types whose values, when -1 (or empty), are fixed to a random seed unless "Keep -1 for seeds"
SEED_TYPES = ("Seed", "Var. seed")


def axis_types(mode="txt2img"):
    """The axis types of a mode's dropdown, in A1111's order (its indices)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose txt2img or img2img")
    return [t for t in AXIS_TYPES if mode in t.modes]


def _name_key(name):
    return re.sub(r"[\s.]+", " ", name.replace(".", " ")).strip().casefold()


def find_axis_type(name, mode="txt2img"):
    """An axis type by A1111 label (any case; "Hires. steps" as "Hires steps") or dropdown index."""
    types = axis_types(mode)
    supported = [t.label for t in types if not t.unsupported]
    if isinstance(name, int) or (isinstance(name, str) and name.strip().isdigit()):
        index = int(name)
        if not 0 <= index < len(types):
            raise ValueError(f"axis type index {index} is outside A1111's {mode} list (0-{len(types) - 1}); "
                             f"names work too: {', '.join(supported)}")
        found = types[index]
    else:
        found = next((t for t in types if _name_key(t.label) == _name_key(str(name))), None)
        if found is None:
            raise ValueError(f"unknown axis type {name!r} for {mode}; valid: {', '.join(supported)}")
    if found.unsupported:
        raise ValueError(f"axis type {found.label!r}: {found.unsupported}; valid: {', '.join(supported)}")
    return found


# ---------------------------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its type and values (ranges expanded), and the values as written."""

    type: AxisType
    values: tuple
    text: str = ""

    @property
    def labels(self):
        return [self.type.format(v) for v in self.values]

    def __len__(self):
        return len(self.values)


NOTHING = Axis(AXIS_TYPES[0], (0,), "")


def parse_axis(type_name, text, context=Context(), what="X"):
    """An axis from A1111's type (label or index) and values text; errors name the axis and the valid choices."""
    axis_type = find_axis_type(type_name, context.mode)
    if axis_type.label == "Nothing":
        return NOTHING
    where = f"{what} axis ({axis_type.label})"
    values = split_values(text or "")
    if axis_type.kind in (int, float):
        if any(v == "" for v in values) and axis_type.label not in SEED_TYPES:
            raise ValueError(f"{where}: an empty value in {text!r}")
        values = [-1 if v == "" else v for v in values]
        values = expand_numbers([str(v) for v in values], axis_type.kind, where)
    elif axis_type.kind == PERMUTATIONS:
        values = _permutations(values, where)
    if not values:
        raise ValueError(f"{where} has no values; give them comma-separated, e.g. {_example(axis_type)}")
    if len(values) > limits.MAX_PLOT_CELLS:
        raise limits.LimitError(f"{where} has {len(values)} values, over the limit of {limits.MAX_PLOT_CELLS} cells")
    _check_choices(axis_type, values, context, where)
    return Axis(axis_type, tuple(values), text)


def _permutations(values, where):
    if math.factorial(len(values)) > limits.MAX_PLOT_CELLS:
        raise limits.LimitError(f"{where}: {len(values)} tokens have {math.factorial(len(values))} orders, over the "
                                f"limit of {limits.MAX_PLOT_CELLS} cells")
    return list(itertools.permutations(values))


def _check_choices(axis_type, values, context, where):
    check = CHECKS.get(axis_type.label)
    for value in values:
        if check:
            try:
                check(value, context)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        elif axis_type.choices and axis_type.label not in _CHECKED_WHEN_APPLIED:
            valid = axis_type.choices(context)
            if value not in valid:
                raise ValueError(f"{where}: {value!r} is not one of {', '.join(valid) or 'none available'}")


def _example(axis_type):
    if axis_type.kind is int:
        return "1-5 or 10, 20"
    if axis_type.kind is float:
        return "5-9 (+2) or 4.5, 7"
    return "a, b, c"
