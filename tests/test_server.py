"""`sdonnx serve` against a live uvicorn server on 127.0.0.1, through a real HTTP client and headless Chromium.

The model is the tiny random sd1 model (images are noise); it is converted once and kept in pytest's cache,
keyed on the sources that make it, so later runs skip the conversion.
"""
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from sdonnx.infotext import parse_infotext  # noqa: E402
from sdonnx.pipeline import GenerationResult, Pipeline  # noqa: E402
from sdonnx.samplers import SAMPLER_NAMES, SCHEDULER_NAMES  # noqa: E402
from sdonnx.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
API = "/sdapi/v1"
AUTH = ("alice", "s3cret")
SMALL_BODY = 4096
# a payload as A1111 API clients send it (the fields of A1111's StableDiffusionTxt2ImgProcessingAPI)
A1111_CLIENT_PAYLOAD = {
    "prompt": "a maltese puppy", "negative_prompt": "blurry", "styles": [], "seed": 1234, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a",
    "sampler_index": "Euler", "scheduler": "Automatic", "batch_size": 2, "n_iter": 2, "steps": 3, "cfg_scale": 7,
    "width": 64, "height": 64, "restore_faces": True, "tiling": True, "do_not_save_samples": False,
    "do_not_save_grid": False, "eta": 0.5, "denoising_strength": 0, "s_min_uncond": 0, "s_churn": 0, "s_tmax": 0,
    "s_tmin": 0, "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": "", "refiner_switch_at": 0, "disable_extra_networks": False, "comments": {},
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_prompt": "", "hr_negative_prompt": "",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {},
}


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models_root(request, tmp_path_factory):
    """A1111-like models folder: the tiny model, a LoRA file and an embedding."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("served")
    (root / "tiny-sd1").symlink_to(_cached_tiny_model(request), target_is_directory=True)
    (root / "Lora").mkdir()
    # a kohya LoRA on one attention projection of the tiny UNet (32 wide)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    rng = np.random.default_rng(0)
    save_file({f"{layer}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32),
               f"{layer}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32),
               f"{layer}.alpha": np.array(4.0, np.float32)}, root / "Lora" / "detail.safetensors",
              metadata={"ss_output_name": "add_detail"})
    (root / "styles.csv").write_text('name,prompt,negative_prompt\n"framed","a photo of {prompt}, framed","blurry"\n'
                                     'suffix,"oil painting",\n', encoding="utf-8")
    (root / "hypernetworks").mkdir()  # filled by a test that has torch to write one
    (root / "embeddings").mkdir()
    save_file({"emb_params": rng.standard_normal((2, 64)).astype(np.float32)},  # the tiny text encoder's width
              root / "embeddings" / "bad-hands.safetensors")
    save_file({"clip_l": np.zeros((3, 768), np.float32), "clip_g": np.zeros((3, 1280), np.float32)},
              root / "embeddings" / "xl-style.safetensors")
    return root


def _cached_tiny_model(request):
    sources = [ROOT / "tests" / "tiny_models.py", ROOT / "sdonnx" / "manifest.py",
               *sorted((ROOT / "converters").rglob("*.py"))]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    if getattr(request.config, "cache", None) is None:  # pytest run with -p no:cacheprovider
        pytest.importorskip("torch")
        return request.getfixturevalue("tiny_onnx")("sd1")
    cached = Path(request.config.cache.mkdir(f"sdonnx-tiny-sd1-{key}")) / "model"
    if not (cached / "sdonnx.json").is_file():
        pytest.importorskip("torch")
        folder = request.getfixturevalue("tiny_onnx")("sd1")
        # copied under a name of this process's own, then renamed: pytest-xdist workers share the cache, and
        # one must never delete or half-write the folder another worker's server is reading
        partial = cached.with_name(f"model.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(folder, partial)
        if not (cached / "sdonnx.json").is_file():  # what an older, unfinished copy may have left
            shutil.rmtree(cached, ignore_errors=True)
        try:
            partial.rename(cached)
        except OSError:  # another worker's copy got there first: the same sources, the same model
            shutil.rmtree(partial)
    return cached


class LiveServer:
    """uvicorn serving an app on a free loopback port, in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def server(models_root, tmp_path_factory):
    app = create_app(models_root, provider="cpu", lora_dirs=[models_root / "Lora"],
                     embedding_dirs=[models_root / "embeddings"], hypernetwork_dirs=[models_root / "hypernetworks"],
                     outdir=tmp_path_factory.mktemp("outputs"))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def secured(models_root):
    """A second server with auth, CORS and a small body limit (it never generates)."""
    app = create_app(models_root, provider="cpu", api_auth=f"bob:pw,{AUTH[0]}:{AUTH[1]}",
                     cors_allow_origins=["https://paint.example"], max_body_bytes=SMALL_BODY)
    with LiveServer(app) as live:
        yield live


