"""A1111's txt2img/img2img request -> Pipeline.generate keywords: the one place the API's fields are mapped.

Every field of A1111's request is in exactly one table: GENERATE (the generate keywords it feeds), SERVER (the
server acts on it itself) or UNSUPPORTED (no equivalent in sdonnx, and why). OPTIONS does the same for the A1111
settings a request carries in override_settings (or POST /options sets). translate() applies the tables with
A1111's defaults and semantics; a field set away from its default that nothing acts on is reported as ignored.
"""
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from ..img2img import IMAGE_UPSCALERS, LATENT_UPSCALERS
from ..request import MAX_SEED, GenerationRequest
from ..samplers import resolve
from .codec import EncodedImage

# A1111 request field -> the Pipeline.generate keywords it feeds
GENERATE = {
    "prompt": ("prompt",), "negative_prompt": ("negative_prompt",),
    "styles": ("prompt", "negative_prompt", "hires_prompt", "hires_negative_prompt"),
    "seed": ("seed",), "subseed": ("subseed",), "subseed_strength": ("subseed_strength",),
    "seed_resize_from_w": ("seed_resize_from_w",), "seed_resize_from_h": ("seed_resize_from_h",),
    "sampler_name": ("sampler",), "sampler_index": ("sampler",), "scheduler": ("scheduler",),
    "batch_size": ("batch_size",), "n_iter": ("batch_count",), "steps": ("steps",), "cfg_scale": ("cfg_scale",),
    "width": ("width",), "height": ("height",), "tiling": ("tiling",),
    "eta": ("eta",), "s_churn": ("s_churn",), "s_tmin": ("s_tmin",), "s_tmax": ("s_tmax",), "s_noise": ("s_noise",),
    "denoising_strength": ("strength", "hires_denoising"),
    "refiner_checkpoint": ("refiner",), "refiner_switch_at": ("refiner_switch_at",),
    "enable_hr": ("hires",), "hr_scale": ("hires_scale",), "hr_upscaler": ("hires_upscaler",),
    "hr_second_pass_steps": ("hires_steps",), "hr_resize_x": ("hires_width",), "hr_resize_y": ("hires_height",),
    "firstphase_width": ("width",), "firstphase_height": ("height",),
    "hr_sampler_name": ("hires_sampler",), "hr_scheduler": ("hires_scheduler",),
    "hr_prompt": ("hires_prompt",), "hr_negative_prompt": ("hires_negative_prompt",),
    "init_images": ("init_image",), "resize_mode": ("resize_mode",), "mask": ("mask",),
    "mask_blur": ("mask_blur",), "mask_blur_x": ("mask_blur",), "mask_blur_y": ("mask_blur",),
    "inpainting_fill": ("inpainting_fill",), "inpaint_full_res": ("inpaint_full_res",),
    "inpaint_full_res_padding": ("inpaint_full_res_padding",), "inpainting_mask_invert": ("inpainting_mask_invert",),
    # sd-webui-controlnet's units: {"controlnet": {"args": [unit, ...]}}; other scripts are reported ignored
    "alwayson_scripts": ("controlnet",),
    "restore_faces": ("restore_faces",),
}

# A1111 request fields the server acts on itself
SERVER = {
    "override_settings": "A1111 settings for this request only (OPTIONS); sd_model_checkpoint picks the model",
    "override_settings_restore_afterwards": "overrides always apply to their own request only",
    "send_images": "whether the response carries the images",
    "save_images": "saves the images under `sdonnx serve -o` (txt2img-images/, img2img-images/)",
    "do_not_save_samples": "save_images decides, as in A1111's API",
    "do_not_save_grid": "no grids are made",
    "include_init_images": "echoes init_images and mask in the response's parameters",
    "force_task_id": "the job's id, reported as current_task by /progress",
    "comments": "A1111 discards them as well",
    "infotext": "an A1111 infotext: its settings apply where the request does not set the field (A1111 1.7+)",
    "script_name": "runs A1111's X/Y/Z plot, prompt matrix or prompts from file (sdonnx/server/scripts.py)",
    "script_args": "the script's arguments in A1111's order (or by name)",
}

