"""A1111 API request bodies. Unknown and unsupported fields are accepted; `ignored_fields` names them."""
from typing import Any

from pydantic import BaseModel, ConfigDict

# A1111 fields this server accepts without acting on, with A1111's default: a field at its default (or
# empty, zero, false) changes nothing, so only a field set to something else is reported as ignored.
A1111_DEFAULTS = {
    "styles": None, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "s_min_uncond": None, "override_settings_restore_afterwards": True, "refiner_checkpoint": None,
    "refiner_switch_at": None, "disable_extra_networks": False, "firstpass_image": None, "comments": None,
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "force_task_id": None, "script_name": None, "script_args": [], "alwayson_scripts": {}, "infotext": None,
    "image_cfg_scale": None, "include_init_images": False, "initial_noise_multiplier": None,
    "latent_mask": None, "denoising_strength": None, "sampler_index": "Euler",
}

HIRES_PREFIXES = ("hr_", "firstphase_")


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
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
    eta: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False

    def ignored_fields(self, handled=()):
        """Names of the fields sent with a value this server does not act on."""
        extra = self.model_extra or {}
        if not extra.get("enable_hr"):  # hires fields mean nothing without it (as in A1111)
            handled = (*handled, *(k for k in extra if k.startswith(HIRES_PREFIXES)))
        # empty/zero/false values ask for nothing, whatever the field
        return sorted(k for k, v in extra.items() if k not in handled and v and v != A1111_DEFAULTS.get(k))


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float = 0.75
    resize_mode: int = 0
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    image: str
