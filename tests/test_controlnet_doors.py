"""ControlNet units through every door: the CLI's unit flags and how they group, the A1111 API's
alwayson_scripts (the extension's field names, legacy names, image forms), the infotext entry written and read back,
and the extension's /controlnet/version and /controlnet/model_list routes. No model runs here."""
import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdonnx import GenerationRequest
from sdonnx.cli import main
from sdonnx.controlnet.model import ControlNetError, Library
from sdonnx.controlnet.unit import ControlNetUnit


class Seen(Exception):
    pass


@pytest.fixture()
def seen(monkeypatch):
    def validate(self, manifest, model_sigmas=None):
        raise Seen(self)

    monkeypatch.setattr(GenerationRequest, "validate", validate)


def _manifest_folder(root, name, family="sd1", model_hash="0123abcd"):
    """A converted-ControlNet folder as the converter writes it (the graph file is only named, never run here)."""
    folder = root / name
    (folder / "controlnet").mkdir(parents=True)
    (folder / "controlnet" / "model.onnx").write_bytes(b"")
    outputs = {f"down_block_res_{i}": ["batch", None, None, None] for i in range(12)}
    outputs["mid_block_res"] = ["batch", None, None, None]
    manifest = {"name": name, "family": family, "residuals": 13, "context_dim": 768, "model_hash": model_hash,
                "graph": {"path": "controlnet/model.onnx", "inputs": {"sample": ["batch", None, "height", "width"]},
                          "outputs": outputs},
                "format": "sdonnx-controlnet", "format_version": 1}
    (folder / "sdonnx.json").write_text(json.dumps(manifest))
    return folder


def _png(color=(200, 30, 30), size=(32, 24)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- CLI

def _cli(model, *args):
    result = CliRunner().invoke(main, ["generate", "-m", str(model), "x", *args])
    assert isinstance(result.exception, Seen), result.output
    return result.exception.args[0].controlnet.controlnet


def test_cli_unit_flags_group_by_position(seen, tiny_onnx):
    units = _cli(tiny_onnx("sd1"), "--control-weight", "0.5", "--control-module", "canny",
                 "--controlnet", "a", "--control-image", "a.png", "--control-mode", "2", "--control-weight", "1.5",
                 "--controlnet=b", "--control-image=b.png", "--control-pixel-perfect", "--control-end", "0.6",
                 "--control-resize-mode", "Resize and Fill", "--control-hr-option", "Low res only")
    a, b = units
    assert (a.model, a.image, a.weight, a.module, a.control_mode) == ("a", "a.png", 1.5, "canny",
                                                                       "ControlNet is more important")
    assert (b.model, b.image, b.weight, b.module, b.pixel_perfect, b.guidance_end, b.resize_mode, b.hr_option) == \
        ("b", "b.png", 0.5, "canny", True, 0.6, "Resize and Fill", "Low res only")
    assert (a.pixel_perfect, a.guidance_end, a.resize_mode) == (False, 1.0, "Crop and Resize")


def test_cli_flags_fill_the_units_of_an_infotext(seen, tiny_onnx):
    text = 'a cat\nSteps: 5, Sampler: Euler, Seed: 1, Size: 64x64, ControlNet 0: "Module: canny, Model: m [0123abcd], ' \
           'Weight: 0.7, Guidance End: 0.5", ControlNet 1: "Module: none, Model: n, Weight: 1.2"'
    units = _cli(tiny_onnx("sd1"), "--from-infotext", text, "--control-image", "a.png", "--control-image", "b.png")
    assert [(u.model, u.module, u.weight, u.guidance_end, u.image) for u in units] == \
        [("m [0123abcd]", "canny", 0.7, 0.5, "a.png"), ("n", "none", 1.2, 1.0, "b.png")]


def test_cli_unit_flags_without_a_unit_are_an_error(tiny_onnx):
    result = CliRunner().invoke(main, ["generate", "-m", str(tiny_onnx("sd1")), "x", "--control-image", "a.png"])
    assert result.exit_code != 0 and "give --controlnet MODEL" in result.output


# ------------------------------------------------------------------------------------------- A1111 API

def test_alwayson_scripts_units_with_legacy_names():
    pytest.importorskip("pydantic")
    from sdonnx.server.a1111 import request_from_a1111

    image, mask = base64.b64encode(_png()).decode(), base64.b64encode(_png((255, 255, 255))).decode()
    payload = {"prompt": "x", "alwayson_scripts": {"ControlNet": {"args": [
        {"input_image": image, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]", "guidance": 0.4,
         "lowvram": True, "guessmode": False, "control_mode": 1, "resize_mode": 2, "processor_res": 256,
         "threshold_a": 50, "threshold_b": 150, "pixel_perfect": True, "hr_option": "High res only",
         "guidance_start": 0.1, "weight": 0.9},
        {"enabled": False, "image": image, "model": "off"},
        {"image": {"image": image, "mask": mask}, "model": "inpaint", "module": "inpaint_only"},
        {"image": [image, mask], "model": "pair"},
    ]}, "ADetailer": {"args": [True]}}}
    request, translation = request_from_a1111(payload, "txt2img")
    first, third, fourth = request.controlnet.controlnet
    assert (first.guidance_start, first.guidance_end, first.control_mode, first.resize_mode, first.processor_res,
            first.threshold_a, first.threshold_b, first.pixel_perfect, first.hr_option, first.weight) == \
        (0.1, 0.4, "My prompt is more important", "Resize and Fill", 256, 50, 150, True, "High res only", 0.9)
    assert np.asarray(first.image.decode()).shape == (24, 32, 3)
    assert third.mask is not None and fourth.mask is not None and third.model == "inpaint"
    assert translation.ignored == ["alwayson_scripts.ADetailer"]