# A1111 request fields without an equivalent here, and why
UNSUPPORTED = {
    "s_min_uncond": "negative guidance minimum sigma (NGMS) is not implemented",
    "hr_checkpoint_name": "the hires pass runs on the request's own model",
    "firstpass_image": "the hires fix always runs its own first pass",
    "disable_extra_networks": "LoRA tags in the prompt always apply",
    "image_cfg_scale": "instruct-pix2pix models are not supported",
    "initial_noise_multiplier": "img2img noise is never scaled (A1111's default 1.0)",
    "latent_mask": "the mask is used for the latents as well",
}

# A1111 settings (override_settings, POST /options) -> (generate keyword, A1111's default)
OPTIONS = {
    "CLIP_stop_at_last_layers": ("clip_skip", 1), "randn_source": ("rng", "GPU"),
    "eta_noise_seed_delta": ("ensd", 0), "sigma_min": ("sigma_min", 0.0), "sigma_max": ("sigma_max", 0.0),
    "rho": ("rho", 0.0), "emphasis": ("emphasis", "Original"), "tiling": ("tiling", False),
    "sdxl_crop_top": ("crop_top_left", 0), "sdxl_crop_left": ("crop_top_left", 0),
    "sdxl_refiner_high_aesthetic_score": ("aesthetic_score", 6.0),
    "sdxl_refiner_low_aesthetic_score": ("negative_aesthetic_score", 2.5),
    "face_restoration_model": ("restore_faces", "CodeFormer"), "code_former_weight": ("codeformer_weight", 0.5),
    "face_restoration": ("restore_faces", False),
    "sd_vae": ("vae", "Automatic"),
}
FACE_RESTORERS = ("CodeFormer", "GFPGAN")

# request fields (GenerationRequest) no A1111 request field or setting reaches, and why
PYTHON_ONLY = {
    "tiled_vae": "A1111's tiled VAE is an extension with its own script arguments (decided automatically here)",
    "sampler_options": "A1111's API has fields for eta, s_churn, s_tmin, s_tmax and s_noise only",
}
# values of a request field A1111's API cannot express
PARTLY = {"tiling": "A1111's tiling is on or off: no seamless tiling along one axis (\"x\", \"y\")"}

RNG_SOURCES = {"GPU": "nv", "NV": "nv", "CPU": "cpu"}
# sampler options, and the values at which a sampler without that option loses nothing
SAMPLER_NEUTRAL = {"eta": 0.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
NO_REFINER = (None, "", "None", "none")
SAME = ("", "Use same sampler", "Use same scheduler")  # A1111's UI choices meaning "as the first pass"
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)
_LORA_TAG = re.compile(r"<lora:([^:>]+)[^>]*>")


class TranslationError(ValueError):
    """A field with a value no translation exists for; status is the HTTP code A1111 answers with."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status


@dataclass
class Translation:
    """Generate keywords (seed, batch_size, batch_count included), and what the response reports."""

    kwargs: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)
    comments: list = field(default_factory=list)  # warnings for the response's info, as A1111's p.comment
    styles: list = field(default_factory=list)


def translate(req, mode, options, styles, find_model, restorers=None):
    """A validated A1111 request model -> Translation; raises TranslationError for values A1111 refuses.

    options: the server's A1111 settings merged with the request's override_settings; styles: {name: (prompt,
    negative prompt)} from styles.csv; find_model(name) -> model entry (raises ValueError when unknown);
    restorers: the face restorers installed (None: not checked)."""
    t = Translation()
    _prompts(req, styles, t)
    _sampling(req, options, t)
    _seeds(req, options, t)
    _options(options, t)
    _faces(req, options, t, restorers)
    if mode == "txt2img":
        _hires(req, t)
    else:
        _img2img(req, t)
    _refiner(req, find_model, t)
    _alwayson(req, t)
    _infotext(req, mode, find_model, t)
    t.ignored += [name for name in UNSUPPORTED if _set(req, name)]
    t.ignored += sorted(k for k, v in (req.model_extra or {}).items() if v)  # fields A1111 does not have either
    return t


def _set(req, name):
    """Whether a field was sent with a value other than A1111's default (empty and zero ask for nothing)."""
    value = getattr(req, name, None)
    return bool(value) and value != type(req).model_fields[name].default


