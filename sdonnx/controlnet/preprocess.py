"""ControlNet preprocessors ("modules") and control-image preparation, as sd-webui-controlnet does them.

A unit's input image goes through its module (`preprocess`) at the module's resolution, then is fitted to the
generation size with the unit's resize mode (`prepare_control_image`) and turned into the ControlNet's hint
(`control_hint`). Module names, labels and slider definitions are the extension's, so `/controlnet/module_list`
answers like it. Only image-operation modules exist here: the model-based ones (depth, openpose, lineart, ...)
need annotator weights that sdonnx does not ship; the `none` module takes a ready-made control image instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

import numpy as np

from ..limits import MAX_IMAGE_PIXELS
from . import imageops
from .imageops import AREA, CUBIC, NEAREST

log = logging.getLogger(__name__)

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "Just Resize", "Crop and Resize", "Resize and Fill"
RESIZE_MODES = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)
# older names the extension still accepts; the integer codes are the list index (3 is A1111's latent resize)
_RESIZE_MODE_ALIASES = MappingProxyType({
    "Inner Fit (Scale to Fit)": CROP_AND_RESIZE,
    "Outer Fit (Shrink to Fit)": RESIZE_AND_FILL,
    "Scale to Fit (Inner Fit)": CROP_AND_RESIZE,
    "Envelope (Outer Fit)": RESIZE_AND_FILL,
})


class UnknownModule(ValueError):
    """A preprocessor name that is not one of `module_names()`."""


@dataclass(frozen=True)
class Slider:
    """One slider of the extension's UI; `visible=False` sliders keep the extension's bounds (0..1, default
    0.5), which decide what an API value falls back to."""

    name: str = "EMPTY_LABEL"
    value: float = 0.5
    min: float = 0.0
    max: float = 1.0
    step: float = 0.01
    visible: bool = True

    def api_json(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}

    def bounded(self, value: float) -> float:
        """The extension's rule for API values: out of range (-1 included) means the default."""
        return value if self.min <= value <= self.max else self.value  # NaN too


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
HIDDEN = Slider(visible=False)


@dataclass(frozen=True)
class Module:
    """A preprocessor. run(image, resolution, threshold_a, threshold_b, seed) -> image; image uint8 [H, W, 3],
    or [H, W, 4] with the inpaint mask in the alpha channel when `mask_in_alpha`."""

    name: str
    run: Callable[..., np.ndarray]
    label: str = ""
    resolution: Slider = RESOLUTION
    slider_1: Slider = HIDDEN
    slider_2: Slider = HIDDEN
    priority: int = 0
    mask_in_alpha: bool = False
    tags: tuple[str, ...] = field(default=())

    @property
    def title(self) -> str:
        return self.label or self.name

    def detail(self) -> dict:
        sliders = (self.resolution, self.slider_1, self.slider_2)
        return {"model_free": False, "sliders": [s.api_json() for s in sliders if s.visible]}


# ----------------------------------------------------------------------------------------------- modules
# Each follows the extension's annotator of the same name (scripts/preprocessor/, scripts/preprocessor/legacy/).
def _none(img, res, a, b, seed):
    return img


def _invert(img, res, a, b, seed):
    return 255 - img


def _inpaint(img, res, a, b, seed):
    # the image travels with its mask; the hint (masked pixels -1) is made by `control_hint`
    return img


def _canny(img, res, low, high, seed):
    padded, (h, w) = fit_resolution(img, res)
    return hwc3(imageops.canny(padded, int(low), int(high))[:h, :w])


def _threshold(img, res, level, b, seed):
    padded, (h, w) = fit_resolution(img, res)
    out = np.zeros_like(padded)
    out[np.min(padded, axis=2) > level] = 255
    return out[:h, :w]


def _scribble_xdog(img, res, level, b, seed):
    """White where a difference of Gaussians (sigma 5 minus sigma 0.5) of the darkest channel passes `level`."""
    padded, (h, w) = fit_resolution(img, res)
    x = padded.astype(np.float32)
    dog = (255 - np.min(imageops.gaussian_blur(x, 5.0) - imageops.gaussian_blur(x, 0.5), axis=2))
    dog = dog.clip(0, 255).astype(np.uint8)
    # in uint8, as the extension computes it: strengths of 128 and more wrap around before the comparison
    strength = (2 * (255 - dog)).astype(np.uint8)
    out = np.zeros_like(padded)
    out[strength > level] = 255
    return out[:h, :w]


