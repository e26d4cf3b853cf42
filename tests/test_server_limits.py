"""`sdonnx serve` against hostile or careless requests (issue 16, items 3-6, 10, 11): limits and finite
numbers at the API's edge, a bounded queue, images decoded when their job runs, memory handed back after
large jobs, options checked when written, the output folder, CORS and websocket auth.

Most tests serve a stand-in Pipeline, so what they check is the server's own behaviour, quickly.
"""
import asyncio
import base64
import io
import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_server import API, LiveServer, models_root  # noqa: E402,F401  (models_root: the fixture)

from sdonnx import limits  # noqa: E402
from sdonnx.cli import main  # noqa: E402
from sdonnx.pipeline import GenerationResult  # noqa: E402
from sdonnx.server import create_app  # noqa: E402
from sdonnx.server.api import plan_generation  # noqa: E402
from sdonnx.server.app import BasicAuth  # noqa: E402
from sdonnx.server.codec import EncodedImage  # noqa: E402
from sdonnx.server.schemas import Img2ImgRequest  # noqa: E402


class FakePipeline:
    """A Pipeline stand-in: records each generate call; waits on `gate` (when given) before finishing."""

    def __init__(self, gate=None):
        self.calls, self.gate, self.entered = [], gate, threading.Event()

    def generate(self, prompt, negative_prompt="", steps=20, cfg_scale=7.0, sampler="Euler a", scheduler="Automatic",
                 seed=-1, width=64, height=64, batch_size=1, batch_count=1, callback=None, clip_skip=1, rng="nv",
                 **options):
        self.calls.append(dict(prompt=prompt, cfg_scale=cfg_scale, size=(width, height), **options))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        callback(1, 1)
        seeds = [seed + j for j in range(batch_size)]
        return GenerationResult([Image.new("RGB", (width, height), (9, 9, 9))] * batch_size, seeds,
                                [f"{prompt}\nSteps: {steps}, Seed: {s}" for s in seeds])


@pytest.fixture
def fake():
    return FakePipeline()


@pytest.fixture
def live(models_root, fake):
    with LiveServer(create_app(models_root, load_pipeline=lambda path: fake)) as server:
        yield server


def _post(live, body, path="txt2img", **kwargs):
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{live.url}{API}/{path}", content=content, headers={"content-type": "application/json"},
                      timeout=kwargs.pop("timeout", 30), **kwargs)


def _png_b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------- numbers and limits


@pytest.mark.parametrize("body, where", [
    ('{"prompt": "x", "cfg_scale": NaN}', "body.cfg_scale"),  # was: generated, then a 500 writing the JSON
    ('{"prompt": "x", "denoising_strength": Infinity, "enable_hr": true}', "body.denoising_strength"),
    ('{"prompt": "x", "override_settings": {"sigma_min": NaN}}', "body.override_settings.sigma_min"),
    ('{"prompt": "x", "some_extension": [1, -Infinity]}', "body.some_extension[1]"),
])
def test_nan_and_infinity_are_refused_at_the_edge(live, fake, body, where):
    r = _post(live, body)
    assert r.status_code == 422 and where in r.text and "finite" in r.text, r.text
    assert fake.calls == []


@pytest.mark.parametrize("body, words", [
    ({"seed_resize_from_w": 100000, "seed_resize_from_h": 100000}, "seed_resize_from_w"),  # was 20.8 GB
    ({"width": 2048, "height": 2048, "batch_size": 2}, "batch size"),
    ({"width": 512, "height": 512, "batch_size": 16, "n_iter": 100}, "batch count"),
    ({"width": 1024, "height": 1024, "enable_hr": True, "hr_scale": 4}, "hires fix target"),
    ({"steps": 1001}, "steps"),
])
def test_limits_hold_before_the_job_queues(live, fake, body, words):
    r = _post(live, {"prompt": "x", **body})
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert fake.calls == []


# ---------------------------------------------------------------------------- queue and memory


def test_queue_is_bounded(models_root):
    """Past max_queue waiting requests, a new one is refused at once (503, Retry-After), as a busy server."""
    gate = threading.Event()
    fake = FakePipeline(gate)
    with LiveServer(create_app(models_root, load_pipeline=lambda path: fake, max_queue=2)) as live:
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.setdefault(i, _post(live, {"prompt": f"p{i}"},
                                                                                    timeout=60))) for i in range(3)]
        threads[0].start()
        assert fake.entered.wait(20)
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 20
        while httpx.get(f"{live.url}{API}/progress").json()["queue_pending"] < 2:
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.02)
        t0 = time.monotonic()
        refused = _post(live, {"prompt": "one too many"}, timeout=10)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "10", refused.text
        assert "busy" in refused.json()["detail"] and time.monotonic() - t0 < 5
        gate.set()
        for t in threads:
            t.join(60)
        assert [results[i].status_code for i in range(3)] == [200, 200, 200]