# ---------------------------------------------------------------------------- prompts and styles


def apply_styles(prompt, texts):
    """A1111's styles: a style text holding {prompt} takes the prompt there, any other is appended after a comma."""
    for text in texts:
        if "{prompt}" in text:
            prompt = text.replace("{prompt}", prompt)
        else:
            prompt = ", ".join(part for part in (prompt.strip(), text.strip()) if part)
    return prompt


def _prompts(req, styles, t):
    chosen = list(req.styles or [])
    missing = [name for name in chosen if name not in styles]
    if missing:
        t.comments.append(f"Styles not found: {', '.join(missing)}")
    found = [styles[name] for name in chosen if name in styles]
    positive, negative = [s[0] for s in found], [s[1] for s in found]
    t.styles = chosen
    t.kwargs.update(prompt=apply_styles(req.prompt, positive), negative_prompt=apply_styles(req.negative_prompt, negative))
    if getattr(req, "enable_hr", False):
        # A1111: an empty hires prompt is the prompt; styles apply to it as well; written only when it differs
        for key, text, base, texts in (("hires_prompt", req.hr_prompt, req.prompt, positive),
                                       ("hires_negative_prompt", req.hr_negative_prompt, req.negative_prompt, negative)):
            styled = apply_styles(text or base, texts)
            if styled != t.kwargs[key.replace("hires_", "")]:
                t.kwargs[key] = styled


def drop_missing_loras(prompt, available):
    """(prompt without the <lora:...> tags whose file is not in `available`, [missing names]): A1111 generates
    without a LoRA it cannot find and says so."""
    missing = []

    def keep(m):
        if m.group(1) in available:
            return m.group(0)
        missing.append(m.group(1))
        return ""

    return _LORA_TAG.sub(keep, prompt), missing


# ---------------------------------------------------------------------------- sampling, seeds, settings


def _sampling(req, options, t):
    sampler = req.sampler_name or req.sampler_index or "Euler"
    resolved = _resolve(sampler, req.scheduler or "Automatic")
    t.kwargs.update(sampler=resolved.sampler, scheduler=resolved.schedule, steps=req.steps, cfg_scale=req.cfg_scale,
                    batch_size=req.batch_size, batch_count=req.n_iter)
    if req.width is not None:
        t.kwargs["width"] = req.width
    if req.height is not None:
        t.kwargs["height"] = req.height
    tiling = req.tiling if req.tiling is not None else options.get("tiling", False)
    if tiling:
        t.kwargs["tiling"] = True
    for name, neutral in SAMPLER_NEUTRAL.items():
        value = getattr(req, name)
        if name == "s_tmax" and value == 0:
            value = float("inf")  # A1111 reads 0 as "no upper bound"
        if value is None or value == resolved.options.get(name, neutral):
            continue
        if name in resolved.options:
            t.kwargs[name] = value
        else:
            t.ignored.append(name)  # the sampler has no such option
    return resolved


def _resolve(sampler, scheduler):
    try:
        return resolve(sampler, scheduler)
    except ValueError as e:
        raise TranslationError(404, str(e)) from None


def _seeds(req, options, t):
    """A1111's seed, variation seed, seed resize and ENSD; -1 draws a random seed."""
    t.kwargs["seed"] = random.randint(0, MAX_SEED) if req.seed in (-1, None) else req.seed
    if req.subseed_strength:
        t.kwargs.update(subseed=random.randint(0, MAX_SEED) if req.subseed in (-1, None) else req.subseed,
                        subseed_strength=req.subseed_strength)
    if req.seed_resize_from_w > 0 and req.seed_resize_from_h > 0:
        t.kwargs.update(seed_resize_from_w=req.seed_resize_from_w, seed_resize_from_h=req.seed_resize_from_h)


