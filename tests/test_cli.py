"""The `sdonnx` command end to end: convert, generate, info, providers, and one-line errors."""
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from sdonnx.cli import main
from sdonnx.infotext import parse_infotext


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_convert_then_generate_writes_pngs_with_infotext(tiny_diffusers, tmp_path):
    pytest.importorskip("torch")
    folder, _ = tiny_diffusers("sd1")
    model = tmp_path / "model"
    code, out, err = run("convert", folder, "-o", model)
    assert code == 0, err
    assert "converted" in out and (model / "sdonnx.json").is_file()
    outdir = tmp_path / "images"
    code, out, err = run("generate", "-m", model, "a red circle", "-n", "blurry", "--steps", 3, "--seed", 42,
                         "--sampler", "DPM++ 2M Karras", "-W", 64, "-H", 72, "--batch-size", 2, "-o", outdir)
    assert code == 0, err
    paths = out.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000-42.png", "00001-43.png"]
    image = Image.open(paths[1])
    assert image.size == (64, 72)
    info = parse_infotext(image.info["parameters"])
    assert info["Prompt"] == "a red circle" and info["Negative prompt"] == "blurry"
    assert (info["Steps"], info["Sampler"], info["Schedule type"], info["Seed"]) == ("3", "DPM++ 2M", "Karras", "43")
    assert info["Size"] == "64x72" and info["Model"] == folder.name and info["CFG scale"] == "7"
    # a second run never overwrites: numbering continues
    code, out, _ = run("generate", "-m", model, "a red circle", "--steps", 1, "--seed", 42, "-W", 64, "-H", 64,
                       "-o", outdir)
    assert code == 0 and out.split()[0].endswith("00002-42.png")


def test_info_and_providers(tiny_onnx):
    code, out, _ = run("info", tiny_onnx("sd2"))
    assert code == 0
    assert "family:          sd2" in out and "v_prediction" in out and "clip skip 1..3" in out
    code, out, _ = run("providers")
    assert code == 0 and "cpu" in out and "auto picks: cpu" in out


@pytest.mark.parametrize("args, message", [
    (["generate", "-m", "{missing}", "x"], "does not exist"),
    (["generate", "-m", "{empty}", "x"], "is not an sdonnx model folder"),
    (["generate", "-m", "{model}", "x", "-W", "100"], "width 100 is not a positive multiple of 8"),
    (["generate", "-m", "{model}", "x", "--sampler", "Eulerish"], "Euler a"),
    (["generate", "-m", "{model}", "x", "--scheduler", "Fancy"], "Karras"),
    (["generate", "-m", "{model}", "x", "--provider", "cuda"], "available: cpu"),
    (["generate", "-m", "{model}", "x", "--provider", "tpu"], "choose auto or one of cpu, cuda, dml"),
    (["generate", "-m", "{model}", "x", "--provider", "cpu", "--device", "GPU"], "chooses an OpenVINO device"),
    (["generate", "-m", "{model}", "(" * 400 + "x"], "nest 400 deep"),  # a RecursionError traceback before
    (["generate", "-m", "{model}", "x", "-n", "x" * 20001], "20001 characters long; at most 20000"),
    (["info", "{missing}"], "does not exist"),
    (["convert", "{missing}", "-o", "{out}"], "does not exist"),
])
def test_bad_input_is_one_line_and_nonzero(tiny_onnx, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing.safetensors", "empty": tmp_path / "empty",
             "model": tiny_onnx("sd1"), "out": tmp_path / "out"}
    code, out, err = run(*[a.format(**paths) for a in args])
    assert code != 0
    errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    # one line says what is wrong (progress lines of a convert may come before it)
    assert len(errors) == 1 and err.strip().endswith(errors[0]) and message in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("flags, batches, lowmem", [([], 1, True), ([], 2, False), (["--no-lowmem"], 1, False),
                                                     (["--lowmem"], 2, True)])
def test_generate_frees_finished_stages_for_a_single_batch(tiny_onnx, tmp_path, monkeypatch, flags, batches, lowmem):
    """One batch creates every session once either way, so the CLI frees each stage's session after it
    (peak memory = the largest model); several batches keep them, unless asked."""
    from sdonnx.pipeline import Pipeline

    loaded, released = [], []
    original_load, original_release = Pipeline.load.__func__, Pipeline._release

    def load(cls, *args, **kwargs):
        pipe = original_load(cls, *args, **kwargs)
        loaded.append(pipe)
        return pipe

    def release(self, *names):
        before = {k[0] for k in self._components}
        original_release(self, *names)
        released.extend(before - {k[0] for k in self._components})

    monkeypatch.setattr(Pipeline, "load", classmethod(load))
    monkeypatch.setattr(Pipeline, "_release", release)
    code, out, err = run("generate", "-m", tiny_onnx("sd1"), "a cat", "--steps", 1, "-W", 64, "-H", 64,
                         "--batch-count", batches, "-o", tmp_path, *flags)
    assert code == 0, err
    assert len(out.split()) == batches and [p.lowmem for p in loaded] == [lowmem]
    assert ("unet" in released) == lowmem and ("text_encoder" in released) == lowmem
    assert not lowmem or not loaded[0]._components  # every session freed at the end


def test_import_sdonnx_stays_torch_free():
    code = ("import sys, sdonnx, sdonnx.pipeline, sdonnx.cli, sdonnx.samplers; "
            "bad = [m for m in ('torch', 'transformers', 'diffusers', 'converters', 'onnxruntime') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    # onnxruntime is imported only when a session or provider list is needed
    assert out == "[]"
