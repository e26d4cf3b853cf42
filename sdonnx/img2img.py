"""img2img and inpainting inputs as A1111 prepares them: resize modes, masks, masked content, crop
regions, latent blending and the final overlay. Pure PIL/numpy; the pipeline calls these stages.
"""
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from . import limits
from .image import ImageError, flatten, open_image

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill", "just resize (latent upscale)")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")


def load_image(image, what="init image"):
    """A PIL image, or a path to one (or its bytes), in its own mode; unreadable input is an ImageError
    (a ValueError) naming it."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike, bytes, bytearray)):
        raise ImageError(f"the {what} must be a PIL image or a path to an image file, not {type(image).__name__}")
    return open_image(image, what)


def choice(name, value, choices):
    """Accept an index or a case-insensitive name from `choices`; returns the index."""
    if isinstance(value, (int, np.integer)) and 0 <= value < len(choices):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in choices:
        return choices.index(value.strip().lower())
    raise ValueError(f"{name} {value!r} is not one of: {', '.join(f'{i} ({c})' for i, c in enumerate(choices))}")


def check_strength(strength):
    if not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"strength (denoising strength) must be in (0, 1], got {strength}")
    return float(strength)


def resize_image(image, width, height, mode=0):
    """A1111's resize modes: 0 stretch, 1 fill the box then centre-crop, 2 fit inside and fill the
    empty bands by stretching the image's edges, 3 as 0 (img2img's mode 3 resizes latents instead: InitPlan)."""
    image = image.convert("RGB")
    if mode in (0, 3):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        w, h = (width, image.height * width // image.width) if ratio > src_ratio else (image.width * height // image.height, height)
        resized = image.resize((w, h), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (width, height))
        canvas.paste(resized, (width // 2 - w // 2, height // 2 - h // 2))
        return canvas
    w, h = (image.width * height // image.height, height) if ratio > src_ratio else (width, image.height * width // image.width)
    resized = image.resize((w, h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    left, top = width // 2 - w // 2, height // 2 - h // 2
    canvas.paste(resized, (left, top))
    if ratio > src_ratio:  # bands left and right: stretch the outer columns
        if left > 0:
            canvas.paste(resized.resize((left, h), box=(0, 0, 0, h)), (0, 0))
            canvas.paste(resized.resize((width - left - w, h), box=(w, 0, w, h)), (left + w, 0))
    elif top > 0:  # bands above and below: stretch the outer rows
        canvas.paste(resized.resize((w, top), box=(0, 0, w, 0)), (0, 0))
        canvas.paste(resized.resize((w, height - top - h), box=(0, h, w, h)), (0, top + h))
    return canvas


def _check_latent_upscale(plan, size, target):
    # A1111 fails on a mask with mode 3 when the sizes differ (its overlay and mask are at the target size,
    # the image at its own); say so before anything runs
    if plan is not None and size != target:
        raise ValueError(f"resize_mode 3 (just resize (latent upscale)) with a mask needs the init image at the "
                         f"output size ({target[0]}x{target[1]}), not {size[0]}x{size[1]}; use resize_mode 0, 1 or 2")


def to_array(image):
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1] (the VAE encoder's input)."""
    return (np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]