def check_option(name, value):
    """An A1111 setting generation reads, checked; raises TranslationError naming the valid values."""
    if name in ("CLIP_stop_at_last_layers", "eta_noise_seed_delta", "sdxl_crop_top", "sdxl_crop_left"):
        low, high = (1, 24) if name == "CLIP_stop_at_last_layers" else (0, MAX_SEED)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TranslationError(422, f"{name} must be a whole number from {low} to {high}, got {value!r}")
    elif name == "randn_source" and (not isinstance(value, str) or value not in RNG_SOURCES):
        raise TranslationError(422, f"randn_source {value!r} is not one of {', '.join(RNG_SOURCES)}")
    elif name == "tiling" and not isinstance(value, bool):
        raise TranslationError(422, f"tiling must be true or false, got {value!r}")
    elif name == "face_restoration_model" and value not in FACE_RESTORERS:
        raise TranslationError(422, f"face_restoration_model {value!r} is not one of {', '.join(FACE_RESTORERS)}")
    elif name == "face_restoration" and not isinstance(value, bool):
        raise TranslationError(422, f"face_restoration must be true or false, got {value!r}")
    elif name == "code_former_weight" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                           or not 0 <= value <= 1):
        raise TranslationError(422, f"code_former_weight must be a number from 0 to 1, got {value!r}")
    elif name == "sd_vae" and (not isinstance(value, str) or not value.strip()):
        raise TranslationError(422, f"sd_vae must be a VAE's name, Automatic or None, got {value!r}")
    elif name == "emphasis" and value not in ("Original", "No norm", "None"):
        raise TranslationError(422, f"emphasis {value!r} is not one of Original, No norm, None")
    elif name in ("sigma_min", "sigma_max", "rho", "sdxl_refiner_high_aesthetic_score",
                  "sdxl_refiner_low_aesthetic_score"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise TranslationError(422, f"{name} must be a number >= 0, got {value!r}")
    return value


def _options(options, t):
    """The settings generation reads, passed only where they differ from A1111's defaults."""
    values = {name: check_option(name, options.get(name, default)) for name, (_, default) in OPTIONS.items()}
    t.kwargs["clip_skip"] = values["CLIP_stop_at_last_layers"]
    t.kwargs["rng"] = RNG_SOURCES[values["randn_source"]]
    if values["eta_noise_seed_delta"]:
        t.kwargs["ensd"] = values["eta_noise_seed_delta"]
    for name in ("sigma_min", "sigma_max", "rho"):
        if values[name]:  # A1111: 0 is the schedule's own value
            t.kwargs[name] = float(values[name])
    if values["emphasis"] != "Original":
        t.kwargs["emphasis"] = values["emphasis"]
    if values["sd_vae"] not in ("Automatic", "auto"):
        t.kwargs["vae"] = values["sd_vae"]
    if values["sdxl_crop_top"] or values["sdxl_crop_left"]:
        t.kwargs["crop_top_left"] = (values["sdxl_crop_top"], values["sdxl_crop_left"])
    for name in ("sdxl_refiner_high_aesthetic_score", "sdxl_refiner_low_aesthetic_score"):
        keyword, default = OPTIONS[name]
        if values[name] != default:
            t.kwargs[keyword] = float(values[name])


def _faces(req, options, t, restorers):
    """A1111's restore_faces (None: the face_restoration setting) with the face_restoration_model setting;
    CodeFormer's code_former_weight. A restorer that is not installed leaves the images as they are, as
    A1111 does, and the response says so (clients send restore_faces without knowing what is installed)."""
    on = req.restore_faces if req.restore_faces is not None else check_option(
        "face_restoration", options.get("face_restoration", False))
    model = check_option("face_restoration_model", options.get("face_restoration_model", "CodeFormer"))
    weight = check_option("code_former_weight", options.get("code_former_weight", 0.5))
    if on and restorers is not None and model not in restorers:
        t.ignored.append("restore_faces")
        t.comments.append(f"Face restoration model {model} is not installed")
    elif on:
        t.kwargs["restore_faces"] = model
    if weight != 0.5:
        t.kwargs["codeformer_weight"] = float(weight)


# ---------------------------------------------------------------------------- hires fix, img2img, refiner


def _hires(req, t):
    """A1111's hires fix: a second pass at hr_scale (or hr_resize_x/y) x the first pass."""
    if not req.enable_hr:
        if req.denoising_strength not in (None, type(req).model_fields["denoising_strength"].default, 0):
            t.ignored.append("denoising_strength")  # A1111's txt2img uses it for the hires pass only
        return
    upscaler = req.hr_upscaler or "Latent"  # A1111's latent_upscale_default_mode
    if not upscaler.strip():  # another name is an upscaler model: the server and the Pipeline look it up
        raise TranslationError(422, f"hr_upscaler {upscaler!r} is not one of {', '.join(UPSCALERS)} or an upscaler "
                                    f"model's name")
    sampler = t.kwargs["sampler"]
    hr_sampler = None if req.hr_sampler_name in (None, *SAME) else req.hr_sampler_name
    hr_scheduler = None if req.hr_scheduler in (None, *SAME) else req.hr_scheduler
    if hr_sampler or hr_scheduler:  # checked before anything queues
        resolved = _resolve(hr_sampler or sampler, hr_scheduler or t.kwargs["scheduler"])
        if hr_sampler and resolved.sampler != sampler:  # A1111 writes it only when it differs
            t.kwargs["hires_sampler"] = resolved.sampler
        if hr_scheduler:
            t.kwargs["hires_scheduler"] = resolved.schedule
    for first, side in (("firstphase_width", "width"), ("firstphase_height", "height")):
        if getattr(req, first):  # the legacy first-pass size
            t.kwargs[side] = getattr(req, first)
    t.kwargs.update(hires=True, hires_scale=req.hr_scale, hires_upscaler=upscaler, hires_steps=req.hr_second_pass_steps,
                    hires_denoising=0.75 if req.denoising_strength is None else req.denoising_strength)
    if req.hr_resize_x or req.hr_resize_y:
        t.kwargs.update(hires_width=req.hr_resize_x, hires_height=req.hr_resize_y)


def _img2img(req, t):
    """Decode the init image and mask; A1111's img2img API defaults apply (inpaint only masked, padding 0)."""
    if not req.init_images:
        raise TranslationError(422, "img2img needs init_images: a list holding one base64-encoded image")
    if len(req.init_images) > 1:
        t.ignored.append("init_images[1:]")
    # the images stay compressed while the job waits; run_plan decodes them when it runs
    t.kwargs.update(init_image=EncodedImage(req.init_images[0], "init_images[0]"), strength=req.denoising_strength,
                    resize_mode=req.resize_mode)
    if req.mask is None:
        return
    blur = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    if req.mask_blur is None and req.mask_blur_y != req.mask_blur_x:
        t.ignored.append("mask_blur_y")  # one blur radius for both directions here
    t.kwargs.update(mask=EncodedImage(req.mask, "mask"), mask_blur=blur, inpainting_fill=req.inpainting_fill,
                    inpaint_full_res=bool(req.inpaint_full_res), inpaint_full_res_padding=req.inpaint_full_res_padding,
                    inpainting_mask_invert=bool(req.inpainting_mask_invert))


def _refiner(req, find_model, t):
    """A1111's refiner: another checkpoint takes over from refiner_switch_at of the steps (>= 1: never)."""
    if req.refiner_checkpoint in NO_REFINER:
        return
    try:
        entry = find_model(req.refiner_checkpoint)
    except ValueError as e:
        raise TranslationError(404, f"refiner_checkpoint: {e}") from None
    switch_at = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at
    if switch_at < 1:
        t.kwargs.update(refiner=str(entry.path), refiner_switch_at=switch_at)


def _alwayson(req, t):
    """A1111's always-on scripts: sd-webui-controlnet's units (alwayson_scripts.controlnet.args, the extension's
    unit fields and legacy names; units with enabled false are left out); any other script is reported ignored."""
    from ..controlnet.unit import ControlNetUnit

    for name, value in (req.alwayson_scripts or {}).items():
        if name.lower() != "controlnet":
            if value:
                t.ignored.append(f"alwayson_scripts.{name}")
            continue
        args = value.get("args", []) if isinstance(value, dict) else None
        if not isinstance(args, list):
            raise TranslationError(422, "alwayson_scripts.controlnet: expected {\"args\": [unit, ...]}")
        units = []
        for i, arg in enumerate(args):
            where = f"alwayson_scripts.controlnet.args[{i}]"
            try:
                unit = ControlNetUnit.from_dict(_unit_images(arg, where), i)
            except ValueError as e:
                raise TranslationError(422, f"{where}: {e}") from None
            if unit.enabled:
                units.append(unit)
        if units:
            t.kwargs["controlnet"] = tuple(units)


def _unit_images(unit, where):
    """A unit dict with its base64 image and mask (every form the extension takes: a string, {"image", "mask"},
    [image, mask], input_image) as EncodedImage, decoded when the job runs; server file paths are not read."""
    if not isinstance(unit, dict):
        return unit
    unit = dict(unit)
    image = unit.pop("image", unit.pop("input_image", None))
    mask = unit.pop("mask", unit.pop("mask_image", None))
    if isinstance(image, dict):
        image, mask = image.get("image"), image.get("mask", mask)
    elif isinstance(image, (list, tuple)) and len(image) == 2:
        image, mask = image
    if image:
        unit["image"] = EncodedImage(image, f"{where}.image")
    if mask:
        unit["mask"] = EncodedImage(mask, f"{where}.mask")
    return unit


def request_from_a1111(payload, mode="txt2img", options=None, styles=None, find_model=None):
    """An A1111 txt2img/img2img payload (a dict, A1111's field names and defaults) -> (GenerationRequest,
    Translation). options: A1111 settings (override_settings in the payload apply over them); styles:
    {name: (prompt, negative prompt)}; find_model(name) -> an entry with .path for refiner_checkpoint (by
    default the name is a model folder)."""
    from .schemas import Img2ImgRequest, Txt2ImgRequest

    if mode not in ("txt2img", "img2img"):
        raise ValueError(f"mode {mode!r}: choose txt2img or img2img")
    req = (Txt2ImgRequest if mode == "txt2img" else Img2ImgRequest).model_validate(payload)
    overrides = {k: v for k, v in (req.override_settings or {}).items() if k in OPTIONS}
    t = translate(req, mode, {**(options or {}), **overrides}, styles or {}, find_model or _model_folder)
    return GenerationRequest.from_kwargs(**t.kwargs), t


def _model_folder(name):
    """A refiner named by its folder (the Python door has no model list)."""
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"model folder {name!r} does not exist")
    return SimpleNamespace(path=path)


