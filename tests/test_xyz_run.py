"""X/Y/Z plot and prompt matrix end to end on the tiny sd1 model: the CLI, and A1111's API script path.

Tiny 64x64 images with 1-2 steps: the grids are checked for their size, their infotext and that each cell is the
image the same request gives alone.
"""
import base64
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdonnx.cli import main
from sdonnx.image import read_infotext
from sdonnx.infotext import parse_infotext
from sdonnx.pipeline import Pipeline
from sdonnx.plots.grid import layout, labels

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from test_server import LiveServer, _open_page, browser, models_root  # noqa: E402,F401  (the tiny model: cached)

from sdonnx.server import create_app  # noqa: E402

SMALL = ["-W", "64", "-H", "64", "--provider", "cpu"]


@pytest.fixture(scope="module")
def model(models_root):  # noqa: F811
    return models_root / "tiny-sd1"


@pytest.fixture(scope="module")
def pipe(model):
    return Pipeline.load(model, provider="cpu")


def _run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cli_xyz_grid_cells_and_infotext(model, pipe, tmp_path):
    out = tmp_path / "out"
    result = _run("xyz", "-m", str(model), "a cat", "--x", "Sampler: Euler a, Euler", "--y", "Steps: 1-2",
                  "--seed", "7", "-o", str(out), *SMALL)
    assert result.exit_code == 0, result.output
    cells = sorted(out.glob("0*.png"))
    grid = out / "xyz_grid-0000.png"
    assert len(cells) == 4 and grid.is_file()
    lay = layout(2, 2, 64, 64, labels(["Euler a", "Euler"]), labels(["Steps: 1", "Steps: 2"]))
    assert Image.open(grid).size == lay.size
    params = parse_infotext(read_infotext(grid))
    assert (params["Script"], params["X Type"], params["X Values"], params["Y Values"]) == \
        ("X/Y/Z plot", "Sampler", "Euler a, Euler", "1-2")
    assert (params["Steps"], params["Sampler"], params["Seed"]) == ("1", "Euler a", "7")  # the first cell's
    # the last cell (x=Euler, y=2 steps) is the image that request makes on its own, pixel for pixel
    alone = pipe.generate("a cat", sampler="Euler", steps=2, seed=7, width=64, height=64).images[0]
    cell = Image.open(grid).crop((lay.pad_left + 64, lay.pad_top + 64, lay.pad_left + 128, lay.pad_top + 128))
    assert np.array_equal(np.asarray(cell), np.asarray(alone))


def test_cli_bad_axes_fail_before_any_image(model, tmp_path):
    for args, words in ((["--x", "Sampler: Euler a, Eulr"], "unknown sampler 'Eulr'"),
                        (["--x", "Face restore: maybe"], "'maybe' is not one of CodeFormer"),
                        (["--x", "Steps 10"], "give TYPE: VALUES"),
                        (["--x", "Prompt S/R: dog, cat"], "did not find 'dog'"),
                        (["--x", "Checkpoint name: nope"], "'nope' not found"),
                        (["--x", "Steps: 1-40", "--y", "CFG Scale: 1-40"], "over the limit of 1000"),
                        (["--x", "Size: 64x60"], "height 60 is not a positive multiple of 8")):
        result = CliRunner().invoke(main, ["xyz", "-m", str(model), "a cat", *args, "-o", str(tmp_path), *SMALL])
        assert result.exit_code == 2 and words in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert not list(tmp_path.glob("*.png"))


def test_cli_prompt_matrix(model, tmp_path):
    result = _run("prompt-matrix", "-m", str(model), "a cat|snow|night", "--steps", "1", "--seed", "3",
                  "-o", str(tmp_path), *SMALL)
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("0*.png"))) == 4
    grid = Image.open(tmp_path / "prompt_matrix-0000.png")
    assert grid.size[1] > 64 * 2 and grid.size[0] == 2 * 64 + 64 * 3 // 4  # 2x2 cells, legends on top and left


# ---------------------------------------------------------------------------------------------- the API

