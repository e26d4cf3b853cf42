"""A1111 API request bodies, every field with A1111's default; a1111.py says what each one does here.

Fields A1111 does not have are accepted too (clients send extension fields) and reported in `ignored_fields`.
"""
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


def non_finite(value, path="body"):
    """The path of the first NaN or infinity in a parsed JSON value (Python's json reads NaN, Infinity), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = non_finite(item, f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]")
        if found:
            return found
    return None


class FiniteBody(BaseModel):
    """An API body that keeps unknown fields (A1111 clients send many) and refuses NaN and infinity anywhere."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _finite_numbers(cls, data):
        # NaN passes every range check, gives a NaN image and a response JSON cannot carry: refused here
        found = non_finite(data)
        if found:
            raise ValueError(f"{found} is not a finite number (NaN and infinity are refused)")
        return data


class _Common(FiniteBody):
    """The fields A1111's txt2img and img2img requests share."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"  # A1111's API falls back to it when sampler_name is missing
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int | None = None  # None: the model's native size (A1111 defaults to 512)
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None  # None: the `tiling` setting
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] | dict[str, Any] = []  # A1111: a list; sdonnx also takes the names
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None


class Txt2ImgRequest(_Common):
    denoising_strength: float | None = 0.75  # the hires pass's
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: str | None = None


class Img2ImgRequest(_Common):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str
