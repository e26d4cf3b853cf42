"""Upscaler models through every door: hires fix in Python and over HTTP, the Extras routes, the
`sdonnx upscale` command and the upscaler lists; names that are unknown or not converted refused."""
import base64
import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sdonnx.postprocess.extras import ExtrasModels, ExtrasRequest, run_extras
from sdonnx.postprocess.upscale import Upscalers, upscaler_folders
from upscaler_reference import BasicsrRRDBNet, SRVGGNetCompact, a1111_model_upscale, randomize

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def upscaler_root(tmp_path_factory):
    """models/ESRGAN with a converted 4x model and a file not converted; models/RealESRGAN with a compact
    model under A1111's name -> (root, {name: torch reference})."""
    from converters.postprocess import convert_postprocess

    root = tmp_path_factory.mktemp("models")
    refs = {}
    for folder, stem, module in (("ESRGAN", "4x-Tiny", randomize(BasicsrRRDBNet(4), 7)),
                                 ("RealESRGAN", "realesr-general-x4v3", randomize(SRVGGNetCompact(8, 1, 4), 8))):
        (root / folder).mkdir()
        torch.save(module.state_dict(), root / folder / f"{stem}.pth")
        convert_postprocess(root / folder / f"{stem}.pth", root / folder / stem)
        refs[stem] = module
    (root / "ESRGAN" / "4x_Later.pth").write_bytes(b"x")
    return root, refs


def _image(w=40, h=32, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).resize((w, h))


def _b64(image, text=None):
    from sdonnx.server.codec import encode_png

    return encode_png(image, text)


def _decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _close(a, b, levels=1):
    d = np.abs(np.asarray(a.convert("RGB")).astype(int) - np.asarray(b.convert("RGB")).astype(int))
    return d.max() <= levels


# ------------------------------------------------------------------ hires fix (Python)

def test_hires_fix_with_a_model_upscaler(tiny_onnx, upscaler_root):
    from sdonnx.pipeline import Pipeline

    root, refs = upscaler_root
    pipe = Pipeline.load(tiny_onnx("sd1"), provider="cpu", upscaler_dirs=upscaler_folders(root))
    decoded, encoded = [], []
    decode, encode = pipe.decode, pipe.encode_images
    pipe.decode = lambda *a, **k: decoded.append(decode(*a, **k)) or decoded[-1]
    pipe.encode_images = lambda images, *a, **k: encoded.append(images) or encode(images, *a, **k)
    result = pipe.generate("a lighthouse", steps=2, width=64, height=64, seed=3, hires=True, hires_scale=1.5,
                           hires_upscaler="4x-Tiny", hires_denoising=0.5)
    assert result.images[0].size == (96, 96)
    assert "Hires upscaler: 4x-Tiny" in result.infotext
    # A1111: decode, the model (4x, tiles of 192 px) toward 1.5x, Lanczos to 96x96, encode for the second pass
    first = decoded[0][0]
    expected = a1111_model_upscale(refs["4x-Tiny"], first).resize((96, 96), Image.Resampling.LANCZOS)
    sent = Image.fromarray(np.round((encoded[0][0].transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))
    assert _close(sent, expected, 2)
    pipe.generate("a lighthouse", steps=2, width=64, height=64, seed=3, hires=True, hires_scale=1.5,
                  hires_upscaler="Lanczos", hires_denoising=0.5)
    assert np.abs(encoded[1] - encoded[0]).max() > 0.1  # the model, not a plain resize, made the second pass's input


def test_hires_fix_refuses_unknown_and_unconverted_models(tiny_onnx, upscaler_root):
    from sdonnx.pipeline import Pipeline

    root, _ = upscaler_root
    pipe = Pipeline.load(tiny_onnx("sd1"), provider="cpu", upscaler_dirs=upscaler_folders(root))
    with pytest.raises(ValueError, match="unknown upscaler 'R-ESRGAN 4x\\+'; choose one of None, Lanczos, Nearest, "
                                         "4x-Tiny, 4x_Later, R-ESRGAN General 4xV3"):
        pipe.generate("x", steps=1, width=64, height=64, hires=True, hires_upscaler="R-ESRGAN 4x+")
    with pytest.raises(ValueError, match="not converted yet; convert it once with `sdonnx convert"):
        pipe.generate("x", steps=1, width=64, height=64, hires=True, hires_upscaler="4x_Later")


# ------------------------------------------------------------------ Extras (Python, CLI)

def test_extras_upscale_blend_and_crop(upscaler_root):
    root, refs = upscaler_root
    upscalers = Upscalers(upscaler_folders(root))
    image = _image()
    one = run_extras(image, ExtrasRequest(upscaler_1="4x-Tiny", upscaling_resize=2), ExtrasModels(upscalers))
    assert one.image.size == (80, 64)
    assert one.infotext == "Postprocess upscale by: 2, Postprocess upscaler: 4x-Tiny"
    assert _close(one.image, a1111_model_upscale(refs["4x-Tiny"], image).resize((80, 64), Image.Resampling.LANCZOS), 2)
    both = run_extras(image, ExtrasRequest(upscaler_1="4x-Tiny", upscaler_2="R-ESRGAN General 4xV3",
                                           extras_upscaler_2_visibility=0.3), ExtrasModels(upscalers))
    second = run_extras(image, ExtrasRequest(upscaler_1="R-ESRGAN General 4xV3"), ExtrasModels(upscalers)).image
    assert np.array_equal(np.asarray(both.image), np.asarray(Image.blend(one.image, second, 0.3)))
    assert both.info["Postprocess upscaler 2"] == "R-ESRGAN General 4xV3"
    to = run_extras(image, ExtrasRequest(upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=100,
                                         upscaling_resize_h=60), ExtrasModels(upscalers))
    assert to.image.size == (100, 60)  # 2.5x covers 100x80, cropped to 100x60 around the centre
    assert to.infotext == ("Postprocess upscale to: 100x60, Postprocess crop to: 100x60, "
                           "Postprocess upscaler: Lanczos")
    none = run_extras(image, ExtrasRequest(), ExtrasModels(upscalers))
    assert none.image.size == image.size and none.infotext == ""


@pytest.mark.parametrize("fields, message", [
    ({"upscaler_1": "nope"}, "unknown upscaler 'nope'"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 0}, "upscaling_resize 0.0 must be above 0"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 50}, "at most 8"),
    ({"upscaler_1": "Lanczos", "extras_upscaler_2_visibility": 2}, "from 0 to 1"),
    ({"upscaler_1": "Lanczos", "resize_mode": 3}, "resize_mode 3"),
])
def test_extras_values_are_checked(upscaler_root, fields, message):
    upscalers = Upscalers(upscaler_folders(upscaler_root[0]))
    with pytest.raises(ValueError, match=message):
        run_extras(_image(), ExtrasRequest(**fields), ExtrasModels(upscalers))