def outpaint_canvas(image, left=0, right=0, up=0, down=0):
    """Extend the canvas for outpainting: (bigger image with the new border filled from the edges,
    mask that is white on the new border). Sizes stay multiples of 8 by growing the border."""
    for name, value in (("left", left), ("right", right), ("up", up), ("down", down)):
        limits.check_range(f"outpaint {name} margin", value, 0, limits.MAX_SIDE)
    width, height = image.width + left + right, image.height + up + down
    width8, height8 = -(-width // 8) * 8, -(-height // 8) * 8
    limits.check_image(width8, height8, "outpaint canvas")
    image = flatten(image)
    right, down = right + width8 - width, down + height8 - height
    canvas = resize_image(image, image.width, image.height, 0)
    canvas = ImageOps.expand(canvas, border=(left, up, right, down), fill=(0, 0, 0))
    arr = np.asarray(canvas).copy()
    if left:
        arr[:, :left] = arr[:, left:left + 1]
    if right:
        arr[:, -right:] = arr[:, -right - 1:-right]
    if up:
        arr[:up] = arr[up:up + 1]
    if down:
        arr[-down:] = arr[-down - 1:-down]
    mask = Image.new("L", (width8, height8), 255)
    mask.paste(0, (left, up, left + image.width, up + image.height))
    return Image.fromarray(arr), mask


@dataclass
class MaskPlan:
    """The mask as the stages need it.

    overlay: the blurred mask at image size (white = generated), used to paste the result over the
    original; crop: the (x0, y0, x1, y1) region processed when inpainting only the masked area, else None;
    process: the mask the model sees (cropped and resized to the generation size when crop is set).
    """

    overlay: Image.Image
    process: Image.Image
    crop: tuple | None


def prepare_mask(mask, size, *, blur=4, invert=False, only_masked=False, padding=32, target=None, resize_mode=0):
    """A1111's mask pipeline: L mode, optional invert, Gaussian blur, then either the crop region for
    'only masked' (the mask's bounding box grown by `padding`, expanded to the target aspect ratio) or,
    for the whole picture, the mask resized to the target like the image (resize_mode) with an overlay
    mask of twice its value (A1111's mask_for_overlay: the generation covers the blur's inner half)."""
    mask = mask.convert("L")
    if mask.size != size:
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; "
                         f"they must be the same size")
    if invert:
        mask = ImageOps.invert(mask)
    blurred = mask.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else mask
    if not only_masked:
        target = target or size
        # A1111 resizes the mask with the image's mode; its "latent upscale" falls to resize-and-fill here
        process = blurred if blurred.size == target else resize_image(blurred, *target, min(resize_mode, 2)).convert("L")
        doubled = np.clip(np.asarray(process, np.float32) * 2, 0, 255).astype(np.uint8)
        return MaskPlan(overlay=Image.fromarray(doubled, "L"), process=process, crop=None)
    box = _crop_region(np.asarray(mask), padding, target or size)
    if box is None:
        raise ValueError("the mask is empty: nothing to inpaint")
    process = blurred.crop(box).resize(target or size, Image.Resampling.LANCZOS)
    return MaskPlan(overlay=blurred, process=process, crop=box)


def _crop_region(mask, padding, target):
    ys, xs = np.nonzero(mask > 127)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    x0, y0, x1, y1 = xs.min() - padding, ys.min() - padding, xs.max() + 1 + padding, ys.max() + 1 + padding
    # grow the shorter side so the crop has the target's aspect ratio (A1111 expand_crop_region)
    ratio = target[0] / target[1]
    cw, ch = x1 - x0, y1 - y0
    if cw / ch < ratio:
        grow = int(ch * ratio) - cw
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = int(cw / ratio) - ch
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


