"""A ControlNet unit as sd-webui-controlnet defines it: the fields of its API (`alwayson_scripts.controlnet.args`),
its legacy names, and its infotext entry `ControlNet N: "Module: ..., Model: ..., ..."`."""
import dataclasses
import math
from dataclasses import dataclass

from .model import ControlNetError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")
# names the extension's API still accepts for a field (ControlNetUnit's legacy keys); guess_mode was removed
# from the extension (1.1.136), which warns and ignores it: here too, with the fields that change nothing here
# (low_vram: lowmem is the pipeline's) and the extension's other models' fields (from_dict drops unknown keys)
LEGACY_KEYS = {"input_image": "image", "guidance": "guidance_end", "lowvram": "low_vram", "guessmode": "guess_mode",
               "mask_image": "mask"}
# infotext: the extension writes every unit field as "Field Name: value" (underscores to capitalized words)
INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode", "hr_option")


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit. model: a converted ControlNet's name in models/ControlNet ("name" or the extension's
    "name [hash]") or its folder; image: the control image (path, PIL image, uint8 array; None in img2img:
    the init image); mask: optional (inpaint modules: white = repaint)."""

    model: str = None
    image: object = None
    module: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: int = -1  # -1 (or out of range): the module's default, as the extension
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    pixel_perfect: bool = False
    hr_option: str = "Both"
    mask: object = None
    enabled: bool = True
    save_detected_map: bool = True  # the A1111 API appends the unit's preprocessed image to the images

    def __post_init__(self):
        for name, choices in (("control_mode", CONTROL_MODES), ("hr_option", HR_OPTIONS)):
            object.__setattr__(self, name, _choice(name, getattr(self, name), choices))
        object.__setattr__(self, "resize_mode", _resize_mode(self.resize_mode))

    @property
    def soft_injection(self):
        """The extension's soft injection: every mode but Balanced scales layer i by 0.825 ** (12 - i)."""
        return self.control_mode != CONTROL_MODES[0]

    @property
    def cond_only(self):
        """"ControlNet is more important": control on the positive prompt's rows only (cfg injection)."""
        return self.control_mode == CONTROL_MODES[2]

    def check(self, index):
        """Refuse values the extension refuses (names the unit, the value and the range)."""
        where = f"ControlNet unit {index}"
        if not self.model or not isinstance(self.model, str) or self.model.strip() in ("None", ""):
            raise ControlNetError(f"{where}: no model; name a converted ControlNet (GET /controlnet/model_list)")
        for name, low, high in (("weight", 0.0, 2.0), ("guidance_start", 0.0, 1.0), ("guidance_end", 0.0, 1.0)):
            value = _number(where, name, getattr(self, name))
            if not low <= value <= high:
                raise ControlNetError(f"{where}: {name} {value} is outside [{low}, {high}]")
        if self.guidance_start > self.guidance_end:
            raise ControlNetError(f"{where}: guidance_start {self.guidance_start} is after guidance_end "
                                  f"{self.guidance_end}")
        for name in ("processor_res", "threshold_a", "threshold_b"):
            _number(where, name, getattr(self, name))
        from .preprocess import find_module

        find_module(self.module)

    def infotext(self, title):
        """The extension's infotext value: "Module: canny, Model: name [hash], Weight: 1.0, ..."; -1 fields left
        out, as the extension's hidden sliders."""
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        values = {name: title if name == "model" else kinds[name](getattr(self, name)) if kinds[name] in (int, float)
                  else getattr(self, name) for name in INFOTEXT_FIELDS}  # floats as floats: "Weight: 1.0"
        return ", ".join(f"{_display(name)}: {value}" for name, value in values.items() if value != -1)

    @classmethod
    def from_infotext(cls, text):
        """A unit from its infotext value (image and mask are not in the text)."""
        fields = {}
        for item in text.split(","):
            key, sep, value = item.strip().partition(": ")
            name = "_".join(word.lower() for word in key.split(" "))
            if sep and name in INFOTEXT_FIELDS:
                fields[name] = _parse_value(name, value.strip())
        return cls(**fields)

    @classmethod
    def from_dict(cls, data, index=0):
        """A unit from an API dict (the extension's field names and its legacy ones; unknown keys, as the
        extension, are dropped)."""
        if isinstance(data, ControlNetUnit):
            return data
        if not isinstance(data, dict):
            raise ControlNetError(f"ControlNet unit {index}: expected an object of unit fields, got "
                                  f"{type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {}
        for key, value in data.items():
            key = LEGACY_KEYS.get(key, key)
            if key in known and value is not None:
                fields[key] = value
        image = fields.get("image")
        if isinstance(image, dict):  # {"image": ..., "mask": ...}
            fields.setdefault("mask", image.get("mask"))
            fields["image"] = image.get("image")
        elif isinstance(image, (list, tuple)) and len(image) == 2 and not isinstance(image[0], dict):
            fields["image"], fields["mask"] = image
        return cls(**fields)


def _display(name):
    return " ".join(word.capitalize() for word in name.split("_"))


def _parse_value(name, text):
    kinds = {f.name: f.type for f in dataclasses.fields(ControlNetUnit)}
    if kinds[name] is bool:
        return text == "True"
    if kinds[name] in (float, int):
        return kinds[name](float(text))
    return text


def _number(where, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ControlNetError(f"{where}: {name} must be a finite number, got {value!r}")
    return float(value)


def _choice(name, value, choices):
    """An index (the API's integer codes) or a name (case-insensitive) -> the name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
        return choices[value]
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
    raise ControlNetError(f"ControlNet {name} {value!r}: choose one of {', '.join(choices)} (or 0 to {len(choices) - 1})")


def _resize_mode(value):
    from .preprocess import resize_mode

    try:
        return resize_mode(value)
    except ValueError as e:
        raise ControlNetError(str(e)) from None
