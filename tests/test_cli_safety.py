"""`sdonnx generate` never loses finished images (issue 16, items 9 and 13): each batch is saved as it
finishes, Ctrl-C stops cleanly, and an output folder that cannot be written is found before any work."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner
from PIL import Image

from sdonnx.cli import main
from sdonnx.pipeline import Pipeline


def test_ctrl_c_keeps_the_finished_batches(tiny_onnx, tmp_path):
    """Ctrl-C during --batch-count 200 wrote nothing although many images were finished."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sdonnx.cli", "generate", "a cat", "-m", str(tiny_onnx("sd1")),
                             "--batch-count", "200", "--steps", "4", "-W", "64", "-H", "64", "--seed", "7",
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png"))) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no batch was saved while the job ran"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = sorted(out.glob("*.png"))
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"interrupted: {len(saved)} image(s) saved in {out}" in stderr
    assert 2 <= len(saved) < 200 and stdout.split() == [str(p) for p in saved]
    assert [p.name for p in saved] == [f"{i:05}-{7 + i}.png" for i in range(len(saved))]  # seeds run on
    assert not list(out.glob(".*"))  # no half-written file


def test_batches_saved_one_by_one_match_one_generate_call(tiny_onnx, tmp_path):
    model = tiny_onnx("sd1")
    result = CliRunner().invoke(main, ["generate", "a cat", "-m", str(model), "--batch-count", "2", "--batch-size",
                                       "2", "--steps", "3", "-W", "64", "-H", "64", "--seed", "21", "-o",
                                       str(tmp_path)])
    assert result.exit_code == 0, result.output
    direct = Pipeline.load(model, provider="cpu").generate("a cat", steps=3, width=64, height=64, seed=21,
                                                           batch_size=2, batch_count=2)
    paths = result.stdout.split()
    assert [os.path.basename(p) for p in paths] == [f"{i:05}-{21 + i}.png" for i in range(4)]
    for path, image, infotext in zip(paths, direct.images, direct.infotexts):
        with Image.open(path) as saved:
            assert np.array_equal(np.asarray(saved), np.asarray(image)) and saved.info["parameters"] == infotext


def test_unwritable_outdir_is_found_before_generating(tiny_onnx, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    outdir = str(blocker / "out")  # a folder no one can create (permissions do not stop root)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(Pipeline, "load", refuse)
    result = CliRunner().invoke(main, ["generate", "a cat", "-m", str(tiny_onnx("sd1")), "-o", outdir])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write images to {outdir}: "), result.stderr