def _infotext(req, mode, find_model, t):
    """A1111's `infotext` field: the settings it names apply wherever the request does not set the field itself."""
    if not req.infotext:
        return
    try:
        read = GenerationRequest.from_infotext(req.infotext).to_kwargs(changed_only=True)
    except ValueError as e:
        raise TranslationError(422, f"infotext: {e}") from None
    explicit = {k for name in req.model_fields_set for k in GENERATE.get(name, ())}
    explicit |= {OPTIONS[name][0] for name in (req.override_settings or {}) if name in OPTIONS}
    refiner = read.pop("refiner", None)
    for keyword, value in read.items():
        if keyword not in explicit and not (mode == "img2img" and keyword.startswith("hires")):
            t.kwargs[keyword] = value
    if refiner and "refiner" not in explicit:  # read back as the model's name: a served model of that name
        try:
            t.kwargs["refiner"] = str(find_model(refiner).path)
        except ValueError:
            t.comments.append(f"Refiner not found: {refiner}")


def http_reach():
    """generate keyword -> how the HTTP API reaches it (an A1111 field, or a setting in override_settings)."""
    reach = {}
    # a field that feeds that keyword alone first (hr_prompt, not styles, for hires_prompt)
    for name, keywords in sorted(GENERATE.items(), key=lambda item: len(item[1])):
        for keyword in keywords:
            reach.setdefault(keyword, name)
    for name, (keyword, _) in OPTIONS.items():
        reach.setdefault(keyword, f"override_settings.{name}")
    return reach
