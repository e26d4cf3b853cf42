"""The post-processing manifest and finding converted models by kind and name (no torch needed)."""
import json

import pytest

from sdonnx.manifest import MANIFEST_NAME
from sdonnx.postprocess import (ModelNotFound, NotConverted, PostprocessManifest, PostprocessManifestError, find,
                                load_postprocess_manifest, scan)


def _write(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(b"graph")
    data = json.loads(PostprocessManifest(kind="upscaler", name=folder.name, architecture="ESRGAN",
                                          graph="model.onnx", inputs={"image": ["batch", None, "h", "w"]},
                                          outputs={"upscaled": ["batch", None, "H", "W"]}, scale=4,
                                          source={"file": f"{folder.name}.pth"}).to_json())
    data.update(changes)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return folder


def test_round_trip(tmp_path):
    m = load_postprocess_manifest(_write(tmp_path / "4x-UltraSharp"), "upscaler")
    assert (m.kind, m.scale, m.channel_order, m.tiling.default, m.tiling.overlap) == ("upscaler", 4, "RGB", 192, 8)
    assert m.image_input == "image" and m.image_output == "upscaled"


@pytest.mark.parametrize("changes, message", [
    ({"kind": "sharpener"}, "kind 'sharpener': expected one of upscaler, face_restorer"),
    ({"graph": "../../etc/passwd"}, "not a path inside the model folder"),
    ({"scale": 0}, "scale must be a whole number from 1 to 16"),
    ({"channel_order": "GRB"}, "channel_order 'GRB'"),
    ({"value_range": [1, 0]}, "value_range must be"),
    ({"tiling": {"size": -1}}, "tiling.size must be"),
    ({"tiling": {"sizes": 2}}, "unknown field"),
    ({"format": "sdonnx"}, "not a post-processing model manifest"),
    ({"surprise": 1}, "unknown field"),
])
def test_bad_manifests_name_the_field(tmp_path, changes, message):
    with pytest.raises(PostprocessManifestError, match=message):
        load_postprocess_manifest(_write(tmp_path / "m", **changes))


def test_wrong_kind_and_missing_graph(tmp_path):
    folder = _write(tmp_path / "m", kind="face_restorer")
    with pytest.raises(PostprocessManifestError, match="holds a model of kind 'face_restorer', not 'upscaler'"):
        load_postprocess_manifest(folder, "upscaler")
    (folder / "model.onnx").unlink()
    with pytest.raises(ValueError, match="model.onnx named by sdonnx.json is missing"):
        load_postprocess_manifest(folder)


def test_scan_lists_converted_and_unconverted(tmp_path):
    esrgan, realesrgan = tmp_path / "ESRGAN", tmp_path / "RealESRGAN"
    _write(esrgan / "4x-UltraSharp")
    (esrgan / "4x-UltraSharp.pth").write_bytes(b"x")  # converted: the folder is listed, not the file
    (esrgan / "4x_foolhardy.pth").write_bytes(b"x")
    (esrgan / "notes.txt").write_text("x")
    _write(esrgan / "restorer", kind="face_restorer")
    (realesrgan).mkdir()
    (realesrgan / "RealESRGAN_x4plus.pth").write_bytes(b"x")
    found = scan([esrgan, realesrgan, tmp_path / "missing"], "upscaler", naming=str.upper)
    assert [(f.name, f.converted) for f in found] == [
        ("4X-ULTRASHARP", True), ("4X_FOOLHARDY", False), ("REALESRGAN_X4PLUS", False)]
    assert find([esrgan], "upscaler", "4x-UltraSharp").folder == esrgan / "4x-UltraSharp"
    with pytest.raises(NotConverted, match=r"upscaler '4x_foolhardy' .* is not converted yet; convert it once with "
                                           r"`sdonnx convert .*4x_foolhardy.pth\" -o .*4x_foolhardy\"`"):
        find([esrgan], "upscaler", "4x_foolhardy")
    with pytest.raises(ModelNotFound, match="unknown upscaler 'nope'; available: 4x-UltraSharp, 4x_foolhardy"):
        find([esrgan], "upscaler", "nope")


def test_a_damaged_folder_does_not_hide_the_others(tmp_path, caplog):
    _write(tmp_path / "good")
    _write(tmp_path / "bad", scale="four")
    assert [f.name for f in scan([tmp_path], "upscaler")] == ["good"]
    assert "skipping" in caplog.text and "scale" in caplog.text


def test_a_postprocess_folder_given_as_a_diffusion_model_says_what_it_is(tmp_path):
    from sdonnx.manifest import ManifestError, load_manifest

    with pytest.raises(ManifestError, match="a converted upscaler model, not a Stable Diffusion model"):
        load_manifest(_write(tmp_path / "4x-UltraSharp"))
