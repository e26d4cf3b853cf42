"""ControlNet units at sampling time, as sd-webui-controlnet's UNet hook applies them (scripts/hook.py).

Each UNet call of the denoiser (batch [uncond, cond...]) first runs the ControlNet of every unit inside its
guidance window on the same inputs (the first `latent_channels` of an inpainting model's sample), scales
its residuals and sums them over the units; the UNet graph with residual inputs (controlnet.residuals) adds
the sum to its skip connections and middle block:
- guidance window: a unit acts while start <= step / steps <= end, with the step the extension reads
  (A1111's `state.sampling_step`: 0 until the first step's callback, then the index of the step whose callback
  ran last, so during step k it is max(k - 1, 0)) and steps the pass's sampling steps (img2img and hires
  passes: the steps they run);
- weight: residual i times weight (Balanced), or weight * 0.825 ** (12 - i) (soft injection, the other two
  modes, and in the hires pass for canny/mlsd modules); SDXL's 10 residuals take the first 10 of these;
- "ControlNet is more important" and globally pooled (shuffle) models: the uncond rows get no control (the
  ControlNet runs on the cond rows only); pooled residuals are averaged over space after scaling;
- hr_option: "Low res only" / "High res only" leave the unit out of the other pass of a hires fix.
"""
from dataclasses import dataclass

import numpy as np

from .model import residual_names

SOFT_INJECTION_BASE = 0.825
SOFT_INJECTION_TOP = 12  # the extension's exponent counts down from SD's 13th (middle block) residual
_NO_RESIDUAL = np.zeros((1, 1, 1, 1), np.float32)  # broadcasts onto any skip connection: no control


def layer_scales(weight, soft, count):
    """Scale of each residual (skips first, middle block last) for a unit weight."""
    return [weight * SOFT_INJECTION_BASE ** float(SOFT_INJECTION_TOP - i) if soft else weight for i in range(count)]


@dataclass(frozen=True)
class PassUnit:
    """A unit ready for one sampling pass."""

    net: object  # model.ControlNetModel
    hint: np.ndarray  # [1, C, H, W] float32 in [0, 1] (-1: an inpaint unit's masked pixels)
    weight: float
    start: float
    end: float
    soft: bool
    cond_only: bool
    pooled: bool
    prepared: np.ndarray = None  # inpaint_only: the fitted control image with its mask, uint8 [H, W, 4]

    def active(self, fraction):
        return self.start <= fraction <= self.end


class StepClock:
    """The sampler step the extension's guidance window reads (A1111's state.sampling_step): set by the
    sampler's per-step callback to the index of the step just finished, 0 before the first."""

    def __init__(self, total):
        self.step, self.total = 0, max(1, int(total))

    def __call__(self, info=None, *args, **kwargs):
        if isinstance(info, dict) and "i" in info:
            self.step = int(info["i"])

    @property
    def fraction(self):
        return self.step / self.total


class ControlledUNet:
    """unet(sample, timestep, context, uncond_rows=0, **added) of a UNet with residual inputs, with the
    units' control added. uncond_rows: how many leading rows of the batch are the negative prompt's."""

    def __init__(self, unet, units, clock, residuals, latent_channels):
        self.unet, self.units, self.clock = unet, tuple(units), clock
        self.names = residual_names(residuals)
        self.latent_channels = latent_channels

    def __call__(self, sample, timestep, context, uncond_rows=0, **added):
        return self.unet(sample, timestep, context, residuals=self.residuals(sample, timestep, context, uncond_rows,
                                                                             added), **added)

    def residuals(self, sample, timestep, context, uncond_rows, added):
        """{residual name: summed control} of the units active at this step (zeros [1, 1, 1, 1] when none)."""
        total = None
        for unit in self.units:
            if unit.active(self.clock.fraction):
                control = self._control(unit, sample, timestep, context, uncond_rows, added)
                total = control if total is None else [t + c for t, c in zip(total, control)]
        return {name: _NO_RESIDUAL if total is None else r for name, r in zip(self.names, total or self.names)}

    def _control(self, unit, sample, timestep, context, uncond_rows, added):
        rows = slice(uncond_rows if unit.cond_only or unit.pooled else 0, None)
        batch = len(sample)
        x = sample[rows, :self.latent_channels]
        hint = np.broadcast_to(unit.hint, (len(x), *unit.hint.shape[1:]))
        outs = unit.net(x, np.asarray(timestep)[rows], context[rows], hint, **{k: v[rows] for k, v in added.items()})
        scales = layer_scales(unit.weight, unit.soft, len(outs))
        control = []
        for out, scale in zip(outs, scales):
            out = out * np.float32(scale)
            if unit.pooled:
                out = out.mean(axis=(2, 3), keepdims=True)
            if rows.start:  # the uncond rows get none
                out = np.concatenate([np.zeros((rows.start, *out.shape[1:]), np.float32), out])
            control.append(out if len(out) == batch else np.broadcast_to(out, (batch, *out.shape[1:])))
        return control