def fill_masked(image, mask):
    """A1111's 'fill' masked content: the masked area takes the colours of its surroundings, by
    repeatedly blurring the unmasked pixels into it."""
    image = image.convert("RGB")
    keep = np.asarray(mask.convert("L"), np.float32) < 128
    arr = np.asarray(image, np.float32)
    filled = arr * keep[..., None]
    weight = keep.astype(np.float32)
    for radius in (256, 64, 16, 4, 1, 0):
        if radius:
            blurred = np.asarray(Image.fromarray(filled.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)), np.float32)
            w = np.asarray(Image.fromarray((weight * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255
            estimate = blurred / np.maximum(w, 1e-3)[..., None]
            filled = np.where(weight[..., None] > 0.999, filled, estimate.clip(0, 255))
            weight = np.maximum(weight, (w > 0.01).astype(np.float32))
    out = np.where(keep[..., None], arr, filled)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def latent_mask(mask, latent_size):
    """Repaint mask at latent resolution as A1111 makes it (PIL's default bicubic resize, rounded to 0/1):
    [1, 1, h, w] (1 = repaint)."""
    small = mask.convert("L").resize(latent_size, Image.Resampling.BICUBIC)
    return np.around(np.asarray(small, np.float32) / 255.0)[None, None]


def overlay(generated, original, plan):
    """Paste the generation over the original through the blurred mask: outside the mask the result is
    exactly the input image. With a crop, the generation is first scaled back into its region."""
    original = original.convert("RGB")
    if plan.crop is not None:
        x0, y0, x1, y1 = plan.crop
        base = original.copy()
        base.paste(generated.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))
        generated = base
    return Image.composite(generated.convert("RGB"), original, plan.overlay)


@dataclass
class InitPlan:
    """An img2img/inpaint request's image side, prepared once per generate call."""

    original: Image.Image  # what the output is pasted over: the image at the output size, or the user's around a crop
    array: np.ndarray  # [1, 3, H, W] in [-1, 1]: what gets encoded (resized, cropped, filled)
    width: int
    height: int
    strength: float
    resize_mode: int
    mask: MaskPlan | None = None
    fill: int = 1
    mask_blur: int = 4
    padding: int = 32

    @classmethod
    def make(cls, init_image, mask, width, height, *, resize_mode, mask_blur, invert, only_masked, padding,
             fill, strength, factor):
        original = flatten(load_image(init_image))  # transparent areas become white, as in A1111
        mode = choice("resize_mode", resize_mode, RESIZE_MODES)
        fill = choice("inpainting_fill", fill, MASKED_CONTENT)
        strength = check_strength(strength)
        # A1111 takes the init image's size when none is given; rounded down to the model's multiple
        width = width or max(factor, original.width // factor * factor)
        height = height or max(factor, original.height // factor * factor)
        plan = None
        if mask is not None:
            plan = prepare_mask(load_image(mask, "mask"), original.size, blur=mask_blur, invert=invert,
                                only_masked=only_masked, padding=padding, target=(width, height), resize_mode=mode)
        crop = plan is not None and plan.crop
        if mode == 3 and not crop:
            _check_latent_upscale(plan, original.size, (width, height))
            image = original  # A1111 encodes it at its own size; the pipeline resizes the latents
        else:
            image = resize_image(original.crop(plan.crop) if crop else original, width, height, 0 if crop else mode)
        # the result is pasted over the image at the output size (A1111's overlay), or into the original
        # around the crop when only the masked area was processed
        base = image if plan is not None and not crop else original
        if plan is not None and fill == 0:
            image = fill_masked(image, plan.process)
        return cls(base, to_array(image), width, height, strength, mode, plan, fill, mask_blur, padding)

    def latent_mask(self, size_hw):
        """[1, 1, h, w], 1 = repaint."""
        return latent_mask(self.mask.process, (size_hw[1], size_hw[0]))

    def conditioning_mask(self, size_hw):
        """An inpainting model's mask channel as A1111 makes it: the pixel mask rounded to 0/1, then resized
        to the latent size with torch's default (legacy nearest) interpolate: [1, 1, h, w]."""
        return interpolate(self.pixel_mask(), size_hw, "nearest")

    def pixel_mask(self):
        """[1, 1, H, W] in {0, 1} at the processing size, 1 = repaint (the inpainting model's mask)."""
        return np.around(np.asarray(self.mask.process.convert("L"), np.float32) / 255.0)[None, None]

    def masked_content(self, latent, keep, noise):
        """The starting latent under A1111's masked content: latent noise / nothing replace the masked part."""
        if self.fill == 2:
            return latent * keep + noise * (1.0 - keep)
        if self.fill == 3:
            return latent * keep
        return latent

    def finish(self, image):
        """Outside the mask the output is the input image (A1111's overlay); plain img2img is unchanged."""
        return image if self.mask is None else overlay(image, self.original, self.mask)

    def params(self):
        """Infotext keys A1111 writes for img2img/inpaint."""
        if self.mask is None:
            return {"Resize mode": RESIZE_MODES[self.resize_mode].capitalize() if self.resize_mode else None}
        return {"Mask blur": self.mask_blur, "Masked content": MASKED_CONTENT[self.fill],
                "Inpaint area": "Only masked" if self.mask.crop else None,
                "Masked area padding": self.padding if self.mask.crop else None}


# A1111's latent upscale modes: torch.nn.functional.interpolate(mode, antialias), align_corners=False
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# upscalers on the decoded image, as A1111's built-in ones: "None" only resizes, with Lanczos
IMAGE_UPSCALERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
                   "Nearest": Image.Resampling.NEAREST}


def upscale_latents(latents, size_hw, mode="Latent"):
    """Resize latents [B, C, h, w] to size_hw with one of A1111's latent upscale modes."""
    if mode not in LATENT_UPSCALERS:
        raise ValueError(f"latent upscaler {mode!r}: choose one of {', '.join(LATENT_UPSCALERS)}")
    return interpolate(latents, size_hw, *LATENT_UPSCALERS[mode])


def interpolate(x, size_hw, mode="bilinear", antialias=False):
    """torch.nn.functional.interpolate(x, size=size_hw, mode=mode, antialias=antialias) for [B, C, h, w]
    float arrays with align_corners=False, as separable per-axis weight matrices."""
    x = np.asarray(x, np.float32)
    rows = _axis_weights(x.shape[2], size_hw[0], mode, antialias)
    cols = _axis_weights(x.shape[3], size_hw[1], mode, antialias)
    return np.einsum("oh,bchw,pw->bcop", rows, x, cols, optimize=True).astype(np.float32)


def _axis_weights(n_in, n_out, mode, antialias):
    """[n_out, n_in]: the weights one output row takes from the input rows (torch's CPU kernels)."""
    if mode in ("nearest", "nearest-exact"):
        index = _nearest_index(n_in, n_out, mode == "nearest-exact")
        return np.eye(n_in, dtype=np.float32)[index]
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"interpolation mode {mode!r}: choose bilinear, bicubic, nearest or nearest-exact")
    # positions and weights in float32 as torch computes them for float32 tensors (float64 would differ
    # from torch by up to ~2e-5 on 64 -> 100 px)
    scale = np.float32(n_in / n_out)
    if antialias:
        return _aa_weights(n_in, n_out, scale, 2 if mode == "bilinear" else 4)
    src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    if mode == "bilinear":
        src = np.maximum(src, np.float32(0))  # torch clamps the linear source index at 0, not the cubic one
        taps, offsets = _linear_taps(src - np.floor(src)), (0, 1)
    else:
        taps, offsets = _cubic_taps(src - np.floor(src), np.float32(-0.75)), (-1, 0, 1, 2)
    weights = np.zeros((n_out, n_in), np.float32)
    base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    for tap, offset in zip(taps, offsets):
        np.add.at(weights, (np.arange(n_out), np.clip(base + offset, 0, n_in - 1)), tap)
    return weights


def _nearest_index(n_in, n_out, exact):
    # torch computes the scale and the source position in float32 ("nearest" is floor(i * scale), the
    # legacy rule; "nearest-exact" samples pixel centres like PIL)
    scale = np.float32(n_in / n_out)
    i = np.arange(n_out)
    pos = (i + 0.5).astype(np.float32) * scale if exact else i.astype(np.float32) * scale
    return np.minimum(np.floor(pos).astype(np.int64), n_in - 1)


def _linear_taps(t):
    return np.float32(1) - t, t


def _cubic_taps(t, a):
    """Keys' cubic convolution weights of the 4 taps around a sample at fraction t past the second."""
    one, two, three, four, five, eight = (np.float32(v) for v in (1, 2, 3, 4, 5, 8))

    def near(x):  # |x| <= 1
        return ((a + two) * x - (a + three)) * x * x + one

    def far(x):  # 1 < |x| < 2
        return ((a * x - five * a) * x + eight * a) * x - four * a

    return far(t + one), near(t), near(one - t), far(two - t)


def _aa_filter(x, taps):
    x = np.abs(x)
    if taps == 2:  # triangle
        return np.where(x < 1, 1 - x, 0.0)
    a = -0.5  # torch's antialiased bicubic uses PIL's a = -0.5, not the -0.75 of plain bicubic
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _aa_weights(n_in, n_out, scale, taps):
    """torch's antialiased kernels: the filter stretched by the scale when shrinking, taps outside the
    input dropped and the rest renormalised (PIL's resampling)."""
    f32 = np.float32
    support = f32(taps / 2) * max(scale, f32(1))
    stretch = f32(1) / max(scale, f32(1))
    weights = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        center = scale * (f32(i) + f32(0.5))
        lo = max(int(center - support + f32(0.5)), 0)
        hi = min(int(center + support + f32(0.5)), n_in)
        w = _aa_filter((np.arange(lo, hi, dtype=f32) - center + f32(0.5)) * stretch, taps).astype(f32)
        total = w.sum(dtype=f32)
        weights[i, lo:hi] = w / total if total != 0 else w
    return weights


@dataclass
class HiresPlan:
    width: int
    height: int
    upscaler: str
    steps: int
    denoising: float
    scale: float | None
    steps_given: bool = False  # A1111 writes "Hires steps" only when set

    @property
    def steps_run(self):
        return int(min(self.denoising, 0.999) * self.steps) + 1

    def params(self, sampler, scheduler, prompt, negative):
        return {"Hires upscale": self.scale, "Hires resize": None if self.scale else (self.width, self.height),
                "Hires steps": self.steps if self.steps_given else None, "Hires upscaler": self.upscaler, "Hires sampler": sampler,
                "Hires schedule type": scheduler, "Hires prompt": prompt or None,
                "Hires negative prompt": negative or None}


def hires_plan(width, height, scale, hires_width, hires_height, upscaler, steps, denoising, factor, steps_given=False):
    """Validate hires fix settings; the target is scale x the first pass, or hires_width x hires_height."""
    if not isinstance(upscaler, str) or not upscaler.strip():
        raise ValueError(f"hires upscaler {upscaler!r}: choose one of {', '.join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])} "
                         f"or an upscaler model's name")
    # any other name is an upscaler model (R-ESRGAN 4x+, 4x-UltraSharp, ...): the pipeline finds it in its
    # upscaler folders before the first pass runs
    denoising = check_strength(denoising)
    if hires_width or hires_height:
        w = hires_width or int(width * hires_height / height)
        h = hires_height or int(height * hires_width / width)
        scale = None
    else:
        if not scale or scale <= 0:
            raise ValueError(f"hires_scale must be positive, got {scale}")
        w, h = int(width * scale), int(height * scale)
    w, h = max(factor, w // factor * factor), max(factor, h // factor * factor)
    return HiresPlan(w, h, upscaler, int(steps), denoising, scale, steps_given)


def img2img_sigmas(sigmas, strength):
    """A1111's img2img slice: with t_enc = int(min(strength, 0.999) * steps), the last t_enc + 1 steps."""
    if strength is None:
        return sigmas
    steps = len(sigmas) - 1
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]
