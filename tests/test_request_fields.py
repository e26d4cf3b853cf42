"""Every field of the generation request reaches every door.

For each field of `GenerationRequest` (walked from the dataclasses, so a new field is picked up by itself)
a non-default sample value goes in through each door, and the request the door builds must hold it:

- python: `Pipeline.generate(**keywords)`;
- cli: `sdonnx generate --flag value`;
- infotext: the request's A1111 infotext, read back with `GenerationRequest.from_infotext`;
- http: the A1111 API payload `sdonnx serve` takes (the field each keyword comes from is read off
  sdonnx/server/a1111.py's tables), through the translation the server runs.

A door that cannot carry a field by design says why in UNREACHABLE. Another door plugs in with one entry in
DOORS and its reasons in UNREACHABLE.
"""
import base64
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from PIL import Image

from sdonnx import GenerationRequest, Pipeline
from sdonnx.cli import generate as generate_command
from sdonnx.cli import main
from sdonnx.cli_controlnet import unit_args
from sdonnx.controlnet.unit import ControlNetUnit
from sdonnx.manifest import load_manifest

IMAGE, MASK = "init.png", "mask.png"  # written into the test's folder; paths are what every door takes

# field -> (a value other than the default, the other fields it needs to take effect)
SAMPLES = {
    "prompt": ("a cat", {}),
    "negative_prompt": ("blurry, dark", {}),
    "width": (72, {}),
    "height": (56, {}),
    "batch_size": (2, {}),
    "batch_count": (3, {}),
    "clip_skip": (2, {}),
    "emphasis": ("No norm", {"prompt": "a (cat)"}),
    "sampler": ("Heun", {}),
    "scheduler": ("Karras", {}),
    "steps": (5, {}),
    "cfg_scale": (6.5, {}),
    "sigma_min": (0.1, {}),
    "sigma_max": (10.0, {}),
    "rho": (5.0, {"scheduler": "Karras"}),
    "eta": (0.5, {}),
    "s_churn": (0.3, {"sampler": "Euler"}),
    "s_tmin": (0.2, {"sampler": "Euler"}),
    "s_tmax": (9.0, {"sampler": "Euler"}),
    "s_noise": (0.9, {"sampler": "Euler"}),
    "sampler_options": ({"order": 3}, {"sampler": "LMS"}),
    "seed": (123, {}),
    "subseed": (77, {"subseed_strength": 0.5}),
    "subseed_strength": (0.5, {"subseed": 3}),
    "seed_resize_from_w": (48, {"seed_resize_from_h": 40}),
    "seed_resize_from_h": (40, {"seed_resize_from_w": 48}),
    "ensd": (31337, {}),
    "rng": ("cpu", {}),
    "init_image": (IMAGE, {}),
    "strength": (0.5, {"init_image": IMAGE}),
    "resize_mode": (1, {"init_image": IMAGE}),
    "mask": (MASK, {"init_image": IMAGE}),
    "mask_blur": (2, {"init_image": IMAGE, "mask": MASK}),
    "inpainting_fill": (2, {"init_image": IMAGE, "mask": MASK}),
    "inpaint_full_res": (True, {"init_image": IMAGE, "mask": MASK}),
    "inpaint_full_res_padding": (8, {"init_image": IMAGE, "mask": MASK, "inpaint_full_res": True}),
    "inpainting_mask_invert": (True, {"init_image": IMAGE, "mask": MASK}),
    "hires": (True, {}),
    "hires_scale": (1.5, {"hires": True}),
    "hires_width": (80, {"hires": True}),
    "hires_height": (72, {"hires": True}),
    "hires_upscaler": ("Lanczos", {"hires": True}),
    "hires_steps": (3, {"hires": True}),
    "hires_denoising": (0.5, {"hires": True}),
    "hires_sampler": ("DPM++ 2M", {"hires": True}),
    "hires_scheduler": ("Exponential", {"hires": True}),
    "hires_prompt": ("a dog", {"hires": True}),
    "hires_negative_prompt": ("ugly", {"hires": True}),
    "refiner": ("refiner-model", {}),
    "refiner_switch_at": (0.6, {"refiner": "refiner-model"}),
    "crop_top_left": ((8, 16), {}),
    "aesthetic_score": (5.0, {}),
    "negative_aesthetic_score": (3.0, {}),
    "tiling": ("x", {}),
    "tiled_vae": (True, {}),
    "controlnet": ((ControlNetUnit(model="control_v11p_sd15_canny", image=IMAGE, module="canny", weight=0.6,
                                   guidance_end=0.8, control_mode="My prompt is more important"),), {}),
    "restore_faces": ("CodeFormer", {}),
    "codeformer_weight": (0.7, {"restore_faces": "CodeFormer"}),
    "vae": ("vae-ft-mse.safetensors", {}),
}

# door -> field -> why that door cannot carry it
UNREACHABLE = {
    "infotext": {
        "batch_size": "each image's infotext holds its own seed: an image is made again as a batch of one",
        "batch_count": "as batch_size",
        "init_image": "an image is not text: it is given again beside --from-image",
        "mask": "as init_image",
    },
    "http": {},  # filled from sdonnx/server/a1111.py below: the reasons live beside the field tables
}
try:
    from sdonnx.server.a1111 import PARTLY, PYTHON_ONLY

    UNREACHABLE["http"] = {**PYTHON_ONLY, **PARTLY}
except ImportError:  # without the serve extra the http door is skipped
    pass


class Seen(Exception):
    """Raised from validate with the request a door built, so no session runs."""

    def __init__(self, request):
        super().__init__("request seen")
        self.request = request


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return tiny_onnx("sd1")


