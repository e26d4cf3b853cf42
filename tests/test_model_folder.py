"""Corrupt and hostile model folders: a manifest with wrong types or values, files missing, truncated or
garbage. Each is a clear error naming the file (and the field), in the Python API, the CLI and the
server; one bad folder among the models never stops `serve` from starting."""
import json
import logging
import shutil

import pytest
from click.testing import CliRunner

from sdonnx.manifest import MANIFEST_NAME, ManifestError, ModelFileError, load_manifest


@pytest.fixture
def model(tiny_onnx, tmp_path):
    """A fresh copy of the tiny SD 1.x model, for one test to damage."""
    return _copy(tiny_onnx("sd1"), tmp_path / "model")


def _copy(source, folder):
    shutil.copytree(source, folder)
    return folder


def _edit(folder, change):
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)  # in place
    path.write_text(json.dumps(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


MANIFESTS = {  # change to the manifest -> what the error says
    "scale factor 0": (lambda d: d.update(vae_scale_factor=0), "vae_scale_factor must be a whole number from 1 to 64, got 0"),
    "no text encoders": (lambda d: d.update(text_encoders=[]), "text_encoders is empty"),
    "graph outside the folder": (lambda d: d["components"]["unet"].update(path="../../etc/passwd"),
                                 "components.unet.path '../../etc/passwd' is not a path inside the model folder"),
    "absolute tokenizer": (lambda d: d["text_encoders"][0].update(tokenizer="/etc/passwd"),
                           "text_encoders\\[0\\].tokenizer '/etc/passwd' is not a path inside"),
    "size as a string": (lambda d: d.update(sample_size="64"), "sample_size must be a whole number from 1 to 1024, got a string"),
    "boolean channels": (lambda d: d.update(latent_channels=True), "latent_channels must be a whole number"),
    "negative scaling": (lambda d: d.update(vae_scaling_factor=-1), "vae_scaling_factor must be above 0.0, got -1"),
    "a billion timesteps": (lambda d: d["noise_schedule"].update(num_train_timesteps=10**9),
                            "noise_schedule.num_train_timesteps must be a whole number from 1 to 10000"),
    "beta above 1": (lambda d: d["noise_schedule"].update(beta_end=2), "noise_schedule.beta_end must be above 0.0 and below 1.0, got 2"),
    "components a list": (lambda d: d.update(components=[]), "components must be an object, got a list"),
    "encoder a string": (lambda d: d.update(text_encoders=["clip"]), "text_encoders\\[0\\] must be an object, got a string"),
    "dims not a list": (lambda d: d["components"]["unet"]["inputs"].update(sample=5), "components.unet: the dimensions of sample must be"),
    "unknown field": (lambda d: d.update(surprise=1), "the manifest has unknown field\\(s\\) surprise"),
    "component lacks its path": (lambda d: d["components"]["unet"].pop("path"), "components.unet lacks the field\\(s\\) path"),
    "no unet": (lambda d: d["components"].pop("unet"), "manifest lacks the component\\(s\\) unet"),
}


@pytest.mark.parametrize("name", MANIFESTS)
def test_bad_manifest_is_an_error_naming_the_file_and_field(model, name):
    change, message = MANIFESTS[name]
    _edit(model, change)
    with pytest.raises(ManifestError, match=f"^{model / MANIFEST_NAME}: {message}"):
        load_manifest(model)


def test_manifest_that_is_not_a_json_object(model):
    path = model / MANIFEST_NAME
    path.write_text("[1, 2]")  # stopped `serve` from starting (AttributeError)
    with pytest.raises(ManifestError, match=f"^{path}: the manifest must be a JSON object, got a list$"):
        load_manifest(model)
    for text in ("{", "[" * 100_000 + "]" * 100_000, "\xff\xfe"):  # broken, too deep (RecursionError), not UTF-8
        path.write_bytes(text.encode("latin-1"))
        with pytest.raises(ManifestError, match=f"cannot read {path}"):
            load_manifest(model)


FILES = {  # damage -> (error message, pattern)
    "graph missing": (lambda m: (m / "unet" / "model.onnx").unlink(), "unet/model.onnx named by sdonnx.json is missing"),
    "tokenizer missing": (lambda m: (m / "tokenizer" / "tokenizer.json").unlink(),
                          "tokenizer/tokenizer.json named by sdonnx.json is missing"),
    "graph truncated": (lambda m: _truncate(m / "unet" / "model.onnx"),
                        "the graph {m}/unet/model.onnx or its data file is missing or damaged \\(.*Protobuf parsing failed"),
    "graph garbage": (lambda m: (m / "vae_decoder" / "model.onnx").write_bytes(b"not a graph" * 20),
                      "the graph {m}/vae_decoder/model.onnx or its data file is missing or damaged"),
    "data truncated": (lambda m: _truncate(m / "unet" / "model.onnx.data"),
                       "the graph {m}/unet/model.onnx or its data file is missing or damaged \\(.*out of bounds"),
    "data missing": (lambda m: (m / "unet" / "model.onnx.data").unlink(),
                     "the graph {m}/unet/model.onnx or its data file is missing or damaged \\(.*does not exist"),
    "tokenizer truncated": (lambda m: _truncate(m / "tokenizer" / "tokenizer.json"),
                            "tokenizer {m}/tokenizer/tokenizer.json cannot be read"),
    "embeddings truncated": (lambda m: _truncate(m / "text_encoder" / "token_embeddings.safetensors"),
                             "token embeddings {m}/text_encoder/token_embeddings.safetensors cannot be read"),
}


@pytest.mark.parametrize("name", FILES)
def test_missing_or_damaged_files_are_errors_naming_them(model, name):
    from sdonnx.pipeline import Pipeline

    damage, message = FILES[name]
    damage(model)
    with pytest.raises(ModelFileError, match=message.format(m=model)) as e:
        Pipeline.load(model, provider="cpu").generate("x", steps=1, width=64, height=64)
    assert "convert the model again" in str(e.value)


def _cli(*args):
    from sdonnx.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stderr


def test_cli_says_which_file_is_bad_in_one_line(model, tmp_path):
    bad_manifest = _copy(model, tmp_path / "listed")
    (bad_manifest / MANIFEST_NAME).write_text("[]")
    _truncate(model / "unet" / "model.onnx.data")
    for args, message in ((["info", bad_manifest], f"{bad_manifest / MANIFEST_NAME}: the manifest must be a JSON object"),
                          (["generate", "-m", model, "x", "--steps", 1, "-W", 64, "-H", 64, "-o", tmp_path / "out"],
                           f"the graph {model}/unet/model.onnx or its data file is missing or damaged")):
        code, err = _cli(*args)
        assert code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith(f"error: {message}"), err


def test_serve_starts_with_bad_folders_among_the_models(tiny_onnx, tmp_path, caplog):
    """A folder whose manifest is a JSON list stopped `serve` (AttributeError); now each bad folder is
    skipped with a warning naming it, and a model whose graph is damaged answers with the file's name."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sdonnx.server import create_app

    root = tmp_path / "models"
    good, damaged = _copy(tiny_onnx("sd1"), root / "good"), _copy(tiny_onnx("sd1"), root / "damaged")
    _truncate(damaged / "unet" / "model.onnx")
    bad = {name: _copy(good, root / name) for name in ("a-list", "scale-0", "outside", "no-graph")}
    (bad["a-list"] / MANIFEST_NAME).write_text("[1, 2, 3]")
    _edit(bad["scale-0"], lambda d: d.update(vae_scale_factor=0))
    _edit(bad["outside"], lambda d: d["components"]["unet"].update(path="/etc/passwd"))
    (bad["no-graph"] / "unet" / "model.onnx").unlink()
    with caplog.at_level(logging.WARNING):
        app = create_app(root, provider="cpu")
    for folder in bad.values():
        assert any(str(folder) in r.getMessage() for r in caplog.records), folder
    with TestClient(app) as client:
        names = sorted(m["model_name"] for m in client.get("/sdapi/v1/sd-models").json())
        assert names == ["damaged", "good"]
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                   "override_settings": {"sd_model_checkpoint": "damaged"}})
        assert r.status_code == 422 and f"the graph {damaged}/unet/model.onnx" in r.json()["detail"], r.text
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                   "override_settings": {"sd_model_checkpoint": "good"}})
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text