def test_upscale_command(upscaler_root, tmp_path):
    from sdonnx.cli import main

    root, refs = upscaler_root
    source = tmp_path / "in.png"
    _image().save(source, pnginfo=_pnginfo("a cat\nSteps: 2, Sampler: Euler, Seed: 1"))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["upscale", str(source), "--upscaler", "4x-Tiny", "--scale", "2",
                                       "--models-root", str(root), "-o", str(out)])
    assert result.exit_code == 0, result.output
    png = Image.open(result.output.strip().splitlines()[-1])
    assert png.size == (80, 64)
    assert png.info["parameters"].startswith("a cat")  # the source's infotext is kept, as A1111
    assert png.info["postprocessing"] == png.info["extras"] == "Postprocess upscale by: 2, Postprocess upscaler: 4x-Tiny"
    listed = CliRunner().invoke(main, ["upscale", "--list", "--models-root", str(root), "x"])
    assert "4x_Later" in listed.output and "not converted" in listed.output
    bad = CliRunner().invoke(main, ["upscale", str(source), "--upscaler", "4x_Later", "--models-root", str(root),
                                    "-o", str(out)])
    assert bad.exit_code != 0 and "sdonnx convert" in bad.output and "Traceback" not in bad.output


def _pnginfo(text):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


# ------------------------------------------------------------------ HTTP

@pytest.fixture(scope="module")
def http(tiny_onnx, upscaler_root, tmp_path_factory):
    from sdonnx.server import create_app

    root, _ = upscaler_root
    served = tmp_path_factory.mktemp("served")
    (served / "tiny").symlink_to(tiny_onnx("sd1"), target_is_directory=True)
    app = create_app(served, provider="cpu", upscaler_dirs=upscaler_folders(root))
    with TestClient(app) as client:
        yield client


def test_http_upscaler_lists(http):
    rows = http.get(f"{API}/upscalers").json()
    assert [r["name"] for r in rows] == ["None", "Lanczos", "Nearest", "4x-Tiny", "4x_Later", "R-ESRGAN General 4xV3"]
    assert rows[3]["scale"] == 4 and rows[3]["model_name"] == "4x-Tiny"
    assert [r["name"] for r in http.get(f"{API}/realesrgan-models").json()] == ["R-ESRGAN General 4xV3"]


