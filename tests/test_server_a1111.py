"""The A1111 field tables of `sdonnx serve` (sdonnx/server/a1111.py): every field of A1111's request is mapped
or named with its reason, every mapping is applied, and every generate keyword is reachable or explained."""
import base64
import io
from pathlib import Path

import pytest

pytest.importorskip("pydantic")

from PIL import Image  # noqa: E402

from sdonnx.request import GenerationRequest  # noqa: E402
from sdonnx.server.a1111 import (GENERATE, OPTIONS, PYTHON_ONLY, SERVER, UNSUPPORTED, TranslationError,  # noqa: E402
                                 apply_styles, drop_missing_loras, http_reach, translate)
from sdonnx.server.schemas import Img2ImgRequest, Txt2ImgRequest  # noqa: E402

GENERATE_KEYWORDS = set(GenerationRequest.keywords())  # the request's fields: Pipeline.generate's keywords


class Entry:
    path = Path("/models/refiner")


def _find(name):
    if name != "refiner":
        raise ValueError(f"model {name!r} not found; available: refiner")
    return Entry()


def _b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_every_a1111_field_is_in_exactly_one_table():
    fields = set(Txt2ImgRequest.model_fields) | set(Img2ImgRequest.model_fields)
    tables = [set(GENERATE), set(SERVER), set(UNSUPPORTED)]
    for name in fields:
        assert sum(name in t for t in tables) == 1, name
    assert set().union(*tables) == fields  # no table names a field A1111's request does not have


def test_every_mapping_names_real_keywords_and_every_keyword_is_reachable():
    named = {k for keywords in GENERATE.values() for k in keywords} | {k for k, _ in OPTIONS.values()}
    assert named <= GENERATE_KEYWORDS
    reach = http_reach()
    for keyword in GENERATE_KEYWORDS:
        assert keyword in reach or keyword in PYTHON_ONLY, f"{keyword}: no A1111 field and no reason why"
    assert not set(reach) & set(PYTHON_ONLY)


# every field set away from A1111's default (Euler takes every sampler option but eta: see below)
TXT2IMG = dict(prompt="p", negative_prompt="n", styles=["s"], seed=3, subseed=4, subseed_strength=0.2,
               seed_resize_from_w=64, seed_resize_from_h=64, sampler_name="Euler", scheduler="Karras", batch_size=2,
               n_iter=2, steps=5, cfg_scale=5, width=64, height=64, tiling=True, s_churn=0.1, s_tmin=0.1,
               s_tmax=5, s_noise=0.9, denoising_strength=0.4, refiner_checkpoint="refiner", refiner_switch_at=0.6,
               enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", hr_second_pass_steps=3, hr_resize_x=96,
               hr_resize_y=96, firstphase_width=48, firstphase_height=48, hr_sampler_name="Heun",
               hr_scheduler="Karras", hr_prompt="hp", hr_negative_prompt="hn", sampler_index="Euler")
OPTION_VALUES = {"CLIP_stop_at_last_layers": 2, "randn_source": "CPU", "eta_noise_seed_delta": 31337, "sigma_min": 0.1,
                 "sigma_max": 10.0, "rho": 5.0, "emphasis": "No norm", "tiling": True, "sdxl_crop_top": 8,
                 "sdxl_crop_left": 8, "sdxl_refiner_high_aesthetic_score": 7.0,
                 "sdxl_refiner_low_aesthetic_score": 2.0, "face_restoration_model": "GFPGAN",
                 "code_former_weight": 0.7, "face_restoration": True, "sd_vae": "tinyvae.safetensors"}