@pytest.mark.parametrize("unit, words", [
    ({"image": "not base64!", "model": "m"}, "alwayson_scripts.controlnet.args[0].image"),
    ({"model": "m", "control_mode": "Loudest"}, "control_mode 'Loudest'"),
    ({"model": "m", "resize_mode": 7}, "unknown ControlNet resize mode 7"),
])
def test_alwayson_scripts_bad_units_are_422(unit, words):
    pytest.importorskip("pydantic")
    from sdonnx.server.a1111 import TranslationError, request_from_a1111

    with pytest.raises(TranslationError, match=words.replace("[", r"\[").replace("(", r"\(")) as e:
        request_from_a1111({"alwayson_scripts": {"controlnet": {"args": [unit]}}}, "txt2img")
    assert e.value.status == 422


def test_controlnet_routes(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sdonnx.server import create_app

    _manifest_folder(tmp_path / "ControlNet", "control_v11p_sd15_canny", model_hash="d14c016b")
    (tmp_path / "ControlNet" / "unconverted.pth").write_bytes(b"")
    app = create_app(tmp_path / "models", load_pipeline=lambda path: None, controlnet_dirs=[tmp_path / "ControlNet"])
    with TestClient(app) as client:
        assert client.get("/controlnet/version").json() == {"version": 2}
        assert client.get("/controlnet/model_list").json() == {"model_list": ["control_v11p_sd15_canny [d14c016b]"]}
        assert client.get("/controlnet/settings").json()["control_net_unit_count"] >= 3


# ------------------------------------------------------------------------------------------- infotext, library

def test_infotext_written_as_the_extension_and_read_back():
    unit = ControlNetUnit(model="m", image="x.png", module="canny", weight=0.8, threshold_a=100, threshold_b=200,
                          processor_res=512, control_mode=2, guidance_end=0.75, pixel_perfect=True)
    text = unit.infotext("m [0123abcd]")
    assert text == ("Module: canny, Model: m [0123abcd], Weight: 0.8, Resize Mode: Crop and Resize, Processor Res: 512, "
                    "Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 0.75, Pixel Perfect: True, "
                    "Control Mode: ControlNet is more important, Hr Option: Both")
    back = ControlNetUnit.from_infotext(text)
    assert back == ControlNetUnit(model="m [0123abcd]", module="canny", weight=0.8, threshold_a=100.0,
                                  threshold_b=200.0, processor_res=512, control_mode=2, guidance_end=0.75,
                                  pixel_perfect=True)
    request = GenerationRequest.from_infotext(f'x\nSteps: 5, Seed: 1, ControlNet 0: "{text}"')
    assert request.controlnet.controlnet == (back,)


def test_library_finds_by_name_title_and_path(tmp_path):
    folder = _manifest_folder(tmp_path, "control_v11p_sd15_canny", model_hash="d14c016b")
    library = Library((tmp_path,))
    for name in ("control_v11p_sd15_canny", "control_v11p_sd15_canny [d14c016b]", str(folder)):
        assert library.find(name) == folder
    with pytest.raises(ControlNetError, match="available: control_v11p_sd15_canny"):
        library.find("depth")



def test_jobs_send_unit_images_not_paths(tmp_path):
    """sdonnx.jobs hands workers (Ray: other machines) the unit's image itself, not a path they may not see."""
    from sdonnx.jobs import wire_settings

    (tmp_path / "edges.png").write_bytes(_png())
    request = GenerationRequest.from_kwargs(prompt="x", controlnet=[dict(model="m", image=str(tmp_path / "edges.png"))])
    unit, = wire_settings(request)["controlnet"]
    assert isinstance(unit.image, Image.Image) and unit.image.size == (32, 24) and unit.mask is None
