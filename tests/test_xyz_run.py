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
from sdonnx.plots.axes import Context, parse_axis
from sdonnx.plots.grid import layout, labels

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from test_server import LiveServer, models_root  # noqa: E402,F401  (the tiny model, converted once and cached)

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
                        (["--x", "Face restore: true"], "no face restoration"),
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