def _png(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _png_b64(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post_in_thread(client, path, body):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("response", client.post(path, json=body)))
    thread.start()
    return thread, box


def _wait_for_step(client, min_step=1, job_no=0, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = client.get(f"{API}/progress").json()
        if progress["state"]["job_no"] >= job_no and progress["state"]["sampling_step"] >= min_step:
            return progress
        time.sleep(0.05)
    raise AssertionError("the job never reported a step")


def _wait_idle(client, timeout=20):
    deadline = time.monotonic() + timeout
    while client.get(f"{API}/progress").json()["current_task"] is not None:
        assert time.monotonic() < deadline, "the device stayed busy"
        time.sleep(0.05)


# ---------------------------------------------------------------------------- API


def test_variation_seeds_keep_the_seed_across_iterations(client):
    """A1111's all_seeds / all_subseeds: with a variation strength the seed stays, the variation seed counts."""
    r = client.post(f"{API}/txt2img", json={"prompt": "a cat", "steps": 1, "width": 64, "height": 64, "seed": 7,
                                            "subseed": 40, "subseed_strength": 0.3, "batch_size": 2, "n_iter": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["all_seeds"] == [7, 7, 7, 7] and info["all_subseeds"] == [40, 41, 42, 43]
    for text, subseed in zip(info["infotexts"], info["all_subseeds"]):
        assert "Seed: 7," in text and f"Variation seed: {subseed}," in text


def test_a1111_client_payload_unchanged(client):
    """What an A1111 API client sends and reads, as it does with A1111 (the wiki's example flow)."""
    r = client.post(f"{API}/txt2img", json=A1111_CLIENT_PAYLOAD)
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 4 and info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert data["parameters"]["prompt"] == "a maltese puppy" and data["parameters"]["hr_upscaler"] == "Latent"
    assert info["sampler_name"] == "Euler a" and info["width"] == 64 and info["negative_prompt"] == "blurry"
    # set to something this server does not do: reported, not fatal; hires fields are moot without enable_hr
    assert info["ignored_fields"] == ["restore_faces"]
    for b64, infotext, seed in zip(data["images"], info["infotexts"], info["all_seeds"]):
        image = _png(b64)
        assert image.size == (64, 64) and image.info["parameters"] == infotext
        assert f"Seed: {seed}," in infotext and "Eta: 0.5" in infotext and "Negative prompt: blurry" in infotext
        assert "Tiling: True" in infotext and "Hires" not in infotext
        png = client.post(f"{API}/png-info", json={"image": "data:image/png;base64," + b64}).json()
        assert png["info"] == infotext
        assert png["parameters"]["Seed"] == str(seed) and png["parameters"]["Size-1"] == "64"
    assert data["images"][0] != data["images"][1]


def test_minimal_payload_and_save_images(client, server):
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "steps": 2, "seed": 5, "save_images": True,
                                            "send_images": False})
    assert r.status_code == 200, r.text
    assert r.json()["images"] == []
    info = json.loads(r.json()["info"])
    assert info["sampler_name"] == "Euler" and info["width"] == 64  # A1111's API default; the model's own size
    outdir = client.get(f"{API}/options").json()["outdir_samples"]
    assert [p.name for p in (Path(outdir) / "txt2img-images").iterdir()] == ["00000-5.png"]


def test_variation_seed(client):
    body = {"prompt": "v", "steps": 2, "seed": 5, "subseed": 40, "subseed_strength": 0.3, "batch_size": 2,
            "n_iter": 2, "seed_resize_from_w": -1, "seed_resize_from_h": -1}
    info = json.loads(client.post(f"{API}/txt2img", json=body).json()["info"])
    assert info["all_subseeds"] == [40, 41, 42, 43] and info["ignored_fields"] == []
    assert "Variation seed: 43, Variation seed strength: 0.3" in info["infotexts"][3]


def test_lists_and_options(client, models_root):
    assert [s["name"] for s in client.get(f"{API}/samplers").json()] == SAMPLER_NAMES
    schedulers = client.get(f"{API}/schedulers").json()
    assert [s["label"] for s in schedulers] == SCHEDULER_NAMES and schedulers[2]["name"] == "karras"
    models = client.get(f"{API}/sd-models").json()
    assert [m["model_name"] for m in models] == ["tiny-sd1"]
    assert client.get(f"{API}/loras").json()[0] | {"path": None} == {
        "name": "detail", "alias": "add_detail", "path": None, "metadata": {"ss_output_name": "add_detail"}}
    embeddings = client.get(f"{API}/embeddings").json()["loaded"]
    assert embeddings["bad-hands"]["vectors"] == 2 and embeddings["bad-hands"]["shape"] == 64
    assert (embeddings["xl-style"]["vectors"], embeddings["xl-style"]["shape"]) == (3, 2048)  # A1111: summed width
    options = client.get(f"{API}/options").json()
    assert options["sd_model_checkpoint"] == models[0]["title"]
    assert client.post(f"{API}/options", json={"sd_model_checkpoint": "tiny-sd1"}).status_code == 200
    assert client.post(f"{API}/options", json=options).status_code == 200  # what GET gave, posted back
    r = client.post(f"{API}/options", json={"sd_model_checkpoint": "nope"})
    assert r.status_code == 404 and "tiny-sd1" in r.json()["detail"]
    (models_root / "second").symlink_to(models_root / "tiny-sd1", target_is_directory=True)
    try:
        assert client.post(f"{API}/refresh-checkpoints").status_code == 200
        assert [m["model_name"] for m in client.get(f"{API}/sd-models").json()] == ["second", "tiny-sd1"]
    finally:
        (models_root / "second").unlink()
        client.post(f"{API}/refresh-checkpoints")


def _txt2img(client, **body):
    r = client.post(f"{API}/txt2img", json={"prompt": "a lighthouse", "steps": 2, "seed": 11, **body})
    assert r.status_code == 200, r.text
    return r.json(), json.loads(r.json()["info"])


@pytest.fixture(scope="module")
def direct(models_root):
    """The served model through the Python API, to check the HTTP door reaches the same images."""
    pipe = Pipeline.load(models_root / "tiny-sd1", provider="cpu", lora_dir=models_root / "Lora",
                         embeddings_dir=models_root / "embeddings", hypernetwork_dir=models_root / "hypernetworks")
    return lambda **kw: pipe.generate(**{"prompt": "a lighthouse", "steps": 2, "seed": 11, "sampler": "Euler",
                                         "scheduler": "Automatic", "cfg_scale": 7.0, **kw})


def _same_pixels(b64, image):
    return np.array_equal(np.asarray(_png(b64).convert("RGB")), np.asarray(image.convert("RGB")))


def test_hires_fix_gives_the_hires_size(client, direct):
    """A1111: enable_hr with hr_scale 2 on 64x64 answers 128x128, with its Hires infotext keys."""
    data, info = _txt2img(client, enable_hr=True, hr_scale=2, hr_second_pass_steps=3, denoising_strength=0.5,
                          hr_upscaler="Latent")
    text = info["infotexts"][0]
    assert _png(data["images"][0]).size == (128, 128) and info["ignored_fields"] == []
    for key in ("Hires upscale: 2", "Hires steps: 3", "Hires upscaler: Latent", "Denoising strength: 0.5",
                "Size: 64x64"):
        assert key in text, text
    reference = direct(hires=True, hires_scale=2, hires_steps=3, hires_denoising=0.5, hires_upscaler="Latent")
    assert _same_pixels(data["images"][0], reference.images[0]) and text == reference.infotexts[0]
    # A1111's defaults: no upscaler named is "Latent" (not written), hr_second_pass_steps 0 is the steps
    data, info = _txt2img(client, enable_hr=True, hr_resize_x=96, hr_upscaler="Nearest")
    assert _png(data["images"][0]).size == (96, 96)
    assert "Hires resize: 96x96" in info["infotexts"][0] and "Hires upscaler: Nearest" in info["infotexts"][0]
    data, info = _txt2img(client, enable_hr=True, hr_sampler_name="DPM++ 2M", hr_scheduler="Karras",
                          hr_prompt="a lighthouse at night", hr_upscaler="None")
    assert _png(data["images"][0]).size == (128, 128)
    for key in ("Hires sampler: DPM++ 2M", "Hires schedule type: Karras", "Hires prompt: a lighthouse at night"):
        assert key in info["infotexts"][0]
    for body, status, words in (({"hr_upscaler": "ESRGAN_4x"}, 422, "Lanczos"),
                                ({"hr_sampler_name": "Euler z"}, 404, "DPM++ 2M"),
                                ({"hr_scheduler": "Karras2"}, 404, "Exponential")):
        r = client.post(f"{API}/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True, **body})
        assert r.status_code == status and words in r.text, r.text


def test_infotext_field_makes_an_image_again(client):
    """A1111 1.7+'s `infotext` field: a hires image made again from its own infotext, pixel for pixel."""
    data, info = _txt2img(client, enable_hr=True, hr_scale=1.5, sampler_name="DPM++ 2M", denoising_strength=0.6)
    again = client.post(f"{API}/txt2img", json={"infotext": info["infotexts"][0]})
    assert again.status_code == 200, again.text
    assert again.json()["images"][0] == data["images"][0]
    assert json.loads(again.json()["info"])["infotexts"][0] == info["infotexts"][0]


def test_tiling_tiles(client, direct):
    data, info = _txt2img(client, tiling=True)
    assert "Tiling: True" in info["infotexts"][0] and info["ignored_fields"] == []
    assert _same_pixels(data["images"][0], direct(tiling=True).images[0])
    assert not _same_pixels(data["images"][0], direct().images[0])
    data, info = _txt2img(client, override_settings={"tiling": True})  # A1111's setting, for tiling None
    assert "Tiling: True" in info["infotexts"][0] and info["ignored_fields"] == []


def test_refiner_switches(client, direct, models_root):
    data, info = _txt2img(client, steps=4, refiner_checkpoint="tiny-sd1", refiner_switch_at=0.5)
    params = parse_infotext(info["infotexts"][0])
    assert params["Refiner"] == params["Model"] and params["Refiner switch at"] == "0.5", params
    reference = direct(steps=4, refiner=models_root / "tiny-sd1", refiner_switch_at=0.5)
    assert _same_pixels(data["images"][0], reference.images[0])
    _, info = _txt2img(client, refiner_checkpoint="tiny-sd1", refiner_switch_at=1.0)  # A1111: never switches
    assert "Refiner" not in info["infotexts"][0]
    r = client.post(f"{API}/txt2img", json={"prompt": "x", "steps": 2, "refiner_checkpoint": "nope"})
    assert r.status_code == 404 and "tiny-sd1" in r.json()["detail"]


def test_styles_as_a1111(client):
    assert client.get(f"{API}/prompt-styles").json() == [
        {"name": "framed", "prompt": "a photo of {prompt}, framed", "negative_prompt": "blurry"},
        {"name": "suffix", "prompt": "oil painting", "negative_prompt": ""}]
    _, info = _txt2img(client, prompt="a cat", negative_prompt="dark", styles=["framed", "suffix", "gone"])
    assert info["prompt"] == "a photo of a cat, framed, oil painting" and info["negative_prompt"] == "dark, blurry"
    assert info["infotexts"][0].startswith("a photo of a cat, framed, oil painting\nNegative prompt: dark, blurry\n")
    assert info["styles"] == ["framed", "suffix", "gone"] and "Styles not found: gone" in info["comments"]


def test_served_lora_and_embedding_folders_are_used(client, direct):
    """Bug: `sdonnx serve --lora-dir/--embeddings-dir` listed those folders but generated without them."""
    data, info = _txt2img(client, prompt="a lighthouse <lora:detail:1>, bad-hands")
    text = info["infotexts"][0]
    assert 'Lora hashes: "detail: ' in text and 'TI hashes: "bad-hands: ' in text, text
    reference = direct(prompt="a lighthouse <lora:detail:1>, bad-hands")
    assert _same_pixels(data["images"][0], reference.images[0])
    assert not _same_pixels(data["images"][0], direct(prompt="a lighthouse , bad-hands").images[0])


def test_served_hypernetwork_folder_is_listed_and_used(client, direct, models_root):
    pytest.importorskip("torch")
    from test_hypernetwork import make_layers, save_a1111

    save_a1111(models_root / "hypernetworks" / "ink.pt", make_layers((32, 64), seed=3))
    assert client.get(f"{API}/hypernetworks").json() == [{"name": "ink",
                                                           "path": str(models_root / "hypernetworks" / "ink.pt")}]
    data, info = _txt2img(client, prompt="a lighthouse <hypernet:ink:0.8>")
    assert info["infotexts"][0].startswith("a lighthouse <hypernet:ink:0.8>\n")
    assert _same_pixels(data["images"][0], direct(prompt="a lighthouse <hypernet:ink:0.8>").images[0])
    assert not _same_pixels(data["images"][0], direct(prompt="a lighthouse ").images[0])


def test_missing_lora_generates_with_a_warning(client, direct):
    """A1111 generates without a LoRA it cannot find, and says so."""
    data, info = _txt2img(client, prompt="a lighthouse <lora:nope:0.7>")
    assert info["comments"] == "Lora not found: nope\n"
    assert info["prompt"] == "a lighthouse <lora:nope:0.7>"
    assert info["infotexts"][0].startswith("a lighthouse <lora:nope:0.7>\nSteps: 2,")
    assert _same_pixels(data["images"][0], direct(prompt="a lighthouse ").images[0])


def test_upscalers_latent_modes_and_memory(client):
    from sdonnx.img2img import LATENT_UPSCALERS

    assert [u["name"] for u in client.get(f"{API}/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in client.get(f"{API}/latent-upscale-modes").json()] == list(LATENT_UPSCALERS)
    memory = client.get(f"{API}/memory").json()
    ram = memory["ram"]
    assert 0 < ram["used"] < ram["total"] and ram["free"] == ram["total"] - ram["used"]
    assert memory["cuda"] == {"error": "unavailable"}  # A1111's answer where torch has no CUDA


@pytest.mark.parametrize("body, status, words", [
    ('{"prompt": "x", ', 422, "json"),
    ('[1, 2]', 422, "dict"),
    ('{"sampler_name": "Euler z"}', 404, "DPM++ 2M"),
    ('{"scheduler": "Karras2"}', 404, "Exponential"),
    ('{"width": 65, "height": 64}', 422, "multiple of 8"),
    ('{"width": 100000}', 422, "2048"),
    ('{"steps": 0}', 422, "steps"),
    ('{"steps": "many"}', 422, "integer"),
    ('{"batch_size": 1000}', 422, "batch_size"),
    ('{"override_settings": {"sd_model_checkpoint": "gone"}}', 404, "not found"),
    ('{"override_settings": {"CLIP_stop_at_last_layers": "two"}}', 422, "CLIP_stop_at_last_layers"),
])
def test_bad_requests_get_a1111_errors(client, body, status, words):
    r = client.post(f"{API}/txt2img", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert words.lower() in r.text.lower() and "Traceback" not in r.text
    assert "detail" in r.json()


def test_bad_images_and_routes(client):
    for image in ("not base64!", base64.b64encode(b"not an image").decode(), "http://127.0.0.1/x.png"):
        r = client.post(f"{API}/png-info", json={"image": image})
        assert r.status_code == 422 and r.json()["error"] == "BadImage", r.text
    r = client.post(f"{API}/img2img", json={"init_images": ["@@@"], "steps": 2})
    assert r.status_code in (422, 501) and "Traceback" not in r.text
    assert client.get(f"{API}/nothing-here").status_code == 404
    assert client.get(f"{API}/txt2img").status_code == 405


def _img2img_body():
    init = Image.new("RGB", (64, 48), (200, 40, 40))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 16, 48, 40))
    return {"init_images": [_png_b64(init)], "mask": _png_b64(mask), "denoising_strength": 0.5, "steps": 4,
            "seed": 9, "prompt": "red", "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res_padding": 32}


def test_img2img(client):
    r = client.post(f"{API}/img2img", json=_img2img_body())
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["parameters"]["init_images"] is None and data["parameters"]["mask"] is None
    info = json.loads(data["info"])
    assert _png(data["images"][0]).size == (64, 48) and info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in info["infotexts"][0]


class FakeImg2ImgPipeline:
    """A Pipeline stand-in: records the keywords of each generate call, answers with the init image."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt, *, seed, width, height, steps, batch_size, init_image, strength, callback, preview,
                 **settings):
        self.calls.append(dict(settings, init_image=init_image, strength=strength, size=(width, height)))
        for step in range(1, steps + 1):
            callback(step, steps)
        seeds = [seed + j for j in range(batch_size)]
        texts = [f"{prompt}\nSteps: {steps}, Seed: {s}, Denoising strength: {strength}" for s in seeds]
        return GenerationResult([init_image.resize((width, height))] * batch_size, seeds, texts)


def test_img2img_route_passes_images_and_options(models_root):
    fake = FakeImg2ImgPipeline()
    with LiveServer(create_app(models_root, load_pipeline=lambda path: fake)) as live:
        r = httpx.post(f"{live.url}{API}/img2img", json=_img2img_body(), timeout=30)
        assert r.status_code == 200, r.text
        call = fake.calls[0]
        assert call["init_image"].size == (64, 48) and call["mask"].getpixel((20, 20)) == 255
        assert (call["strength"], call["mask_blur"], call["inpainting_fill"], call["size"]) == (0.5, 2, 1, (64, 48))
        # A1111's API defaults: only masked (inpaint_full_res), not inverted; the padding as sent
        assert (call["inpaint_full_res"], call["inpaint_full_res_padding"], call["inpainting_mask_invert"]) == (
            True, 32, False)
        info = json.loads(r.json()["info"])
        assert info["ignored_fields"] == []
        assert _png(r.json()["images"][0]).getpixel((0, 0)) == (200, 40, 40)
        for body, words in (({"steps": 2}, "init_images"), ({**_img2img_body(), "mask": "%%"}, "mask"),
                            ({**_img2img_body(), "width": 60}, "multiple of 8")):
            r = httpx.post(f"{live.url}{API}/img2img", json=body, timeout=30)
            assert r.status_code == 422 and words in r.text, r.text


def test_progress_preview_and_interrupt(client):
    thread, box = _post_in_thread(client, f"{API}/txt2img", {"prompt": "slow", "steps": 1000, "n_iter": 3})
    progress = _wait_for_step(client, 2)
    assert progress["current_task"] and 0 < progress["progress"] < 1
    assert progress["state"]["sampling_steps"] == 1000 and progress["state"]["job_count"] == 3
    assert _png(progress["current_image"]).size == (8, 8)  # latent-sized live preview
    assert client.get(f"{API}/progress", params={"skip_current_image": True}).json()["current_image"] is None
    t0 = time.monotonic()
    assert client.post(f"{API}/interrupt").json() == {}
    thread.join(20)
    assert time.monotonic() - t0 < 5
    response = box["response"]
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) == 1  # the unfinished image, as A1111
    assert client.get(f"{API}/progress").json()["current_task"] is None


def test_skip_drops_one_batch(client):
    thread, box = _post_in_thread(client, f"{API}/txt2img", {"prompt": "s", "steps": 1000, "n_iter": 2, "seed": 3})
    _wait_for_step(client, 2)
    client.post(f"{API}/skip")
    _wait_for_step(client, 2, job_no=1)  # the second iteration runs
    client.post(f"{API}/interrupt")
    thread.join(20)
    info = json.loads(box["response"].json()["info"])
    assert info["all_seeds"] == [3, 4] and info["interrupted"] is True


def test_disconnected_client_frees_the_device(server, client):
    with httpx.Client(base_url=server.url, timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(f"{API}/txt2img", json={"prompt": "abandoned", "steps": 1000, "n_iter": 100})
    _wait_idle(client, 10)
    r = client.post(f"{API}/txt2img", json={"prompt": "next", "steps": 2})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


def test_concurrent_requests_fifo(server, client):
    """10 requests queued behind a running job: every one gets its own images, answered in arrival order."""
    n, finished, lock = 10, [], threading.Lock()
    responses = [None] * n
    clients = [httpx.Client(base_url=server.url, timeout=120) for _ in range(n)]

    def send(i):
        responses[i] = clients[i].post(f"{API}/txt2img", json={"prompt": f"p{i}", "steps": 3, "seed": 100 * i,
                                                                "batch_size": 1 + i % 2})
        with lock:
            finished.append(i)

    blocker, box = _post_in_thread(client, f"{API}/txt2img", {"prompt": "blocker", "steps": 1000})
    _wait_for_step(client, 1)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for i, t in enumerate(threads):
        t.start()
        deadline = time.monotonic() + 10
        while client.get(f"{API}/progress").json()["queue_pending"] < i + 1:  # arrival order = i
            assert time.monotonic() < deadline, "request did not queue"
            time.sleep(0.01)
    client.post(f"{API}/interrupt")
    for t in [blocker, *threads]:
        t.join(120)
    for c in clients:
        c.close()
    assert box["response"].status_code == 200
    assert finished == list(range(n))
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["prompt"] == f"p{i}" and info["all_seeds"][0] == 100 * i and info["interrupted"] is False
        assert len(r.json()["images"]) == 1 + i % 2


# ---------------------------------------------------------------------------- auth, CORS, limits


def test_auth_cors_and_body_limit(secured):
    url = secured.url
    assert httpx.get(f"{url}{API}/samplers").status_code == 401
    r = httpx.get(f"{url}{API}/samplers", auth=("alice", "wrong"))
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{url}/", auth=("eve", AUTH[1])).status_code == 401
    assert httpx.get(f"{url}{API}/samplers", headers={"Authorization": "Basic !!"}).status_code == 401
    assert httpx.get(f"{url}{API}/samplers", auth=AUTH).status_code == 200
    assert httpx.get(f"{url}/", auth=("bob", "pw")).status_code == 200
    preflight = httpx.options(f"{url}{API}/txt2img", headers={
        "Origin": "https://paint.example", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://paint.example"
    big = {"image": "A" * (SMALL_BODY * 2)}
    r = httpx.post(f"{url}{API}/png-info", json=big, auth=AUTH)
    assert r.status_code == 413 and r.json()["error"] == "PayloadTooLarge"

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(4):
            yield b"x" * SMALL_BODY

    r = httpx.post(f"{url}{API}/png-info", content=chunks(), auth=AUTH, headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_serve_command(models_root):
    """`sdonnx serve` as users start it: loopback only, LoRAs found under the models folder."""
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdonnx.cli", "serve", "-m", str(models_root), "--port", str(port),
                             "--api-auth", "u:p"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}{API}/loras", auth=("u", "p"))
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "sdonnx serve did not come up"
                time.sleep(0.2)
        assert r.status_code == 200 and r.json()[0]["name"] == "detail"
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 401
    finally:
        proc.terminate()
        proc.wait(10)
    from click.testing import CliRunner

    from sdonnx.cli import main

    bad = CliRunner().invoke(main, ["serve", "-m", str(models_root), "--api-auth", "nopass"])
    assert bad.exit_code == 2 and "user:password" in bad.output


# ---------------------------------------------------------------------------- web page


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1100,900",
                  "--remote-debugging-pipe"]


def _high_fds(*fds):
    """The fds moved to numbers >= 10, so that putting them on 3 and 4 cannot clobber one another."""
    import fcntl

    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in fds)
    for fd in fds:
        os.close(fd)
    return moved


class Chromium:
    """Chrome DevTools Protocol over --remote-debugging-pipe (fd 3 in, fd 4 out): no extra packages."""

    def __init__(self, binary, profile):
        to_browser_r, self._to_browser = _high_fds(*os.pipe())
        self._from_browser, from_browser_w = _high_fds(*os.pipe())
        # bash puts the pipe ends on fds 3 and 4 (no preexec_fn: this process runs threads)
        wrapper = f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", wrapper, "bash", binary, *CHROMIUM_FLAGS,
                                      f"--user-data-dir={profile}", "about:blank"],
                                     pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id, self._buffer, self.session = 0, b"", None

    def send(self, method, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply
                return reply["result"]

    def _read(self):
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 16)
            assert chunk, "chromium closed the pipe"
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url):
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            status = self.js("document.getElementById('status')?.textContent")
            assert time.monotonic() < deadline, f"timed out waiting for {expression} (status: {status})"
            time.sleep(0.1)

    def close(self):
        try:  # a clean exit takes the renderer and helper processes with it
            os.write(self._to_browser, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture
def browser(tmp_path):
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.skip("no chromium/chrome on PATH (apt-get install chromium) to drive the web page")
    browser = Chromium(binary, tmp_path / "profile")
    try:
        yield browser
    finally:
        browser.close()


def _open_page(browser, server):
    browser.open(server.url + "/")
    browser.wait_for("document.body && document.body.dataset.ready === '1'")


def test_web_page_hires_fix_png_info_and_painter(server, client, browser):
    """The hires fix section, the PNG-info tab and its "Send to txt2img", the mask painter's size."""
    _open_page(browser, server)
    browser.js("""(() => {
        const set = (id, v) => { document.getElementById(id).value = v; };
        set('prompt', 'a harbour'); set('steps', '2'); set('seed', '5'); set('width', '64'); set('height', '64');
        set('sampler_name', 'Euler');
        document.getElementById('hires_section').open = true;
        document.getElementById('enable_hr').checked = true; set('hr_scale', '2'); set('hr_upscaler', 'Lanczos');
        document.getElementById('generate').click();
    })()""")
    browser.wait_for("[...document.querySelectorAll('#results img')].some(i => i.complete && i.naturalWidth === 128)")
    text = browser.js("document.querySelector('#results pre').textContent")
    for key in ("Hires upscale: 2", "Hires upscaler: Lanczos", "Denoising strength: 0.7", "Size: 64x64", "Seed: 5,"):
        assert key in text, text
    # PNG info: the image dropped on the tab, its parameters read back, then sent to txt2img
    browser.js("""(async () => {
        document.querySelector('.tab[data-tab=pnginfo_tab]').click();
        const blob = await (await fetch(document.querySelector('#results img').src)).blob();
        const transfer = new DataTransfer();
        transfer.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
        document.getElementById('png_drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer}));
    })()""")
    browser.wait_for("document.getElementById('png_text').textContent.includes('Hires upscale: 2')")
    assert browser.js("document.getElementById('png_text').textContent") == text
    rows = browser.js("[...document.querySelectorAll('#png_params tr')].map(r => r.textContent)")
    assert "Hires upscale2" in rows and "Seed5" in rows
    assert browser.js("document.getElementById('generate_tab').hidden") is True
    browser.js("""document.getElementById('enable_hr').checked = false; document.getElementById('seed').value = '-1';
                  document.getElementById('hr_upscaler').value = 'Latent';
                  document.getElementById('png_to_txt2img').click()""")
    assert browser.js("document.getElementById('generate_tab').hidden") is False
    form = browser.js("""['enable_hr', 'seed', 'hr_scale', 'hr_upscaler', 'hr_denoising_strength', 'steps', 'prompt']
                         .map(id => { const e = document.getElementById(id); return e.type === 'checkbox' ? e.checked : e.value; })""")
    assert form == [True, "5", "2", "Lanczos", "0.7", "2", "a harbour"]
    # the mask painter: tiny and huge images are both shown in a 512 px box, painting at image pixels
    sizes = browser.js("""(async () => {
        document.querySelector('input[name=mode][value=img2img]').click();
        const out = [];
        for (const [w, h] of [[16, 16], [2048, 1024]]) {
            const c = document.createElement('canvas'); c.width = w; c.height = h;
            loadInitImage(c.toDataURL('image/png'));
            await new Promise(r => setTimeout(r, 300));
            const box = document.getElementById('mask_canvas').getBoundingClientRect();
            out.push([document.getElementById('mask_canvas').width, Math.round(box.width), Math.round(box.height)]);
        }
        return out;
    })()""")
    assert sizes == [[16, 512, 512], [2048, 512, 256]]
    defaults = browser.js("['inpainting_fill', 'inpaint_full_res', 'inpaint_full_res_padding', 'resize_mode']"
                          ".map(id => document.getElementById(id).selectedOptions?.[0]?.textContent ?? "
                          "document.getElementById(id).value)")
    assert defaults == ["original", "Whole picture", "32", "Just resize"]  # A1111's UI defaults
    assert browser.js("document.getElementById('hires_section').hidden") is True  # no hires fix in img2img


def test_web_page_shows_only_its_own_progress(server, client, browser):
    """A job from another client holds the device: the page says it waits, and shows no progress as its own."""
    _open_page(browser, server)
    thread, box = _post_in_thread(client, f"{API}/txt2img", {"prompt": "other tab", "steps": 1000})
    try:
        _wait_for_step(client, 2)
        browser.js("""document.getElementById('steps').value = '2'; document.getElementById('width').value = '64';
                      document.getElementById('generate').click()""")
        browser.wait_for("document.getElementById('status').textContent.includes('another job is running')")
        time.sleep(1.0)  # several polls while the other job runs
        assert browser.js("document.getElementById('status').textContent").startswith("Waiting: another job")
        assert browser.js("document.getElementById('progress').value") == 0
        assert browser.js("document.getElementById('preview').hidden") is True
    finally:
        client.post(f"{API}/interrupt")
        thread.join(30)
    browser.wait_for("document.getElementById('status').textContent.startsWith('Done')")
    assert box["response"].status_code == 200


def test_web_page_in_headless_chromium(server, browser, tmp_path):
    _open_page(browser, server)
    assert browser.js("document.querySelectorAll('#sampler_name option').length") == len(SAMPLER_NAMES)
    assert browser.js("document.querySelector('#lora option[value=detail]').textContent") == "add_detail"
    browser.js("""(() => {
        const set = (id, v) => { document.getElementById(id).value = v; };
        set('prompt', 'a lighthouse at dusk'); set('negative_prompt', 'fog'); set('steps', '4');
        set('seed', '77'); set('width', '64'); set('height', '64'); set('batch_size', '2');
        set('sampler_name', 'DPM++ 2M'); set('scheduler', 'Karras');
        set('lora', 'detail'); document.getElementById('add_lora').click();
    })()""")
    assert browser.js("document.getElementById('prompt').value") == "a lighthouse at dusk, <lora:detail:1>"
    browser.js("""document.getElementById('prompt').value = 'a lighthouse at dusk';
                  document.getElementById('generate').click()""")
    browser.wait_for("[...document.querySelectorAll('#results img')].filter("
                     "i => i.complete && i.naturalWidth === 64).length === 2")
    text = browser.js("document.querySelector('#results pre').textContent")
    assert text.startswith("a lighthouse at dusk\nNegative prompt: fog\n") and "Seed: 77," in text
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    browser.js("document.getElementById('seed').value = '-1'; document.querySelectorAll('.reuse')[1].click()")
    browser.wait_for("document.getElementById('status').textContent.includes('Parameters loaded')")
    assert browser.js("document.getElementById('seed').value") == "78"
    shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "server_page.png").write_bytes(shot)
    artifacts = ROOT / "tests" / "artifacts"
    if artifacts.is_dir():
        (artifacts / "server_page.png").write_bytes(shot)
    assert Image.open(io.BytesIO(shot)).size[0] > 500