API = "/sdapi/v1"
BASE = {"prompt": "a cat", "negative_prompt": "", "seed": 11, "steps": 1, "width": 64, "height": 64,
        "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def live(models_root, outputs):  # noqa: F811
    app = create_app(models_root, provider="cpu", lora_dirs=[models_root / "Lora"],
                     embedding_dirs=[models_root / "embeddings"], outdir=outputs)
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    with httpx.Client(base_url=live.url, timeout=120) as c:
        yield c


def _image(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_api_xyz_as_an_a1111_client_sends_it(client):
    # A1111 1.10's 18 positional arguments: axis types as dropdown indices (9 Sampler, 4 Steps), the Sampler
    # values from its dropdown list (csv_mode off), Include Sub Images on
    args = [9, "", ["Euler a", "Euler"], 4, "1-2", [], 0, "", [], True, True, False, False, False, False, False, 0,
            False]
    r = client.post(f"{API}/txt2img", json={**BASE, "script_name": "X/Y/Z plot", "script_args": args})
    assert r.status_code == 200, r.text
    body, info = r.json(), json.loads(r.json()["info"])
    assert len(body["images"]) == 5 and info["index_of_first_image"] == 1
    lay = layout(2, 2, 64, 64, labels(["Euler a", "Euler"]), labels(["Steps: 1", "Steps: 2"]))
    grid = _image(body["images"][0])
    assert grid.size == lay.size
    params = parse_infotext(read_infotext(io.BytesIO(base64.b64decode(body["images"][0]))))
    assert (params["X Type"], params["X Values"], params["Y Type"], params["Y Values"]) == \
        ("Sampler", "Euler a,Euler", "Steps", "1-2")
    assert info["infotexts"][0] == read_infotext(io.BytesIO(base64.b64decode(body["images"][0])))
    assert [p["Steps"] for p in map(parse_infotext, info["infotexts"][1:])] == ["1", "1", "2", "2"]
    assert info["all_seeds"][1:] == [11] * 4
    # the cells in the grid are the images answered after it
    last = _image(body["images"][4])
    cell = grid.crop((lay.pad_left + 64, lay.pad_top + 64, lay.pad_left + 128, lay.pad_top + 128))
    assert np.array_equal(np.asarray(cell), np.asarray(last.convert("RGB")))


def test_api_script_args_by_name_and_prompt_matrix(client):
    args = {"x_type": "CFG Scale", "x_values": "1, 7", "z_type": "Prompt S/R", "z_values": "cat, dog",
            "include_sub_grids": True}
    r = client.post(f"{API}/txt2img", json={**BASE, "script_name": "x/y/z plot", "script_args": args})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 3 and info["index_of_first_image"] == 3  # the grid and one per Z value
    assert "Z Values: \"cat, dog\"" in info["infotexts"][0] and "Z Type" not in info["infotexts"][2]
    assert info["all_prompts"][2] == "a dog"
    r = client.post(f"{API}/txt2img", json={**BASE, "prompt": "a cat|snow|night", "script_name": "Prompt matrix",
                                            "script_args": [False, True, "positive", "comma", 0]})
    info = json.loads(r.json()["info"])
    assert r.status_code == 200 and len(r.json()["images"]) == 5
    assert info["all_prompts"][1:] == ["a cat", "a cat, snow", "a cat, night", "a cat, snow, night"]
    assert info["all_seeds"][1:] == [11, 12, 13, 14]


@pytest.mark.parametrize("script, args, words", [
    ("X/Y/Z plot", [43, "1"], ["outside A1111's txt2img list"]),
    ("X/Y/Z plot", ["Sampler", "Eulr"], ["unknown sampler 'Eulr'", "DPM++ 2M"]),
    ("X/Y/Z plot", ["Face restore", "maybe"], ["'maybe' is not one of CodeFormer, GFPGAN"]),
    ("X/Y/Z plot", ["Checkpoint name", "nope"], ["'nope' not found", "tiny-sd1"]),
    ("X/Y/Z plot", {"x_typo": 1}, ["unknown script_args x_typo"]),
    ("X/Y/Z plot", ["Steps", "1-40", [], "CFG Scale", "1-40"], ["over the limit of 1000"]),
    ("Loopback", [], ["script 'Loopback' not found", "x/y/z plot"]),
    ("Prompt matrix", [False, False, "both"], ["choose positive or negative"]),
])
def test_api_bad_scripts_are_refused_before_they_queue(client, script, args, words):
    r = client.post(f"{API}/txt2img", json={**BASE, "script_name": script, "script_args": args})
    assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), r.text
    assert client.get(f"{API}/progress").json()["state"]["job_count"] == 0


def test_api_lora_strengths_by_prompt_sr(client):
    # the A1111 way to plot a LoRA's strength: Prompt S/R on the tag's weight (the served Lora/detail file)
    body = {**BASE, "prompt": "a cat <lora:detail:0.1>", "script_name": "x/y/z plot",
            "script_args": {"x_type": "Prompt S/R", "x_values": "detail:0.1, detail:3", "include_lone_images": True}}
    r = client.post(f"{API}/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    weak, strong = (np.asarray(_image(b).convert("RGB"), np.int16) for b in r.json()["images"][1:])
    assert info["all_prompts"][1:] == ["a cat <lora:detail:0.1>", "a cat <lora:detail:3>"]
    assert all("Lora hashes" in text for text in info["infotexts"])
    assert np.abs(weak - strong).mean() > 1  # the strength reaches the UNet


def test_api_img2img_plot_saved_as_a1111(client, outputs):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
    body = {**BASE, "init_images": [base64.b64encode(buf.getvalue()).decode()], "steps": 2, "save_images": True,
            "script_name": "x/y/z plot", "script_args": [25, "0.3, 0.9"]}  # 25: Denoising in img2img's list
    r = client.post(f"{API}/img2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert [parse_infotext(t)["Denoising strength"] for t in info["infotexts"]] == ["0.3"]  # the grid: cell 1's
    assert "X Type: Denoising" in info["infotexts"][0]
    assert [p.name for p in (outputs / "img2img-grids").iterdir()] == ["xyz_grid-0000.png"]


def test_api_lists_the_scripts(client):
    assert client.get(f"{API}/scripts").json() == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"],
        "img2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot"]}
    info = client.get(f"{API}/script-info").json()
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert len(xyz["args"]) == 18 and "Steps" in xyz["args"][0]["choices"]


def test_api_prompts_from_file(client):
    text = 'a dog\n\n--prompt "a bird" --steps 2 --seed 5\n--prompt fish --sd_model tiny-sd1\n'
    r = client.post(f"{API}/txt2img", json={**BASE, "prompt": "photo", "seed": 20, "script_name":
                                            "Prompts from file or textbox", "script_args": [True, False, "end", text]})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 3 and info["index_of_first_image"] == 0
    assert info["all_prompts"] == ["photo a dog", "photo a bird", "photo fish"]  # prompt_position "end"
    assert info["all_seeds"] == [20, 5, 22]  # "Iterate seed every line": +1 a line; a line's own seed stays its own
    assert parse_infotext(info["infotexts"][1])["Steps"] == "2"
    old = client.post(f"{API}/txt2img", json={**BASE, "script_name": "prompts from file or textbox",
                                              "script_args": [False, False, "--steps 2 --bogus 1"]})  # A1111 < 1.8
    assert old.status_code == 422 and "unknown option --bogus" in old.json()["detail"]


def test_web_page_script_section(live, browser):  # noqa: F811
    _open_page(browser, live)
    browser.wait_for("document.querySelectorAll('#xyz_x_type option').length > 10")
    browser.js("""(() => {
        const set = (id, value) => { document.getElementById(id).value = value; };
        set('script_name', 'x/y/z plot'); document.getElementById('script_name').dispatchEvent(new Event('change'));
        set('xyz_x_type', 'Steps'); set('xyz_x_values', '1, 2'); set('xyz_y_type', 'CFG Scale'); set('xyz_y_values', '5');
        set('prompt', 'a cat'); set('steps', '1'); set('width', '64'); set('height', '64'); set('seed', '3');
        document.getElementById('generate').click();
    })()""")
    assert browser.js("document.getElementById('script_xyz').hidden") is False
    browser.wait_for("document.getElementById('status').textContent.startsWith('Done')", timeout=60)
    lay = layout(2, 1, 64, 64, labels(["Steps: 1", "Steps: 2"]), labels(["CFG Scale: 5.0"]))
    assert browser.js("[...document.querySelectorAll('#results img')].map(i => [i.naturalWidth, i.naturalHeight])") \
        == [list(lay.size)]
    assert "X Type: Steps" in browser.js("document.querySelector('#results pre').textContent")
    # img2img has its own axis list (Image CFG Scale where txt2img has Hires steps)
    browser.js("document.querySelector('input[name=mode][value=img2img]').click()")
    types = browser.js("[...document.querySelectorAll('#xyz_x_type option')].map(o => o.value)")
    assert "Hires steps" not in types and "Steps" in types


def test_cli_xyz_on_ray_makes_the_same_files(model, tmp_path):
    pytest.importorskip("ray")
    args = ["xyz", "-m", str(model), "a cat", "--x", "Seed: 1, 2", "--steps", "1", *SMALL]
    for where, extra in (("here", []), ("ray", ["--ray"])):
        result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / where), *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    here, there = ({p.name: p.read_bytes() for p in (tmp_path / d).glob("*.png")} for d in ("here", "ray"))
    assert sorted(here) == ["00000.png", "00001.png", "xyz_grid-0000.png"] and here == there