def test_http_hires_fix_with_a_model_upscaler(http, tiny_onnx, upscaler_root):
    from sdonnx.pipeline import Pipeline

    body = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, "enable_hr": True,
            "hr_scale": 1.5, "hr_upscaler": "4x-Tiny", "denoising_strength": 0.5}
    r = http.post(f"{API}/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Hires upscaler: 4x-Tiny" in info["infotexts"][0]
    direct = Pipeline.load(tiny_onnx("sd1"), provider="cpu", upscaler_dirs=upscaler_folders(upscaler_root[0]))
    expected = direct.generate("a lighthouse", steps=2, width=64, height=64, seed=3, hires=True, hires_scale=1.5,
                               hires_upscaler="4x-Tiny", hires_denoising=0.5, sampler="Euler").images[0]
    assert np.array_equal(np.asarray(_decode(r.json()["images"][0]).convert("RGB")), np.asarray(expected))
    for name, words in (("R-ESRGAN 4x+", "choose one of None, Lanczos"), ("4x_Later", "sdonnx convert")):
        r = http.post(f"{API}/txt2img", json={**body, "hr_upscaler": name})
        assert r.status_code == 422 and words in r.text, r.text


def test_http_extras(http, upscaler_root):
    root, _ = upscaler_root
    image = _image()
    body = {"image": _b64(image, "a cat\nSteps: 2, Sampler: Euler, Seed: 1"), "upscaler_1": "4x-Tiny",
            "upscaling_resize": 2, "upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.5}
    r = http.post(f"{API}/extra-single-image", json=body)
    assert r.status_code == 200, r.text
    text = "Postprocess upscale by: 2, Postprocess upscaler: 4x-Tiny, Postprocess upscaler 2: Lanczos"
    assert r.json()["html_info"] == f"<p>{text}</p>"
    png = _decode(r.json()["image"])
    assert png.info["postprocessing"] == text and png.info["parameters"].startswith("a cat")
    expected = run_extras(image, ExtrasRequest(upscaler_1="4x-Tiny", upscaler_2="Lanczos",
                                               extras_upscaler_2_visibility=0.5),
                          ExtrasModels(Upscalers(upscaler_folders(root)))).image
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))
    batch = http.post(f"{API}/extra-batch-images", json={
        "imageList": [{"data": _b64(image), "name": "a.png"}, {"data": _b64(_image(24, 24, 1)), "name": "b.png"}],
        "upscaler_1": "R-ESRGAN General 4xV3", "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 48})
    assert batch.status_code == 200, batch.text
    assert [_decode(b).size for b in batch.json()["images"]] == [(64, 48), (64, 48)]


@pytest.mark.parametrize("fields, status, words", [
    ({"upscaler_1": "nope"}, 422, "unknown upscaler 'nope'"),
    ({"upscaler_1": "4x_Later"}, 422, "sdonnx convert"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "image": "big"}, 422, "over the limit"),
    ({"upscaler_1": "Lanczos", "image": "not base64!"}, 422, "base64"),
])
def test_http_extras_refusals(http, fields, status, words):
    image = _image(2048, 1200) if fields.get("image") == "big" else _image()
    body = {"image": _b64(image), **{k: v for k, v in fields.items() if not (k == "image" and v == "big")}}
    r = http.post(f"{API}/extra-single-image", json=body)
    assert r.status_code == status and words in r.text, r.text


# ------------------------------------------------------------------ web page

def test_web_page_extras_tab(tiny_onnx, upscaler_root, tmp_path_factory, tmp_path):
    """The Extras tab lists the upscalers, sends the image with A1111's field names and shows the result."""
    from test_server import Chromium, LiveServer, _open_page
    import shutil

    from sdonnx.server import create_app

    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no chromium/chrome on PATH (apt-get install chromium) to drive the web page")
    served = tmp_path_factory.mktemp("served-page")
    (served / "tiny").symlink_to(tiny_onnx("sd1"), target_is_directory=True)
    app = create_app(served, provider="cpu", upscaler_dirs=upscaler_folders(upscaler_root[0]))
    with LiveServer(app) as server:
        browser = Chromium(binary, tmp_path / "profile")
        try:
            _open_page(browser, server)
            browser.wait_for("document.getElementById('extras_upscaler_1').options.length > 3")
            assert browser.js("[...document.getElementById('extras_upscaler_1').options].map(o => o.value)") == \
                ["None", "Lanczos", "Nearest", "4x-Tiny", "4x_Later", "R-ESRGAN General 4xV3"]
            browser.js("""(async () => {
                document.querySelector('.tab[data-tab=extras_tab]').click();
                const c = document.createElement('canvas'); c.width = 40; c.height = 32;
                c.getContext('2d').fillRect(5, 5, 20, 10);
                const blob = await new Promise(r => c.toBlob(r, 'image/png'));
                const transfer = new DataTransfer();
                transfer.items.add(new File([blob], 'in.png', {type: 'image/png'}));
                const input = document.getElementById('extras_image');
                input.files = transfer.files;
                input.dispatchEvent(new Event('change'));
                await new Promise(r => setTimeout(r, 200));
                document.getElementById('extras_upscaler_1').value = '4x-Tiny';
                document.getElementById('extras_upscaling_resize').value = '2';
                document.getElementById('extras_run').click();
            })()""")
            browser.wait_for("document.getElementById('extras_result').naturalWidth === 80")
            assert browser.js("document.getElementById('extras_info').textContent") == \
                "Postprocess upscale by: 2, Postprocess upscaler: 4x-Tiny"
            assert browser.js("document.getElementById('extras_tab').hidden") is False
        finally:
            browser.close()
