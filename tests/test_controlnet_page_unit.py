"""The web page's ControlNet unit in headless Chromium: the preprocessor half (static/controlnet.js) and the model half
(app.js) make one unit of alwayson_scripts.controlnet.args; an infotext's unit is pasted back. No model runs."""
import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from test_controlnet_doors import _manifest_folder  # noqa: E402
from test_server import LiveServer, browser  # noqa: E402,F401  (browser: the fixture)

from sdonnx.server import create_app  # noqa: E402


def test_web_page_sends_the_unit(tmp_path, browser):
    """The page's ControlNet section (preprocessor half from controlnet.js, model half from app.js) becomes one
    unit of alwayson_scripts.controlnet.args, and an infotext's unit is pasted back into it."""
    _manifest_folder(tmp_path / "ControlNet", "control_v11p_sd15_canny", model_hash="d14c016b")
    app = create_app(tmp_path / "models", load_pipeline=lambda path: None, controlnet_dirs=[tmp_path / "ControlNet"])
    with LiveServer(app) as live:
        browser.open(live.url + "/")
        browser.wait_for("document.body && document.body.dataset.ready === '1'")
        browser.js("controlnetPreprocessor.ready")
        assert browser.js("payload().alwayson_scripts") is None  # not enabled: no unit
        browser.js("""applyParameters({"ControlNet 0": "Module: canny, Model: control_v11p_sd15_canny [d14c016b], """
                   """Weight: 0.6, Guidance End: 0.7, Control Mode: ControlNet is more important"})""")
        unit = browser.js("payload().alwayson_scripts.controlnet.args[0]")
    assert (unit["model"], unit["module"], unit["weight"], unit["guidance_start"], unit["guidance_end"],
            unit["control_mode"], unit["resize_mode"], unit["hr_option"]) == \
        ("control_v11p_sd15_canny [d14c016b]", "canny", 0.6, 0, 0.7, "ControlNet is more important",
         "Crop and Resize", "Both")
