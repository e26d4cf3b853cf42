"""Hypernetworks through the doors: `sdonnx generate --hypernetwork-dir`, and `sdonnx serve`'s
/sdapi/v1/hypernetworks list (A1111's shape: name, path) and txt2img with a `<hypernet:...>` tag."""
import base64
import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

torch = pytest.importorskip("torch")

from test_hypernetwork import make_layers, save_a1111

from sdonnx.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hypernetworks")
    save_a1111(folder / "style.pt", make_layers((32, 64), seed=1, activation="relu"), activation_func="relu")
    return folder


def generate_cli(model, folder, prompt, outdir):
    result = CliRunner().invoke(main, ["generate", "-m", str(model), prompt, "--steps", "3", "--seed", "5",
                                       "--hypernetwork-dir", str(folder), "-o", str(outdir), "--provider", "cpu"],
                                catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_reads_the_hypernetwork_folder(tiny_onnx, folder, tmp_path):
    model = tiny_onnx("sd1")
    code, out, err = generate_cli(model, folder, "a red circle", tmp_path)
    assert code == 0, err
    code, out_h, err = generate_cli(model, folder, "a red circle <hypernet:style:1>", tmp_path)
    assert code == 0, err
    plain, styled = (Image.open(o.split()[0]) for o in (out, out_h))
    assert styled.info["parameters"].startswith("a red circle <hypernet:style:1>\n")
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(styled, np.int16)).mean() > 1


def test_cli_refuses_a_malicious_file_in_one_line(tiny_onnx, folder, tmp_path):
    class Payload:
        def __reduce__(self):
            return eval, ("1",)

    evil = tmp_path / "hn"
    evil.mkdir()
    torch.save({64: Payload()}, str(evil / "evil.pt"))
    code, _, err = generate_cli(tiny_onnx("sd1"), evil, "x <hypernet:evil:1>", tmp_path)
    assert code == 2 and err.startswith("error: hypernetwork evil: ") and "eval (only tensor data" in err
    assert err.count("\n") == 1


def test_server_lists_and_uses_hypernetworks(tiny_onnx, folder):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdonnx.server import create_app

    app = create_app(tiny_onnx("sd1"), provider="cpu", hypernetwork_dirs=[folder.parent / "absent", folder])
    with TestClient(app) as client:
        assert client.get("/sdapi/v1/hypernetworks").json() == [{"name": "style", "path": str(folder / "style.pt")}]

        def txt2img(prompt):
            r = client.post("/sdapi/v1/txt2img", json={"prompt": prompt, "steps": 3, "seed": 5, "width": 64,
                                                        "height": 64, "sampler_name": "Euler"})
            assert r.status_code == 200, r.text
            image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            return np.asarray(image, np.int16), r.json()["info"]

        plain, _ = txt2img("a red circle")
        styled, info = txt2img("a red circle <hypernet:style:0.8>")
        assert "a red circle <hypernet:style:0.8>" in info
        assert np.abs(plain - styled).mean() > 1