def _blur_gaussian(img, res, sigma, b, seed):
    padded, (h, w) = fit_resolution(img, res)
    return imageops.gaussian_blur(padded[:h, :w], sigma)


def _shuffle(img, res, a, b, seed):
    """Pixels moved along a smooth random flow (the extension's content shuffle), reproducible from `seed`."""
    padded, (h, w) = fit_resolution(img, res)
    rng = np.random.RandomState(seed)  # numpy's legacy generator: the extension's np.random.seed(seed) stream
    flow_x = _noise_disk(rng, h, w, 256) * float(w - 1)
    flow_y = _noise_disk(rng, h, w, 256) * float(h - 1)
    return imageops.remap(padded[:h, :w], flow_x.astype(np.float32), flow_y.astype(np.float32))


def _noise_disk(rng, h, w, f):
    """Smooth noise in [0, 1]: a coarse uniform grid (one cell per f pixels) upscaled bicubically."""
    coarse = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2))
    noise = imageops.resize(coarse, (w + 2 * f, h + 2 * f), CUBIC)[f:f + h, f:f + w]
    noise = noise - np.min(noise)
    return noise / np.max(noise)


def _tile_resample(img, res, rate, b, seed):
    if rate < 1.1:
        return img
    h, w = img.shape[:2]
    return imageops.resize(img, (max(1, int(w / rate)), max(1, int(h / rate))), AREA)


def _lineart_standard(img, res, a, b, seed):
    """Dark lines on a light background, from how much darker each pixel is than its sigma-6 surroundings."""
    padded, (h, w) = fit_resolution(img, res)
    x = padded.astype(np.float32)
    intensity = np.min(imageops.gaussian_blur(x, 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines)) if lines.size else 16.0)
    intensity *= 127
    return hwc3(intensity.clip(0, 255).astype(np.uint8)[:h, :w])


