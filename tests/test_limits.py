"""sdonnx/limits.py: one set of limits, enforced by the Pipeline before anything is allocated, and the
memory errors that still happen turned into one-line errors naming what to reduce (issue 16, items 3 and 5)."""
import math
import resource
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdonnx import limits
from sdonnx.img2img import outpaint_canvas
from sdonnx.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return Pipeline.load(tiny_onnx("sd1"), provider="cpu")


@pytest.fixture
def nothing_runs(pipe, monkeypatch):
    """Creating any session (the first thing that allocates model memory) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a session was created before the request was checked")

    monkeypatch.setattr(pipe, "_component", refuse)
    return pipe


@pytest.mark.parametrize("args, words", [
    (dict(width=100000), "width 100000"),  # was: a MemoryError traceback
    (dict(width=8192, height=8192), "2048"),  # was: an ONNX Runtime arena failure
    (dict(steps=10**6), "steps"),  # 10**9 was a MemoryError building the schedule
    (dict(batch_size=65), "batch_size"),
    (dict(batch_count=1001), "batch_count"),
    (dict(width=1024, height=1024, batch_size=8), "batch size"),  # 8 Mpx in one UNet batch
    (dict(width=512, height=512, batch_size=16, batch_count=100), "batch count"),  # 419 Mpx held at once
    (dict(width=1024, height=1024, hires=True, hires_scale=4), "hires fix target width 4096"),
    (dict(hires=True, hires_width=4096), "hires_width"),
    (dict(seed_resize_from_w=100000, seed_resize_from_h=100000), "seed_resize_from_w"),  # was 20.8 GB
    (dict(mask_blur=10**6), "mask_blur"),
    (dict(init_image=Image.new("RGB", (4096, 64))), "image width 4096"),  # size taken from the init image
])
def test_limits_hold_before_any_session(nothing_runs, args, words):
    with pytest.raises(limits.LimitError, match=words):
        nothing_runs.generate("x", **{"steps": 2, **args})


@pytest.mark.parametrize("args, name", [
    (dict(cfg_scale=math.nan), "cfg_scale"),
    (dict(cfg_scale=math.inf), "cfg_scale"),
    (dict(strength=math.nan, init_image=Image.new("RGB", (64, 64))), "strength"),
    (dict(subseed_strength=math.nan), "subseed_strength"),
    (dict(sigma_min=math.nan), "sigma_min"),
    (dict(hires=True, hires_scale=math.nan), "hires_scale"),
    (dict(hires=True, hires_denoising=math.inf), "hires_denoising"),
    (dict(refiner_switch_at=math.nan), "refiner_switch_at"),
    (dict(aesthetic_score=np.float32("nan")), "aesthetic_score"),
    (dict(crop_top_left=(0, math.nan)), "crop_top_left"),
    (dict(sampler="Euler a", eta=math.nan), "eta"),
    (dict(sampler="Euler", s_noise=-math.inf), "s_noise"),
    (dict(sampler="Euler", s_tmax=math.nan), "s_tmax"),
])
def test_nan_and_infinity_are_refused(nothing_runs, args, name):
    """NaN passes every range check (nan < 0 is False) and comes out as a black or NaN image."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        nothing_runs.generate("x", steps=2, **args)


@pytest.mark.parametrize("prompt, words", [
    ("<lora:detail:nan>", "finite"),
    ("<lora:detail:1:inf>", "finite"),
    ("<hypernet:detail:inf>", "multiplier 'inf' is not a number"),
    ("(cat:" + "9" * 400 + ")", "emphasis weight"),  # float("9" * 400) is inf
    ("cat AND dog :" + "9" * 400, "AND weight"),
])
def test_prompt_weights_must_be_finite(pipe, prompt, words):
    with pytest.raises(ValueError, match=words):
        pipe.generate(prompt, steps=1)


def test_s_tmax_infinity_still_means_no_bound(pipe):
    result = pipe.generate("x", steps=2, sampler="Euler", s_tmax=math.inf, seed=1)
    assert len(result.images) == 1


@pytest.mark.parametrize("prompt, words", [
    ("cat BREAK " * (limits.MAX_PROMPT_CHUNKS + 1), f"{limits.MAX_PROMPT_CHUNKS} chunks"),
    (" AND ".join(["cat"] * (limits.MAX_PROMPT_PARTS + 1)), "AND parts"),
])
def test_prompt_chunks_and_parts_are_limited(pipe, prompt, words):
    calls = []
    encoder = pipe._component("text_encoder")
    original = encoder.__class__.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(encoder.__class__, "__call__", counting)
        with pytest.raises(limits.LimitError, match=words):
            pipe.generate(prompt, steps=1)
    assert calls == []  # refused while tokenizing, before the text encoder ran on any chunk


def test_outpaint_margins_are_limited():
    image = Image.new("RGB", (64, 64))
    with pytest.raises(limits.LimitError, match="outpaint left margin 100000"):
        outpaint_canvas(image, 100000, 0, 0, 0)
    with pytest.raises(limits.LimitError, match="outpaint canvas width 2112"):
        outpaint_canvas(image, 1024, 1024, 0, 0)
    with pytest.raises(limits.LimitError, match="outpaint left margin"):
        outpaint_canvas(image, -8, 0, 0, 0)
    canvas, mask = outpaint_canvas(image, 8, 0, 0, 8)
    assert canvas.size == mask.size == (72, 72)


def _address_space(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_out_of_memory_is_one_line_naming_what_to_reduce(tiny_onnx, tmp_path):
    """Inside the limits, a model can still need more than the machine has (the test model's exported
    attention at 2048x2048 asks ONNX Runtime for a 256 GiB score matrix). The address space is capped
    so no machine can grant it."""
    model = tiny_onnx("sd1")
    proc = subprocess.run([sys.executable, "-m", "sdonnx.cli", "generate", "x", "-m", str(model), "-W", "2048",
                           "-H", "2048", "--steps", "1", "-o", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_address_space(16 << 30))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: out of memory in unet (sample [2, 4, 256, 256]")
    assert "reduce the width/height" in last and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_in_python_is_a_memory_error(pipe):
    code = ("import sys; from sdonnx.pipeline import Pipeline; from sdonnx.limits import OutOfMemory\n"
            "try:\n    Pipeline.load(sys.argv[1], provider='cpu').generate('x', steps=1, width=2048, height=2048)\n"
            "except OutOfMemory as e:\n    print('caught', isinstance(e, MemoryError), e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(pipe.folder)], capture_output=True, text=True,
                          timeout=300, preexec_fn=_address_space(16 << 30))
    assert proc.stdout.startswith("caught True out of memory in unet"), proc.stderr


def test_allocation_failures_are_recognised():
    assert limits.is_allocation_failure(MemoryError())
    ort = ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
           "Status Message: bfc_arena.cc:360 Failed to allocate memory for requested buffer of size 68719476736")
    assert limits.is_allocation_failure(RuntimeError(ort))
    assert "64.0 GiB" in str(limits.out_of_memory("unet", RuntimeError(ort)))
    assert not limits.is_allocation_failure(RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad rank"))
