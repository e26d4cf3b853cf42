"""sd-webui-controlnet's /controlnet/module_list and /controlnet/detect routes, through FastAPI's test client."""
import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from sdonnx.controlnet import preprocess as cn  # noqa: E402
from sdonnx.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(tmp_path_factory.mktemp("models"), load_pipeline=lambda path: None)
    with TestClient(app) as c:
        yield c


def _b64(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _unb64(text):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def _picture():
    x = np.zeros((48, 64, 3), np.uint8)
    x[10:30, 20:50] = (220, 180, 40)
    return x


def test_module_list(client):
    body = client.get("/controlnet/module_list").json()
    assert body["module_list"] == cn.module_names() and body["module_list"][0] == "none"
    assert "canny" in body["module_list"] and "depth" not in body["module_list"]  # only what runs here
    assert body["module_detail"]["canny"]["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1,
                                                            "max": 255, "step": 1}
    aliases = client.get("/controlnet/module_list", params={"alias_names": True}).json()
    assert "invert (from white bg & black line)" in aliases["module_list"]
    assert set(aliases["module_detail"]) == set(aliases["module_list"])


def test_detect_canny_with_default_thresholds(client):
    x = _picture()
    r = client.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [_b64(x)],
                                                "controlnet_processor_res": 96})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    out = _unb64(body["images"][0])
    # -1 thresholds are the module's defaults (100, 200)
    assert (out == cn.preprocess("canny", x, 96, 100, 200)).all() and out.shape == (96, 128, 3)


def test_detect_by_label_and_several_images(client):
    x = _picture()
    r = client.post("/controlnet/detect", json={"controlnet_module": "invert (from white bg & black line)",
                                                "controlnet_input_images": [_b64(x), _b64(x[:, ::-1].copy())]})
    images = [_unb64(i) for i in r.json()["images"]]
    assert (images[0] == 255 - x).all() and (images[1] == 255 - x[:, ::-1]).all()


def test_detect_inpaint_shows_the_mask(client):
    x = _picture()
    mask = np.zeros((48, 64), np.uint8)
    mask[:10] = 255
    r = client.post("/controlnet/detect", json={"controlnet_module": "inpaint_only",
                                                "controlnet_input_images": [_b64(x)], "controlnet_masks": [_b64(mask)]})
    out = _unb64(r.json()["images"][0])
    assert out.shape == (48, 64, 4) and (out[:10, :, 3] == 128).all() and (out[10:, :, 3] == 255).all()
    assert (out[:, :, :3] == x).all()


@pytest.mark.parametrize("body,status,words", [
    ({"controlnet_module": "depth_midas", "controlnet_input_images": ["x"]}, 422, "valid: none, "),
    ({"controlnet_module": "canny"}, 422, "No image"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["not base64!"]}, 422, "controlnet_input_images[0]"),
    ({"controlnet_module": "inpaint_only", "controlnet_input_images": ["x"]}, 422, "controlnet_masks"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["x"], "controlnet_threshold_a": float("nan")}, 422,
     "finite"),
])
def test_detect_refuses_bad_input(client, body, status, words):
    if "controlnet_input_images" in body and body["controlnet_input_images"] == ["x"]:
        body = {**body, "controlnet_input_images": [_b64(_picture())]}
    # json.dumps writes NaN as Python clients do
    r = client.post("/controlnet/detect", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status and words in r.text