def test_every_txt2img_field_and_option_reaches_its_keywords():
    t = translate(Txt2ImgRequest(**TXT2IMG), "txt2img", OPTION_VALUES, {"s": ("{prompt} style", "bad")}, _find)
    for name in TXT2IMG:  # denoising_strength feeds strength in img2img, hires_denoising here
        assert set(GENERATE[name]) - {"strength"} <= set(t.kwargs), name
    for name, (keyword, _) in OPTIONS.items():
        assert keyword in t.kwargs, f"override_settings.{name} -> {keyword}"
    assert t.ignored == [] and t.comments == []
    kw = t.kwargs
    assert (kw["prompt"], kw["negative_prompt"], kw["hires_prompt"], kw["hires_negative_prompt"]) == (
        "p style", "n, bad", "hp style", "hn, bad")
    assert (kw["width"], kw["height"], kw["hires_width"], kw["hires_height"]) == (48, 48, 96, 96)
    assert (kw["hires_sampler"], kw["hires_scheduler"], kw["hires_denoising"]) == ("Heun", "Karras", 0.4)
    assert (kw["refiner"], kw["rng"], kw["crop_top_left"], kw["batch_count"]) == (str(Entry.path), "cpu", (8, 8), 2)
    assert (kw["restore_faces"], kw["codeformer_weight"]) == ("GFPGAN", 0.7)


def test_sampler_options_reach_the_samplers_taking_them():
    t = translate(Txt2ImgRequest(sampler_name="Euler a", eta=0.5, s_churn=0.2), "txt2img", {}, {}, _find)
    assert t.kwargs["eta"] == 0.5 and "s_churn" not in t.kwargs and t.ignored == ["s_churn"]


def test_every_img2img_field_reaches_its_keywords():
    init, mask = Image.new("RGB", (64, 48)), Image.new("L", (64, 48), 255)
    body = dict(init_images=[_b64(init)], mask=_b64(mask), resize_mode=1, denoising_strength=0.3, mask_blur=6,
                inpainting_fill=1, inpaint_full_res=False, inpaint_full_res_padding=16, inpainting_mask_invert=1)
    kw = translate(Img2ImgRequest(**body), "img2img", {}, {}, _find).kwargs
    for name in body:  # img2img has no hires fix
        assert set(GENERATE[name]) - {"hires_denoising"} <= set(kw), name
    assert kw["init_image"].size == (64, 48) and kw["mask_blur"] == 6 and kw["inpainting_mask_invert"] is True
    blurs = translate(Img2ImgRequest(init_images=[_b64(init)], mask=_b64(mask), mask_blur_x=3, mask_blur_y=5),
                      "img2img", {}, {}, _find)
    assert blurs.kwargs["mask_blur"] == 3 and blurs.ignored == ["mask_blur_y"]


def test_a1111_defaults_ask_for_nothing_extra():
    """An empty request: A1111's defaults, no hires, no refiner, nothing ignored."""
    t = translate(Txt2ImgRequest(), "txt2img", {}, {}, _find)
    assert t.ignored == [] and t.comments == []
    assert {k for k in t.kwargs} == {"prompt", "negative_prompt", "sampler", "scheduler", "steps", "cfg_scale",
                                     "batch_size", "batch_count", "seed", "clip_skip", "rng"}
    assert (t.kwargs["sampler"], t.kwargs["steps"], t.kwargs["rng"]) == ("Euler", 50, "nv")


def test_unsupported_fields_and_unknown_ones_are_reported():
    req = Txt2ImgRequest(restore_faces=True, s_min_uncond=0.5, alwayson_scripts={"ADetailer": {"args": [True]}},
                         my_ext=1)
    # restore_faces without the model installed: ignored and said, as A1111 leaves the image as it is
    t = translate(req, "txt2img", {}, {}, _find, restorers=["GFPGAN"])
    assert t.ignored == ["restore_faces", "alwayson_scripts.ADetailer", "s_min_uncond", "my_ext"]
    assert "Face restoration model CodeFormer is not installed" in t.comments
    req = Txt2ImgRequest(denoising_strength=0.3)  # txt2img uses it for the hires pass only
    assert translate(req, "txt2img", {}, {}, _find).ignored == ["denoising_strength"]