# ------------------------------------------------------------------------------------------- preparing units

@dataclass(frozen=True)
class Control:
    """A unit of a job with its ControlNet and its preprocessed image (the detected map), shared by the passes."""

    unit: object  # unit.ControlNetUnit
    net: object  # model.ControlNetModel
    detected: np.ndarray  # uint8 [H, W, 3] ([H, W, 4] for inpaint modules: the mask in alpha)


def detect(unit, image, mask, width, height, seed):
    """The unit's module run on its image (the extension's preprocessing): image/mask uint8 arrays, width x
    height the first pass's size (pixel perfect's target) -> the detected map."""
    from .preprocess import control_input, pixel_perfect_resolution, preprocess, resolve_params

    source = control_input(image, mask, unit.module)
    resolution, a, b = resolve_params(unit.module, unit.processor_res, unit.threshold_a, unit.threshold_b)
    if unit.pixel_perfect:
        resolution = pixel_perfect_resolution(source, width, height, unit.resize_mode)
    return preprocess(unit.module, source, resolution, a, b, seed=seed)


def pass_units(controls, width, height, hires_pass=False, with_hires=False):
    """The PassUnits of one pass at width x height: each detected map fitted with its unit's resize mode.
    hires_pass: this is a hires fix's second pass; with_hires: the job has one (hr_option applies)."""
    from .preprocess import control_hint, prepare_control_image

    units = []
    for c in controls:
        u = c.unit
        if with_hires and u.hr_option == ("Low res only" if hires_pass else "High res only"):
            continue
        prepared = prepare_control_image(c.detected, width, height, u.resize_mode)
        # the extension softens canny and mlsd units in the hires pass whatever their mode
        soft = u.soft_injection or (hires_pass and ("canny" in u.module or "mlsd" in u.module))
        units.append(PassUnit(c.net, control_hint(prepared), float(u.weight), float(u.guidance_start),
                              float(u.guidance_end), soft, u.cond_only, c.net.manifest.global_average_pooling,
                              prepared if _inpaint_only(u, prepared) else None))
    return tuple(units)


def _inpaint_only(unit, prepared):
    return "inpaint_only" in unit.module and prepared.ndim == 3 and prepared.shape[2] == 4


def inpaint_only_blend(unit):
    """(the image's pixels in [-1, 1] [1, 3, H, W], keep [1, 1, H/8, W/8]) of an inpaint_only unit: at every model
    call the extension replaces x0 outside its (latent-pooled) mask by the control image's latent, blended by the
    weight clipped to [0, 1], whatever the guidance window: x0 + keep * (image latent - x0), keep = w * (1 - mask)."""
    from .inpaint import latent_mask

    pixels = unit.prepared[:, :, :3].astype(np.float32).transpose(2, 0, 1)[None] / np.float32(127.5) - 1
    keep = np.float32(min(max(unit.weight, 0.0), 1.0)) * (1 - latent_mask(unit.prepared))
    return pixels, keep.astype(np.float32)


def restore_images(images, controls, width, height):
    """The extension's last step for inpaint_only units: outside each unit's mask (grown and softened) the
    finished image is the control image (fitted to width x height) again. images: PIL -> PIL."""
    from PIL import Image

    from .inpaint import restore_unmasked
    from .preprocess import prepare_control_image

    for c in controls:
        prepared = prepare_control_image(c.detected, width, height, c.unit.resize_mode)
        if _inpaint_only(c.unit, prepared):
            images = [Image.fromarray((restore_unmasked(np.asarray(im, np.float32) / 255, prepared) * 255)
                                      .clip(0, 255).astype(np.uint8)) for im in images]
    return images


def image_array(image, what):
    """A unit's image or mask (path, PIL image, uint8 array, or a server upload with decode()) -> uint8 array
    [H, W, 3] ([H, W, 4] when it has transparency, which the modules composite over white)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        return image
    if hasattr(image, "decode") and not isinstance(image, (bytes, bytearray)):
        image = image.decode()
    if not isinstance(image, Image.Image):
        from ..img2img import load_image

        image = load_image(image, what)
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    return np.asarray(image.convert("RGBA" if transparent else "RGB"))


def detected_images(controls):
    """The detected map of each unit that keeps it (save_detected_map), as the extension shows it (inpaint modules:
    the masked area veiled through alpha) -> [PIL image]."""
    from PIL import Image

    from .preprocess import display_image

    return [Image.fromarray(display_image(c.unit.module, c.detected)) for c in controls if c.unit.save_detected_map]