@pytest.fixture()
def seen(monkeypatch):
    def validate(self, manifest, model_sigmas=None):
        raise Seen(self)

    monkeypatch.setattr(GenerationRequest, "validate", validate)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("door-images")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / IMAGE)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(folder / MASK)
    return folder


def _in(folder, value):
    if isinstance(value, tuple) and value and isinstance(value[0], ControlNetUnit):  # a unit's image is a path too
        return tuple(dataclasses.replace(u, image=_in(folder, u.image)) for u in value)
    return str(folder / value) if value in (IMAGE, MASK) else value


def _settings(name, folder):
    value, context = SAMPLES[name]
    settings = {k: _in(folder, v) for k, v in context.items()}
    settings[name] = _in(folder, value)
    return settings


def python_door(name, settings, model):
    pipe = Pipeline.load(model, provider="cpu")
    with pytest.raises(Seen) as seen:
        pipe.generate(**settings)
    return seen.value.request


def _cli_args(name, value):
    if name == "controlnet":  # a unit is --controlnet MODEL and the --control-* flags after it
        return unit_args(value)
    option = next(p for p in generate_command.params if p.name == name)
    if isinstance(value, bool):
        return [option.opts[0]] if value else [option.secondary_opts[0]]
    if isinstance(value, dict):
        return [a for k, v in value.items() for a in (option.opts[0], f"{k}={v}")]
    if isinstance(value, tuple):
        return [option.opts[0], ",".join(map(str, value))]
    return [option.opts[0], str(value)]


def cli_door(name, settings, model):
    prompt = settings.pop("prompt", "x")
    args = ["generate", "-m", str(model), prompt, *[a for k, v in settings.items() for a in _cli_args(k, v)]]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, Seen), result.output
    return result.exception.request


def infotext_door(name, settings, model):
    request = GenerationRequest.from_kwargs(**settings)
    plan = request.validate(load_manifest(model))
    refiner = settings.get("refiner")
    facts = {"Model": "m", "Refiner": f"{Path(refiner).name} [0123456789]" if refiner else None,
             "VAE": settings.get("vae")}  # the pipeline writes the name of the VAE it used
    return GenerationRequest.from_infotext(request.infotext(plan, facts=facts))


# keyword -> its value as the A1111 API sends it, where that is not the value itself
A1111_VALUES = {
    "init_image": lambda path: [base64.b64encode(Path(path).read_bytes()).decode()],
    "mask": lambda path: base64.b64encode(Path(path).read_bytes()).decode(),
    "rng": lambda source: {"cpu": "CPU", "nv": "NV"}[source],
    "inpainting_mask_invert": int,
    "controlnet": lambda units: {"controlnet": {"args": [
        {**{k: v for k, v in dataclasses.asdict(u).items() if v is not None},
         "image": base64.b64encode(Path(u.image).read_bytes()).decode()} for u in units]}},
    "restore_faces": lambda name: True,  # A1111's flag; the model is the face_restoration_model setting (CodeFormer)
}


def http_door(name, settings, model):
    pytest.importorskip("pydantic")
    from sdonnx.server.a1111 import http_reach, request_from_a1111

    reach = http_reach()
    # the request's sampler unless one is given: A1111's default (Euler) takes no eta
    settings = {"sampler": GenerationRequest.keywords()["sampler"], **settings}
    payload, options = {}, {}
    for keyword, value in settings.items():
        field = reach[keyword]
        value = A1111_VALUES.get(keyword, lambda v: v)(value)
        if keyword == "crop_top_left":
            options.update(sdxl_crop_top=value[0], sdxl_crop_left=value[1])
        elif field.startswith("override_settings."):
            options[field.split(".", 1)[1]] = value
        else:
            payload[field] = value
    payload["override_settings"] = options
    mode = "img2img" if "init_images" in payload else "txt2img"
    request, translation = request_from_a1111(payload, mode, find_model=lambda name: SimpleNamespace(path=name))
    assert translation.ignored == [], translation.ignored
    return request


DOORS = {"python": python_door, "cli": cli_door, "infotext": infotext_door, "http": http_door}


def _value(request, name):
    part = next(part for part, f in GenerationRequest.fields() if f.name == name)
    return getattr(getattr(request, part), name)


def test_every_field_has_a_sample():
    fields = [f.name for _, f in GenerationRequest.fields()]
    assert sorted(SAMPLES) == sorted(fields)
    for name in fields:  # a sample must differ from the default, or it would prove nothing
        default = GenerationRequest.keywords()[name]
        assert SAMPLES[name][0] != default, name


@pytest.mark.parametrize("door", sorted(DOORS))
@pytest.mark.parametrize("name", [f.name for _, f in GenerationRequest.fields()])
def test_field_reaches_door(door, name, model, images, request):
    reason = UNREACHABLE.get(door, {}).get(name)
    if reason:
        pytest.skip(f"{door} cannot carry {name}: {reason}")
    if door != "infotext":
        request.getfixturevalue("seen")
    settings = _settings(name, images)
    built = DOORS[door](name, dict(settings), model)
    expected = settings[name]
    if door == "infotext" and name == "refiner":
        expected = Path(expected).name  # the infotext names the refiner's folder
    if door == "http" and name in ("init_image", "mask"):  # the API carries the image itself, still encoded
        assert _value(built, name).decode().tobytes() == Image.open(expected).tobytes()
        return
    if name == "controlnet" and door in ("http", "infotext"):  # the image: encoded / not in the text
        for unit, wanted in zip(_value(built, name), expected, strict=True):
            if door == "http":
                assert unit.image.decode().tobytes() == Image.open(wanted.image).tobytes()
            assert dataclasses.replace(unit, image=None) == dataclasses.replace(wanted, image=None)
        return
    assert _value(built, name) == expected
