"""A1111's Extras tab (postprocessing) on one image: upscale, then the face restorers, each a step.

`ExtrasRequest` holds the tab's settings under the A1111 API's field names (the CLI, the HTTP API and the
web page build it); `run_extras` runs STEPS in A1111's order (its postprocessing scripts' `order`:
Upscale 1000, GFPGAN 2000, CodeFormer 3000) and returns the image and A1111's extras infotext
("Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+, ...").

Face restoration joins here: its settings (gfpgan_visibility, codeformer_visibility, codeformer_weight)
become fields of ExtrasRequest, its models an entry of ExtrasModels, and its steps entries of STEPS after
`upscale_step`; each step is step(image, request, models, info) -> image and writes its infotext keys
into `info`.
"""
from dataclasses import dataclass, fields

from PIL import Image

from .. import limits
from ..infotext import _format_value, _quote
from ..request import finite
from .upscale import Upscalers, upscale

RESIZE_MODES = ("scale by", "scale to")  # A1111's resize_mode 0 and 1


@dataclass(frozen=True)
class ExtrasRequest:
    """The Extras tab's settings; the field names and defaults are the A1111 API's (ExtrasBaseRequest)."""

    resize_mode: int = 0  # 0: scale by upscaling_resize; 1: scale to upscaling_resize_w x _h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True  # scale to: crop the result to exactly w x h (centred)
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False  # accepted as A1111's API does; its order is fixed (upscale first)
    gfpgan_visibility: float = 0.0  # how much of the GFPGAN-restored image shows (0: the step is off)
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0  # CodeFormer's fidelity (A1111's Extras default 0)

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]

    def validate(self, upscalers, faces=None):
        """Every value in range, both upscalers known and converted, and the face restorers asked for
        (faces: postprocess.faces.FaceRestorers); ValueError naming the bad one."""
        if self.resize_mode not in (0, 1):
            raise ValueError(f"resize_mode {self.resize_mode!r}: choose 0 (scale by) or 1 (scale to)")
        if self.resize_mode == 0:
            by = finite("upscaling_resize", self.upscaling_resize)
            if not 0 < by <= limits.MAX_UPSCALE_BY:
                raise ValueError(f"upscaling_resize {by} must be above 0 and at most {limits.MAX_UPSCALE_BY:g}")
        else:
            for name in ("upscaling_resize_w", "upscaling_resize_h"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8 * limits.MAX_SIDE:
                    raise ValueError(f"{name} {value!r} must be a whole number of pixels from 1 to {8 * limits.MAX_SIDE}")
        if not 0 <= finite("extras_upscaler_2_visibility", self.extras_upscaler_2_visibility) <= 1:
            raise ValueError(f"extras_upscaler_2_visibility {self.extras_upscaler_2_visibility} must be from 0 to 1")
        for name in ("upscaler_1", "upscaler_2"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be an upscaler name, got {getattr(self, name)!r}")
            upscalers.get(getattr(self, name))
        for name, restorer in (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer")):
            if not 0 <= finite(name, getattr(self, name)) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must be from 0 to 1")
            if getattr(self, name) > 0:
                if faces is None:
                    raise ValueError(f"{name}: face restoration needs its model folders")
                faces.check(restorer)
        if not 0 <= finite("codeformer_weight", self.codeformer_weight) <= 1:
            raise ValueError(f"codeformer_weight {self.codeformer_weight} must be from 0 to 1")


@dataclass
class ExtrasModels:
    """What the steps run with: the upscalers (and, with face restoration, its models)."""

    upscalers: Upscalers
    faces: object = None  # postprocess.faces.FaceRestorers


@dataclass
class ExtrasResult:
    image: object  # PIL RGB
    info: dict  # A1111's pp.info: {infotext key: value} in the order the steps wrote them

    @property
    def infotext(self):
        return extras_infotext(self.info)


def extras_infotext(info):
    """A1111's postprocessing text: `Key: value` pairs joined by ", " (values quoted as in infotexts)."""
    return ", ".join(key if key == value else f"{key}: {_quote(_format_value(value))}"
                     for key, value in info.items() if value is not None)


def target_scale(size, request):
    """(scale, (w, h) to crop to or None) of the upscale step for an image of this (w, h) (A1111's scale
    to: the larger of the two ratios, so the result covers w x h)."""
    if request.resize_mode == 1:
        w, h = request.upscaling_resize_w, request.upscaling_resize_h
        return max(w / size[0], h / size[1]), (w, h) if request.upscaling_crop else None
    return float(request.upscaling_resize), None


def check_size(size, request, upscalers):
    """Refuse before any work an upscale of an image of this (w, h) whose result, or an image on the way
    to it, is over the limit."""
    scale, _ = target_scale(size, request)
    dest = (int(size[0] * scale // 8 * 8), int(size[1] * scale // 8 * 8))
    largest = max(dest[0] * dest[1], _largest_pass(size, dest, upscalers, request))
    if min(dest) < 1:
        raise ValueError(f"upscaling {size[0]}x{size[1]} by {scale:g} gives an empty image")
    if largest > limits.MAX_UPSCALE_PIXELS:
        raise limits.LimitError(f"upscaling {size[0]}x{size[1]} to {dest[0]}x{dest[1]} passes through "
                                f"{largest} pixels, over the limit of {limits.MAX_UPSCALE_PIXELS}; use a smaller "
                                f"scale or image")


def _largest_pass(size, dest, upscalers, request):
    """Pixels of the largest image a model's passes make on the way to dest (a 4x model asked for 2x
    makes 4x first)."""
    largest = 0
    for name in (request.upscaler_1, request.upscaler_2):
        factor = getattr(upscalers.get(name), "scale", 1)
        w, h = size
        for _ in range(3):
            if factor == 1 or (w >= dest[0] and h >= dest[1]):
                break
            w, h = w * factor, h * factor
            largest = max(largest, w * h)
    return largest


def upscale_step(image, request, models, info):
    """A1111's Upscale postprocessing script: upscaler 1, optionally blended with upscaler 2."""
    if request.upscaler_1 == "None":  # A1111: no upscaler 1, no upscale at all (and no infotext keys)
        return image
    first = _upscale_once(image, request, models.upscalers.get(request.upscaler_1), info)
    info["Postprocess upscaler"] = request.upscaler_1
    if request.upscaler_2 != "None" and request.extras_upscaler_2_visibility > 0:
        second = _upscale_once(image, request, models.upscalers.get(request.upscaler_2), info)
        first = Image.blend(first, second.convert(first.mode), request.extras_upscaler_2_visibility)
        info["Postprocess upscaler 2"] = request.upscaler_2
    return first


def _upscale_once(image, request, upscaler, info):
    scale, crop = target_scale(image.size, request)
    if request.resize_mode == 1:
        info["Postprocess upscale to"] = f"{request.upscaling_resize_w}x{request.upscaling_resize_h}"
    else:
        info["Postprocess upscale by"] = request.upscaling_resize
    out = upscale(image, scale, upscaler)
    if crop is None:
        return out
    canvas = Image.new("RGB", crop)  # centred on black: A1111's "crop to fit"
    canvas.paste(out, (crop[0] // 2 - out.width // 2, crop[1] // 2 - out.height // 2))
    info["Postprocess crop to"] = f"{crop[0]}x{crop[1]}"
    return canvas


def _restore_step(name, visibility_key, weight_key=None):
    """A1111's GFPGAN / CodeFormer postprocessing scripts: the restored image blended over the input by
    its visibility; the infotext gets the visibility (and CodeFormer's weight), rounded to 3 places."""

    def step(image, request, models, info):
        visibility = getattr(request, visibility_key)
        if visibility == 0:
            return image
        import numpy as np

        weight = getattr(request, weight_key) if weight_key else 0.5
        restored = Image.fromarray(models.faces.get(name).restore(np.asarray(image.convert("RGB")),
                                                                   codeformer_weight=weight))
        if visibility < 1:
            restored = Image.blend(image.convert("RGB"), restored, visibility)
        info[f"{name} visibility"] = round(visibility, 3)
        if weight_key:
            info[f"{name} weight"] = round(weight, 3)
        return restored

    step.__name__ = f"{name.lower()}_step"
    return step


# A1111's postprocessing order (its scripts' order: Upscale 1000, GFPGAN 2000, CodeFormer 3000)
STEPS = (upscale_step, _restore_step("GFPGAN", "gfpgan_visibility"),
         _restore_step("CodeFormer", "codeformer_visibility", "codeformer_weight"))


def run_extras(image, request, models):
    """One image through the Extras steps -> ExtrasResult. The request is validated first (names, ranges,
    sizes), so a bad one fails before any model runs."""
    request.validate(models.upscalers, models.faces)
    image = image.convert("RGB")
    check_size(image.size, request, models.upscalers)
    info = {}
    for step in STEPS:
        image = step(image, request, models, info)
    return ExtrasResult(image, info)
