"""The web page's ControlNet preprocessor panel in headless Chromium: the extension's module list and sliders, the
unit fields it gives, Pixel Perfect, and the preview through /controlnet/detect (no model needed)."""
import base64
import io

import numpy as np
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from test_server import LiveServer, browser  # noqa: E402,F401  (browser: the fixture)

from sdonnx.controlnet import preprocess as cn  # noqa: E402
from sdonnx.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def modelless(tmp_path_factory):
    with LiveServer(create_app(tmp_path_factory.mktemp("models"), load_pipeline=lambda path: None)) as live:
        yield live


def _picture():
    x = np.full((60, 80, 3), 240, np.uint8)
    x[15:45, 20:60] = (30, 60, 200)
    return x


def _data_url(x):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _choose(browser, module):
    browser.js(f"{{ const m = document.getElementById('cn_module'); m.value = '{module}'; m.onchange() }}")


def test_preprocessor_panel(modelless, browser):
    browser.open(modelless.url + "/")
    browser.wait_for("document.body && document.body.dataset.ready === '1'")
    browser.js("controlnetPreprocessor.ready")
    options = browser.js("[...document.querySelectorAll('#cn_module option')].map(o => [o.value, o.textContent])")
    assert options == [list(p) for p in zip(cn.module_names(), cn.module_names(alias_names=True))]
    # canny: the extension's slider names and defaults; invert: no sliders at all
    _choose(browser, "canny")
    labels = browser.js("[...document.querySelectorAll('#controlnet_section label:not([hidden]) span')]"
                        ".map(s => s.textContent)")
    assert labels == ["Resolution", "Low Threshold", "High Threshold"]
    x = _picture()
    browser.js(f"controlnetPreprocessor.setImage('{_data_url(x)}')")
    browser.wait_for("!document.getElementById('cn_input').hidden")
    browser.js("""document.getElementById('cn_processor_res').value = '120';
                  document.getElementById('cn_threshold_a').value = '50'""")
    assert browser.js("controlnetPreprocessor.fields().processor_res") == 120
    browser.js("document.getElementById('cn_preview_button').click()")
    browser.wait_for("!document.getElementById('cn_preview').hidden && document.getElementById('cn_preview').complete")
    src = browser.js("document.getElementById('cn_preview').src")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    assert (shown == cn.preprocess("canny", x, 120, 50, 200)).all() and shown.shape == (120, 160, 3)
    # Pixel Perfect hides the resolution; the preview then uses the generation size's (512 / 60 * 60 = 512 rows)
    browser.js("""{ const p = document.getElementById('cn_pixel_perfect'); p.checked = true; p.onchange();
                    document.getElementById('width').value = '256'; document.getElementById('height').value = '512' }""")
    assert browser.js("controlnetPreprocessor.pixelPerfect()") == 512
    browser.js("document.getElementById('cn_resize_mode').value = 'Resize and Fill'")
    assert browser.js("controlnetPreprocessor.pixelPerfect()") == 192  # min(512/60, 256/80) * 60
    unit = browser.js("controlnetPreprocessor.fields()")
    assert unit["processor_res"] == -1 and unit["pixel_perfect"] is True and unit["threshold_a"] == 50
    assert unit["resize_mode"] == "Resize and Fill" and unit["image"].startswith("data:image/png")
    _choose(browser, "invert")
    assert browser.js("controlnetPreprocessor.fields()")["threshold_a"] == -1
    assert browser.js("document.querySelectorAll('#controlnet_section label:not([hidden]) span').length") == 0