@pytest.mark.parametrize("body, options, status, words", [
    ({"sampler_name": "Euler z"}, {}, 404, "DPM++ 2M"),
    ({"enable_hr": True, "hr_upscaler": " "}, {}, 422, "Latent (bicubic)"),
    ({"refiner_checkpoint": "sdxl-refiner"}, {}, 404, "available: refiner"),
    ({}, {"randn_source": "GPU2"}, 422, "CPU"),
    ({}, {"CLIP_stop_at_last_layers": 0}, 422, "from 1 to 24"),
    ({}, {"emphasis": "Strong"}, 422, "No norm"),
])
def test_bad_values_name_the_choices(body, options, status, words):
    with pytest.raises(TranslationError) as e:
        translate(Txt2ImgRequest(**body), "txt2img", options, {}, _find)
    assert e.value.status == status and words in str(e.value)


def test_styles_and_missing_loras_as_a1111():
    assert apply_styles("cat", ["a photo of {prompt}", "framed", ""]) == "a photo of cat, framed"
    assert apply_styles("", ["oil"]) == "oil"
    assert drop_missing_loras("x <lora:a:1> <lora:b:0.5:1> y", {"a"}) == ("x <lora:a:1>  y", ["b"])


def test_request_from_a1111_payload():
    """GenerationRequest.from_a1111: the same translation as `sdonnx serve`, from a plain dict."""
    r = GenerationRequest.from_a1111({"prompt": "a cat", "enable_hr": True, "hr_scale": 2, "denoising_strength": 0.4,
                                      "tiling": True, "n_iter": 3, "sampler_name": "DPM++ 2M Karras",
                                      "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert (r.hires.hires, r.hires.hires_scale, r.hires.hires_denoising) == (True, 2.0, 0.4)
    assert (r.sampling.sampler, r.sampling.scheduler, r.prompt.clip_skip) == ("DPM++ 2M", "Karras", 2)
    assert r.tiling.tiling is True and r.to_kwargs()["batch_count"] == 3
    with pytest.raises(ValueError, match="txt2img or img2img"):
        GenerationRequest.from_a1111({}, mode="extras")


def test_the_field_tables_load_without_the_web_stack():
    import subprocess
    import sys

    code = "import sys, sdonnx.server.a1111; assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_infotext_field_fills_what_the_request_does_not_set():
    """A1111 1.7+: `infotext` applies its settings where the request leaves a field unset."""
    text = ("a cat <lora:x:1>\nNegative prompt: dark\nSteps: 7, Sampler: Heun, Schedule type: Karras, CFG scale: 5, "
            "Seed: 9, Size: 72x56, Clip skip: 2, Denoising strength: 0.4, Hires upscale: 1.5, Hires upscaler: Lanczos, "
            "Refiner: other [0123456789], Refiner switch at: 0.6, Version: v1.10.1")
    overrides = {"CLIP_stop_at_last_layers": 3}
    req = Txt2ImgRequest(infotext=text, steps=3, override_settings=overrides)
    t = translate(req, "txt2img", overrides, {}, _find)  # the server merges override_settings into the options
    kw = t.kwargs
    assert (kw["prompt"], kw["negative_prompt"], kw["steps"], kw["sampler"], kw["scheduler"]) == (
        "a cat <lora:x:1>", "dark", 3, "Heun", "Karras")  # steps and clip skip: the request's own
    assert (kw["seed"], kw["width"], kw["height"], kw["cfg_scale"], kw["clip_skip"]) == (9, 72, 56, 5.0, 3)
    assert (kw["hires"], kw["hires_scale"], kw["hires_upscaler"], kw["hires_denoising"]) == (True, 1.5, "Lanczos", 0.4)
    assert "refiner" not in kw and t.comments == ["Refiner not found: other"]
    assert "infotext" not in t.ignored