def _color_grid(img, res, a, b, seed):
    """The T2I colour adapter's input: the image (short side `res`) reduced to 64-pixel colour cells."""
    h, w = img.shape[:2]
    size = (res, int(round(w / h * res))) if h < w else (int(round(h / w * res)), res)
    _check_pixels(size[1], size[0], "the processed image")
    x = imageops.resize(img, (size[1], size[0]), AREA)
    if size[0] < 64 or size[1] < 64:
        raise ValueError(f"t2ia_color_grid needs a processor resolution of 64 or more, got {res}")
    cells = imageops.resize(x, (size[1] // 64, size[0] // 64), CUBIC)
    return imageops.resize(cells, (size[1], size[0]), NEAREST)


def fit_resolution(img: np.ndarray, res: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The extension's resize_image_with_pad: the short side scaled to `res` (bicubic up, area down), then the
    bottom and right edges repeated up to multiples of 64. Returns (padded, (h, w) of the unpadded part)."""
    if res < 1:
        raise ValueError(f"ControlNet processor resolution must be a positive number, got {res}")
    raw_h, raw_w = img.shape[:2]
    k = res / min(raw_h, raw_w)
    h, w = int(np.round(raw_h * k)), int(np.round(raw_w * k))
    pad_h, pad_w = -h % 64, -w % 64
    _check_pixels(w + pad_w, h + pad_h, "the processed image")
    x = imageops.resize(img, (w, h), CUBIC if k > 1 else AREA)
    return np.pad(x, [(0, pad_h), (0, pad_w), (0, 0)], mode="edge"), (h, w)


MODULES: tuple[Module, ...] = (
    Module("none", _none, priority=10),
    Module("invert", _invert, label="invert (from white bg & black line)", resolution=HIDDEN, priority=20,
           tags=("Canny", "Lineart", "Scribble", "MLSD")),
    Module("canny", _canny, slider_1=Slider("Low Threshold", 100, 1, 255, 1),
           slider_2=Slider("High Threshold", 200, 1, 255, 1), priority=100, tags=("Canny",)),
    Module("threshold", _threshold, slider_1=Slider("Binarization Threshold", 127, 0, 255)),
    Module("scribble_xdog", _scribble_xdog, slider_1=Slider("XDoG Threshold", 32, 1, 64),
           tags=("Scribble", "SparseCtrl")),
    Module("blur_gaussian", _blur_gaussian, slider_1=Slider("Sigma", 9.0, 0.01, 64.0), tags=("Tile",)),
    # the extension fixes shuffle's resolution at 512 (pixel perfect still sets it)
    Module("shuffle", _shuffle, resolution=Slider(value=512, visible=False), tags=("Shuffle",)),
    Module("tile_resample", _tile_resample, slider_1=Slider("Down Sampling Rate", 1.0, 1.0, 8.0),
           priority=100, tags=("Tile",)),
    Module("lineart_standard", _lineart_standard, label="lineart_standard (from white bg & black line)",
           priority=100, tags=("Lineart",)),
    Module("color", _color_grid, label="t2ia_color_grid", tags=("T2I-Adapter",)),
    Module("inpaint_only", _inpaint, resolution=HIDDEN, priority=100, mask_in_alpha=True, tags=("Inpaint",)),
    Module("inpaint", _inpaint, label="inpaint_global_harmonious", resolution=HIDDEN, mask_in_alpha=True,
           tags=("Inpaint",)),
)
_BY_KEY = MappingProxyType({**{m.name: m for m in MODULES}, **{m.label: m for m in MODULES if m.label}})


def sorted_modules() -> list[Module]:
    """The extension's order: `none`, then by priority and label, both descending."""
    rest = [m for m in MODULES if m.name != "none"]
    rest.sort(key=lambda m: str(m.priority).zfill(8) + m.title, reverse=True)
    return [_BY_KEY["none"], *rest]


def module_names(alias_names: bool = False) -> list[str]:
    """Module names as `/controlnet/module_list` lists them (UI labels with alias_names)."""
    return [m.title if alias_names else m.name for m in sorted_modules()]


def module_detail(alias_names: bool = False) -> dict[str, dict]:
    """{name: {"model_free": bool, "sliders": [{name, value, min, max, step}, ...]}}, the extension's shape."""
    return {(m.title if alias_names else m.name): m.detail() for m in sorted_modules()}


def find_module(name: str) -> Module:
    """The module called `name` (its name or its UI label, as the extension accepts either)."""
    module = _BY_KEY.get(name) if isinstance(name, str) else None
    if module is None:
        raise UnknownModule(f"unknown ControlNet module {name!r}; valid: {', '.join(module_names())}")
    return module


def resolve_params(module: str, processor_res: float, threshold_a: float, threshold_b: float):
    """(resolution, threshold_a, threshold_b) with values outside a slider's range (such as the API's -1)
    replaced by the slider's default, as the extension does for every unit."""
    m = find_module(module)
    return (int(m.resolution.bounded(processor_res)), m.slider_1.bounded(threshold_a),
            m.slider_2.bounded(threshold_b))


def preprocess(module: str, image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
               *, seed: int | None = None) -> np.ndarray:
    """Run one preprocessor. image: uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; alpha is composited over
    white, except for inpaint modules, which need [H, W, 4] with the mask (255 = repaint) in alpha and return it
    that way. Returns uint8 [H', W', 3] (or 4): most modules first scale the image's short side to
    `resolution`. `seed` makes `shuffle` reproducible (the extension seeds numpy with `numpy_seed`)."""
    m = find_module(module)
    image = _checked_image(image)
    if not np.isfinite([resolution, threshold_a, threshold_b]).all():
        raise ValueError(f"ControlNet {m.name}: resolution and thresholds must be finite numbers, got "
                         f"{resolution}, {threshold_a}, {threshold_b}")
    if m.mask_in_alpha:
        if image.ndim != 3 or image.shape[2] != 4:
            raise ValueError(f"ControlNet module {m.name!r} needs an image with its mask ([H, W, 4]), "
                             f"got shape {image.shape}")
    else:
        image = hwc3(image)
    return np.ascontiguousarray(m.run(image, int(resolution), float(threshold_a), float(threshold_b), seed))


def numpy_seed(seed: int, subseed: int, first_seed: int | None = None) -> int:
    """The seed the extension gives numpy before preprocessing (`shuffle`): the request's seed plus its variation
    seed, mod 2**32, where either one left at -1 (random) counts as the job's first image seed `first_seed` (given
    none, as 0)."""
    def used(value):
        return int(first_seed) if value == -1 and first_seed is not None else max(int(value), 0)

    return (used(seed) + used(subseed)) & 0xFFFFFFFF


def display_image(module: str, result: np.ndarray) -> np.ndarray:
    """What the extension shows (and `/controlnet/detect` returns) for a result: inpaint results half-veil the
    masked area through the alpha channel (255 - mask // 2)."""
    if find_module(module).mask_in_alpha and result.ndim == 3 and result.shape[2] == 4:
        shown = result.copy()
        shown[:, :, 3] = 255 - result[:, :, 3] // 2
        return shown
    return result


def control_input(image: np.ndarray, mask: np.ndarray | None, module: str) -> np.ndarray:
    """A unit's image (and optional mask) -> the module's input, as the extension combines them: inpaint modules
    get RGBA with the mask (none: nothing masked) in alpha; others get RGB, unless the mask is a drawing (neither
    all clear nor all set), which then becomes the input (the UI's canvas scribble)."""
    rgb = hwc3(_checked_image(image))
    alpha = np.zeros(rgb.shape[:2], np.uint8) if mask is None else _mask_channel(mask, rgb.shape[:2])
    if find_module(module).mask_in_alpha:
        return np.concatenate([rgb, alpha[:, :, None]], axis=2)
    if mask is None or (alpha <= 5).all() or (alpha >= 250).all():
        return rgb
    log.info("ControlNet: the mask is a drawing; using it as the input image (canvas scribble)")
    return hwc3(alpha)


def _mask_channel(mask, shape):
    mask = hwc3(_checked_image(mask))
    if mask.shape[:2] != shape:
        raise ValueError(f"ControlNet mask size {mask.shape[1]}x{mask.shape[0]} differs from its image's "
                         f"{shape[1]}x{shape[0]}")
    return mask[:, :, 0]


# ----------------------------------------------------------------------------------------------- image helpers
def hwc3(x: np.ndarray) -> np.ndarray:
    """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> [H, W, 3]; alpha is composited over white."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    # truncated, as the extension does
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def _checked_image(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"ControlNet images must be uint8, got {x.dtype}")
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (1, 3, 4))) or 0 in x.shape[:2]:
        raise ValueError(f"ControlNet images must be [H, W] or [H, W, 1|3|4], got shape {x.shape}")
    return x


def _check_pixels(width, height, what):
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} would be {width}x{height}, more than the {MAX_IMAGE_PIXELS} pixels allowed")


# ----------------------------------------------------------------------------------------------- fitting
def resize_mode(value) -> str:
    """The extension's resize mode for a name, an old name or an integer code (0, 1, 2; 3 is Just Resize)."""
    if isinstance(value, str):
        mode = _RESIZE_MODE_ALIASES.get(value, value)
        if mode in RESIZE_MODES:
            return mode
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value <= 3:
        return RESIZE_MODES[value % 3]
    valid = [*RESIZE_MODES, *_RESIZE_MODE_ALIASES, 0, 1, 2, 3]
    raise ValueError(f"unknown ControlNet resize mode {value!r}; valid: {', '.join(map(repr, valid))}")


def pixel_perfect_resolution(image: np.ndarray, width: int, height: int, mode) -> int:
    """The processor resolution that makes the preprocessed image's short side land on the generation size
    without resampling, as the extension's "Pixel Perfect": the larger scale for Just Resize and Crop and
    Resize, the smaller for Resize and Fill."""
    raw_h, raw_w = image.shape[:2]
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode(mode) == RESIZE_AND_FILL else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


def prepare_control_image(image: np.ndarray, width: int, height: int, mode) -> np.ndarray:
    """A preprocessed image fitted to the generation size. image: uint8 [H, W, 3] or [H, W, 4] (inpaint, mask in
    alpha) -> uint8 [height, width, 3|4].

    Just Resize stretches; Crop and Resize scales to cover and crops the centre; Resize and Fill scales to fit
    and fills the rest with the median border colour (for inpaint, marked to repaint). Resampling is the
    extension's: nearest for images of few colours (segmentation maps), area when shrinking, bicubic when
    growing; two-colour images are re-binarized, one-pixel edges thinned back to one pixel. (For inpaint maps the
    extension keeps the resampled colours in float; here they are rounded to uint8, within 0.5/255 of it.)"""
    mode = resize_mode(mode)
    _check_pixels(width, height, "the control image")
    x = _checked_image(image)
    x = x if x.ndim == 3 and x.shape[2] == 4 else hwc3(x)
    if mode == JUST_RESIZE:
        return _high_quality_resize(x, (width, height))
    old_h, old_w = x.shape[:2]
    k0, k1 = height / old_h, width / old_w
    k = min(k0, k1) if mode == RESIZE_AND_FILL else max(k0, k1)
    size = (int(np.round(old_w * k)), int(np.round(old_h * k)))
    _check_pixels(*size, "the scaled control image")
    if mode == CROP_AND_RESIZE:
        y = _high_quality_resize(x, size)
        top, left = max(0, (y.shape[0] - height) // 2), max(0, (y.shape[1] - width) // 2)
        return np.ascontiguousarray(y[top:top + height, left:left + width])
    background = np.tile(_border_colour(x)[None, None], (height, width, 1))
    y = _high_quality_resize(x, size)
    top, left = max(0, (height - y.shape[0]) // 2), max(0, (width - y.shape[1]) // 2)
    background[top:top + y.shape[0], left:left + y.shape[1]] = y
    return background


def _border_colour(x):
    borders = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
    colour = np.median(borders, axis=0).astype(x.dtype)
    if len(colour) == 4:
        colour[3] = 255  # the filled margin is for the inpaint model to draw
    return colour


def _high_quality_resize(x, size):
    """The extension's resampling of control maps to `size` (width, height); alpha, if any, is a mask."""
    mask = None
    if x.shape[2] == 4:
        x, mask = x[:, :, :3], x[:, :, 3]
    if x.shape[:2] != (size[1], size[0]):
        x, mask = _resample(x, mask, size)
    if mask is not None:
        x = np.concatenate([x, np.where(mask > 127, 255, 0).astype(np.uint8)[:, :, None]], axis=2)
    return np.ascontiguousarray(x)


def _resample(x, mask, size):
    new_pixels, old_pixels = size[0] * size[1], x.shape[0] * x.shape[1]
    colours = _colour_count(x)
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        interpolation = NEAREST
    elif new_pixels < old_pixels:
        interpolation = AREA
    else:
        interpolation = CUBIC  # the extension insists on cubic here: thin edges are recovered below
    y = imageops.resize(x, size, interpolation)
    if mask is not None:
        mask = imageops.resize(mask, size, interpolation)
    if binary:
        y = _rebinarize(x, y, grows=new_pixels > old_pixels)
    return y, mask


def _colour_count(x):
    packed = (x[:, :, 0].astype(np.uint32) << 16) | (x[:, :, 1].astype(np.uint32) << 8) | x[:, :, 2]
    return len(np.unique(packed))


def _rebinarize(x, y, grows):
    """Back to two levels after resampling a black/white map; one-pixel edges are thinned back to one pixel."""
    ones = np.ones((3, 3), np.uint8)
    opened = imageops.dilate(imageops.erode(x, ones), ones)
    one_pixel_edges = np.count_nonzero(opened < x) * 2 > np.count_nonzero(x > 127)
    y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edges:
        y = imageops.otsu_threshold(_directional_maxima(y))
        y = thin(y, prune=grows)
    else:
        y = imageops.otsu_threshold(y)
    return np.stack([y] * 3, axis=2)


_LINES = tuple(np.array(k, np.uint8) for k in (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]))


def _directional_maxima(x):
    """Keep pixels that are a maximum along at least one of the four directions, zero the rest."""
    y = np.zeros_like(x)
    for line in _LINES:
        np.putmask(y, imageops.dilate(x, line) == x, x)
    return y


def _rotations(*kernels):
    return tuple(np.rot90(np.array(k, np.int32), r) for r in range(4) for k in kernels)


# hit-or-miss patterns (1 set, -1 clear, 0 either) of removable edge pixels, and of spur ends
_THIN = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNE = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def thin(x: np.ndarray, prune: bool = True) -> np.ndarray:
    """Thin 0/255 edges to one pixel (at most 32 sweeps), then optionally remove one pixel of spur ends.
    Lvmin Zhang's "High Quality Edge Thinning" as the extension applies it."""
    y = x.copy()
    for _ in range(32):
        if not _sweep(y, _THIN):
            break
    if prune:
        _sweep(y, _PRUNE)
    return y


def _sweep(y, kernels):
    changed = False
    for k in kernels:
        hits = imageops.hit_or_miss(y, k) > 127
        if hits.any():
            y[hits] = 0
            changed = True
    return changed


def control_hint(prepared: np.ndarray) -> np.ndarray:
    """A prepared control image -> the ControlNet's hint: float32 [1, 3, H, W] in [0, 1]; with a mask (4
    channels) masked pixels are -1, the extension's inpaint protocol."""
    x = prepared.astype(np.float32) / 255.0
    hint = x[:, :, :3]
    if x.shape[2] == 4:
        masked = (x[:, :, 3:4] > 0.5).astype(np.float32)
        hint = hint * (1 - masked) - masked
    return np.ascontiguousarray(hint.transpose(2, 0, 1)[None])
