"""`convert --force` replaces only an empty folder or a converted model (it once replaced a folder of
photos), and the next convert of a name removes the staging folders killed converts left behind."""
import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")

from converters.convert import ConvertError, _running, convert  # noqa: E402
from sdonnx.manifest import MANIFEST_NAME  # noqa: E402


def _photos(folder):
    folder.mkdir()
    for name in ("IMG_0001.jpg", "IMG_0002.jpg", "notes.txt"):
        (folder / name).write_bytes(b"precious " + name.encode())
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(child.stdout)
    assert not _running(pid)
    return pid


def test_force_refuses_a_folder_that_is_not_a_model(tiny_diffusers, tmp_path):
    source, _ = tiny_diffusers("sd1")
    photos = tmp_path / "photos"
    before = _photos(photos)
    with pytest.raises(ConvertError, match="is not empty and is not an sdonnx model .*never other files"):
        convert(source, photos, force=True)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    # a manifest among other files does not make them a model either
    (photos / MANIFEST_NAME).write_text(json.dumps({"format": "sdonnx", "components": {"unet": {"path": "unet/model.onnx"}}}))
    with pytest.raises(ConvertError, match=r"holds files that are not part of a converted model \(IMG_0001.jpg, "
                                           r"IMG_0002.jpg, notes.txt\)"):
        convert(source, photos, force=True)
    assert (photos / "IMG_0001.jpg").read_bytes() == before["IMG_0001.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging folder was even made


def test_cli_force_on_photos_is_a_one_line_error(tiny_diffusers, tmp_path):
    from sdonnx.cli import main

    source, _ = tiny_diffusers("sd1")
    photos = tmp_path / "photos"
    before = _photos(photos)
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(photos), "--force"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: output folder '{photos}' is not empty and is "
                                                             f"not an sdonnx model")
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_force_replaces_a_model_and_leftovers_of_killed_converts_go(tiny_diffusers, tiny_onnx, tmp_path):
    source, _ = tiny_diffusers("sd1")
    out = tmp_path / "model"
    shutil.copytree(tiny_onnx("sd2"), out)  # a converted model (another family) ...
    (out / ".DS_Store").write_bytes(b"")  # ... that a file browser has visited
    with pytest.raises(ConvertError, match="holds a converted model; pass --force to replace it"):
        convert(source, out)
    dead = _dead_pid()
    stale = [tmp_path / f".model.partial-{dead}-k1ll3d", tmp_path / ".model.partial-0ldst7le", tmp_path / f".model.old-{dead}"]
    kept = [tmp_path / f".model.partial-{__import__('os').getpid()}-running", tmp_path / f".other.partial-{dead}-x",
            tmp_path / f".model.v2.partial-{dead}-y"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "unet").mkdir()
    convert(source, out, force=True)
    assert json.loads((out / MANIFEST_NAME).read_text())["family"] == "sd1"
    assert not (out / ".DS_Store").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", *(p.name for p in kept)])


def test_running_tells_live_from_dead_processes():
    import os

    assert _running(os.getpid()) and _running(1)
    assert not _running(_dead_pid())