def test_queued_images_stay_encoded(models_root, fake):
    """A waiting img2img request holds its compressed upload, not decoded pixels (ten 8192x8192 requests
    kept 2.8 GB); the Pipeline still gets a decoded image."""
    app = create_app(models_root, load_pipeline=lambda path: fake)
    image = _png_b64(Image.new("RGB", (64, 48), (200, 40, 40)))
    mask = _png_b64(Image.new("L", (64, 48), 255))
    plan = plan_generation(app.state.sdonnx, Img2ImgRequest(init_images=[image], mask=mask, steps=2), "img2img")
    for name in ("init_image", "mask"):
        assert isinstance(plan.kwargs[name], EncodedImage) and not isinstance(plan.kwargs[name], Image.Image)
    assert plan.kwargs["init_image"].size == (64, 48) and (plan.kwargs["width"], plan.kwargs["height"]) == (64, 48)
    bad = Img2ImgRequest(init_images=[base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()])
    with pytest.raises(ValueError, match="init_images"):  # still refused before it queues
        plan_generation(app.state.sdonnx, bad, "img2img")


def test_large_jobs_hand_memory_back(models_root, fake):
    """After a job whose batch holds more than four native-size images, the worker drops the Pipeline
    (ONNX Runtime's arena keeps a job's peak for the session's life) and the next job loads it again."""
    loads = []

    def load(path):
        loads.append(path)
        return fake

    with LiveServer(create_app(models_root, load_pipeline=load)) as live:
        for size in (64, 64, 256, 64):  # the tiny model's native size is 64: 256x256 is 16 of its images
            assert _post(live, {"prompt": "x", "width": size, "height": size}).status_code == 200
    assert len(loads) == 2 and [c["size"] for c in fake.calls] == [(64, 64), (64, 64), (256, 256), (64, 64)]


# ---------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, status, words", [
    ({"foo": 1}, 422, "unknown option 'foo'"),
    ({"eta_noise_seed_delta": "x"}, 422, "eta_noise_seed_delta"),  # was: kept, then every request failed
    ({"CLIP_stop_at_last_layers": 99}, 422, "CLIP_stop_at_last_layers"),
    ({"randn_source": ["GPU"]}, 422, "randn_source"),  # was: a 500 (an unhashable value)
    ({"tiling": "yes"}, 422, "tiling"),
    ({"live_previews_enable": "no"}, 422, "live_previews_enable"),
    ({"outdir_samples": "/tmp/elsewhere"}, 422, "read-only"),
    ({"CLIP_stop_at_last_layers": 2, "sd_model_checkpoint": "x" * limits.MAX_OPTIONS_BYTES}, 413, "options"),
])
def test_options_are_checked_when_written(live, fake, options, status, words):
    before = httpx.get(f"{live.url}{API}/options").json()
    r = httpx.post(f"{live.url}{API}/options", json=options)
    assert r.status_code == status and words in r.json()["detail"], r.text
    assert httpx.get(f"{live.url}{API}/options").json() == before  # nothing of a refused body is kept
    assert _post(live, {"prompt": "still works"}).status_code == 200


def test_good_options_are_kept(live, fake):
    options = httpx.get(f"{live.url}{API}/options").json()
    assert httpx.post(f"{live.url}{API}/options", json={**options, "CLIP_stop_at_last_layers": 2}).status_code == 200
    assert httpx.get(f"{live.url}{API}/options").json()["CLIP_stop_at_last_layers"] == 2


# ---------------------------------------------------------------------------- output folder


def test_unwritable_outdir_is_found_at_start_up(models_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=f"cannot write images to {blocker / 'out'}"):
        create_app(models_root, outdir=blocker / "out")
    r = CliRunner().invoke(main, ["serve", "-m", str(models_root), "-o", str(blocker / "out")])
    assert r.exit_code == 2 and "cannot write images" in r.output and "Traceback" not in r.output


def test_save_error_still_returns_the_images(models_root, fake, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    with LiveServer(create_app(models_root, outdir=outdir, load_pipeline=lambda path: fake)) as live:
        outdir.rmdir()  # the folder goes away (unmounted, deleted) while the server runs
        outdir.write_text("now a file")
        r = _post(live, {"prompt": "keep me", "save_images": True})
    assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
    assert f"images not saved to {outdir}" in json.loads(r.json()["info"])["save_error"]


# ---------------------------------------------------------------------------- CORS and auth


@pytest.mark.parametrize("origins, regex, credentials", [
    (["*"], None, False),  # was: every origin echoed back with credentials allowed
    ([], r"https://.*", False),
    (["https://paint.example"], None, True),
])
def test_cors_never_combines_a_wildcard_with_credentials(models_root, origins, regex, credentials):
    app = create_app(models_root, cors_allow_origins=origins, cors_allow_origins_regex=regex)
    r = TestClient(app).options(f"{API}/txt2img", headers={"Origin": "https://paint.example",
                                                            "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200
    assert r.headers.get("access-control-allow-credentials") == ("true" if credentials else None)
    assert r.headers["access-control-allow-origin"] in ("*", "https://paint.example")


def test_basic_auth_guards_websockets():
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["type"])

    async def connect(headers):
        sent = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "websocket", "path": "/ws", "headers": headers}
        await BasicAuth(inner, credentials=[(b"u", b"p")])(scope, receive, send)
        return sent

    assert asyncio.run(connect([])) == [{"type": "websocket.close", "code": 1008}] and reached == []
    token = base64.b64encode(b"u:p")
    assert asyncio.run(connect([(b"authorization", b"Basic " + token)])) == [] and reached == ["websocket"]
    asyncio.run(BasicAuth(inner, credentials=[(b"u", b"p")])({"type": "lifespan"}, None, None))
    assert reached == ["websocket", "lifespan"]
