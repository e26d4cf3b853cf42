"""`sdonnx generate --from-image/--from-infotext` reproduces an sdonnx PNG pixel for pixel; `png-info`."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sdonnx.cli import main
from sdonnx.image import read_infotext


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return tiny_onnx("sd1")


@pytest.fixture(scope="module")
def init_png(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    image.save(folder / "init.png")
    mask.save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result.stdout.split()


def _pixels(path):
    return np.asarray(Image.open(path)).astype(int)


CASES = {
    "txt2img": ["a cat", "--steps", 3, "--sampler", "DPM++ 2M SDE", "--seed", 7, "-W", 64, "-H", 64,
                "--eta", 0.7, "--ensd", 5, "--rng", "cpu", "--clip-skip", 2],
    "hires": ["a cat", "--steps", 3, "--sampler", "Euler a", "--seed", 8, "-W", 64, "-H", 64, "--hires",
              "--hires-scale", 1.5, "--hires-steps", 2, "--hires-denoising", 0.6, "--hires-sampler", "DPM++ 2M",
              "--hires-upscaler", "Latent (bicubic)", "--hires-prompt", "a dog, big"],
    "variation": ["a cat", "--steps", 3, "--seed", 9, "-W", 64, "-H", 64, "--subseed", 4, "--subseed-strength",
                  0.3, "--seed-resize-from-w", 48, "--seed-resize-from-h", 56, "--batch-size", 2],
    "img2img": ["a cat", "--steps", 4, "--sampler", "Heun", "--seed", 10, "--strength", 0.6, "--resize-mode", 1,
                "-W", 64, "-H", 48, "--s-churn", 0.4],
    "inpaint": ["a cat", "--steps", 3, "--seed", 11, "--strength", 0.9, "--mask-blur", 2, "--inpainting-fill", 2,
                "--only-masked", "--inpaint-padding", 8, "--invert-mask"],
}
# what has to be given again beside --from-image: the images themselves are not in the infotext
IMAGES = {"img2img": ["init"], "inpaint": ["init", "mask"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_image_reproduces_pixel_for_pixel(model, init_png, tmp_path, case):
    images = {"init": ["--init-image", init_png[0]], "mask": ["--mask", init_png[1]]}
    given = [a for name in IMAGES.get(case, []) for a in images[name]]
    first = run("generate", "-m", model, *CASES[case], *given, "-o", tmp_path / "a")
    for path in first:  # every image of a batch: its own seed and variation seed
        again = run("generate", "-m", model, "--from-image", path, *given, "-o", tmp_path / "b")
        assert len(again) == 1
        assert np.array_equal(_pixels(again[0]), _pixels(path)), case
        assert read_infotext(again[0]) == read_infotext(path)


def test_flags_override_the_infotext_and_from_infotext(model, tmp_path):
    [path] = run("generate", "-m", model, "a cat", "--steps", 2, "--seed", 3, "-W", 64, "-H", 64, "-o", tmp_path)
    text = read_infotext(path)
    [other] = run("generate", "-m", model, "--from-infotext", text, "--seed", 4, "-o", tmp_path / "b")
    assert "Seed: 4" in read_infotext(other) and read_infotext(other) == text.replace("Seed: 3", "Seed: 4")
    [same] = run("generate", "-m", model, "--from-infotext", text, "-o", tmp_path / "c")
    assert np.array_equal(_pixels(same), _pixels(path))


def test_png_info(model, tmp_path):
    [path] = run("generate", "-m", model, "a cat", "--steps", 2, "--seed", 3, "-W", 64, "-H", 64, "--hires",
                 "--hires-steps", 1, "-o", tmp_path)
    out = CliRunner().invoke(main, ["png-info", path])
    assert out.exit_code == 0 and out.stdout.startswith(read_infotext(path) + "\n\n")
    assert "hires: True" in out.stdout and "seed: 3" in out.stdout
    data = json.loads(CliRunner().invoke(main, ["png-info", path, "--json"]).stdout)
    assert data["infotext"] == read_infotext(path) and data["parameters"]["Hires steps"] == "1"
    assert data["settings"]["hires_steps"] == 1 and data["settings"]["width"] == 64


@pytest.mark.parametrize("args, message", [
    (["png-info", "{plain}"], "holds no generation parameters"),
    (["generate", "-m", "{model}", "--from-image", "{plain}"], "holds no generation parameters"),
    (["generate", "-m", "{model}"], "give a PROMPT"),
    (["generate", "-m", "{model}", "x", "--sampler-option", "order"], "KEY=VALUE"),
    (["generate", "-m", "{model}", "x", "--hires", "--hires-sampler", "Nope"], "unknown sampler 'Nope'"),
])
def test_one_line_errors(model, tmp_path, args, message):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    args = [a.format(plain=plain, model=model) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
